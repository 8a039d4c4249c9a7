"""The DDPM backend end to end on the CT phantom with the tiny preset: generator training (loss falls,
resume, held-out validation, fold hygiene), checkpoint checks, the bank (changes only inside the lesion,
reproducible, parts, raw export) and the bank-mixing trainers (ratio, validation purity, missing bank)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_synth.bank import bank_identifiers, generate_bank, is_bank_identifier, parse_bank_identifier
from nnunet_synth.bank import main as generate_main
from nnunet_synth.generator_training import main as train_main
from nnunet_synth.generators import get_backend
from nnunet_synth.generators.checkpoints import GeneratorCheckpointError
from nnunet_synth.generators.ddpm.model import PRESETS, build_model, build_sampling_scheduler, get_preset
from nnunet_synth.generators.ddpm.sampling import inpaint, masked_noisy_sample
from nnunet_synth.generators.paths import bank_dir, generator_output_dir
from nnunet_synth.generators.splits import split_cases
from nnunet_synth.injection import SynthTumourTransform
from nnunet_synth.planning import load_synth_plan, preprocessed_dir
from nnunet_synth.synth_plan import SynthPlan
from nnunet_synth.trainers import nnUNetTrainerSynth20DDPM, nnUNetTrainerSynth60DDPM, nnUNetTrainerSynthBank

from .conftest import cpu_trainer as _trainer
from .conftest import run, train_as_the_readme_says, training_log

TUMOUR = 2
ITERATIONS = 24
BANK_CASES = 4
SAMPLING_STEPS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def generator(phantom_ct, one_torch_thread) -> Path:
    """A tiny DDPM trained for a few dozen iterations on fold 0 of the CT phantom."""
    train_main(["-d", str(phantom_ct), "-g", "ddpm", "--preset", "tiny", "--iterations", str(ITERATIONS),
                "-device", "cpu"])
    return generator_output_dir(phantom_ct, "ddpm", "3d_fullres", 0)


@pytest.fixture(scope="module")
def bank(phantom_ct, generator, tmp_path_factory) -> tuple[Path, Path]:
    """Four bank cases of fold 0 (and their raw export)."""
    raw = tmp_path_factory.mktemp("bank_raw")
    written = generate_bank(phantom_ct, "ddpm", BANK_CASES, sampling_steps=SAMPLING_STEPS, device="cpu",
                            export_raw_dir=raw, progress=False)
    assert len(written) == BANK_CASES
    return bank_dir(phantom_ct, "ddpm", "3d_fullres"), raw




def test_presets_build_and_paper_preset_matches_table_1():
    paper = get_preset("paper")
    assert paper.channels == (128, 256, 512, 1024) and paper.attention_levels == (False, False, False, True)
    assert paper.num_res_blocks == 3 and paper.patch_size == (64, 96, 128)
    assert paper.learning_rate == 5e-5 and paper.weight_decay == 1e-5
    assert {"paper", "small", "tiny"} <= set(PRESETS)
    with pytest.raises(KeyError, match="available: paper"):
        get_preset("huge")
    model = build_model(get_preset("tiny"), num_channels=2)
    out = model(torch.zeros(1, 3, *get_preset("tiny").patch_size), timesteps=torch.tensor([5]))
    assert out.shape == (1, 2, *get_preset("tiny").patch_size)


def test_masked_forward_process_and_inpainting_keep_the_known_region():
    torch.manual_seed(0)
    scheduler = build_sampling_scheduler(4)
    x0 = torch.randn(2, 1, 8, 16, 16)
    mask = torch.zeros(2, 1, 8, 16, 16)
    mask[:, :, 2:6, 4:12, 4:12] = 1
    xt = masked_noisy_sample(scheduler, x0, mask, torch.randn_like(x0), torch.tensor([999, 500]))
    assert torch.equal(xt[mask.expand_as(x0) == 0], x0[mask.expand_as(x0) == 0])
    assert not torch.allclose(xt[mask.expand_as(x0) == 1], x0[mask.expand_as(x0) == 1])
    model = build_model(get_preset("tiny"), 1).eval()
    out = inpaint(model, scheduler, x0, mask, torch.Generator().manual_seed(1))
    assert torch.equal(out[mask.expand_as(x0) == 0], x0[mask.expand_as(x0) == 0])
    again = inpaint(model, scheduler, x0, mask, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_training_loss_falls_and_outputs_are_written(phantom_ct, generator):
    log = json.loads((generator / "training_log.json").read_text(encoding="utf-8"))
    losses = np.asarray(log["train_loss"])
    assert len(losses) == ITERATIONS
    first, last = losses[:8].mean(), losses[-8:].mean()
    assert last < 0.7 * first, (first, last)
    assert [h["iteration"] for h in log["history"]] == [10, 20, ITERATIONS]
    for name in ("checkpoint_best.pth", "checkpoint_final.pth", "checkpoint_latest.pth", "progress.png",
                 "training_log.txt"):
        assert (generator / name).is_file(), name
    assert "validation loss" in (generator / "training_log.txt").read_text(encoding="utf-8")
    # the generator only saw training cases of the segmenter's fold, and held some out for its own validation
    train, val, _ = split_cases(phantom_ct, "3d_fullres", 0)
    config = log["config"]
    assert set(config["train_cases"]) | set(config["val_cases"]) <= set(train)
    assert not set(config["train_cases"]) & set(config["val_cases"])
    assert not (set(config["train_cases"]) | set(config["val_cases"])) & set(val)
    plan = load_synth_plan(phantom_ct, "3d_fullres")
    assert tuple(config["spacing"]) == plan.spacing and config["normalization_schemes"] == ["CTNormalization"]
    best = torch.load(generator / "checkpoint_best.pth", weights_only=False)
    assert best["best_val_loss"] == min(h["val_loss"] for h in log["history"])


def test_resumed_training_continues_from_its_checkpoint(phantom_ct, generator, capsys):
    # fold 1 keeps the fold-0 generator of the other tests untouched
    args = ["-d", str(phantom_ct), "-g", "ddpm", "--preset", "tiny", "-device", "cpu", "-f", "1"]
    out = generator_output_dir(phantom_ct, "ddpm", "3d_fullres", 1)
    with pytest.raises(SystemExit) as exit_info:  # a user error: one line, exit status 2
        train_main(args + ["--iterations", "2", "--c"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "nnUNetv2_synth_train_generator: error: --c given but" in err
    assert "does not exist" in err and "Traceback" not in err
    train_main(args + ["--iterations", "4"])
    straight = torch.load(out / "checkpoint_final.pth", weights_only=False)
    shutil.rmtree(out)
    train_main(args + ["--iterations", "2"])
    halfway = torch.load(out / "checkpoint_latest.pth", weights_only=False)
    assert halfway["iteration"] == 2
    train_main(args + ["--iterations", "4", "--c"])
    resumed = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert resumed["iteration"] == 4 and len(resumed["train_loss"]) == 4
    # same initial weights, patches, noise and timesteps as the uninterrupted run
    assert resumed["train_loss"] == straight["train_loss"]
    for key, value in straight["model"].items():
        assert torch.allclose(resumed["model"][key], value, rtol=1e-5, atol=1e-7), key
    assert any(not torch.equal(value, halfway["model"][key]) for key, value in straight["model"].items())
    assert "resumed at iteration 2" in (out / "training_log.txt").read_text(encoding="utf-8")


def _plan_with(phantom_ct, **changes) -> SynthPlan:
    plan = load_synth_plan(phantom_ct, "3d_fullres")
    params = changes.pop("backend_params", {})
    return plan.replace(backend="ddpm", backend_params={"device": "cpu", "sampling_steps": 2, **params}, **changes)


def test_checkpoint_errors_name_the_file_and_the_mismatch(phantom_ct, generator, tmp_path, capsys):
    ddpm = get_backend("ddpm")
    best = generator / "checkpoint_best.pth"
    assert ddpm(_plan_with(phantom_ct)).checkpoint == best

    missing = tmp_path / "missing.pth"
    with pytest.raises(GeneratorCheckpointError, match="missing.pth does not exist"):
        ddpm(_plan_with(phantom_ct, backend_params={"checkpoint": str(missing)}))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    with pytest.raises(GeneratorCheckpointError, match="truncated.pth cannot be read .truncated or corrupt"):
        ddpm(_plan_with(phantom_ct, backend_params={"checkpoint": str(truncated)}))
    with pytest.raises(GeneratorCheckpointError, match="dataset_name = 'Dataset901_PhantomCT'.*Dataset942_Other"):
        ddpm(_plan_with(phantom_ct, dataset_name="Dataset942_Other", backend_params={"checkpoint": str(best)}))
    with pytest.raises(GeneratorCheckpointError, match="configuration = '3d_fullres'.*'3d_lowres'"):
        ddpm(_plan_with(phantom_ct, configuration="3d_lowres", backend_params={"checkpoint": str(best)}))
    plan = _plan_with(phantom_ct)
    plan = plan.replace(channels=plan.channels * 2)
    with pytest.raises(GeneratorCheckpointError, match=r"checkpoint_best.pth does not fit.*num_channels = 1.*2"):
        ddpm(plan)

    # the command says which file is missing and how to make it
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["-d", str(phantom_ct), "-g", "ddpm", "-n", "1", "-f", "3", "-device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "fold_3/checkpoint_best.pth does not exist" in err
    assert "nnUNetv2_synth_train_generator -d Dataset901_PhantomCT -g ddpm -c 3d_fullres -f 3" in err


def test_bank_case_differs_from_its_source_only_inside_the_lesion(phantom_ct, bank):
    folder, _ = bank
    train, _, real_folder = split_cases(phantom_ct, "3d_fullres", 0)
    ids = bank_identifiers(folder, 0)
    assert len(ids) == BANK_CASES
    real, synthetic = nnUNetDatasetBlosc2(str(real_folder)), nnUNetDatasetBlosc2(str(folder))
    for identifier in ids:
        source, fold, _ = parse_bank_identifier(identifier)
        assert fold == "0" and source in train
        data, seg, _, props = synthetic.load_case(identifier)
        data0, seg0, _, _ = real.load_case(source)
        data, seg, data0, seg0 = (np.asarray(a) for a in (data, seg, data0, seg0))
        lesion = (seg[0] == TUMOUR) & (seg0[0] != TUMOUR)
        assert lesion.sum() == sum(item["voxels"] for item in props["synth"]["lesions"]) > 0
        assert np.array_equal(seg[0][~lesion], seg0[0][~lesion])
        changed = (data != data0)[0]
        assert not (changed & ~lesion).any(), "a voxel outside the lesion changed"
        assert changed[lesion].mean() > 0.9
        # nnU-Net's foreground oversampling finds the new tumour
        locations = np.asarray(props["class_locations"][TUMOUR])
        assert len(locations) and (seg[tuple(locations.T)] == TUMOUR).all()
    assert not any(p.name.startswith(".") or p.suffix == ".tmp" for p in folder.iterdir())


def test_bank_is_reproducible_and_parts_split_the_work(phantom_ct, bank):
    folder, _ = bank
    ids = bank_identifiers(folder, 0)
    assert generate_bank(phantom_ct, "ddpm", BANK_CASES, sampling_steps=SAMPLING_STEPS, device="cpu",
                         progress=False) == []  # finished cases are skipped
    victim = ids[1]
    before = np.asarray(nnUNetDatasetBlosc2(str(folder)).load_case(victim)[0])
    for f in folder.glob(f"{victim}*"):
        f.unlink()
    assert generate_bank(phantom_ct, "ddpm", BANK_CASES, sampling_steps=SAMPLING_STEPS, device="cpu",
                         progress=False) == [victim]
    assert np.array_equal(np.asarray(nnUNetDatasetBlosc2(str(folder)).load_case(victim)[0]), before)
    # parts of a larger bank: part 1 of 2 writes the odd new index, part 0 the even one
    manifest = folder / "manifest" / "fold_0.json"
    fixture_manifest = manifest.read_text(encoding="utf-8")
    part1 = generate_bank(phantom_ct, "ddpm", BANK_CASES + 2, sampling_steps=SAMPLING_STEPS, device="cpu",
                          num_parts=2, part=1, progress=False)
    part0 = generate_bank(phantom_ct, "ddpm", BANK_CASES + 2, sampling_steps=SAMPLING_STEPS, device="cpu",
                          num_parts=2, part=0, progress=False)
    assert [parse_bank_identifier(i)[2] for i in part1] == [5] and [parse_bank_identifier(i)[2] for i in part0] == [4]
    with pytest.raises(RuntimeError, match="other settings"):
        generate_bank(phantom_ct, "ddpm", 1, sampling_steps=SAMPLING_STEPS + 1, device="cpu", progress=False)
    for identifier in part0 + part1:  # back to the fixture's bank for the trainer tests
        for f in folder.glob(f"{identifier}*"):
            f.unlink()
    # the fixture requested BANK_CASES: the trainers refuse an incomplete bank
    manifest.write_text(fixture_manifest, encoding="utf-8")


def test_bank_export_to_raw_space(phantom_ct, bank):
    _, raw = bank
    labels = sorted((raw / "labelsTr").glob("*.nii.gz"))
    assert len(labels) == BANK_CASES and len(list((raw / "imagesTr").glob("*_0000.nii.gz"))) == BANK_CASES
    source = parse_bank_identifier(labels[0].name.removesuffix(".nii.gz"))[0]
    raw_root = Path(os.environ["nnUNet_raw"]) / preprocessed_dir(phantom_ct).name
    reference = sitk.ReadImage(str(raw_root / "labelsTr" / f"{source}.nii.gz"))
    exported = sitk.ReadImage(str(labels[0]))
    assert exported.GetSize() == reference.GetSize()
    assert np.allclose(exported.GetSpacing(), reference.GetSpacing())
    assert (sitk.GetArrayFromImage(exported) == TUMOUR).sum() > (sitk.GetArrayFromImage(reference) == TUMOUR).sum()
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / labels[0].name.replace(".nii", "_0000.nii"))))
    assert image.std() > 10, "CT channel is mapped back to HU"


@pytest.mark.parametrize("cls", [nnUNetTrainerSynth20DDPM, nnUNetTrainerSynth60DDPM])
def test_bank_trainer_reaches_its_ratio_and_validation_stays_real(phantom_ct, bank, monkeypatch, cls):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(cls, phantom_ct)
    train_loader, val_loader = trainer.get_dataloaders()
    assert not any(isinstance(t, SynthTumourTransform) for t in train_loader.data_loader.transforms.transforms)
    train, val, _ = split_cases(phantom_ct, "3d_fullres", 0)
    ids = train_loader.data_loader.indices
    assert {i for i in ids if not is_bank_identifier(i)} == set(train)
    assert {parse_bank_identifier(i)[0] for i in ids if is_bank_identifier(i)} <= set(train)
    probabilities = np.asarray(train_loader.data_loader.sampling_probabilities)
    is_bank = np.array([is_bank_identifier(i) for i in ids])
    assert probabilities.sum() == pytest.approx(1.0)
    assert probabilities[is_bank].sum() == pytest.approx(cls.synth_probability)

    p = cls.synth_probability
    samples = bank_samples = 0
    for _ in range(100):  # real batches through nnU-Net's loader and transforms
        keys = next(train_loader)["keys"]
        samples += len(keys)
        bank_samples += sum(is_bank_identifier(k) for k in keys)
    assert abs(bank_samples - p * samples) < 4 * np.sqrt(samples * p * (1 - p)), (bank_samples, samples)
    keys = np.concatenate([train_loader.data_loader.get_indices() for _ in range(10000)])
    n = len(keys)
    assert abs(sum(map(is_bank_identifier, keys)) - p * n) < 4 * np.sqrt(n * p * (1 - p))

    for _ in range(20):
        keys = list(next(val_loader)["keys"])
        assert not any(map(is_bank_identifier, keys)) and set(keys) <= set(val)


def test_bank_trainer_without_its_bank_names_the_command(phantom_ct, bank, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(nnUNetTrainerSynth20DDPM, phantom_ct, fold=1)  # the bank holds fold-0 cases only
    with pytest.raises(RuntimeError, match="holds no case of this fold.*nnUNetv2_synth_generate -d "
                                           "Dataset901_PhantomCT -g ddpm -c 3d_fullres -f 1"):
        trainer.get_dataloaders()

    class NoBank(nnUNetTrainerSynthBank):
        synth_backend = "no_bank_backend"

    with pytest.raises(RuntimeError, match="nnUNetSynthBank_no_bank_backend_3d_fullres, which does not exist.*"
                                           "nnUNetv2_synth_generate"):
        _trainer(NoBank, phantom_ct).get_dataloaders()


@pytest.mark.slow
def test_bank_trainer_through_nnunetv2_train(phantom_ct, bank):
    fold = train_as_the_readme_says(phantom_ct, "3d_fullres", "nnUNetTrainerSynth20DDPM_Debug")
    log = training_log(fold)
    assert f"training on 4 real and {BANK_CASES} bank cases" in log and "bank cases this epoch" in log
    # validation is nnU-Net's own, on real validation cases only
    _, val, _ = split_cases(phantom_ct, "3d_fullres", 0)
    summary = json.loads((fold / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert {Path(c["reference_file"]).name.removesuffix(".nii.gz") for c in summary["metric_per_case"]} == set(val)


@pytest.mark.slow
def test_generator_training_runs_distributed_under_torchrun(phantom_ct, generator):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "nnunet_synth.generator_training",
         "-d", str(phantom_ct), "-g", "ddpm", "--preset", "tiny", "--iterations", "2", "-device", "cpu", "-f", "2"],
        env=env, timeout=600)
    out = generator_output_dir(phantom_ct, "ddpm", "3d_fullres", 2)
    state = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert state["iteration"] == 2 and state["config"]["world_size"] == 2
    log = (out / "training_log.txt").read_text(encoding="utf-8")
    assert "2 process(es)" in log and "parameters identical on all 2 ranks (model)" in log


def test_bank_with_the_liver_mri_preset_has_its_semi_axes(nnunet_dirs, one_torch_thread):
    """The liver-MRI paper's own size preset (every semi-axis ~ N(27, 4.5) mm) through the ddpm bank, on a coarse
    phantom (12 x 6 x 6 mm voxels) where such lesions fit the tiny model's patch."""
    from nnunet_synth.phantom import PhantomConfig, write_phantom_dataset

    from .conftest import plan_and_preprocess

    dataset = 911
    write_phantom_dataset(dataset, num_train=3, num_test=0, seed=11,
                          config=PhantomConfig(shape=(14, 40, 40), spacing=(12.0, 6.0, 6.0), tumour_radii_mm=(15.0,)))
    plan_and_preprocess(dataset)
    train_main(["-d", str(dataset), "-g", "ddpm", "--preset", "tiny", "--iterations", "2", "-device", "cpu",
                "-f", "all"])
    load_synth_plan(dataset, "3d_fullres")  # the plan file, then the preset as a user sets it
    path = preprocessed_dir(dataset) / "nnUNetSynthPlans.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["shapes"].update(size_preset="liver_mri", size_class="any")
    raw["placement"].update(min_inside=0.3)
    path.write_text(json.dumps(raw), encoding="utf-8")
    written = generate_bank(dataset, "ddpm", 6, fold="all", sampling_steps=2, device="cpu", progress=False)
    assert len(written) == 6
    bank = nnUNetDatasetBlosc2(str(bank_dir(dataset, "ddpm", "3d_fullres")))
    lesions = [lesion for i in written for lesion in bank.load_case(i)[3]["synth"]["lesions"]]
    assert {lesion["size_class"] for lesion in lesions} == {"liver_mri"}
    axes = [a for lesion in lesions for a in lesion["semi_axes_mm"]]
    assert abs(np.mean(axes) - 27.0) < 3.0, np.mean(axes)
