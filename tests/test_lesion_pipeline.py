"""The one lesion pipeline (size -> mask -> placement -> synthesis -> label) and its public API."""

import re
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt, label

from nnunet_synth import SynthPlan, SynthPlanError, insert_tumours
from nnunet_synth.generators import get_backend
from nnunet_synth.generators.lesions import plan_lesions
from nnunet_synth.generators.sizes import slice_area_class

from .test_injection import ORGAN, TUMOUR, make_patch, make_plan

TEMPLATE = np.zeros((5, 9, 13), bool)
TEMPLATE[1:4, 2:8, 2:11] = True
ONE_PIECE = np.ones((3, 3, 3), bool)


def _insert(plan, seed, templates=None, shape=(32, 64, 64)):
    image, seg = make_patch(shape=shape)
    return image.numpy(), seg.numpy(), *insert_tumours(image.numpy(), seg.numpy(), None, plan,
                                                       np.random.default_rng(seed), templates=templates)


@pytest.mark.parametrize("preset, size_class", [("labelfree", "any"), ("labelfree", "mixed"), ("quartile", "small"),
                                                ("quartile", "mixed"), ("liver_mri", "any")])
@pytest.mark.parametrize("deformation", ["elastic", "simplex", "template", "none"])
def test_every_preset_and_deformation_gives_whole_connected_lesions(preset, size_class, deformation):
    from nnunet_synth.synth_plan import TumourSizes

    radii = {"tiny": 2.5, "small": 4.0, "medium": 6.0, "large": 8.0}
    plan = make_plan(size_class=size_class).replace(
        shapes={"size_preset": preset, "deformation": deformation},
        tumour_sizes=TumourSizes(count=8, cases=4, class_radius_mm=radii)).validated()
    if preset == "liver_mri":  # 27 mm semi-axes: a coarser grid makes the patch's organ large enough
        plan = plan.replace(spacing=(4.0, 2.5, 2.5))
    found = 0
    for seed in range(4):
        image, seg, new_image, new_seg, lesions = _insert(plan, seed, [TEMPLATE], shape=(48, 96, 96))
        synthetic = (new_seg[0] == TUMOUR) & (seg[0] != TUMOUR)
        assert synthetic.sum() == sum(lesion.voxels for lesion in lesions)
        assert label(synthetic, ONE_PIECE)[1] == len(lesions), "a lesion in several pieces, or two lesions touching"
        assert (seg[0][synthetic] == ORGAN).all()
        far = distance_transform_edt(~synthetic, sampling=plan.spacing) > get_backend(plan.backend)(plan).halo_mm
        assert np.array_equal(new_image[:, far], image[:, far]), "a voxel beyond the backend's halo changed"
        for lesion in lesions:
            assert len(lesion.semi_axes_mm) == 3 and synthetic[lesion.centre] in (True, False)
            assert all(lo < hi for lo, hi in lesion.bbox)
        found += len(lesions)
    assert found, f"no lesion placed with {preset}/{size_class}/{deformation}"


def test_gap_to_real_tumours_is_kept_in_mm_on_the_final_lesion():
    plan = make_plan(size_class="small", placement={"gap_mm": 3.0})
    spacing = np.array(plan.spacing)
    for seed in range(8):
        _, seg, _, new_seg, lesions = _insert(plan, seed)
        synthetic = (new_seg[0] == TUMOUR) & (seg[0] != TUMOUR)
        if not lesions:
            continue
        distance = distance_transform_edt(seg[0] != TUMOUR, sampling=spacing)
        assert distance[synthetic].min() > 3.0 - 1e-6, "a synthetic lesion within gap_mm of a real tumour"


def test_liver_mri_preset_semi_axes():
    plan = make_plan(size_class="any", shapes={"size_preset": "liver_mri", "deformation": "none"})
    rng = np.random.default_rng(0)
    image, seg = make_patch(shape=(48, 128, 128))
    big = plan.replace(spacing=(2.0, 1.5, 1.5), placement={"min_inside": 0.05})
    axes = [a for _ in range(30) for p in plan_lesions(image.numpy(), seg[0].numpy(), big, rng)
            for a in p.info.semi_axes_mm]
    assert len(axes) >= 30 and abs(np.mean(axes) - 27.0) < 3.0, np.mean(axes)


@pytest.mark.parametrize("size_class", ["tiny", "small", "medium"])
def test_slice_area_lesions_have_the_requested_pixel_area_class(size_class):
    image, seg = make_patch(shape=(24, 96, 96))
    plan = make_plan(size_class=size_class).replace(spacing=(1.0, 1.0), configuration="2d",
                                                    shapes={"size_preset": "slice_area"}).validated()
    rng = np.random.default_rng(0)
    placed = 0
    for _ in range(6):
        new_image, new_seg, lesions = insert_tumours(image[:, 12].numpy(), seg[:, 12].numpy(), None, plan, rng)
        for lesion in lesions:
            assert slice_area_class(lesion.voxels) == size_class
            placed += 1
    assert placed


def test_template_deformation_without_templates_is_refused():
    plan = make_plan(shapes={"deformation": "template"})
    with pytest.raises(ValueError, match="deformation 'template' needs"):
        _insert(plan, 0)


def test_same_rng_state_same_tumours():
    plan = make_plan()
    a = _insert(plan, 5)
    b = _insert(plan, 5)
    assert np.array_equal(a[2], b[2]) and a[4] == b[4]


@pytest.mark.parametrize("size_class", ["tiny", "small"])
def test_in_place_insertion_paints_the_same_tumours_into_the_inputs(size_class):
    """A loader that owns its crop has it painted in place: the same image, labels and lesions as the copy, each
    lesion's site and edge still judged on the sample as it was before any lesion was painted."""
    plan = make_plan(size_class=size_class).replace(shapes={"size_preset": "labelfree"})  # several per sample
    most = 0
    for seed in range(3):
        image, seg, copied_image, copied_seg, lesions = _insert(plan, seed)
        own_image, own_seg = image.copy(), seg.copy()
        new_image, new_seg, same = insert_tumours(own_image, own_seg, None, plan, np.random.default_rng(seed),
                                                  in_place=True)
        assert new_image is own_image and new_seg is own_seg
        assert np.array_equal(new_image, copied_image) and np.array_equal(new_seg, copied_seg) and same == lesions
        most = max(most, len(lesions))
    assert most > 1, "no sample with several lesions to paint in turn"


def test_plan_round_trips_through_its_json_form_and_validates():
    plan = make_plan()
    assert SynthPlan.from_dict(plan.to_dict(), "copy") == plan
    with pytest.raises(SynthPlanError, match=r"copy: key 'placement.min_inside' = 1.5"):
        SynthPlan.from_dict({**plan.to_dict(), "placement": {"margin_mm": 1, "gap_mm": 2, "min_inside": 1.5}}, "copy")
    with pytest.raises(SynthPlanError, match=r"key 'shapes.deformation' = 'wobbly'"):
        plan.replace(shapes={"deformation": "wobbly"}).validated()
    with pytest.raises(SynthPlanError, match=r"key 'organ_label' = 7 .* foreground label of dataset.json"):
        plan.replace(organ_label=7).validated("x", {"labels": {"background": 0, "organ": 1, "tumour": 2},
                                                    "channel_names": {"0": "c0"}})
    with pytest.raises(SynthPlanError, match="slice_area"):
        plan.replace(shapes={"size_preset": "slice_area"}).validated()
    with pytest.raises(SynthPlanError, match="template masks are the real tumours' 3D components"):
        plan.replace(spacing=(1.0, 1.0), shapes={"deformation": "template"}).validated()


def test_for_volume_measures_the_volume():
    image, seg = make_patch(shape=(24, 48, 48))
    image = image.numpy()
    image[0][seg[0].numpy() == TUMOUR] += 3.0
    plan = SynthPlan.for_volume(image, seg.numpy(), (2.0, 1.0, 1.0), tumour_label=TUMOUR, organ_label=ORGAN)
    assert plan.organ_label == ORGAN and plan.tumour_sizes.count == 1
    assert 2.0 < plan.channels[0].contrast_range[0] <= plan.channels[0].contrast_range[1] < 4.0
    with pytest.raises(SynthPlanError, match="no real tumour"):
        SynthPlan.for_volume(image, np.zeros_like(seg.numpy()), (2.0, 1.0, 1.0), tumour_label=TUMOUR)


def test_the_api_docs_example_runs():
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text(encoding="utf-8")
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    exec(compile(example, "docs/api.md", "exec"), {})


def test_a_whole_lesion_too_large_for_any_deep_centre_is_shrunk_before_its_mask_is_drawn(monkeypatch):
    """Without an organ label a size that no centre in the window is deep enough for is shrunk at once: masks are
    drawn only at sizes placement could accept, starting at the first such size."""
    from nnunet_synth.generators import lesions
    from nnunet_synth.generators.placement import LabelMask, central_window
    from nnunet_synth.generators.sizes import LesionRequest

    spacing = (2.0, 1.0, 1.0)
    shape = (40, 64, 64)
    region = np.zeros(shape, bool)
    region[:, 20:44, :] = True  # a 24 mm slab: at most ~12 mm deep
    depth = lesions.region_depth(region, spacing)
    window = central_window(shape, None)
    seg = np.zeros(shape, np.int16)
    levels = [20.0 * lesions.WHOLE_SHRINK ** k for k in range(lesions.WHOLE_SHRINKS + 1)]
    bounds = np.array([0, 0, 0]), np.array(shape)
    deep = [len(depth.at_least(lesions.DEEP_ENOUGH * r).cells(*bounds)[0]) > 0 for r in levels]
    assert deep[:2] == [False, False] and deep[2], deep  # the first two sizes have no centre deep enough
    drawn: list[float] = []
    mask_for = lesions._mask_for
    monkeypatch.setattr(lesions, "_mask_for", lambda request, *a: (drawn.append(float(request.radii_mm.min())),
                                                                    mask_for(request, *a))[1])
    plan = make_plan()
    for max_shape, first in ((None, levels[2]), ((999, 999, 999), levels[0])):  # a limit no mask reaches: no shortcut
        for seed in range(3):
            drawn.clear()
            lesions._place([LesionRequest("medium", np.full(3, 20.0))], plan, spacing, np.random.default_rng(seed),
                           region, depth, region, LabelMask(seg, TUMOUR), window, None, max_shape)
            assert drawn and drawn[0] == pytest.approx(first), (max_shape, drawn)
