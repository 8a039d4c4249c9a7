"""The papers' experiments as the papers ran them (issue 13): the pancreas paper's label noise is fixed per case,
the liver-MRI DDPM trains on rotated as well as flipped patches, and the merged datasets' healthy controls are the
synth plan's preferred insertion targets."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_synth import trainers
from nnunet_synth.generators.ddpm.training import MAX_ROTATION_DEG, rotate_axial, training_crop
from nnunet_synth.generators.training_utils import PatchSource, TumourSite
from nnunet_synth.injection import NOT_CHOSEN, OUTCOME_KEY, OutcomeDataLoader, SynthTumourTransform
from nnunet_synth.label_noise import LABEL_NOISE_MM, NoisyLabelDataset, NoisyTumourLabelTransform
from nnunet_synth.planning import load_synth_plan, plan_synth, preprocessed_dir, read_healthy_cases
from nnunet_synth.synth_plan import HEALTHY_CASES_FILE, SynthPlan, SynthPlanError

from .test_injection import ORGAN, TUMOUR, make_plan

LABELS = LabelManager({"background": 0, "organ": ORGAN, "tumour": TUMOUR}, regions_class_order=None)


def _case(shape=(16, 40, 40)) -> np.ndarray:
    """(1, z, y, x) labels: an organ ball with a tumour ball inside and a band of -1 (outside the image)."""
    grid = np.indices(shape) - np.array(shape)[:, None, None, None] // 2
    seg = np.zeros((1, *shape), np.int8)
    seg[0][((grid / np.array([7, 18, 18])[:, None, None, None]) ** 2).sum(0) <= 1] = ORGAN
    seg[0][((grid / np.array([4, 8, 8])[:, None, None, None]) ** 2).sum(0) <= 1] = TUMOUR
    seg[0, :, :, :2] = -1
    return seg


class _Cases:
    """nnU-Net's dataset interface over read-only arrays: the same labels under every identifier."""

    def __init__(self, seg: np.ndarray, identifiers: list[str], data: np.ndarray | None = None):
        self.seg, self.identifiers = seg, identifiers
        self.data = np.zeros(seg.shape, np.float32) if data is None else data
        self.seg.flags.writeable = False  # as nnU-Net's memory-mapped files: must never be written

    def load_case(self, identifier: str):
        assert identifier in self.identifiers, identifier
        return self.data, self.seg, None, {"class_locations": {ORGAN: np.argwhere(self.seg == ORGAN),
                                                               TUMOUR: np.argwhere(self.seg == TUMOUR)}}


def _noisy(cases, level: str = "High", spacing=(2.0, 1.0, 1.0), seed: int = 3) -> NoisyLabelDataset:
    return NoisyLabelDataset(cases, TUMOUR, ORGAN, LABEL_NOISE_MM[level], spacing, seed)


# --- pancreas CT: label noise fixed per case -------------------------------------------------------------------


@pytest.mark.parametrize("level", ["Low", "Extreme"])
def test_a_cases_noisy_label_is_drawn_once_and_differs_between_cases(level):
    seg = _case()
    clean = _Cases(seg, ["case_a", "case_b"])
    first = _noisy(clean, level)
    epoch1 = first.load_case("case_a")[1]
    # another epoch, another worker (a pickled copy with its own cache), another order of loading
    worker = pickle.loads(pickle.dumps(_noisy(clean, level)))
    worker.load_case("case_b")
    for again in (first.load_case("case_a")[1], worker.load_case("case_a")[1]):
        assert np.array_equal(again, epoch1)
    assert not np.array_equal(epoch1, seg), "no label changed"
    assert not np.array_equal(first.load_case("case_b")[1], epoch1), "two cases got the same corruption"
    assert not np.array_equal(_noisy(clean, level, seed=4).load_case("case_a")[1], epoch1), "the seed is ignored"
    # only the tumour boundary moves: -1 stays -1, nothing becomes -1, the image is the base dataset's
    assert ((epoch1 == -1) == (seg == -1)).all()
    assert set(np.unique(epoch1[epoch1 != seg])) <= {ORGAN, TUMOUR}
    assert first.load_case("case_a")[0] is clean.data
    assert np.array_equal(clean.seg, seg), "the base dataset's segmentation was written to"


def test_the_levels_draw_different_corruptions_of_the_same_case():
    clean = _Cases(_case(), ["case_a"])
    labels = [_noisy(clean, level).load_case("case_a")[1] for level in LABEL_NOISE_MM]
    assert all(not np.array_equal(a, b) for i, a in enumerate(labels) for b in labels[i + 1:])


def test_the_jitter_transform_redraws_while_the_dataset_does_not():
    """The behaviour the Jitter trainers keep, and what the default no longer does."""
    seg = _case()
    jitter = NoisyTumourLabelTransform(TUMOUR, ORGAN, LABEL_NOISE_MM["High"], (2.0, 1.0, 1.0), seed=0)
    draws = [jitter(image=torch.zeros(seg.shape), segmentation=torch.from_numpy(seg.copy()))["segmentation"].numpy()
             for _ in range(2)]
    assert not np.array_equal(*draws)
    fixed = _noisy(_Cases(seg, ["case_a"]))
    assert np.array_equal(fixed.load_case("case_a")[1], fixed.load_case("case_a")[1])


def test_nnunet_loader_sees_each_cases_fixed_noisy_label_in_every_batch():
    seg = _case((8, 24, 24))
    cases = _noisy(_Cases(seg, [f"case_{i}" for i in range(3)]))
    expected = {i: cases.load_case(i)[1] for i in cases.identifiers}
    # patch = case: nnU-Net's crop is the whole case, so every sample must be its case's one corrupted label
    loader = nnUNetDataLoader(cases, 4, seg.shape[1:], seg.shape[1:], LABELS, oversample_foreground_percent=0.0)
    np.random.seed(0)
    seen = set()
    for _ in range(6):
        batch = loader.generate_train_batch()
        for key, target in zip(batch["keys"], batch["target"]):
            assert np.array_equal(target.numpy(), expected[key]), key
            seen.add(key)
    assert len(seen) == 3 and len({expected[k].tobytes() for k in seen}) == 3


def test_a_2d_configuration_deforms_each_slice_in_plane():
    seg = _case()
    noisy = _noisy(_Cases(seg, ["case_a"]), "Extreme", spacing=(1.0, 1.0)).load_case("case_a")[1]
    has_tumour = (seg[0] == TUMOUR).any(axis=(1, 2))
    changed = (noisy[0] != seg[0]).any(axis=(1, 2))
    assert changed.any() and not (changed & ~has_tumour).any(), "a 2D deformation reached a slice without tumour"


def test_noisy_label_trainers_fix_the_label_per_case_and_jitter_variants_redraw():
    for level in LABEL_NOISE_MM:
        fixed = getattr(trainers, f"nnUNetTrainerNoisyLabels{level}")
        jitter = getattr(trainers, f"nnUNetTrainerNoisyLabels{level}Jitter")
        assert not fixed.label_noise_per_iteration and jitter.label_noise_per_iteration
        assert jitter.label_noise_mm == fixed.label_noise_mm == LABEL_NOISE_MM[level]
        assert f"nnUNetTrainerNoisyLabels{level}Jitter" in trainers.__all__


def test_a_case_that_cannot_be_deformed_is_named():
    cases = NoisyLabelDataset(_Cases(_case(), ["bad_case"]), TUMOUR, ORGAN, 2.0, (1.0,), seed=0)
    with pytest.raises(RuntimeError, match="bad_case"):
        cases.load_case("bad_case")


# --- liver MRI: the DDPM's training patches are rotated as well as flipped -------------------------------------


def _ramp_angle(image: np.ndarray, spacing) -> float:
    """The in-plane angle (degrees, folded into [0, 90] so flips do not count) of an x-ramp's gradient in mm."""
    gz, gy, gx = np.gradient(image[0], *spacing)
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert np.abs(gz[inner]).max() < 1e-3, "the rotation left the axial plane"
    return float(np.degrees(np.arctan2(abs(gy[inner].mean()), abs(gx[inner].mean()))))


@pytest.mark.parametrize("spacing", [(3.0, 1.0, 1.0), (2.0, 0.7, 1.4)])
@pytest.mark.parametrize("angle", [-12.0, 7.0])
def test_rotate_axial_turns_the_plane_in_mm(spacing, angle):
    shape = (6, 48, 48)
    image = np.broadcast_to(np.arange(shape[2], dtype=np.float32) * spacing[2], (1, *shape)).copy()
    rotated, _ = rotate_axial(image, np.zeros((1, *shape), np.float32), angle, spacing, (6, 24, 24))
    gz, gy, gx = np.gradient(rotated[0], *spacing)
    measured = np.degrees(np.arctan2(gy[:, 4:-4, 4:-4].mean(), gx[:, 4:-4, 4:-4].mean()))
    assert abs(abs(measured) - abs(angle)) < 0.5 and rotated.shape == (1, 6, 24, 24)


class _Volume:
    """One case for DDPM training crops: channel 0 an x-ramp (in mm), channel 1 bright in the tumour box."""

    identifiers = ["liver"]

    def __init__(self, spacing):
        self.seg = np.zeros((1, 16, 64, 64), np.int8)
        self.seg[0, 6:10, 28:36, 24:40] = TUMOUR
        ramp = np.broadcast_to(np.arange(64, dtype=np.float32) * spacing[2], (16, 64, 64))
        self.data = np.stack([ramp, 1000 * (self.seg[0] == TUMOUR)]).astype(np.float32)

    def load_case(self, identifier):
        return self.data, self.seg, None, {}


def test_ddpm_training_patches_are_rotated_in_the_axial_plane_and_seeded():
    spacing = (3.0, 1.0, 1.0)
    source = PatchSource(_Volume(spacing), (8, 24, 32), TUMOUR)
    site = TumourSite("liver", (8, 32, 32), (4, 8, 16))
    angles = []
    rng = np.random.default_rng(0)
    for _ in range(40):
        image, mask = training_crop(source, site, rng, spacing)
        assert image.shape == (2, 8, 24, 32) and mask.shape == (1, 8, 24, 32)
        assert mask.sum() > 0 and ((image[1] > 500) == (mask[0] > 0)).mean() > 0.98, "mask and image rotated apart"
        angles.append(_ramp_angle(image, spacing))
    angles = np.array(angles)
    rotated = angles > 0.5
    assert 0.2 < rotated.mean() < 0.8, angles  # ROTATION_PROBABILITY = 0.5
    assert angles.max() <= MAX_ROTATION_DEG + 0.5 and np.ptp(angles[rotated]) > 3, angles
    first = [training_crop(source, site, np.random.default_rng(5), spacing)[0] for _ in range(2)]
    assert np.array_equal(*first), "the same seed gave another patch"


# --- healthy controls: recorded in the plan, preferred as insertion targets ------------------------------------


def test_plan_validates_its_healthy_cases():
    plan = make_plan()
    flat = {**plan.to_dict(), "healthy_cases": ["h1", "h2"]}
    assert SynthPlan.from_dict(flat, "p.json").healthy_cases == ("h1", "h2")
    assert SynthPlan.from_dict(plan.to_dict(), "p.json").healthy_cases == ()
    for bad in ("h1", ["h1", "h1"], [1]):
        with pytest.raises(SynthPlanError, match=r"p\.json: key 'healthy_cases'"):
            SynthPlan.from_dict({**plan.to_dict(), "healthy_cases": bad}, "p.json")


def test_healthy_cases_file_is_read_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    folder = tmp_path / "Dataset510_Merged"
    folder.mkdir()
    assert read_healthy_cases("Dataset510_Merged", ["a", "b"]) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_healthy_cases("Dataset510_Merged", ["a"], {"healthy_cases_file": HEALTHY_CASES_FILE})
    assert any(HEALTHY_CASES_FILE in str(w.message) for w in caught)
    (folder / HEALTHY_CASES_FILE).write_text(json.dumps(["b", "a"]), encoding="utf-8")
    assert read_healthy_cases("Dataset510_Merged", ["a", "b", "c"]) == ["a", "b"]
    with pytest.raises(SynthPlanError, match=r"healthy_cases\.json.*\['b'\]"):
        read_healthy_cases("Dataset510_Merged", ["a", "c"])
    (folder / HEALTHY_CASES_FILE).write_text(json.dumps({"a": 1}), encoding="utf-8")
    with pytest.raises(SynthPlanError, match="list of case identifiers"):
        read_healthy_cases("Dataset510_Merged", ["a"])


def test_synth_plan_records_the_raw_datasets_healthy_cases(phantom_ct, tmp_path, monkeypatch):
    # a copy of the phantom (its plan file is shared with other tests), raw folder holding only the healthy list
    name = "Dataset951_HealthyCopy"
    shutil.copytree(preprocessed_dir(phantom_ct), tmp_path / "pre" / name)
    for f in (tmp_path / "pre" / name).glob("nnUNetSynthPlans*.json"):
        f.unlink()
    (tmp_path / "raw" / name).mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    cases = sorted(f.stem for f in (tmp_path / "pre" / name / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    (tmp_path / "raw" / name / HEALTHY_CASES_FILE).write_text(json.dumps(cases[:2]), encoding="utf-8")
    plan_synth(name, "3d_fullres")
    assert load_synth_plan(name, "3d_fullres", create=False).healthy_cases == tuple(cases[:2])
    # a later run without the raw folder keeps the list
    shutil.rmtree(tmp_path / "raw" / name)
    plan_synth(name, "3d_fullres")
    assert load_synth_plan(name, "3d_fullres", create=False).healthy_cases == tuple(cases[:2])


def _chosen_shares(p: float, healthy: list[str], cases: list[str], batches: int = 60) -> tuple[float, float, float]:
    """(share chosen among healthy-case samples, among the others, overall) through nnU-Net's loader."""
    seg = np.zeros((1, 8, 16, 16), np.int8)  # no organ: a chosen sample is counted without drawing a lesion
    transform = SynthTumourTransform(make_plan(healthy_cases=tuple(healthy)), p, None, seed=1)
    loader = OutcomeDataLoader(_Cases(seg, cases), 40, (8, 16, 16), (8, 16, 16), LABELS,
                               transforms=ComposeTransforms([transform]))
    assert not transform.owns_crops, "a dataset that hands out arrays it keeps had its crops painted in place"
    np.random.seed(1)
    is_healthy, chosen = [], []
    for _ in range(batches):
        batch = loader.generate_train_batch()
        is_healthy += [k in healthy for k in batch["keys"]]
        chosen += (batch[OUTCOME_KEY] != NOT_CHOSEN).tolist()
    is_healthy, chosen = np.array(is_healthy), np.array(chosen)
    on_healthy = chosen[is_healthy].mean() if is_healthy.any() else float("nan")
    return on_healthy, chosen[~is_healthy].mean(), chosen.mean()


@pytest.mark.parametrize("p, n_healthy", [(0.2, 3), (0.5, 3), (0.2, 0)])
def test_healthy_cases_get_the_synthetic_tumours_first_at_the_named_ratio(p, n_healthy):
    cases = [f"case_{i:02d}" for i in range(10)]
    healthy = cases[:n_healthy]
    on_healthy, on_others, overall = _chosen_shares(p, healthy, cases)
    n = 60 * 40
    assert abs(overall - p) < 4 * np.sqrt(p * (1 - p) / n), overall
    h = n_healthy / len(cases)
    if h == 0:
        assert np.isnan(on_healthy) and abs(on_others - p) < 0.05
        return
    want_healthy, want_others = min(1.0, p / h), max(0.0, (p - h) / (1 - h))
    assert abs(on_healthy - want_healthy) < 0.08 and abs(on_others - want_others) < 0.05, (on_healthy, on_others)
    assert on_healthy > on_others


def test_transform_without_case_identifiers_keeps_the_plain_ratio():
    transform = SynthTumourTransform(make_plan(healthy_cases=("h",)), 0.3, None, seed=0)
    transform.prefer_cases(["h"], 0.5)
    assert transform.sample_probability(None) == pytest.approx(0.3)
    assert transform.case_probabilities() == pytest.approx((0.6, 0.0))
    with pytest.raises(ValueError, match="share"):
        transform.prefer_cases(["h"], 1.5)
