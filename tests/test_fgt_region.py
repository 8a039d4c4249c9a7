"""Breast plans place synthetic tumours in fibroglandular tissue (FGT) found without a trained model (the SynBT
paper's placement), show that region in the preview, and scale template sizes with the breast size."""

from __future__ import annotations

import dataclasses

import matplotlib.colors
import numpy as np
import pytest

from nnunet_synth.generators.lesions import placement_region, plan_lesions
from nnunet_synth.generators.regions import breast_size_mm
from nnunet_synth.generators.templates import Template, breast_scale
from nnunet_synth.planning import default_plan, default_region
from nnunet_synth.preview import REGION_COLOUR, TumourCrop, comparison_figure
from nnunet_synth.synth_plan import FGTRegion, SynthPlan, SynthPlanError

SPACING = (2.0, 2.0, 2.0)
GLANDS = ((0, -10, -8), (0, 8, 10), (3, 6, -12))  # blob centres (voxels from the body's centre, at unit scale)


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    idx = np.indices(shape).astype(float)
    return (((idx - np.reshape(centre, (3, 1, 1, 1))) / np.reshape(radii, (3, 1, 1, 1))) ** 2).sum(0) <= 1


def breast_phantom(seed: int = 0, scale: float = 1.0, fat_suppressed: bool = False, shape=(32, 64, 64)):
    """A body of fat with darker glandular blobs (non-fat-suppressed T1; with ``fat_suppressed`` the fat is dark and
    the glands bright), a tumour in one blob; z-scored per channel as nnU-Net's ZScoreNormalization.

    Returns:
        (image (2, *shape), seg, body, glands).
    """
    rng = np.random.default_rng(seed)
    centre = np.array(shape) / 2
    body = _ellipsoid(shape, centre, np.array([13, 26, 28]) * scale)
    glands = np.zeros(shape, bool)
    for offset in GLANDS:
        glands |= _ellipsoid(shape, centre + np.array(offset) * scale, np.array([6, 8, 8]) * scale)
    glands &= body
    fat, gland = (0.2, 1.0) if fat_suppressed else (1.0, 0.45)
    pre = np.where(body, np.where(glands, gland, fat), 0.0) + rng.normal(0, 0.04, shape)
    seg = np.zeros(shape, np.int16)
    tumour = _ellipsoid(shape, centre + np.array(GLANDS[0]) * scale, (3, 3, 3))
    seg[tumour] = 1
    pre[tumour] = 0.6
    post = pre.copy()
    post[tumour] = 2.0
    image = np.stack([pre, post]).astype(np.float32)
    image = (image - image.mean(axis=(1, 2, 3), keepdims=True)) / image.std(axis=(1, 2, 3), keepdims=True)
    return image, seg, body, glands


def fgt_plan(image, seg, **settings) -> SynthPlan:
    return SynthPlan.for_volume(image, seg, SPACING, placement_region="fgt", **settings)


@pytest.mark.parametrize("fat_suppressed", [False, True])
def test_region_lies_inside_the_body_in_the_glandular_class(fat_suppressed):
    image, seg, body, glands = breast_phantom(fat_suppressed=fat_suppressed)
    plan = fgt_plan(image, seg)
    lo, hi = plan.fgt.range
    # the tumours' vote picks the darker class without fat suppression, the brighter one with it
    assert (hi is not None and lo is None) if not fat_suppressed else (lo is not None and hi is None)
    region = placement_region(image, seg, plan)
    assert region.sum() > 0.2 * glands.sum()
    assert not (region & ~body).any()
    assert (region & glands).sum() >= 0.95 * region.sum()
    assert not (region & (seg != 0)).any()
    # the tissue region of the same plan (the old placement) spreads into the fat
    tissue = placement_region(image, seg, plan.replace(placement_region="tissue"))
    assert (tissue & ~glands).sum() > 0.2 * tissue.sum()


def test_every_lesion_centre_lies_in_the_region_on_cases_and_patches():
    image, seg, _, _ = breast_phantom(seed=1)
    plan = fgt_plan(image, seg, shapes={"size_preset": "labelfree", "size_class": "small"})
    region = placement_region(image, seg, plan)
    centres = 0
    for seed in range(4):
        for p in plan_lesions(image, seg, plan, np.random.default_rng(seed)):
            assert region[p.info.centre]
            assert region[p.lesion.bbox][p.lesion.mask].all()
            centres += 1
    # a patch recomputes the region from the plan's thresholds; lesions go where it lies, in the central window
    patch = (slice(None), slice(0, 24), slice(8, 56))
    window = (16, 32, 32)
    patch_region = placement_region(image[(slice(None), *patch)], seg[patch], plan)
    assert (patch_region & region[patch]).sum() >= 0.9 * patch_region.sum() > 0
    for seed in range(4):
        for p in plan_lesions(image[(slice(None), *patch)], seg[patch], plan, np.random.default_rng(seed),
                              window=window):
            assert patch_region[p.info.centre]
            centres += 1
    assert centres >= 4


def test_template_size_follows_the_breast_size():
    image, seg, _, _ = breast_phantom()
    tumour = seg == 1
    box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(tumour))
    templates = [Template(mask=tumour[box])]
    plan = fgt_plan(image, seg, shapes={"deformation": "template", "size_preset": "quartile"})
    # the median recorded at planning is this (only) case's breast size: its templates keep their drawn size
    assert plan.fgt.breast_size_mm == pytest.approx(breast_size_mm(image[0], plan.fgt.body_threshold, SPACING))
    assert breast_scale(image, plan, SPACING) == pytest.approx(1.0)
    big, _, _, _ = breast_phantom(scale=1.2, shape=(40, 72, 72))
    size_ratio = breast_size_mm(big[0], plan.fgt.body_threshold, SPACING) / plan.fgt.breast_size_mm
    assert size_ratio == pytest.approx(1.2, rel=0.05)
    assert breast_scale(big, plan, SPACING) == pytest.approx(size_ratio)
    # on a patch: the body inside its central window against the median in patch windows
    window = (slice(4, 28), slice(8, 56), slice(8, 56))
    in_window = breast_size_mm(image[0], plan.fgt.body_threshold, SPACING, window)
    patched = plan.replace(fgt=dataclasses.replace(plan.fgt, breast_size_patch_mm=in_window / 1.25))
    assert breast_scale(image, patched, SPACING, window) == pytest.approx(1.25)
    assert breast_scale(image, plan, SPACING, window) == 1.0  # no patch median recorded: not scaled
    # not scaled: other deformations, and the tissue region
    assert breast_scale(big, plan.replace(shapes={"deformation": "elastic"}), SPACING) == 1.0
    assert breast_scale(big, plan.replace(placement_region="tissue"), SPACING) == 1.0
    # placed lesions: the drawn semi-axes times the breast's factor (same draws, a training median half as large)
    half = plan.replace(fgt=dataclasses.replace(plan.fgt, breast_size_mm=plan.fgt.breast_size_mm / 1.5))
    ratios = []
    for seed in range(6):
        a = plan_lesions(image, seg, plan, np.random.default_rng(seed), templates=templates)
        b = plan_lesions(image, seg, half, np.random.default_rng(seed), templates=templates)
        if a and b:
            ratios.append(b[0].info.semi_axes_mm[0] / a[0].info.semi_axes_mm[0])
    assert ratios and max(ratios) == pytest.approx(1.5)


def test_preview_outlines_the_placement_region():
    shape = (12, 12, 12)
    lesion = _ellipsoid(shape, (6, 6, 6), (2, 2, 2))
    region = _ellipsoid(shape, (6, 6, 6), (4, 5, 5))
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)

    def colours(crop_region):
        crop = TumourCrop("analytic", "case", [[0, n] for n in shape], image, lesion, np.zeros(shape, bool),
                          np.ones(shape, bool), crop_region)
        fig, _ = comparison_figure(None, [crop], SPACING, ["pre"], 24.0, "title")
        found = [tuple(c) for ax in fig.axes for coll in ax.collections for c in np.atleast_2d(coll.get_edgecolor())]
        return {matplotlib.colors.to_hex(c[:3]) for c in found if len(c) >= 3}

    yellow = matplotlib.colors.to_hex(REGION_COLOUR)
    assert yellow in colours(region)
    assert yellow not in colours(None)


@pytest.mark.parametrize("key, value, named", [
    ("placement_region", "lungs", "'placement_region'"),
    ("placement_region", "organ", "'placement_region'"),
    ("fgt", None, "'fgt'"),
    ("fgt.range", [1.5, 0.5], "'fgt.range'"),
    ("fgt.range", [0.5], "'fgt.range'"),
    ("fgt.smoothing_mm", 0, "'fgt.smoothing_mm'"),
    ("fgt.channel", 5, "'fgt.channel'"),
    ("fgt.breast_size_mm", -1.0, "'fgt.breast_size_mm'"),
    ("fgt.threshold", 0.3, "'fgt.threshold'"),
])
def test_a_bad_region_spec_names_the_field(key, value, named):
    image, seg, _, _ = breast_phantom()
    flat = fgt_plan(image, seg).to_dict()
    SynthPlan.from_dict(flat, "nnUNetSynthPlans.json")  # the plan as written loads
    *parents, last = key.split(".")
    node = flat
    for parent in parents:
        node = node[parent]
    node[last] = value
    with pytest.raises(SynthPlanError, match=named) as err:
        SynthPlan.from_dict(flat, "nnUNetSynthPlans.json")
    assert "nnUNetSynthPlans.json" in str(err.value)


def test_breast_cohorts_default_to_the_fgt_region():
    labels = {"background": 0, "tumor": 1}
    for cohort, region in (("mama_mia", "fgt"), ("duke_fgt", "fgt"), ("msd_pancreas", None)):
        dataset_json = {"labels": labels, "nnunet_synth": {"cohort": cohort}}
        assert default_plan(dataset_json, "Dataset1_X", "nnUNetPlans", None, 1)["placement_region"] == region
    # an organ label stays the region; plans without the key keep the old placement
    assert default_region({"nnunet_synth": {"cohort": "mama_mia"}}, 2) is None
    assert SynthPlan("d", "3d_fullres", SPACING, 1, None, ()).region_kind == "tissue"
    assert FGTRegion().range == (None, None)
