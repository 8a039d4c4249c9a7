"""The analytic backend and the injection transform, on hand-made patches."""

import pickle

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from nnunet_synth.generators import available_backends, get_backend
from nnunet_synth.generators.placement import PlacementRules
from nnunet_synth.injection import SEEN, SKIPPED, SYNTHETIC, SynthTumourTransform, achieved_rates
from nnunet_synth.synth_plan import ChannelPrior, ShapeSettings, SynthPlan

ORGAN, TUMOUR = 1, 2


def make_plan(contrasts=((-2.0, -1.0),), clip=None, size_class="small", **changes) -> SynthPlan:
    channels = tuple(ChannelPrior(name=f"c{i}", normalization="ZScoreNormalization", organ_mean=0.0, organ_std=1.0,
                                  contrast_range=tuple(c), clip=None if clip is None else tuple(clip))
                     for i, c in enumerate(contrasts))
    plan = SynthPlan(dataset_name="hand-made", configuration="3d_fullres", spacing=(2.0, 1.0, 1.0),
                     tumour_label=TUMOUR, organ_label=ORGAN, channels=channels,
                     labels={"background": 0, "organ": ORGAN, "tumour": TUMOUR},
                     shapes=ShapeSettings(size_class=size_class), placement=PlacementRules(1.0, 2.0, 0.8))
    return plan.replace(**changes).validated("hand-made plan")


def make_patch(channels=1, shape=(24, 48, 48), seg_channels=1):
    """A patch with a large organ, a real tumour, a band of -1 (outside the image) and a noisy image."""
    rng = np.random.default_rng(0)
    seg = np.zeros((seg_channels, *shape), np.int16)
    grid = np.indices(shape) - np.array(shape)[:, None, None, None] // 2
    seg[0][((grid / np.array([10, 20, 20])[:, None, None, None]) ** 2).sum(0) <= 1] = ORGAN
    seg[0][((grid - np.array([0, 0, 12])[:, None, None, None]) ** 2).sum(0) <= 9] = TUMOUR
    seg[0, :, :, :3] = -1
    if seg_channels > 1:
        seg[1] = seg[0] > 0  # a cascade's previous-stage segmentation
    image = rng.normal(0, 1, (channels, *shape)).astype(np.float32)
    return torch.from_numpy(image), torch.from_numpy(seg)


def test_registry_lists_analytic_and_names_what_is_missing(monkeypatch):
    from nnunet_synth import generators

    assert "analytic" in available_backends()
    # a backend of the design that this version does not build (whichever that is now)
    monkeypatch.setitem(generators._NOT_BUILT, "future_backend", "not implemented yet")
    with pytest.raises(NotImplementedError, match="future_backend"):
        get_backend("future_backend")
    with pytest.raises(KeyError, match="available: analytic"):
        get_backend("nonexistent")


def test_insertion_changes_only_the_lesion_and_labels_only_channel_0():
    image, seg = make_patch(channels=2, seg_channels=2)
    plan = make_plan(contrasts=((-2.0, -1.0), (1.0, 2.0)))
    t = SynthTumourTransform(plan, 1.0, (16, 32, 32), seed=0)
    before_image, before_seg = image.clone(), seg.clone()
    out = t(image=image, segmentation=seg)
    new_lesion = (out["segmentation"][0] == TUMOUR) & (before_seg[0] != TUMOUR)
    assert new_lesion.sum() > 0
    assert torch.equal(image, before_image) and torch.equal(seg, before_seg), "inputs were written to"
    outside = ~new_lesion
    # the edge may straddle the border by up to the backend's halo, never further
    halo = distance_transform_edt(~new_lesion.numpy(), sampling=plan.spacing) > t.generator.halo_mm
    assert torch.equal(out["image"][:, halo], before_image[:, halo]), "image changed beyond the lesion's halo"
    protected = (before_seg[0] < 0) | (before_seg[0] == TUMOUR)
    assert torch.equal(out["image"][:, protected], before_image[:, protected]), "padding or real tumour changed"
    assert torch.equal(out["segmentation"][1], before_seg[1]), "a segmentation channel other than 0 changed"
    assert torch.equal(out["segmentation"][0][outside], before_seg[0][outside])
    assert (before_seg[0][new_lesion] == ORGAN).all(), "lesion on voxels that are not organ (-1, tumour, bg)"
    # contrast per channel as planned: the mean change over the lesion lies in the planned range
    delta = (out["image"][:, new_lesion] - before_image[:, new_lesion]).mean(1)
    assert -2.01 < delta[0] < -0.99 and 0.99 < delta[1] < 2.01, delta


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("size_class", ["tiny", "medium"])
def test_mean_lesion_contrast_is_the_planned_contrast(seed, size_class):
    image, seg = make_patch()
    plan = make_plan(contrasts=((1.5, 1.5),), size_class=size_class)
    transform = SynthTumourTransform(plan, 1.0, None, seed=seed)
    for _ in range(5):  # a medium lesion does not always fit the small organ while it keeps its gap to the tumour
        out = transform(image=image, segmentation=seg)
        lesion = (out["segmentation"][0] == TUMOUR) & (seg[0] != TUMOUR)
        if lesion.any():
            break
    assert lesion.any()
    assert float((out["image"][0][lesion] - image[0][lesion]).mean()) == pytest.approx(1.5, abs=0.01)


def test_clip_bounds_are_respected():
    image, seg = make_patch()
    plan = make_plan(contrasts=((-50.0, -40.0),), clip=[-3.0, 10.0])
    out = SynthTumourTransform(plan, 1.0, None, seed=1)(image=image, segmentation=seg)
    lesion = (out["segmentation"][0] == TUMOUR) & (seg[0] != TUMOUR)
    assert lesion.any() and out["image"][0][lesion].min() >= -3.0


@pytest.mark.parametrize("probability", [0.0, 0.2, 0.5, 1.0])
def test_achieved_rate_matches_probability(probability):
    """Each carried tumour is counted as synthetic (tests/test_ratios.py pins the rate itself, with many draws)."""
    image, seg = make_patch(shape=(16, 32, 32))
    t = SynthTumourTransform(make_plan(size_class="tiny"), probability, None, seed=3)
    n = 60
    carried = sum(bool(((t(image=image, segmentation=seg)["segmentation"][0] == TUMOUR) & (seg[0] != TUMOUR)).any())
                  for _ in range(n))
    rates = achieved_rates(t.counters)
    assert rates["seen"] == n and rates["synthetic"] == carried and rates["skipped"] == 0
    sigma = np.sqrt(n * probability * (1 - probability))
    assert abs(carried - n * probability) <= 4 * sigma + 1e-9, carried


def test_same_seed_same_tumours_other_worker_other_tumours(monkeypatch):
    image, seg = make_patch()

    def draw(seed, worker):
        monkeypatch.setattr("nnunet_synth.injection.worker_index", lambda: worker)
        t = SynthTumourTransform(make_plan(), 1.0, None, seed=seed)
        return [t(image=image, segmentation=seg)["image"] for _ in range(3)]

    a, b, c = draw(7, 1), draw(7, 1), draw(7, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_transform_pickles_and_a_copy_draws_the_same_tumours():
    image, seg = make_patch()
    t = SynthTumourTransform(make_plan(), 1.0, (16, 32, 32), seed=11)
    t(image=image, segmentation=seg)  # a used transform: its generator state must not travel
    copy = pickle.loads(pickle.dumps(t))
    fresh = SynthTumourTransform(make_plan(), 1.0, (16, 32, 32), seed=11)
    assert torch.equal(copy(image=image, segmentation=seg)["image"], fresh(image=image, segmentation=seg)["image"])


def test_patch_without_organ_is_skipped_and_counted():
    image, seg = make_patch()
    seg[0][seg[0] == ORGAN] = 0
    t = SynthTumourTransform(make_plan(), 1.0, None, seed=0)
    out = t(image=image, segmentation=seg)
    assert torch.equal(out["image"], image)
    counts = t.counters.sum(0)
    assert counts[SEEN] == 1 and counts[SKIPPED] == 1 and counts[SYNTHETIC] == 0


def test_two_dimensional_patch():
    image, seg = make_patch()
    image2d, seg2d = image[:, 12], seg[:, 12]
    plan = make_plan()
    transform = SynthTumourTransform(plan, 1.0, (32, 32), seed=0)
    out = transform(image=image2d, segmentation=seg2d)
    lesion = (out["segmentation"][0] == TUMOUR) & (seg2d[0] != TUMOUR)
    beyond = distance_transform_edt(~lesion.numpy(), sampling=plan.spacing[-2:]) > transform.generator.halo_mm
    assert lesion.any() and torch.equal(out["image"][:, beyond], image2d[:, beyond])
    assert not torch.equal(out["image"][:, ~lesion], image2d[:, ~lesion]), "the edge should straddle the border"


def test_invalid_probability_is_rejected():
    with pytest.raises(ValueError, match="probability"):
        SynthTumourTransform(make_plan(), 1.5, None, seed=0)
