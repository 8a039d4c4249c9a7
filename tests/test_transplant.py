"""The transplant backend (CarveMix / copy-paste): real tumours of the training fold only, intensity-matched to
the target site, blended within the halo; its trainers and its bank."""

import json

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json
from scipy.ndimage import distance_transform_edt
from scipy.ndimage import label as connected_components

from nnunet_synth import insert_tumours
from nnunet_synth.generators import get_backend
from nnunet_synth.generators.appearance import (
    MAX_HALO_MM,
    RING_MM,
    edge_halo_mm,
    expand_box,
    measure_tumour,
    ring,
    ring_statistics,
    signed_distance,
)
from nnunet_synth.generators.base import Lesion
from nnunet_synth.generators.lesions import plan_lesions
from nnunet_synth.generators.paths import bank_dir, template_file
from nnunet_synth.generators.splits import split_cases
from nnunet_synth.generators.templates import (
    Template,
    draw_template,
    fold_templates,
    has_textures,
    mask_box,
    ring_units,
    template_cases,
)
from nnunet_synth.generators.transplant import TransplantGenerator
from nnunet_synth.planning import load_synth_plan, preprocessed_dir

from .conftest import NO_FINAL_VALIDATION, train_as_the_readme_says, training_log
from .test_injection import ORGAN, TUMOUR, make_patch, make_plan

SPACING = (2.0, 1.0, 1.0)
TRAIN_SIGNATURE, VALIDATION_SIGNATURE = -4.0, 15.0  # ring units of the tumours of training / validation cases


def transplant_plan(**changes):
    return make_plan(**changes).replace(backend="transplant", shapes={"deformation": "template"}).validated()


def donor(seed=0, shape=(20, 40, 40)):
    """A real tumour (dark, textured) in noisy organ tissue, cut as the template bank cuts it."""
    rng = np.random.default_rng(seed)
    grid = (np.indices(shape) - np.array(shape)[:, None, None, None] // 2) * np.array(SPACING)[:, None, None, None]
    tumour = ((grid / np.array([7.0, 9.0, 6.0])[:, None, None, None]) ** 2).sum(0) <= 1
    tumour &= ~((grid[2] > 2) & (grid[1] > 2))  # a notch: flips and turns must move mask and texture together
    seg = np.full(shape, ORGAN, np.int16)
    seg[tumour] = TUMOUR
    image = 80 + 5 * rng.normal(size=shape)
    image[tumour] = 80 + 5 * rng.normal(-3.0, 0.8, size=int(tumour.sum()))
    box = mask_box(tumour)
    texture = ring_units(image[None], seg, tumour, box, SPACING, seg == ORGAN, TUMOUR)
    return Template(mask=tumour[box], texture=texture, case="donor"), image, tumour, seg


def target_site(scale=1.0, shift=0.0, shape=(20, 40, 40)):
    rng = np.random.default_rng(7)
    return (scale * (-20 + 2 * rng.normal(size=(1, *shape))) + shift).astype(np.float32)


# --- painting: intensity matching, halo, labels -------------------------------------------------------------------

def test_painted_tumour_has_the_donors_ring_unit_intensities_at_any_site_scale_and_shift():
    template, donor_image, donor_mask, _ = donor()
    plan = transplant_plan()
    generator = get_backend("transplant")(plan)
    assert isinstance(generator, TransplantGenerator) and generator.halo_mm == edge_halo_mm(*generator.edge_mm)
    starts = (3, 8, 10)
    bbox = tuple(slice(s, s + n) for s, n in zip(starts, template.mask.shape))
    lesion = Lesion(bbox, template.mask, template.texture)
    painted = []
    for scale, shift in ((1.0, 0.0), (3.0, 100.0)):  # a site with another mean and scale
        image = target_site(scale, shift)
        new = image.copy()
        generator.synthesize(new, lesion, SPACING, np.random.default_rng(0))
        painted.append((image, new))
    (a, new_a), (b, new_b) = painted
    # shift and scale of the site carry through: the same ring-unit tumour
    np.testing.assert_allclose(new_b, 3.0 * new_a + 100.0, rtol=1e-5, atol=1e-3)
    # the painted tumour's ring-unit quantiles are the donor's
    mask = np.zeros(a.shape[1:], bool)
    mask[bbox] = template.mask
    expected = measure_tumour(donor_image[None], donor_mask, ~donor_mask, SPACING)["quantiles"][0]
    for new in (new_a, new_b):
        got = measure_tumour(new, mask, ~mask, SPACING)["quantiles"][0]
        # central quantiles (the feathered edge moves the outermost voxels towards the site)
        assert np.allclose(got[2:7], expected[2:7], atol=0.35), (got, expected)
        assert got[4] < -2.0


def test_only_the_halo_changes_and_labels_only_where_the_mask_is():
    template = donor()[0]
    plan = transplant_plan(placement={"gap_mm": 3.0})
    halo = get_backend("transplant")(plan).halo_mm
    assert 0 < halo <= MAX_HALO_MM
    placed = changed_outside = 0
    for seed in range(4):
        image, seg = (t.numpy() for t in make_patch(shape=(32, 64, 64)))
        image = image * 2 + 5
        new_image, new_seg, lesions = insert_tumours(image, seg, None, plan, np.random.default_rng(seed),
                                                     templates=[template])
        synthetic = (new_seg[0] == TUMOUR) & (seg[0] != TUMOUR)
        assert np.array_equal(new_seg != seg, synthetic[None]), "a label changed outside the lesion masks"
        assert synthetic.sum() == sum(lesion.voxels for lesion in lesions)
        if not lesions:
            continue
        placed += len(lesions)
        far = distance_transform_edt(~synthetic, sampling=plan.spacing) > halo + 1e-6
        assert np.array_equal(new_image[:, far], image[:, far]), "a voxel farther than halo_mm changed"
        assert not np.array_equal(new_image[:, synthetic], image[:, synthetic])
        changed_outside += int((new_image != image)[:, ~synthetic].sum())
        # the tumour is the donor's: dark against the site's ring
        for k in range(1, connected_components(synthetic)[1] + 1):
            lesion = connected_components(synthetic)[0] == k
            assert _ring_units_inside(image, new_image, lesion, seg[0] == ORGAN) < -1.5
    assert placed, "no lesion placed"
    assert changed_outside, "the edge should straddle the label border (halo)"


def _ring_units_inside(image, new_image, mask, tissue, spacing=SPACING):
    """Median over the lesion's interior of the painted values in units of the site's ring (on the tissue the
    lesion was placed in, as paint_lesion measures it)."""
    where = np.argwhere(mask)
    bbox = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(where.min(0), where.max(0)))
    box, _ = expand_box(bbox, RING_MM[1], spacing, mask.shape)
    distance = signed_distance(mask[box], spacing)
    centre, spread = ring_statistics(image[0][box], ring(distance, tissue[box] & ~mask[box]))
    inside = distance >= min(2.0, distance.max())
    return float(np.median((new_image[0][box][inside] - centre) / spread))


def test_texture_follows_the_mask_through_draw_and_placement():
    mask = np.zeros((6, 14, 12), bool)
    mask[1:5, 2:12, 2:5] = True
    mask[1:5, 9:12, 2:10] = True  # an L: a flip or turn of one without the other would show
    texture = np.where(mask, 4.0, -1.0)[None].astype(np.float16)
    template = Template(mask=mask, texture=texture, case="a")
    rng = np.random.default_rng(0)
    for radius in (3.0, 5.0, 9.0):
        for _ in range(20):
            drawn = draw_template([template], np.full(3, radius), SPACING, rng)
            assert drawn.texture.shape == (1, *drawn.mask.shape) and drawn.case == "a"
            # linear interpolation blurs the texture's edge; a texture flipped apart from its mask agrees on ~60%
            assert np.mean((drawn.texture[0] > 1.5) == drawn.mask) > 0.8
    # placement clips the mask to the organ and crops it at the patch edge: the texture stays aligned
    image, seg = (t.numpy() for t in make_patch(shape=(24, 48, 48)))
    plan = transplant_plan(placement={"min_inside": 0.3})
    found = 0
    for seed in range(10):
        for p in plan_lesions(image, seg[0], plan, np.random.default_rng(seed), templates=[template]):
            assert p.lesion.texture.shape == (1, *p.lesion.mask.shape)
            assert np.mean(p.lesion.texture[0][p.lesion.mask] > 0) > 0.9
            found += 1
    assert found


def test_transplant_without_texture_or_with_other_channels_is_a_clear_error():
    generator = get_backend("transplant")(transplant_plan())
    image = target_site()
    mask = np.ones((3, 3, 3), bool)
    bbox = tuple(slice(5, 8) for _ in range(3))
    with pytest.raises(ValueError, match=r"deformation 'template'.*nnUNetTrainerSynth\{2,5,10,20,30,40,50,60\}"
                                         r"Transplant"):
        generator.synthesize(image, Lesion(bbox, mask), SPACING, np.random.default_rng(0))
    with pytest.raises(ValueError, match="texture has 2 channel"):
        generator.synthesize(image, Lesion(bbox, mask, np.zeros((2, 3, 3, 3))), SPACING, np.random.default_rng(0))


# --- the template bank of a fold ----------------------------------------------------------------------------------

def _plan_and_configuration(dataset):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    base = preprocessed_dir(dataset)
    conf = PlansManager(load_json(base / "nnUNetPlans.json")).get_configuration("3d_fullres")
    plan = load_synth_plan(dataset, "3d_fullres").replace(backend="transplant", shapes={"deformation": "template"})
    return plan.validated(), conf


def _copy_preprocessed(dataset, tmp_path, edit):
    """The dataset's preprocessed cases rewritten (nnU-Net's numpy format) into a new preprocessed folder after
    ``edit(identifier, data, seg)``; returns that folder."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetDatasetNumpy

    _, conf = _plan_and_configuration(dataset)
    _, _, folder = split_cases(dataset, "3d_fullres", 0)
    out = tmp_path / preprocessed_dir(dataset).name
    (out / conf.data_identifier).mkdir(parents=True)
    ds = infer_dataset_class(str(folder))(str(folder))
    for identifier in sorted(ds.identifiers):
        data, seg, _, properties = ds.load_case(identifier)
        data, seg = np.array(data, dtype=np.float32), np.array(seg)
        edit(identifier, data, seg)
        nnUNetDatasetNumpy.save_case(data, seg, properties, str(out / conf.data_identifier / identifier))
    return out


def test_fold_templates_are_the_training_folds_tumours_with_textures(phantom_ct):
    plan, conf = _plan_and_configuration(phantom_ct)
    train, val, _ = split_cases(phantom_ct, "3d_fullres", 0)
    base = preprocessed_dir(phantom_ct)
    templates, cases = fold_templates(base, conf, plan, train)
    path = template_file(base, "3d_fullres")
    assert has_textures(path, plan.organ_label)
    assert set(val) & set(template_cases(path)), "the stored bank holds every case; the fold filter is tested"
    assert cases and set(cases) <= set(train) and not set(cases) & set(val)
    assert {t.case for t in templates} == set(cases)
    for t in templates:
        assert t.texture.dtype == np.float16 and t.texture.shape == (len(plan.channels), *t.mask.shape)
        assert np.isfinite(t.texture).all()
    # shape-only uses load the masks alone
    masks_only, _ = fold_templates(base, conf, plan.replace(backend="analytic"), train)
    assert len(masks_only) == len(templates) and all(t.texture is None for t in masks_only)


def test_a_transplant_never_uses_a_validation_cases_tumour(phantom_ct, tmp_path):
    """Every case's tumours carry a signature in ring units: training cases dark, validation cases bright; the
    bank stores them all, and what is pasted into a (validation) case is always dark."""
    plan, conf = _plan_and_configuration(phantom_ct)
    train, val, _ = split_cases(phantom_ct, "3d_fullres", 0)

    def sign(identifier, data, seg):
        organ, tumour = seg[0] == plan.organ_label, seg[0] == plan.tumour_label
        q25, median, q75 = np.percentile(data[0][organ], [25, 50, 75])
        signature = VALIDATION_SIGNATURE if identifier in val else TRAIN_SIGNATURE
        data[0][tumour] = median + signature * (q75 - q25) / 1.349

    base = _copy_preprocessed(phantom_ct, tmp_path, sign)
    templates, cases = fold_templates(base, conf, plan, train)
    assert set(cases) <= set(train)
    stored = fold_templates(base, conf, plan, train + val)[0]
    signatures = {t.case: float(np.median(t.texture[0][t.mask].astype(np.float32))) for t in stored}
    assert all(signatures[c] > 5 for c in val) and all(signatures[c] < -2 for c in train), signatures
    ds = np.load(next((base / conf.data_identifier).glob(f"{val[0]}.npz")))
    image, seg = ds["data"], ds["seg"]
    generator = get_backend("transplant")(plan)
    pasted = 0
    for seed in range(6):
        new_image, new_seg, lesions = insert_tumours(image, seg, None, plan, np.random.default_rng(seed),
                                                     generator=generator, templates=templates, draws=5)
        synthetic = (new_seg[0] == plan.tumour_label) & (seg[0] != plan.tumour_label)
        components, n = connected_components(synthetic)
        for k in range(1, n + 1):
            value = _ring_units_inside(image, new_image, components == k, seg[0] == plan.organ_label, plan.spacing)
            assert value < 0, f"a bright (validation-case) tumour was pasted: {value:.1f} ring units"
            assert abs(value - TRAIN_SIGNATURE) < 1.5, f"{value:.1f} ring units: not a training case's tumour"
            pasted += 1
    assert pasted


def test_an_old_template_file_without_textures_is_rebuilt(phantom_ct, tmp_path):
    plan, conf = _plan_and_configuration(phantom_ct)
    train, _, _ = split_cases(phantom_ct, "3d_fullres", 0)
    base = _copy_preprocessed(phantom_ct, tmp_path, lambda *_: None)
    path = template_file(base, "3d_fullres")
    fold_templates(base, conf, plan, train)
    with np.load(path) as z:  # the file as the mask-only version wrote it
        old = {k: z[k] for k in z.files if k.startswith("mask_") or k in ("case_ids", "shapes")}
    np.savez_compressed(path, **old)
    assert not has_textures(path, plan.organ_label)
    templates, _ = fold_templates(base, conf, plan, train)
    assert has_textures(path, plan.organ_label) and all(t.texture is not None for t in templates)


def test_a_fold_without_real_tumours_names_the_analytic_trainer(phantom_ct, tmp_path):
    plan, conf = _plan_and_configuration(phantom_ct)
    train, _, _ = split_cases(phantom_ct, "3d_fullres", 0)

    def heal(identifier, data, seg):
        seg[seg == plan.tumour_label] = plan.organ_label

    base = _copy_preprocessed(phantom_ct, tmp_path, heal)
    with pytest.raises(ValueError, match=r"training fold of .* has none.*nnUNetTrainerSynth20\b"):
        fold_templates(base, conf, plan, train)


# --- trainers and bank --------------------------------------------------------------------------------------------

def test_transplant_trainers_set_backend_and_template_shapes():
    from nnunet_synth.trainers import transplant

    for n in (2, 5, 10, 20, 30, 40, 50, 60):
        cls = getattr(transplant, f"nnUNetTrainerSynth{n}Transplant")
        assert cls.synth_probability == pytest.approx(n / 100)
        assert cls.synth_backend == "transplant" and cls.synth_shapes == {"deformation": "template"}


@pytest.mark.slow
def test_debug_trainer_runs_through_nnunetv2_train(phantom_ct):
    log = training_log(train_as_the_readme_says(phantom_ct, "3d_fullres", "nnUNetTrainerSynth20Transplant_Debug",
                                                **NO_FINAL_VALIDATION))
    assert "backend transplant" in log and "template bank:" in log
    assert "synthetic tumours this epoch" in log


def test_transplant_bank_writes_a_case(phantom_ct):
    from nnunet_synth.bank import MANIFEST_DIR, generate_bank

    written = generate_bank(phantom_ct, "transplant", 1, deformation="template", progress=False)
    assert len(written) == 1
    train, _, _ = split_cases(phantom_ct, "3d_fullres", 0)
    folder = bank_dir(phantom_ct, "transplant", "3d_fullres")
    assert [p for p in folder.iterdir() if p.name.startswith(written[0])], "no case file written"
    manifest = json.loads((folder / MANIFEST_DIR / "fold_0.json").read_text(encoding="utf-8"))
    assert manifest["backend"] == "transplant" and manifest["shapes"]["deformation"] == "template"
    assert set(manifest["training_cases"]) == set(train)
