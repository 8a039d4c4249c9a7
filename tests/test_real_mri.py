"""Real multi-channel brain MRI (BraTS 2013 sample in ../shared/data): synth plan, injection and preview on
nnU-Net's own preprocessing of real scans. Skipped, saying why, where the data is absent; failed instead where
NNUNET_SYNTH_REQUIRE_SHARED_DATA is set (CI)."""

import json
import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import distance_transform_edt, label

from nnunet_synth.injection import SynthTumourTransform
from nnunet_synth.planning import load_synth_plan, preprocessed_dir

from .conftest import BRATS_DIR, plan_and_preprocess, run, shared_data_or_skip


@pytest.fixture(scope="module", autouse=True)
def real_mri_sample() -> None:
    """Before the module's other fixtures: skip (or, where CI requires the shared data, fail) without the sample."""
    shared_data_or_skip(BRATS_DIR, "real MRI sample", "set NNUNET_SYNTH_BRATS_DIR to the brats2013_sample folder")


DATASET_ID = 920
TUMOUR_ONLY_ID = 921
CHANNELS = {"0": "FLAIR", "1": "T1c"}
FILES = {"FLAIR": "Flair", "T1c": "T1c"}  # file-name prefixes of the channels in the sample
SHRINK = 2  # 1 mm -> 2 mm keeps nnU-Net's preprocessing of six cases to seconds


def _shrunk(path) -> sitk.Image:
    image = sitk.ReadImage(str(path))
    return sitk.BinShrink(image, [SHRINK] * 3)


@pytest.fixture(scope="module")
def brats(nnunet_dirs) -> int:
    """The sample as an nnU-Net dataset: FLAIR + T1c, brain 1 (organ), tumour 2 (all tumour classes)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    root = nnunet_dirs / "nnUNet_raw" / f"Dataset{DATASET_ID}_BraTSSample"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    cases = sorted(p for p in BRATS_DIR.iterdir() if p.is_dir())
    for case in cases:
        name = case.name
        for c, modality in CHANNELS.items():
            sitk.WriteImage(_shrunk(case / f"{FILES[modality]}_subtrMeanDivStd.nii.gz"),
                            str(root / "imagesTr" / f"{name}_{int(c):04d}.nii.gz"))
        brain = sitk.GetArrayFromImage(_shrunk(case / "brainmask.nii.gz")) > 0.5
        tumour = sitk.GetArrayFromImage(_shrunk(case / "OTMultiClass.nii.gz")) > 0.5
        seg = np.where(tumour, 2, np.where(brain, 1, 0)).astype(np.uint8)
        out = sitk.GetImageFromArray(seg)
        out.CopyInformation(_shrunk(case / "brainmask.nii.gz"))
        sitk.WriteImage(out, str(root / "labelsTr" / f"{name}.nii.gz"))
    generate_dataset_json(str(root), CHANNELS, {"background": 0, "brain": 1, "tumour": 2}, len(cases), ".nii.gz",
                          dataset_name=root.name)
    plan_and_preprocess(DATASET_ID)
    return DATASET_ID


@pytest.fixture(scope="module")
def brats_tumour_only(nnunet_dirs) -> int:
    """The sample converted without a brain label (tumour 1 only), as a tumour-only cohort arrives."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    root = nnunet_dirs / "nnUNet_raw" / f"Dataset{TUMOUR_ONLY_ID}_BraTSTumourOnly"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in sorted(p for p in BRATS_DIR.iterdir() if p.is_dir()):
        for c, modality in CHANNELS.items():
            sitk.WriteImage(_shrunk(case / f"{FILES[modality]}_subtrMeanDivStd.nii.gz"),
                            str(root / "imagesTr" / f"{case.name}_{int(c):04d}.nii.gz"))
        reference = _shrunk(case / "OTMultiClass.nii.gz")
        out = sitk.GetImageFromArray((sitk.GetArrayFromImage(reference) > 0.5).astype(np.uint8))
        out.CopyInformation(reference)
        sitk.WriteImage(out, str(root / "labelsTr" / f"{case.name}.nii.gz"))
    generate_dataset_json(str(root), CHANNELS, {"background": 0, "tumour": 1}, 6, ".nii.gz", dataset_name=root.name)
    plan_and_preprocess(TUMOUR_ONLY_ID)
    return TUMOUR_ONLY_ID


def _brain(case: str) -> np.ndarray:
    """The sample's brain mask of a case on the shrunk grid (z, y, x): True where a voxel holds any brain."""
    return sitk.GetArrayFromImage(_shrunk(BRATS_DIR / case / "brainmask.nii.gz")) > 0


def test_tumours_are_counted_as_tumours_not_fragments(brats_tumour_only):
    plan = load_synth_plan(brats_tumour_only, "3d_fullres")
    sizes = plan.tumour_sizes
    assert plan.organ_label is None and plan.tissue is not None
    assert 6 <= sizes.count <= 9 and sizes.cases == 6, sizes  # one glioma per case, the odd satellite
    assert sizes.equivalent_diameter_mm["q25"] > 15, "label fragments counted as tumours"


def test_no_synthetic_lesion_outside_the_head_without_a_brain_label(brats_tumour_only):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_synth.preview import draw_synthetic_patch

    # glioma with oedema is 5-7 cm across: the label-free paper's sizes give many more draws that fit a patch
    plan = load_synth_plan(brats_tumour_only, "3d_fullres").replace(shapes={"size_preset": "labelfree"})
    folder = preprocessed_dir(brats_tumour_only) / "nnUNetPlans_3d_fullres"
    plans_file = preprocessed_dir(brats_tumour_only) / "nnUNetPlans.json"
    transpose = json.loads(plans_file.read_text(encoding="utf-8"))["transpose_forward"]
    ds = infer_dataset_class(str(folder))(str(folder))
    transform = SynthTumourTransform(plan, 1.0, (64, 64, 64), seed=0)
    rng = np.random.default_rng(0)
    drawn = 0
    for case in sorted(ds.identifiers):
        data, seg, _, properties = ds.load_case(case)
        crop = tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])
        brain = _brain(case).transpose(transpose)[crop]
        assert brain.shape == seg.shape[1:], "the preprocessed grid is the shrunk grid (same spacing, no crop)"
        for _ in range(5):
            patch = draw_synthetic_patch(np.asarray(data), np.asarray(seg), plan, transform, (64, 64, 64), rng)
            if patch is None:
                continue
            lesion = np.argwhere(patch.lesion) + [lo for lo, _ in patch.bbox]
            assert brain[tuple(lesion.T)].all(), f"{case}: synthetic lesion voxels outside the head"
            drawn += 1
    assert drawn >= 15


def test_loader_reads_each_patchs_region_from_its_case(brats_tumour_only):
    """nnU-Net's real loader (our OutcomeDataLoader) tells the transform each sample's case and patch box; the
    transform reads the placement region from the case's, found once per case, and its lesions stay in the head."""
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_synth.injection import OutcomeDataLoader

    plan = load_synth_plan(brats_tumour_only, "3d_fullres").replace(shapes={"size_preset": "labelfree"})
    folder = preprocessed_dir(brats_tumour_only) / "nnUNetPlans_3d_fullres"
    plans = json.loads((preprocessed_dir(brats_tumour_only) / "nnUNetPlans.json").read_text(encoding="utf-8"))
    dataset_json = json.loads((preprocessed_dir(brats_tumour_only) / "dataset.json").read_text(encoding="utf-8"))
    labels = PlansManager(plans).get_label_manager(dataset_json)
    ds = infer_dataset_class(str(folder))(str(folder))
    transform = SynthTumourTransform(plan, 1.0, (64, 64, 64), seed=0)
    boxes = []
    record = transform.set_next_box
    transform.set_next_box = lambda lower, upper: (boxes.append((list(lower), list(upper))), record(lower, upper))
    loader = OutcomeDataLoader(ds, 2, (64, 64, 64), (64, 64, 64), labels, 0.33,
                               transforms=ComposeTransforms([transform]))
    assert transform.case_regions is not None
    inserted = 0
    for _ in range(6):
        batch = loader.generate_train_batch()
        for key, (lower, upper), target in zip(batch["keys"], boxes[-2:], batch["target"]):
            _, seg, _, properties = ds.load_case(key)
            box = [[lo, hi] for lo, hi in zip(lower, upper)]
            real = crop_and_pad_nd(np.asarray(seg[0]), box, -1) == 1
            synthetic = (target[0] == 1).numpy() & ~real
            transpose = plans["transpose_forward"]
            crop = tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])
            brain = crop_and_pad_nd(_brain(key).transpose(transpose)[crop], box, False)
            assert brain[synthetic].all(), f"{key}: synthetic lesion voxels outside the head"
            inserted += int(synthetic.any())
    assert inserted >= 6
    assert set(transform.case_regions._kept) <= set(ds.identifiers) and transform.case_regions._kept


def test_bank_without_organ_label_writes_every_case_with_whole_lesions(brats_tumour_only, tmp_path):
    out = tmp_path / "raw_export"
    run(["nnUNetv2_synth_generate", "-d", str(brats_tumour_only), "-g", "analytic", "-f", "all", "-n", "6",
         "--export-raw", str(out)])
    masks = sorted((out / "synthetic_masksTr").glob("*.nii.gz"))
    assert len(masks) == 6 and len(list((out / "imagesTr").glob("*.nii.gz"))) == 12
    for path in masks:
        synthetic = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
        source = path.name.split("__synth")[0]
        pieces = label(synthetic, np.ones((3, 3, 3)))[1]
        assert synthetic.any() and pieces == 1, f"{path.name}: {pieces} pieces"
        assert _brain(source)[synthetic].all(), f"{path.name}: synthetic voxels outside the head"


def test_synth_plan_reads_real_tumours(brats):
    plan = load_synth_plan(brats, "3d_fullres")
    assert (plan.organ_label, plan.tumour_label) == (1, 2)
    sizes = plan.tumour_sizes
    assert sizes.count >= 6 and plan.shapes.size_preset == "quartile"
    # glioma plus oedema: several centimetres across
    assert 20 < sizes.equivalent_diameter_mm["max"] < 150
    flair, t1c = plan.channels
    assert flair.name == "FLAIR" and flair.normalization == "ZScoreNormalization"
    assert min(flair.contrast_range) > 0, "tumour and oedema are bright on FLAIR"
    assert "real tumours" in flair.contrast_source


def test_injection_on_real_patch(brats):
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    plan = load_synth_plan(brats, "3d_fullres")
    folder = preprocessed_dir(brats) / "nnUNetPlans_3d_fullres"
    ds = infer_dataset_class(str(folder))(str(folder))
    data, seg, _, _ = ds.load_case(sorted(ds.identifiers)[0])
    data, seg = np.asarray(data), np.asarray(seg)
    centre = np.argwhere(seg[0] == 1).mean(0).astype(int)
    bbox = [[c - 32, c + 32] for c in centre]
    image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0).astype(np.float32))
    labels = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1).astype(np.int16))
    rng = np.random.default_rng(0)
    transform = SynthTumourTransform(plan, 1.0, (48, 48, 48), seed=0)
    changes = []
    for _ in range(5):
        new_image, new_labels = transform.insert(image, labels, rng)
        assert new_image is not None
        lesion = (new_labels[0] == 2) & (labels[0] != 2)
        assert lesion.any() and (labels[0][lesion] == 1).all(), "synthetic tumour outside the brain"
        far = distance_transform_edt(~lesion.numpy(), sampling=plan.spacing) > transform.generator.halo_mm
        assert torch.equal(new_image[:, far], image[:, far]), "a voxel beyond the backend's halo changed"
        changes.append(float((new_image[0][lesion] - image[0][lesion]).mean()))
    assert min(changes) >= 0 and np.mean(changes) > 0, changes  # FLAIR brighter, as the real ones


def test_preview_command_on_real_mri(brats, tmp_path):
    out = tmp_path / "previews"
    subprocess.run(["nnUNetv2_synth_preview", "-d", str(brats), "-n", "2", "-o", str(out)], check=True,
                   env=dict(os.environ), capture_output=True)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    import matplotlib.image

    assert matplotlib.image.imread(pngs[0]).ndim == 3


def test_realism_benchmark_runs_on_the_real_sample(brats):
    """The realism benchmark at a reduced scale (one seed) on the real sample: a floor and both CPU backends."""
    from nnunet_synth.evaluation.realism_benchmark import format_table, load_cases, run_benchmark

    plan, cases = load_cases(brats, "3d_fullres", "nnUNetPlans")
    assert plan.texture is not None and len(plan.texture.tumours) >= 6
    results = run_benchmark(plan, cases, ["analytic", "transplant"], seeds=[0], n_repeats=1)
    table = format_table(results, "BraTS sample")
    for name in ("real", "analytic", "transplant"):
        (auc,) = results[name]["auc"]
        assert 0.0 <= auc <= 1.0 and name in table
        n_reference, n_other = results[name]["n"][0]
        assert n_reference >= 2 and n_other >= 2, (name, results[name]["n"])


def test_generic_converter_merges_the_brain_mask(tmp_path):
    """The sample as a user converts it, with no script: the generic converter with --organ-pattern puts the
    brain mask in as label 1 and every tumour class as label 2 (two of the six cases, to stay quick)."""
    from nnunet_synth.dataset_conversion.cli import main as convert_main

    cases = sorted(p.name for p in BRATS_DIR.iterdir() if p.is_dir())
    assert convert_main(["generic", "-i", str(BRATS_DIR), "-d", "922", "--raw-dir", str(tmp_path), "--quiet",
                         "--image-pattern", "{case}/Flair_subtrMeanDivStd.nii.gz", "{case}/T1c_subtrMeanDivStd.nii.gz",
                         "--channel-names", "FLAIR", "T1c", "--label-pattern", "{case}/OTMultiClass.nii.gz",
                         "--binarize", "--labels", "background=0", "brain=1", "tumour=2",
                         "--organ-pattern", "{case}/brainmask.nii.gz", "--organ-label", "brain",
                         "--exclude", *cases[2:]]) == 0
    folder = tmp_path / "Dataset922_Generic"
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert meta["labels"] == {"background": 0, "brain": 1, "tumour": 2}
    for case in cases[:2]:
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz")))
        tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(BRATS_DIR / case / "OTMultiClass.nii.gz"))) > 0
        brain = sitk.GetArrayFromImage(sitk.ReadImage(str(BRATS_DIR / case / "brainmask.nii.gz"))) > 0
        assert np.array_equal(label, np.where(tumour, 2, np.where(brain, 1, 0)))
        assert tumour.any() and (label == 1).any()
