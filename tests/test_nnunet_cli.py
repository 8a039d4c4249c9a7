"""The real nnU-Net commands end to end with a Synth trainer: discovery through nnUNet_extTrainer as the
README sets it, training on a dataset brought in by nnUNetv2_synth_convert, prediction, export to plain nnU-Net
(predicting where the plugin cannot be imported), and the demo command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from .conftest import ext_trainer_dir, plan_and_preprocess, run

pytestmark = pytest.mark.slow
TRAINER = "nnUNetTrainerSynth20_Debug"
CONVERTED = 904


@pytest.fixture(scope="module")
def converted_ct(phantom_ct) -> int:
    """The CT phantom brought in as a user's own folder of NIfTIs by ``nnUNetv2_synth_convert generic`` (whose
    dataset.json names the converter, and nnU-Net copies dataset.json into every checkpoint), then planned."""
    source = next(Path(os.environ["nnUNet_raw"]).glob(f"Dataset{phantom_ct}_*"))
    run(["nnUNetv2_synth_convert", "generic", "-i", str(source), "-d", str(CONVERTED), "--name", "ConvertedCT",
         "--image-pattern", "imagesTr/{case}_0000.nii.gz", "--label-pattern", "labelsTr/{case}.nii.gz",
         "--channel-names", "CT", "--labels", "background=0", "organ=1", "tumour=2", "--quiet"])
    plan_and_preprocess(CONVERTED)
    return CONVERTED


def _without_plugin(tmp_path: Path, **extra) -> dict:
    """The environment of a plain nnU-Net install: no nnUNet_extTrainer, and ``import nnunet_synth`` fails (a
    package of that name that raises ImportError comes first on the path)."""
    blocker = tmp_path / "no_plugin" / "nnunet_synth"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text('raise ImportError("nnunet_synth is not installed here")\n', encoding="utf-8")
    env = _env(PYTHONPATH=os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")])),
               **extra)
    probe = subprocess.run([sys.executable, "-c", "import nnunet_synth"], env=env, capture_output=True, text=True,
                           cwd=tmp_path)  # not the repository, whose nnunet_synth folder python -c would find
    assert probe.returncode != 0 and "not installed here" in probe.stderr, "the plugin is still importable"
    return env


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update(extra)
    return env


def _predict(dataset: int, images: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["nnUNetv2_predict", "-d", str(dataset), "-c", "3d_fullres", "-f", "0", "-tr", TRAINER,
                           "-i", str(images), "-o", str(out), "-device", "cpu", "--disable_tta", "-npp", "1",
                           "-nps", "1"], env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=900,
                          cwd=out.parent)


def _read(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def test_trainer_is_found_only_through_nnunet_exttrainer(phantom_ct):
    result = subprocess.run(["nnUNetv2_train", str(phantom_ct), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"],
                            env=_env(), capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode != 0 and "Could not find requested nnunet trainer" in result.stderr + result.stdout


def test_train_predict_and_export_for_plain_nnunet(phantom_ct, converted_ct, tmp_path):
    env = _env(nnUNet_extTrainer=ext_trainer_dir())
    run(["nnUNetv2_train", str(converted_ct), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"],
        env=dict(env, nnUNet_n_proc_DA="0"))
    results = Path(os.environ["nnUNet_results"])
    model = next(results.glob(f"Dataset{converted_ct}_*")) / f"{TRAINER}__nnUNetPlans__3d_fullres"
    fold = model / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert json.loads((fold / "nnUNetSynthPlans.json").read_text(encoding="utf-8"))["backend"] == "analytic"
    stats = json.loads((fold / "synth_stats.json").read_text(encoding="utf-8"))
    # the samples the training steps consumed (2 iterations), not the batch the loader drew at start
    plans = json.loads((fold.parent / "plans.json").read_text(encoding="utf-8"))
    batch_size = plans["configurations"]["3d_fullres"]["batch_size"]
    assert len(stats) == 1 and stats[0]["seen"] == 2 * batch_size, stats
    log = "".join(p.read_text(encoding="utf-8") for p in fold.glob("training_log_*.txt"))
    assert "synthetic tumours this epoch" in log and "synth plan of" in log
    # validation is nnU-Net's own, on the real validation cases of the split only
    splits_file = Path(os.environ["nnUNet_preprocessed"]) / model.parent.name / "splits_final.json"
    split = json.loads(splits_file.read_text(encoding="utf-8"))
    summary = json.loads((fold / "validation" / "summary.json").read_text(encoding="utf-8"))
    validated = {Path(c["reference_file"]).name.removesuffix(".nii.gz") for c in summary["metric_per_case"]}
    assert validated == set(split[0]["val"])

    raw = next(Path(os.environ["nnUNet_raw"]).glob(f"Dataset{phantom_ct}_*"))  # the phantom's held-out cases
    synth_pred = tmp_path / "pred_synth"
    assert _predict(converted_ct, raw / "imagesTs", synth_pred, env).returncode == 0
    assert sorted(_read(synth_pred)) == sorted(p.name for p in (raw / "labelsTs").glob("*.nii.gz"))

    # a plain install cannot use the Synth checkpoint as it is ...
    plain_fail = _predict(converted_ct, raw / "imagesTs", tmp_path / "fail", _without_plugin(tmp_path))
    assert plain_fail.returncode != 0 and "Could not find requested nnunet trainer" in plain_fail.stderr

    # ... but can after export (the converter's name in the checkpoint's dataset.json is data, not an import),
    # with the same predictions, in a process where nnunet_synth cannot be imported
    exported = tmp_path / "exported_results"
    run(["nnUNetv2_synth_export", "-d", str(converted_ct), "-c", "3d_fullres", "-tr", TRAINER, "-o",
         str(exported)], env=env)
    checkpoint = torch.load(exported / model.parent.name / model.name / "fold_0" / "checkpoint_final.pth",
                            map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["dataset_json"]["converted_by"].startswith("nnunet_synth.dataset_conversion")
    plain_pred = tmp_path / "pred_plain"
    result = _predict(converted_ct, raw / "imagesTs", plain_pred,
                      _without_plugin(tmp_path, nnUNet_results=str(exported)))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _read(synth_pred), _read(plain_pred)
    assert all(np.array_equal(a[k], b[k]) for k in a)

    # the zip installs with nnU-Net's own installer; an existing zip is replaced only with --overwrite
    archive = tmp_path / "model.zip"
    archive.write_bytes(b"someone else's file")
    refused = subprocess.run(["nnUNetv2_synth_export", "-d", str(converted_ct), "-tr", TRAINER, "-o", str(archive)],
                             env=env, capture_output=True, encoding="utf-8", errors="replace")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"nnUNetv2_synth_export: error: {archive} exists; pass --overwrite to replace it, or export elsewhere"]
    assert archive.read_bytes() == b"someone else's file"
    run(["nnUNetv2_synth_export", "-d", str(converted_ct), "-tr", TRAINER, "-o", str(archive), "--overwrite"],
        env=env)
    installed = tmp_path / "installed_results"
    installed.mkdir()
    run(["nnUNetv2_install_pretrained_model_from_zip", str(archive)], env=_env(nnUNet_results=str(installed)))
    assert (installed / model.parent.name / model.name / "fold_0" / "checkpoint_final.pth").is_file()


def test_export_of_missing_training_is_a_clear_error(phantom_ct, tmp_path):
    result = subprocess.run(["nnUNetv2_synth_export", "-d", str(phantom_ct), "-tr", "nnUNetTrainerSynth50",
                             "-o", str(tmp_path / "x")], capture_output=True, encoding="utf-8", errors="replace")
    assert result.returncode != 0 and "no trained model in" in result.stderr
    assert not (tmp_path / "x").exists()


def test_demo_command_runs_the_pipeline(nnunet_dirs, tmp_path):
    out = tmp_path / "demo"
    result = run(["nnUNetv2_synth_demo", "-o", str(out), "-tr", TRAINER, "--num-train", "5", "--num-test", "1"],
                 env=_env())
    assert "Dice on held-out phantoms" in result.stdout and "Where everything went" in result.stdout
    assert len(list((out / "predictions").glob("*.nii.gz"))) == 1
    previews = sorted((out / "previews").glob("*.png"))
    assert len(previews) == 4
    import matplotlib.image

    assert matplotlib.image.imread(previews[0]).shape[2] in (3, 4)
