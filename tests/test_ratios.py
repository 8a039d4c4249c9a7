"""Every named trainer does what its name says: the ratio in ``nnUNetTrainerSynthN...`` is the probability it uses
(all backends), the transform achieves it to within a tenth of itself, and the noisy-label trainers deform their
training labels by their level."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_synth import trainers
from nnunet_synth.bank import RealAndBankDataset
from nnunet_synth.injection import SynthTumourTransform, achieved_rates
from nnunet_synth.label_noise import LABEL_NOISE_MM, NoisyLabelDataset, NoisyTumourLabelTransform
from nnunet_synth.planning import preprocessed_dir

from .test_injection import ORGAN, make_patch, make_plan

RATIO_NAME = re.compile(r"^nnUNetTrainerSynth(\d+)")
RATIO_CLASSES = {name: getattr(trainers, name) for name in trainers.__all__ if RATIO_NAME.match(name)}


def _ratio(name: str) -> float:
    return int(RATIO_NAME.match(name)[1]) / 100


def test_every_ratio_class_uses_the_probability_in_its_name():
    wrong = {name: cls.synth_probability for name, cls in RATIO_CLASSES.items()
             if cls.synth_probability != _ratio(name)}
    assert not wrong, wrong
    # every backend's family is pinned here, not only the analytic one
    for family in ("", "DDPM", "LDM", "LDMOnline", "SD", "Transplant"):
        ratios = {_ratio(name) for name in RATIO_CLASSES if re.fullmatch(rf"nnUNetTrainerSynth\d+{family}", name)}
        assert ratios == {0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6}, (family, ratios)


class _Cases:
    def __init__(self, identifiers: list[str]):
        self.identifiers = identifiers


BANK_RATIO_CLASSES = [name for name, cls in RATIO_CLASSES.items() if issubclass(cls, trainers.nnUNetTrainerSynthBank)]


@pytest.mark.parametrize("name", BANK_RATIO_CLASSES)
def test_bank_trainers_give_the_bank_the_share_in_their_name(name):
    cls = RATIO_CLASSES[name]
    mixed = RealAndBankDataset(_Cases([f"case_{i}" for i in range(7)]),
                               _Cases([f"case_{i}__synth_f0_{k:05d}" for i in range(3) for k in range(4)]))
    probabilities = mixed.sampling_probabilities(cls.synth_probability)
    is_bank = np.array(["__synth_" in i for i in mixed.identifiers])
    assert probabilities.sum() == pytest.approx(1.0) and probabilities[is_bank].sum() == pytest.approx(_ratio(name))


@pytest.mark.parametrize("name", ["nnUNetTrainerSynth10", "nnUNetTrainerSynth20", "nnUNetTrainerSynth60"])
def test_achieved_rate_is_the_named_ratio_within_a_tenth(name):
    """Draws enough samples that a probability off by 10% of itself lies 8 standard deviations away (4 allowed).

    The patch has no organ: a chosen sample is counted (as skipped: no lesion fits) without the cost of a lesion,
    and being chosen is what the ratio is about.
    """
    p = _ratio(name)
    image, seg = make_patch(shape=(8, 16, 16))
    seg[0][seg[0] == ORGAN] = 0
    transform = SynthTumourTransform(make_plan(), RATIO_CLASSES[name].synth_probability, None, seed=7)
    n = int(np.ceil(64 * (1 - p) / (0.1 ** 2 * p)))
    for _ in range(n):
        transform(image=image, segmentation=seg)
    rates = achieved_rates(transform.counters)
    chosen = rates["synthetic"] + rates["skipped"]
    assert rates["seen"] == n and abs(chosen / n - p) < 4 * np.sqrt(p * (1 - p) / n), (chosen / n, p)


class _OneCase:
    """A dataset whose every identifier holds the same segmentation."""

    def __init__(self, seg: np.ndarray, identifiers: list[str]):
        self.seg, self.identifiers = seg, identifiers

    def load_case(self, identifier: str):
        return np.zeros((1, *self.seg.shape[1:]), np.float32), self.seg, None, {}


def _changed_boundary_mm(noise: NoisyTumourLabelTransform | NoisyLabelDataset, seeds: int = 4) -> float:
    """Mean shift of a 36 mm tumour's boundary: changed tumour volume over its surface area, averaged over seeds
    (for the per-case noise: over cases, each its own draw)."""
    from skimage.measure import marching_cubes, mesh_surface_area

    transform = noise
    spacing = np.asarray(transform.spacing)
    shape = tuple(int(s) for s in np.ceil(120 / spacing))
    grid = (np.indices(shape) - np.array(shape)[:, None, None, None] / 2) * spacing[:, None, None, None]
    radius = np.sqrt((grid ** 2).sum(0))
    seg = np.zeros(shape, np.int16)
    seg[radius <= 50] = transform.fill_label
    seg[radius <= 18] = transform.tumour_label
    tumour = seg == transform.tumour_label
    verts, faces, _, _ = marching_cubes(tumour.astype(float), 0.5, spacing=tuple(spacing))
    shifts = []
    for seed in range(seeds):
        if isinstance(noise, NoisyLabelDataset):
            cases = NoisyLabelDataset(_OneCase(seg[None], [f"case_{seed}"]), noise.tumour_label, noise.fill_label,
                                      noise.mean_displacement_mm, noise.spacing, noise.seed, noise.ignore_label)
            new = cases.load_case(f"case_{seed}")[1][0]
        else:
            transform.seed, transform._rng = seed, None  # noqa: SLF001 - a fresh generator per seed
            new = transform(image=torch.zeros((1, *shape)),
                            segmentation=torch.from_numpy(seg[None].copy()))["segmentation"][0].numpy()
        changed = (new == transform.tumour_label) != tumour
        shifts.append(changed.sum() * spacing.prod() / mesh_surface_area(verts, faces))
    return float(np.mean(shifts))


def test_noisy_label_trainers_deform_their_training_labels_by_their_level(phantom_ct, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    base = preprocessed_dir(phantom_ct)
    shifts = []
    for level, mm in [*LABEL_NOISE_MM.items(), ("HighJitter", LABEL_NOISE_MM["High"])]:
        plans = dict(load_json(base / "nnUNetPlans.json"), continue_training=False)
        trainer = getattr(trainers, f"nnUNetTrainerNoisyLabels{level}")(plans, "3d_fullres", 0,
                                                                        load_json(base / "dataset.json"),
                                                                        torch.device("cpu"))
        trainer.initialize()
        train_loader, val_loader = trainer.get_dataloaders()
        jitter = level.endswith("Jitter")
        # the paper's trainers corrupt each training case once (dataset); the Jitter ones every sample (transform)
        noise = train_loader.data_loader.transforms.transforms[0] if jitter else train_loader.data_loader._data
        assert isinstance(noise, NoisyTumourLabelTransform if jitter else NoisyLabelDataset), level
        assert jitter == any(isinstance(t, NoisyTumourLabelTransform)
                             for t in train_loader.data_loader.transforms.transforms)
        assert not any(isinstance(t, NoisyTumourLabelTransform) for t in val_loader.data_loader.transforms.transforms)
        assert not isinstance(val_loader.data_loader._data, NoisyLabelDataset), "validation labels must stay real"
        assert noise.mean_displacement_mm == mm
        assert noise.tumour_label == trainer.synth_plan.tumour_label
        if jitter:
            continue
        # a mean displacement L moves a boundary by about L/2 along its normal; the voxel grid blurs small shifts
        shifts.append(_changed_boundary_mm(noise))
        assert 0.15 * mm < shifts[-1] < 0.8 * mm, (level, shifts[-1])
    assert shifts == sorted(shifts) and shifts[-1] > 5 * shifts[0], shifts
