"""Size presets, deformations, templates, multi-lesion samples and label noise (issue: shapes engine)."""

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt, label

from nnunet_synth.generators.shapes import LABELFREE_RADIUS_MM, equivalent_diameter_mm, lesion_mask
from nnunet_synth.generators.sizes import LABELFREE_COUNTS, SLICE_AREA_BINS_PX, lesion_requests
from nnunet_synth.generators.templates import draw_template
from nnunet_synth.injection import SynthTumourTransform
from nnunet_synth.label_noise import LABEL_NOISE_MM, NoisyTumourLabelTransform, displacement
from nnunet_synth.synth_plan import TissueRegion, TumourSizes

from .test_injection import ORGAN, TUMOUR, make_patch, make_plan


def _plan(preset, size_class, radii=None):
    sizes = TumourSizes(count=40, cases=10, class_radius_mm=radii) if radii else TumourSizes()
    return make_plan(size_class="any").replace(shapes={"size_preset": preset, "size_class": size_class},
                                               tumour_sizes=sizes)


def _mean_radius(plan, spacing, n, seed=0):
    """Mean equivalent radius of the first ``n`` lesions the plan requests (labelfree asks for several)."""
    rng = np.random.default_rng(seed)
    radii = []
    while len(radii) < n:
        for request in lesion_requests(plan, spacing, rng)[: n - len(radii)]:
            mask = lesion_mask(request.radii_mm, spacing, rng, plan.shapes.deformation)
            radii.append(equivalent_diameter_mm(int(mask.sum()), spacing) / 2)
    return float(np.mean(radii))


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 1.5), (3.0, 1.0, 1.0)])
@pytest.mark.parametrize("preset, size_class, expected, n", [
    ("labelfree", "tiny", 4.0, 200), ("labelfree", "small", 8.0, 200), ("labelfree", "medium", 16.0, 100),
    ("labelfree", "large", 32.0, 40), ("quartile", "tiny", 3.5, 200), ("quartile", "large", 11.0, 100),
    ("liver_mri", "any", 27.0, 40),
])
def test_equivalent_size_follows_the_preset(spacing, preset, size_class, expected, n):
    plan = _plan(preset, size_class, {"tiny": 3.5, "small": 5.0, "medium": 7.5, "large": 11.0})
    mean = _mean_radius(plan, spacing, n)
    assert abs(mean - expected) / expected < 0.10, mean
    if preset == "labelfree":
        assert expected == LABELFREE_RADIUS_MM[size_class]


@pytest.mark.parametrize("size_class", list(SLICE_AREA_BINS_PX))
def test_slice_area_bins_in_pixels(size_class):
    plan = _plan("slice_area", size_class)
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(150):
        (request,) = lesion_requests(plan, (0.7, 0.7), rng)
        areas.append(int(lesion_mask(request.radii_mm, (0.7, 0.7), rng).sum()))
    lo, hi = SLICE_AREA_BINS_PX[size_class]
    assert lo * 0.9 <= np.mean(areas) <= hi * 1.1, np.mean(areas)
    with pytest.raises(ValueError, match="2d configurations"):
        lesion_requests(plan, (1.0, 0.7, 0.7), rng)


def test_labelfree_counts_and_scaling_to_the_room():
    rng = np.random.default_rng(0)
    plan = _plan("labelfree", "tiny")
    counts = [len(lesion_requests(plan, (1, 1, 1), rng, room_mm3=1e9)) for _ in range(200)]
    assert min(counts) == LABELFREE_COUNTS["tiny"][0] and max(counts) == LABELFREE_COUNTS["tiny"][1]
    small_room = [len(lesion_requests(plan, (1, 1, 1), rng, room_mm3=2000.0)) for _ in range(50)]
    assert max(small_room) < LABELFREE_COUNTS["tiny"][0] and min(small_room) >= 1
    mixed = lesion_requests(_plan("labelfree", "mixed"), (1, 1, 1), rng, room_mm3=1e9)
    assert {r.size_class for r in mixed} == {"tiny", "small", "medium", "large"}


def test_unknown_preset_or_class_is_an_error():
    with pytest.raises(ValueError, match="size_preset"):
        lesion_requests(_plan("huge", "any"), (1, 1, 1), np.random.default_rng(0))
    with pytest.raises(ValueError, match="size_class 'gigantic'"):
        lesion_requests(_plan("labelfree", "gigantic"), (1, 1, 1), np.random.default_rng(0))


def test_simplex_keeps_one_piece_more_often_than_elastic_at_equal_displacement():
    """The liver-MRI paper's claim, on our code: at the same mean displacement, simplex masks stay whole."""
    rng = np.random.default_rng(0)
    one_piece = {}
    for deformation in ("elastic", "simplex"):
        masks = [lesion_mask(12.0, (1.0, 1.0, 1.0), rng, deformation, amplitude=0.3) for _ in range(80)]
        one_piece[deformation] = np.mean([label(m)[1] == 1 for m in masks])
    assert one_piece["simplex"] > one_piece["elastic"] + 0.1, one_piece


def test_template_draw_is_zoomed_to_the_size_and_keeps_the_shape_family():
    rng = np.random.default_rng(0)
    template = np.zeros((5, 12, 20), bool)
    template[1:4, 2:10, 3:17] = True  # an elongated box
    spacing = (1.0, 1.0, 1.0)
    for radius in (4.0, 10.0):
        volumes = [draw_template([template], np.full(3, radius), spacing, rng).mask.sum() for _ in range(50)]
        target = 4 / 3 * np.pi * radius ** 3
        assert abs(np.mean(volumes) - target) / target < 0.15
    with pytest.raises(ValueError, match="template bank holds no tumour"):
        draw_template([], np.full(3, 4.0), spacing, rng)


def test_mixed_sample_gets_several_lesions_in_the_organ_without_overlap():
    image, seg = make_patch(shape=(32, 96, 96))
    plan = _plan("labelfree", "tiny")
    transform = SynthTumourTransform(plan, 1.0, None, seed=0)
    new_image, new_seg = transform.insert(image, seg, np.random.default_rng(1))
    synthetic = (new_seg[0] == TUMOUR) & (seg[0] != TUMOUR)
    components = label(synthetic.numpy())[1]
    assert components >= 2
    assert (seg[0][synthetic] == ORGAN).all()
    far = distance_transform_edt(~synthetic.numpy(), sampling=plan.spacing) > transform.generator.halo_mm
    assert torch.equal(new_image[:, far], image[:, far]), "a voxel beyond the backend's halo changed"


@pytest.mark.parametrize("level", list(LABEL_NOISE_MM))
def test_label_noise_level_is_the_mean_displacement(level):
    mm = LABEL_NOISE_MM[level]
    fields = displacement((64, 64, 64), np.array([3.0, 3.0, 3.0]), mm, np.random.default_rng(0))
    mean_length = np.sqrt(sum(f ** 2 for f in fields)).mean()
    assert abs(mean_length - mm) / mm < 0.1


def test_noisy_label_transform_moves_the_boundary_only():
    image, seg = make_patch(shape=(24, 48, 48))
    t = NoisyTumourLabelTransform(TUMOUR, ORGAN, 2.0, (1.0, 1.0, 1.0), seed=0)
    out = t(image=image.clone(), segmentation=seg.clone())
    assert torch.equal(out["image"], image)
    changed = out["segmentation"][0] != seg[0]
    assert changed.any()
    assert (seg[0][out["segmentation"][0] == -1] == -1).all() and (out["segmentation"][0][seg[0] == -1] == -1).all()
    # changes stay within a few displacements of the real tumour
    from scipy.ndimage import distance_transform_edt

    distance = distance_transform_edt(seg[0].numpy() != TUMOUR)
    assert distance[changed.numpy()].max() <= 3 * 2.0 * 3 + 1


def _tissue_patch():
    """A breast-like patch: background fill, a box of tissue, one real tumour, no organ label."""
    image, seg = make_patch(shape=(24, 48, 48))
    seg[0][seg[0] == ORGAN] = 0
    image[0] = -3.0
    box = np.zeros(seg.shape[1:], bool)
    box[4:20, 8:40, 8:40] = True  # the "tissue" the tumours sit in: textured, as real tissue is
    image[0][torch.from_numpy(box)] = torch.from_numpy(np.random.default_rng(0).normal(0.5, 0.05, int(box.sum()))
                                                       .astype(np.float32))
    plan = make_plan(size_class="tiny", organ_label=None, tissue=TissueRegion(0, (0.0, 1.0)),
                     labels={"background": 0, "tumour": TUMOUR})
    return image, seg, plan, box


def test_dataset_without_organ_label_places_whole_lesions_in_the_tissue():
    from nnunet_synth.planning import guess_labels, tumour_shell

    assert guess_labels({"background": 0, "tumor": 1}) == (None, 1)
    with pytest.raises(Exception, match="--organ-label"):
        guess_labels({"background": 0, "vessel": 1, "tumor": 2})  # an unknown label still needs the flag
    image, seg, plan, box = _tissue_patch()
    shell = tumour_shell(seg[0].numpy() == TUMOUR, seg[0].numpy(), (1.0, 1.0, 1.0))
    assert shell.any() and not (shell & (seg[0].numpy() != 0)).any()
    transform = SynthTumourTransform(plan, 1.0, None, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(8):
        new_image, new_seg = transform.insert(image, seg, rng)
        assert new_image is not None
        synthetic = ((new_seg[0] == TUMOUR) & (seg[0] != TUMOUR)).numpy()
        assert synthetic.any()
        assert (seg[0].numpy()[synthetic] == 0).all() and box[synthetic].all(), "lesion outside the tissue"
        pieces, n = label(synthetic, np.ones((3, 3, 3)))
        sizes = np.bincount(pieces.ravel())[1:]
        assert sizes.min() >= 7, f"a clipped sliver of {sizes.min()} voxels: lesions must be placed whole"


def test_tissue_region_excludes_background_fill_whatever_its_value():
    """A background fill inside the tissue's intensity range (z-scored skull-stripped MRI) is never tissue."""
    from nnunet_synth.generators.lesions import placement_region

    image, seg, plan, box = _tissue_patch()
    image[0][image[0] == -3.0] = 0.5  # the fill now looks like tissue by value
    region = placement_region(image.numpy(), seg[0].numpy(), plan)
    assert region.any() and not (region & ~box).any()


def test_preview_patch_centres_on_the_tissue_without_organ_label():
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    from nnunet_synth.preview import draw_synthetic_patch

    image, seg, plan, box = _tissue_patch()
    transform = SynthTumourTransform(plan, 1.0, None, seed=0)
    rng = np.random.default_rng(1)
    drawn = [draw_synthetic_patch(image.numpy(), seg.numpy(), plan, transform, (16, 24, 24), rng) for _ in range(4)]
    assert all(d is not None and d.lesion.any() for d in drawn)
    for d in drawn:
        centre = [(lo + hi) // 2 for lo, hi in d.bbox]
        assert box[tuple(centre)] and seg[0][tuple(centre)] == 0, "patch not centred in the tissue"
        inside = crop_and_pad_nd(box, d.bbox, False)
        assert not (d.lesion & ~inside).any(), "lesion outside the tissue"


def test_ct_clipped_fat_inside_the_body_is_tissue_air_outside_is_not():
    """CTNormalization clips fat and air to the same floor: only the clipped region reaching the border is air."""
    from nnunet_synth.generators.lesions import tissue_region
    from nnunet_synth.synth_plan import TissueRegion

    rng = np.random.default_rng(0)
    shape = (24, 64, 64)
    z, y, x = np.indices(shape)
    body = ((y - 32) / 28) ** 2 + ((x - 32) / 28) ** 2 <= 1
    fat = ((y - 32) / 12) ** 2 + ((x - 32) / 12) ** 2 <= 1
    floor = -2.0  # the clip floor: air and fat alike
    channel = np.where(body, rng.normal(0.5, 0.2, shape), floor).astype(np.float32)
    channel[fat] = floor
    seg0 = np.zeros(shape, np.int16)
    tissue = TissueRegion(0, (-2.5, 1.5), 1.0)
    clipped = tissue_region(channel, seg0, tissue, (1.0, 1.0, 1.0), 1.0, clipped=True)
    assert clipped[fat & (z > 2) & (z < 21)].mean() > 0.9, "fat inside the body is tissue"
    assert not clipped[~body].any(), "air is never tissue"
    mri = tissue_region(channel, seg0, tissue, (1.0, 1.0, 1.0), 1.0, clipped=False)
    assert not mri[fat].any(), "a fill value is background in a channel nnU-Net does not clip"


class _OneCase:
    """An nnU-Net dataset of one case (load_case, as the loader's), counting its loads."""

    def __init__(self, image: np.ndarray, seg: np.ndarray):
        self.image, self.seg, self.loads = image, seg, 0

    def load_case(self, identifier: str):
        self.loads += 1
        return self.image, self.seg, None, {}


@pytest.mark.parametrize("lower, upper", [((2, 5, 3), (20, 37, 43)), ((-4, -6, 30), (14, 20, 59)),
                                          ((10, 40, -9), (30, 60, 9)), ((30, 50, 50), (34, 54, 54))])
def test_patch_region_is_the_crop_of_its_cases_region(lower, upper):
    """The loader reads a patch's placement region and its depth from its whole case's (found once per case, the
    region kept bit-packed): the case's at the patch's box, not deep and not in the region where the box leaves the
    case (nnU-Net's padding)."""
    import pickle

    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    from nnunet_synth.generators.lesions import placement_region, region_depth
    from nnunet_synth.injection import CaseRegions

    image, seg, plan, _ = _tissue_patch()
    case = _OneCase(image.numpy(), seg.numpy())
    regions = CaseRegions(case, plan)
    whole = placement_region(case.image, case.seg[0], plan)
    whole_depth = region_depth(whole, tuple(plan.spacing))
    assert whole.any()
    box = [[lo, hi] for lo, hi in zip(lower, upper)]
    everything = tuple(slice(None) for _ in box)
    for _ in range(3):
        region, depth = regions.crop("case", lower, upper)
        np.testing.assert_array_equal(region, crop_and_pad_nd(whole, box, False))
        for mm in (1.0, 2.5):
            deep = crop_and_pad_nd(whole_depth.at_least(mm)[tuple(slice(0, n) for n in whole.shape)], box, False)
            np.testing.assert_array_equal(depth.at_least(mm)[everything], deep)
            points = tuple(np.random.default_rng(1).integers(0, n, 40) for n in region.shape)
            np.testing.assert_array_equal(depth.at_least(mm)[points], deep[points])
    assert case.loads == 1, "the case's region is found once"
    assert not pickle.loads(pickle.dumps(regions))._kept, "each worker finds its own"


def test_transform_places_lesions_in_the_patchs_case_region():
    """With the loader's case and box, the transform places whole lesions in the case's region at the patch, and
    finds the region once for many samples of the case."""
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    from nnunet_synth.generators.lesions import placement_region

    image, seg, plan, _ = _tissue_patch()
    case = _OneCase(image.numpy(), seg.numpy())
    whole = placement_region(case.image, case.seg[0], plan)
    transform = SynthTumourTransform(plan, 1.0, None, seed=0)
    transform.use_case_regions(case)
    inserted = 0
    for lower in [(0, 0, 0), (-3, 4, 6), (2, -5, 10), (4, 10, -2)]:
        box = [[lo, lo + n] for lo, n in zip(lower, (22, 40, 40))]
        transform.set_batch_keys(["case"])
        transform.set_next_box([b[0] for b in box], [b[1] for b in box])
        sample = transform(image=torch.from_numpy(crop_and_pad_nd(case.image, [[0, 1], *box], 0)),
                           segmentation=torch.from_numpy(crop_and_pad_nd(case.seg, [[0, 1], *box], -1)))
        synthetic = (sample["segmentation"][0] == TUMOUR).numpy() & (crop_and_pad_nd(case.seg[0], box, -1) != TUMOUR)
        inserted += int(synthetic.any())
        assert crop_and_pad_nd(whole, box, False)[synthetic].all(), "lesion outside the case's region"
    assert inserted >= 3 and case.loads == 1
