"""``--single-breast`` (Luna et al.'s single-breast views): each breast its own case, cut at the body's midline,
in world space, with folds grouped by patient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_synth.dataset_conversion import mama_mia
from nnunet_synth.dataset_conversion.common import OutputCase
from nnunet_synth.dataset_conversion.single_breast import split_breasts

from .test_conversion import volume as conversion_volume

SHAPE = (6, 10, 30)  # z, y, x: x is the patient's left-right axis
SPACING = (1.5, 1.0, 2.0)  # x, y, z
ORIGIN = (-20.0, 4.0, 7.0)
PATIENTS = ("DUKE_001", "DUKE_002", "ISPY1_1001")


def two_breasts(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pre-contrast-like image: air, and a body whose centre of mass lies at x = 17 (not the array's centre);
    labels in both breasts."""
    rng = np.random.default_rng(seed)
    image = rng.normal(5.0, 1.0, SHAPE).astype(np.float32)
    image[:, 2:9, 6:29] = rng.normal(100.0, 5.0, (SHAPE[0], 7, 23))
    label = np.zeros(SHAPE, np.uint8)
    label[2:4, 4:6, 8:11] = 1  # right breast (small x in LPS)
    label[1:5, 3:7, 20:25] = 1  # left breast
    return image, label


def volume(array: np.ndarray, direction=None) -> sitk.Image:
    return conversion_volume(array, SPACING, ORIGIN, direction)


def build_mama(root: Path) -> None:
    for k, pid in enumerate(PATIENTS):
        image, label = two_breasts(k)
        for phase in (0, 1):
            path = root / "images" / pid / f"{pid.lower()}_{phase:04d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(volume(image + 10 * phase), str(path), True)
        path = root / "segmentations" / "expert" / f"{pid.lower()}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume(label), str(path), True)


def test_mama_mia_single_breast_cases_keep_labels_and_world_space(raw, tmp_path):
    build_mama(tmp_path / "mama")
    folder = mama_mia.convert(tmp_path / "mama", 508, single_breast=True, progress=False)
    cases = sorted(p.name[:-len(".nii.gz")] for p in (folder / "labelsTr").glob("*.nii.gz"))
    assert cases == [f"{p.lower()}_{side}" for p in PATIENTS for side in ("L", "R")]
    image, label = two_breasts(0)
    left, right = (sitk.ReadImage(str(folder / "labelsTr" / f"duke_001_{s}.nii.gz")) for s in ("L", "R"))
    # label voxels are kept in total, each breast's in its own case
    arrays = [sitk.GetArrayFromImage(im) for im in (left, right)]
    assert sum(int(a.sum()) for a in arrays) == int(label.sum())
    assert arrays[0].sum() == label[..., 17:].sum() and arrays[1].sum() == label[..., :17].sum()
    # cut at the body's centre of mass (x index 17): the left breast's origin is moved by the crop offset
    assert right.GetOrigin() == ORIGIN and right.GetSize() == (17, 10, 6)
    assert np.allclose(np.subtract(left.GetOrigin(), right.GetOrigin()), (17 * SPACING[0], 0, 0))
    # images cropped like the labels: the same voxels at the same world points
    pre_l = sitk.ReadImage(str(folder / "imagesTr" / "duke_001_L_0000.nii.gz"))
    assert pre_l.GetOrigin() == left.GetOrigin()
    assert np.allclose(sitk.GetArrayFromImage(pre_l), image[..., 17:])
    # folds grouped by patient: a patient's two breasts are never split across train and validation
    folds = json.loads((folder / "splits_final.json").read_text(encoding="utf-8"))
    assert len(folds) == len(PATIENTS)
    for fold in folds:
        patients = {side: {c.rsplit("_", 1)[0] for c in fold[side]} for side in ("train", "val")}
        assert not patients["train"] & patients["val"]
        assert sorted(fold["train"] + fold["val"]) == cases
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert meta["nnunet_synth"]["single_breast"] is True


def test_left_is_the_patients_left_whatever_the_axis_direction():
    image, label = two_breasts(0)
    flipped = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)  # index x runs towards the patient's right
    case = OutputCase("c", [volume(image, flipped)], volume(label, flipped))
    left, right = split_breasts(case)
    assert (left.identifier, right.identifier) == ("c_L", "c_R")
    # with x flipped, the low indices are the patient's left
    assert sitk.GetArrayFromImage(left.label).sum() == label[..., :17].sum()
    assert left.images[0].GetOrigin() == ORIGIN
    assert np.allclose(right.label.GetOrigin(), (ORIGIN[0] - 17 * SPACING[0], ORIGIN[1], ORIGIN[2]))
