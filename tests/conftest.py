"""Shared fixtures: nnU-Net folders in a temporary directory and preprocessed phantom datasets.

nnU-Net 2.8 reads its folder variables from the environment at call time, so setting os.environ here
serves in-process calls and the subprocesses the tests start alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# nnU-Net reads nnUNet_def_n_proc once, when nnunetv2.configuration is first imported (test modules import it
# while they are collected, before any fixture runs): one worker for its helper pools and for the -np default of
# our commands (see one_worker_for_nnunet_helpers)
os.environ.setdefault("nnUNet_def_n_proc", "1")

from nnunet_synth.phantom import PhantomConfig, write_phantom_dataset  # noqa: E402

TINY = PhantomConfig(shape=(24, 40, 40), spacing=(3.0, 1.5, 1.5), tumour_radii_mm=(4.0, 6.0, 8.0))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BRATS_DIR = Path(os.environ.get("NNUNET_SYNTH_BRATS_DIR", SHARED_DATA / "brats2013_sample"))
# set (to 1) where the shared data must be present (CI, see .ci/run): tests that need it fail instead of skipping
REQUIRE_SHARED_DATA = "NNUNET_SYNTH_REQUIRE_SHARED_DATA"


def shared_data_or_skip(folder: Path, what: str, hint: str = "") -> None:
    """Skips the calling test (or module fixture) where ``folder`` is absent, saying why; fails it instead where
    :data:`REQUIRE_SHARED_DATA` is set, so a CI run never passes with the real-data tests silently skipped."""
    if folder.is_dir():
        return
    message = f"{what} not found at {folder}{f' ({hint})' if hint else ''}"
    if os.environ.get(REQUIRE_SHARED_DATA, "") not in ("", "0"):
        pytest.fail(f"{message}; {REQUIRE_SHARED_DATA} is set: this run must have it", pytrace=False)
    pytest.skip(message)


def ext_trainer_dir() -> str:
    """What the README tells users: export nnUNet_extTrainer=$(python -m nnunet_synth.ext_path)."""
    return subprocess.run([sys.executable, "-m", "nnunet_synth.ext_path"], check=True, capture_output=True,
                          encoding="utf-8", errors="replace").stdout.strip()


def run(command: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs a command, failing the test with its output when it fails."""
    result = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)
    if result.returncode:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


# the debug schedule without nnU-Net's final validation (about 20 s of spawned export and metric workers per
# training on two cores), for trainings whose tests do not read the validation folder
NO_FINAL_VALIDATION = {"NNUNET_SYNTH_SCHEDULE": "1,2,1,skip"}


def train_as_the_readme_says(dataset: int, configuration: str, trainer: str, **env_overrides: str) -> Path:
    """``nnUNetv2_train DATASET CONFIGURATION 0 -tr TRAINER`` on CPU with only the README's ``nnUNet_extTrainer``
    line (and a single-threaded loader); returns the fold folder after checking its final checkpoint."""
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update(nnUNet_extTrainer=ext_trainer_dir(), nnUNet_n_proc_DA="0", **env_overrides)
    run(["nnUNetv2_train", str(dataset), configuration, "0", "-tr", trainer, "-device", "cpu"], env=env)
    fold = next(Path(os.environ["nnUNet_results"]).glob(f"Dataset{dataset}_*")) / \
        f"{trainer}__nnUNetPlans__{configuration}" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    return fold


def training_log(fold: Path) -> str:
    """nnU-Net's training log(s) of a fold folder."""
    return "".join(p.read_text(encoding="utf-8") for p in fold.glob("training_log_*.txt"))


def plan_and_preprocess(dataset_id: int, configuration: str = "3d_fullres", verify: bool = True) -> None:
    # planning must run without nnUNet_n_proc_DA=0 (nnU-Net 2.8.1 calls torch.set_num_threads(0) otherwise)
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
    # two fingerprint workers instead of nnU-Net's eight: same result, half the time on two cores
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "2", "-npfp", "2",
         *(["--verify_dataset_integrity"] if verify else [])], env=env)


def ct_phantom_2d(dataset_id: int, seed: int) -> int:
    """A CT phantom (organ 1, tumour 2; 5 training cases) written and preprocessed for the 2d configuration."""
    write_phantom_dataset(dataset_id, num_train=5, num_test=0, modality="CT", seed=seed, config=TINY)
    plan_and_preprocess(dataset_id, "2d", verify=False)
    return dataset_id


@pytest.fixture(scope="session", autouse=True)
def one_worker_for_nnunet_helpers():
    """nnU-Net's final validation starts nnUNet_def_n_proc (8) workers twice; on two cores one is faster."""
    os.environ.setdefault("nnUNet_def_n_proc", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for tests of tiny generator models: on a shared 2-core machine, OpenMP barriers
    of two threads make tiny convolutions an order of magnitude slower whenever another process holds a core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def nnunet_dirs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nnunet")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir()
        os.environ[name] = str(root / name)
    return root


@pytest.fixture(scope="session")
def phantom_ct(nnunet_dirs) -> int:
    """Preprocessed CT phantom with tumours (ID 901)."""
    write_phantom_dataset(901, num_train=6, num_test=2, modality="CT", seed=1, config=TINY)
    plan_and_preprocess(901)
    return 901


@pytest.fixture(scope="session")
def phantom_healthy(nnunet_dirs) -> int:
    """Preprocessed CT phantom whose training cases have no tumours (ID 902): the label-free setting."""
    write_phantom_dataset(902, num_train=6, num_test=0, modality="CT", healthy=True, seed=2, config=TINY)
    plan_and_preprocess(902)
    return 902


@pytest.fixture(scope="session")
def phantom_mri(nnunet_dirs) -> int:
    """Preprocessed two-channel MRI phantom with tumours (ID 903)."""
    write_phantom_dataset(903, num_train=5, num_test=0, modality="MRI", seed=3, config=TINY)
    plan_and_preprocess(903)
    return 903


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    """Private nnU-Net folders in tmp_path, set through the environment (worker processes inherit them), so a
    conversion's output and a refusal's leftovers can be checked; returns nnUNet_raw."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    return tmp_path / "nnUNet_raw"


def cpu_trainer(cls, dataset: int, fold: int = 0, configuration: str = "3d_fullres"):
    """An initialised trainer of ``cls`` on the CPU (nnU-Net's plans of ``dataset``, no checkpoint to continue)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_synth.planning import preprocessed_dir

    base = preprocessed_dir(dataset)
    plans = load_json(base / "nnUNetPlans.json")
    plans["continue_training"] = False
    trainer = cls(plans, configuration, fold, load_json(base / "dataset.json"), torch.device("cpu"))
    trainer.initialize()
    return trainer
