"""The papers' named trainers: each runs through the real nnUNetv2_train; templates come from the training
fold only; the two-stage schedule stops synthesis; the mask inspection command writes NIfTI and PNGs."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_synth.generators.paths import template_file
from nnunet_synth.generators.templates import template_cases
from nnunet_synth.injection import achieved_rates
from nnunet_synth.planning import preprocessed_dir
from nnunet_synth.trainers import nnUNetTrainerSynth20RealFinetune, nnUNetTrainerSynth20Template

from .conftest import train_as_the_readme_says, training_log

STUDY_TRAINERS = {
    "nnUNetTrainerSynth20Tiny": "'size_class': 'tiny'",
    "nnUNetTrainerSynth20Small": "'size_class': 'small'",
    "nnUNetTrainerSynth20Medium": "'size_class': 'medium'",
    "nnUNetTrainerSynth20Large": "'size_class': 'large'",
    "nnUNetTrainerSynth20Mixed": "'size_class': 'mixed'",
    "nnUNetTrainerSynth20Elastic": "'deformation': 'elastic'",
    "nnUNetTrainerSynth20Simplex": "'deformation': 'simplex'",
    "nnUNetTrainerSynth20Template": "template bank:",
    "nnUNetTrainerSynth20RealFinetune": "synthetic tumours this epoch",
    "nnUNetTrainerNoisyLabelsLow": "boundary displacement of 1.0 mm",
    "nnUNetTrainerNoisyLabelsModerate": "boundary displacement of 2.0 mm",
    "nnUNetTrainerNoisyLabelsHigh": "boundary displacement of 4.0 mm",
    "nnUNetTrainerNoisyLabelsExtreme": "boundary displacement of 8.0 mm",
}


# Through the real nnUNetv2_train, one per mode of nnU-Net's final validation after the short epoch (the
# schedule's fourth field); every other named trainer is built, initialised and drawn from in this process (what
# nnUNetv2_train adds, the same for every trainer, is covered by these three).
FINAL_VALIDATION = {"nnUNetTrainerSynth20Tiny": "full", "nnUNetTrainerSynth20Small": "nomirror",
                    "nnUNetTrainerNoisyLabelsHigh": "skip"}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", list(FINAL_VALIDATION))
def test_named_trainer_runs_one_short_epoch(phantom_ct, trainer):
    validation = FINAL_VALIDATION[trainer]
    schedule = "1,1,1" if validation == "full" else f"1,1,1,{validation}"
    fold = train_as_the_readme_says(phantom_ct, "3d_fullres", trainer, NNUNET_SYNTH_SCHEDULE=schedule)
    log = training_log(fold)
    assert "schedule overridden by NNUNET_SYNTH_SCHEDULE" in log
    assert STUDY_TRAINERS[trainer] in log
    assert (fold / "validation" / "summary.json").is_file() == (validation != "skip")
    assert {"skip": "final validation skipped", "nomirror": "final validation without test-time mirroring",
            "full": "Mean Validation Dice"}[validation] in log


@pytest.mark.parametrize("trainer", [t for t in STUDY_TRAINERS if t not in FINAL_VALIDATION])
def test_named_trainer_initialises_and_draws_a_training_batch(phantom_ct, trainer, monkeypatch):
    import nnunet_synth.trainers as trainers

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    t = _trainer(getattr(trainers, trainer), phantom_ct)
    train_loader, _ = t.get_dataloaders()
    batch = next(train_loader)
    assert batch["data"].shape[0] == t.configuration_manager.batch_size
    assert STUDY_TRAINERS[trainer] in Path(t.log_file).read_text(encoding="utf-8") or \
        trainer == "nnUNetTrainerSynth20RealFinetune"  # its line is logged at each epoch's end


def _trainer(cls, dataset):
    base = preprocessed_dir(dataset)
    plans = load_json(base / "nnUNetPlans.json")
    plans["continue_training"] = False
    t = cls(plans, "3d_fullres", 0, load_json(base / "dataset.json"), torch.device("cpu"))
    t.initialize()
    return t


def test_template_bank_uses_the_training_fold_only(phantom_ct, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(nnUNetTrainerSynth20Template, phantom_ct)
    train_loader, val_loader = trainer.get_dataloaders()
    train_keys, val_keys = trainer.do_split()
    stored = set(template_cases(template_file(Path(trainer.preprocessed_dataset_folder_base), "3d_fullres")))
    assert set(val_keys) & stored, "the stored bank should hold every case; the fold filter is what is tested"
    assert trainer.synth_template_cases and set(trainer.synth_template_cases) <= set(train_keys)
    assert not set(trainer.synth_template_cases) & set(val_keys)
    assert len(trainer.synth_transform.templates) >= len(trainer.synth_template_cases)
    for _ in range(3):
        next(train_loader)


def test_real_finetune_stops_synthesis_for_the_last_epochs(phantom_healthy, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(nnUNetTrainerSynth20RealFinetune, phantom_healthy)
    trainer.num_epochs = 10
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.current_epoch = 7  # still mixing
    trainer.on_train_epoch_start()
    assert float(trainer.synth_transform.probability[0]) == pytest.approx(0.2)
    trainer.current_epoch = 8  # the last 20%
    trainer.on_train_epoch_start()
    assert float(trainer.synth_transform.probability[0]) == 0.0
    before = achieved_rates(trainer.synth_counters)
    for _ in range(15):
        assert not (next(trainer.dataloader_train)["target"][0] == 2).any()
    after = achieved_rates(trainer.synth_counters)
    assert after["seen"] > before["seen"] and after["synthetic"] == before["synthetic"]
    assert "real-only fine-tuning from epoch 8" in Path(trainer.log_file).read_text(encoding="utf-8")


def test_masks_command_writes_nifti_with_spacing_and_png_grids(phantom_ct, tmp_path):
    out = tmp_path / "masks"
    subprocess.run(["nnUNetv2_synth_masks", "-d", str(phantom_ct), "-n", "3", "--size-class", "tiny", "small",
                    "--deformation", "elastic", "simplex", "template", "-o", str(out)], check=True,
                   capture_output=True, env=dict(os.environ))
    niftis = sorted(out.glob("*.nii.gz"))
    assert len(niftis) == 2 * 3 * 3
    plan = json.loads((preprocessed_dir(phantom_ct) / "nnUNetSynthPlans.json").read_text(encoding="utf-8"))
    spacing = plan["configurations"]["3d_fullres"]["spacing"]
    image = sitk.ReadImage(str(niftis[0]))
    assert list(image.GetSpacing()) == pytest.approx(spacing[::-1])
    assert sitk.GetArrayFromImage(image).any()
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"{c}_{d}.png" for c in ("tiny", "small") for d in ("elastic", "simplex", "template"))
