"""Real multi-channel brain MRI (BraTS 2013 sample in ../shared/data): synth plan, injection and preview on
nnU-Net's own preprocessing of real scans. Skipped, saying why, where the data is absent."""

import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_synth.injection import SynthTumourTransform
from nnunet_synth.planning import load_synth_plan, preprocessed_dir

from .conftest import BRATS_DIR, plan_and_preprocess

pytestmark = pytest.mark.skipif(not BRATS_DIR.is_dir(), reason=f"real MRI sample not found at {BRATS_DIR} "
                                "(set NNUNET_SYNTH_BRATS_DIR to the brats2013_sample folder)")
DATASET_ID = 920
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


def test_synth_plan_reads_real_tumours(brats):
    plan = load_synth_plan(brats, "3d_fullres")
    assert (plan["organ_label"], plan["tumour_label"]) == (1, 2)
    sizes = plan["tumour_sizes"]
    assert sizes["count"] >= 6 and plan["shapes"]["size_preset"] == "quartile"
    # glioma plus oedema: several centimetres across
    assert 20 < sizes["equivalent_diameter_mm"]["max"] < 150
    flair, t1c = plan["intensity"]["channels"]
    assert flair["name"] == "FLAIR" and flair["normalization"] == "ZScoreNormalization"
    assert min(flair["contrast_range"]) > 0, "tumour and oedema are bright on FLAIR"
    assert "real tumours" in flair["contrast_source"]


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
        assert torch.equal(new_image[:, ~lesion], image[:, ~lesion])
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
