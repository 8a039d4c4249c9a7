"""The Synth trainer's real nnU-Net data loaders on a healthy phantom: every tumour voxel in a training
batch is synthetic, so rates and validation purity can be counted exactly."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_synth.injection import INSERTED, OUTCOME_KEY, SynthTumourTransform, achieved_rates
from nnunet_synth.planning import preprocessed_dir
from nnunet_synth.trainers import nnUNetTrainerSynth20

TUMOUR = 2


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "nnUNetSynthPlans.json"}


@pytest.fixture()
def trainer(phantom_healthy, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # single-threaded loader (never set around planning)
    base = preprocessed_dir(phantom_healthy)
    plans = load_json(base / "nnUNetPlans.json")
    plans["continue_training"] = False
    t = nnUNetTrainerSynth20(plans, "3d_fullres", 0, load_json(base / "dataset.json"), torch.device("cpu"))
    t.initialize()
    return t


def test_healthy_dataset_gets_tumours_at_the_ratio_and_validation_stays_real(trainer):
    base = preprocessed_dir(trainer.plans_manager.dataset_name)
    before = _digest(base)
    train_loader, val_loader = trainer.get_dataloaders()

    tr_transforms = train_loader.data_loader.transforms.transforms
    assert isinstance(tr_transforms[0], SynthTumourTransform)
    assert float(tr_transforms[0].probability[0]) == 0.20  # the ratio in the trainer's name
    assert not any(isinstance(t, SynthTumourTransform) for t in val_loader.data_loader.transforms.transforms)

    with_tumour = 0
    samples = 0
    for _ in range(60):
        batch = next(train_loader)
        target = batch["target"][0]  # full-resolution deep-supervision target
        tumour = (target == TUMOUR).flatten(1).any(1)
        with_tumour += int(tumour.sum())
        samples += target.shape[0]
        # the batch says which of its samples got a synthetic tumour (what the trainer counts as consumed)
        assert len(batch[OUTCOME_KEY]) == target.shape[0]
        assert (batch[OUTCOME_KEY][tumour] == INSERTED).all(), "a tumour in a sample that got none"
    rates = achieved_rates(trainer.synth_counters)
    # the first batch was drawn by get_dataloaders itself
    assert samples <= rates["seen"] <= samples + trainer.batch_size
    # each sample is chosen with probability p; a chosen one gets a tumour unless none fits (the 32 mm
    # 'large' class does not fit this small phantom organ), and that skip is counted
    p = trainer.synth_probability
    chosen = rates["synthetic"] + rates["skipped"]
    sigma = np.sqrt(rates["seen"] * p * (1 - p))
    assert abs(chosen - p * rates["seen"]) < 4 * sigma, rates
    assert rates["synthetic"] >= 0.5 * chosen, rates
    # spatial augmentation may scale a lesion out of the final patch, never create one
    assert 0.75 * (rates["synthetic"] - trainer.batch_size) <= with_tumour <= rates["synthetic"], (with_tumour, rates)

    for _ in range(15):
        target = next(val_loader)["target"][0]
        assert not (target == TUMOUR).any(), "a synthetic tumour reached a validation batch"

    after = _digest(base)  # nnU-Net itself adds splits_final.json on first use
    assert {k: after.get(k) for k in before} == before, "nnU-Net's preprocessed files changed"


def test_trainer_records_its_synth_plan(trainer):
    copied = Path(trainer.output_folder) / "nnUNetSynthPlans.json"
    plan = json.loads(copied.read_text(encoding="utf-8"))
    assert plan["backend"] == "analytic" and plan["configuration"] == "3d_fullres"
    assert plan["organ_label"] == 1 and plan["tumour_label"] == 2
    log = Path(trainer.log_file).read_text(encoding="utf-8")
    assert "probability 0.2 per training sample" in log and "CT default" in log
