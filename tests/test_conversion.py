"""Dataset conversion: every cohort from a tiny input tree in its real layout to a valid nnU-Net raw dataset.

Each cohort test writes the files the way the download ships them (NIfTI, DICOM series written with SimpleITK, Slicer
``.seg.nrrd`` written with pynrrd, the LLD-MMRI box JSON, the MAMA-MIA split CSV), converts through the console
entry point or the Python API, checks the voxels and metadata that came out, and runs nnU-Net's own
``verify_dataset_integrity``. The error-path tests check that a refused conversion names the case and the file and
leaves nothing behind.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_synth.dataset_conversion import btcv, duke_fgt, generic, lld_mmri, mama_mia, merge, msd, pancreas_ct
from nnunet_synth.dataset_conversion.cli import COHORTS, main
from nnunet_synth.dataset_conversion.common import (
    ConversionError,
    Geometry,
    align_to_reference,
    dataset_folder_name,
    nnunet_raw_dir,
    parse_label_spec,
)

SHAPE = (16, 24, 24)  # z, y, x
SPACING = (0.8, 0.8, 2.5)  # x, y, z
ORIGIN = (-10.0, 5.0, 3.0)


# ----------------------------------------------------------------------------------------------------------------
# Builders: tiny cohorts in their download layouts
# ----------------------------------------------------------------------------------------------------------------


def volume(array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=None) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def write(img: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path


def ct_array(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(-200, 300, shape).astype(np.int16)


def mri_array(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32) * 100


def organ_tumour(shape=SHAPE, tumour: bool = True, organ_value: int = 1, tumour_value: int = 2) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[4:12, 6:18, 6:18] = organ_value
    if tumour:
        lab[6:9, 9:13, 9:13] = tumour_value
    return lab


def build_msd(root: Path, task: str = "Task07_Pancreas", organ: str = "pancreas", n: int = 3) -> Path:
    folder = root / task
    prefix = organ
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "imagesTs").mkdir()
    meta = {"name": organ, "modality": {"0": "CT"}, "labels": {"0": "background", "1": organ, "2": "cancer"},
            "numTraining": n, "training": [{"image": f"./imagesTr/{prefix}_{i:03d}.nii.gz",
                                            "label": f"./labelsTr/{prefix}_{i:03d}.nii.gz"} for i in range(1, n + 1)]}
    (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    for i in range(1, n + 1):
        write(volume(ct_array(i)), folder / "imagesTr" / f"{prefix}_{i:03d}.nii.gz")
        write(volume(organ_tumour()), folder / "labelsTr" / f"{prefix}_{i:03d}.nii.gz")
        # macOS resource forks as they come in the Decathlon tarballs
        (folder / "imagesTr" / f"._{prefix}_{i:03d}.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
        (folder / "labelsTr" / f"._{prefix}_{i:03d}.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
    write(volume(ct_array(99)), folder / "imagesTs" / f"{prefix}_100.nii.gz")
    return folder


def write_dicom_series(folder: Path, image: sitk.Image, description: str, series_uid: str,
                       study_uid: str = "1.2.826.0.1.3680043.2.1125.1", modality: str = "CT") -> None:
    """One file per slice with the tags GDCM needs to rebuild the volume (position, orientation, UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        tags = {
            "0008|0060": modality, "0008|103e": description, "0020|000d": study_uid, "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1), "0010|0020": folder.name,
            "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"1-{k + 1:03d}.dcm"))
        writer.Execute(sl)


def build_pancreas_ct(root: Path, n: int = 2) -> dict[str, np.ndarray]:
    """TCIA layout: Pancreas-CT/PANCREAS_NNNN/<study>/<series>/*.dcm + TCIA_pancreas_labels-02-05-2017/labelNNNN."""
    arrays = {}
    for i in range(1, n + 1):
        img = volume(ct_array(10 + i))
        series = root / "Pancreas-CT" / f"PANCREAS_{i:04d}" / f"11-24-2015-PANCREAS{i:04d}-Pancreas-1" / "Pancreas-2"
        write_dicom_series(series, img, "Pancreas", f"1.2.826.0.1.3680043.2.1125.{100 + i}")
        lab = organ_tumour(tumour=False)
        write(volume(lab), root / "TCIA_pancreas_labels-02-05-2017" / f"label{i:04d}.nii.gz")
        arrays[f"{i:04d}"] = (sitk.GetArrayFromImage(img), lab)
    return arrays


BTCV_ORGAN_BOXES = {11: (slice(2, 6), slice(2, 8), slice(2, 8)), 2: (slice(8, 12), slice(2, 8), slice(14, 20)),
                    3: (slice(8, 12), slice(14, 20), slice(14, 20)), 6: (slice(10, 15), slice(10, 22), slice(2, 12))}


def build_btcv(root: Path, n: int = 2) -> Path:
    folder = root / "RawData" / "Training"
    for i in range(1, n + 1):
        lab = np.zeros(SHAPE, np.uint8)
        for value, box in BTCV_ORGAN_BOXES.items():
            lab[box] = value
        lab[0, 0, :13] = np.arange(1, 14)  # every BTCV organ value occurs
        write(volume(ct_array(20 + i)), folder / "img" / f"img{i:04d}.nii.gz")
        write(volume(lab), folder / "label" / f"label{i:04d}.nii.gz")
    return folder


def build_atlas(root: Path, numbers=(0, 1, 12)) -> Path:
    for i in numbers:
        write(volume(mri_array(30 + i)), root / "imagesTr" / f"im{i}.nii.gz")
        write(volume(organ_tumour()), root / "labelsTr" / f"lb{i}.nii.gz")
    return root


def lld_entry(study: str, series: str, phase: str, lesions: list[tuple[int, tuple[int, ...]]]) -> dict:
    """One series entry of Annotation.json; boxes as (z0, y0, x0, z1, y1, x1), maxima inclusive."""
    return {"studyUID": study, "seriesUID": series, "phase": phase, "pixel_spacing": [0.8, 0.8],
            "slice_thickness": 2.5, "annotation": {"num_targets": len(lesions), "lesion": {
                str(k): {"category": cat, "bbox": {"3D_box": dict(zip(
                    ("z_min", "y_min", "x_min", "z_max", "y_max", "x_max"), box, strict=True))}}
                for k, (cat, box) in enumerate(lesions)}}}


def build_lld(root: Path) -> dict:
    """Two patients, all eight phases on disk; MR0001 has HCC (category 6), MR0002 a cyst (4)."""
    info = {}
    for pid, cat in (("MR0001", 6), ("MR0002", 4)):
        entries = []
        for j, phase in enumerate(lld_mmri.PHASES):
            study, series = f"1.2.{pid[-1]}", f"1.2.{pid[-1]}.{j}"
            write(volume(mri_array(hash(phase) % 1000)), root / "images" / pid / study / f"{series}.nii.gz")
            entries.append(lld_entry(study, series, phase, [(cat, (3, 4, 5, 6, 8, 10))]))
        info[pid] = entries
    # a second lesion of another category in the arterial phase of MR0001
    info["MR0001"][0]["annotation"]["lesion"]["1"] = {"category": 4, "bbox": {"3D_box": dict(
        zip(("z_min", "y_min", "x_min", "z_max", "y_max", "x_max"), (10, 15, 15, 11, 16, 17), strict=True))}}
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "Annotation.json").write_text(json.dumps({"Annotation_info": info}), encoding="utf-8")
    return info


MAMA_PATIENTS = {"DUKE_001": 2, "DUKE_002": 3, "ISPY1_1001": 2, "NACT_01": 2}  # patient -> post-contrast phases


def build_mama(root: Path, spacing=(0.7, 0.7, 2.0)) -> None:
    for k, (pid, posts) in enumerate(MAMA_PATIENTS.items()):
        low = pid.lower()
        for phase in range(posts + 1):
            write(volume(mri_array(40 + 10 * k + phase), spacing=spacing), root / "images" / pid /
                  f"{low}_{phase:04d}.nii.gz")
        write(volume(organ_tumour(tumour=False), spacing=spacing), root / "segmentations" / "expert" /
              f"{low}.nii.gz")
        (root / "patient_info_files").mkdir(parents=True, exist_ok=True)
        (root / "patient_info_files" / f"{low}.json").write_text(json.dumps(
            {"patient_id": pid, "primary_lesion": {"breast_coordinates": {
                "x_min": 0, "x_max": 15, "y_min": 0, "y_max": 23, "z_min": 0, "z_max": 23}},
             "imaging_data": {"dataset": pid.split("_")[0], "bilateral": True}}))
    with open(root / "train_test_splits.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["train_split", "test_split"])
        w.writerow(["DUKE_001", "NACT_01"])
        w.writerow(["DUKE_002", ""])
        w.writerow(["ISPY1_1001", ""])


def write_seg_nrrd(path: Path, layers_zyx: list[np.ndarray], segments: list[dict], spacing=SPACING,
                   origin=ORIGIN, space: str = "left-posterior-superior") -> Path:
    """A 3D Slicer segmentation: one layer (3D) or several (4D with a list axis), segment metadata in the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sign = np.array([-1.0, -1.0, 1.0]) if space == "right-anterior-superior" else np.ones(3)
    axes = np.diag(spacing) * sign  # rows: steps of index axes i, j, k in `space`
    data = [np.transpose(a, (2, 1, 0)) for a in layers_zyx]
    header = {"space": space, "kinds": ["domain"] * 3, "encoding": "gzip", "space directions": axes,
              "space origin": np.asarray(origin) * sign}
    if len(data) > 1:
        data = np.stack(data)
        header["kinds"] = ["list", "domain", "domain", "domain"]
        header["space directions"] = np.vstack([[np.nan] * 3, axes])
    else:
        data = data[0]
    for n, seg in enumerate(segments):
        header[f"Segment{n}_ID"] = f"Segment_{n + 1}"
        for key, value in seg.items():
            header[f"Segment{n}_{key}"] = str(value)
    nrrd.write(str(path), np.ascontiguousarray(data), header)
    return path


def build_duke(root: Path, layered_case: bool = True) -> dict[str, np.ndarray]:
    """Two patients: a pre-contrast and a post-contrast DICOM series each; FGT/vessel masks as .seg.nrrd.

    Breast_MRI_001 stores vessels=1, dense=2 in one layer; Breast_MRI_002 stores them in two layers with swapped
    values and in RAS space, and its breast mask covers only a sub-box of the image (Slicer's own extent).
    """
    expected = {}
    for i in (1, 2):
        pid = f"Breast_MRI_{i:03d}"
        pre = volume(mri_array(50 + i).astype(np.int16))
        study = root / "Duke-Breast-Cancer-MRI" / pid / f"01-01-1990-{i}-BREASTROUTINE"
        write_dicom_series(study / "3.000000-ax dyn pre-1", pre, "ax dyn pre", f"1.3.6.1.4.1.14519.{i}.3",
                           modality="MR")
        write_dicom_series(study / "4.000000-ax dyn 1st pass-2", volume(mri_array(60 + i).astype(np.int16)),
                           "ax dyn 1st pass", f"1.3.6.1.4.1.14519.{i}.4", modality="MR")
        breast = np.zeros(SHAPE, np.uint8)
        breast[2:14, 2:22, 2:22] = 1
        fgt = np.zeros(SHAPE, bool)
        fgt[5:10, 5:12, 5:12] = True
        vessels = np.zeros(SHAPE, bool)
        vessels[8:12, 10:16, 10:16] = True  # overlaps FGT at [8:10, 10:12, 10:12]
        seg_dir = root / "Segmentation_Masks_NRRD" / pid
        if i == 2 and layered_case:
            write_seg_nrrd(seg_dir / f"Segmentation_{pid}_Dense_and_Vessels.seg.nrrd",
                           [fgt.astype(np.uint8) * 5, vessels.astype(np.uint8) * 7],
                           [{"Name": "Dense", "LabelValue": 5, "Layer": 0}, {"Name": "Vessels", "LabelValue": 7,
                                                                             "Layer": 1}],
                           space="right-anterior-superior")
            sub = breast[1:15, 1:23, 1:23]  # Slicer crops the stored extent to the segment's bounds (+ margin)
            sub_origin = pre.TransformIndexToPhysicalPoint((1, 1, 1))
            write_seg_nrrd(seg_dir / f"Segmentation_{pid}_Breast.seg.nrrd", [sub * 3],
                           [{"Name": "Segment_1", "LabelValue": 3, "Layer": 0}], origin=sub_origin)
        else:
            dv = np.zeros(SHAPE, np.uint8)
            dv[vessels] = 1
            dv[fgt] = 2  # Slicer's own overlap order in a merged layer
            write_seg_nrrd(seg_dir / f"Segmentation_{pid}_Dense_and_Vessels.seg.nrrd", [dv],
                           [{"Name": "Vessels", "LabelValue": 1, "Layer": 0},
                            {"Name": "Dense", "LabelValue": 2, "Layer": 0}])
            write_seg_nrrd(seg_dir / f"Segmentation_{pid}_Breast.seg.nrrd", [breast],
                           [{"Name": "Breast", "LabelValue": 1, "Layer": 0}])
        want = breast.copy()
        want[vessels] = 3
        want[fgt] = 2
        expected[f"dukefgt_{i:03d}"] = (sitk.GetArrayFromImage(pre), want)
    return expected


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------



class _SerialPool:
    """Stands in for multiprocessing.Pool: runs nnU-Net's per-case check functions in this process."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> _SerialPool:
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def starmap(func, iterable) -> list:
        return [func(*args) for args in iterable]


class _SerialMultiprocessing:
    @staticmethod
    def get_context(method=None) -> _SerialMultiprocessing:
        return _SerialMultiprocessing()

    Pool = _SerialPool


@pytest.fixture
def verify(monkeypatch):
    """nnU-Net's own ``verify_dataset_integrity`` run in-process; returns dataset.json.

    nnU-Net checks the cases in a spawn-context pool, whose start-up (re-importing torch) costs seconds per call;
    the serial stand-in runs the very same check functions here. The subprocess test below runs the real pool.
    """
    import nnunetv2.experiment_planning.verify_dataset_integrity as vdi
    import nnunetv2.utilities.utils as nnunet_utils

    monkeypatch.setattr(vdi, "multiprocessing", _SerialMultiprocessing)
    monkeypatch.setattr(nnunet_utils, "Pool", _SerialPool)

    def run(folder: Path) -> dict:
        vdi.verify_dataset_integrity(str(folder), num_processes=1)
        return json.loads((folder / "dataset.json").read_text(encoding="utf-8"))

    return run


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def cases_of(folder: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (folder / "labelsTr").glob("*.nii.gz"))


def leftovers(raw_dir: Path) -> list[str]:
    return sorted(p.name for p in raw_dir.iterdir())


def convert_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of the command (a refusal exits with status 2, as argparse does)."""
    try:
        rc = main(args + ["--quiet"])
    except SystemExit as exit_info:
        rc = exit_info.code
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Cohorts
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cohort,task,organ", [("msd_pancreas", "Task07_Pancreas", "pancreas"),
                                               ("msd_liver", "Task03_Liver", "liver")])
def test_msd(verify, raw, tmp_path, capsys, cohort, task, organ):
    src = build_msd(tmp_path / "in", task, organ)
    rc, err = convert_cli([cohort, "-i", str(src.parent), "-d", "501"], capsys)
    assert rc == 0, err
    folder = raw / f"Dataset501_{msd.TASKS[cohort][2]}"
    meta = verify(folder)
    assert meta["labels"] == {"background": 0, organ: 1, "tumor": 2}
    assert meta["channel_names"] == {"0": "CT"}
    assert cases_of(folder) == [f"{organ}_001", f"{organ}_002", f"{organ}_003"]  # no "._" files, no imagesTs
    assert np.array_equal(read(folder / "labelsTr" / f"{organ}_002.nii.gz"), organ_tumour())
    out = sitk.ReadImage(str(folder / "imagesTr" / f"{organ}_002_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(out), ct_array(2))
    assert np.allclose(out.GetSpacing(), SPACING) and np.allclose(out.GetOrigin(), ORIGIN)


def test_msd_wrong_task_is_refused(raw, tmp_path):
    src = build_msd(tmp_path / "in", "Task03_Liver", "liver")
    with pytest.raises(ConversionError, match="label 1 is 'liver', expected 'pancreas'"):
        msd.convert("msd_pancreas", src, 501, progress=False)


def test_pancreas_ct_dicom(verify, raw, tmp_path, capsys):
    arrays = build_pancreas_ct(tmp_path / "tcia")
    rc, err = convert_cli(["pancreas_ct", "-i", str(tmp_path / "tcia"), "-d", "502"], capsys)
    assert rc == 0, err
    folder = raw / "Dataset502_PancreasCT"
    meta = verify(folder)
    assert meta["labels"] == {"background": 0, "pancreas": 1, "tumor": 2}
    assert cases_of(folder) == ["pancreasct_0001", "pancreasct_0002"]
    image, label = arrays["0002"]
    out = sitk.ReadImage(str(folder / "imagesTr" / "pancreasct_0002_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(out), image)
    assert np.allclose(out.GetSpacing(), SPACING, atol=1e-4) and np.allclose(out.GetOrigin(), ORIGIN, atol=1e-4)
    assert np.array_equal(read(folder / "labelsTr" / "pancreasct_0002.nii.gz"), label)


def test_pancreas_ct_flipped_label_grid_is_put_in_register(raw, tmp_path):
    """A label stored slice-reversed (same voxels, other header) is aligned exactly, not interpolated."""
    arrays = build_pancreas_ct(tmp_path / "tcia", n=1)
    lab = arrays["0001"][1].copy()
    lab[4, 6, 6] = 0  # make it asymmetric in z
    ref = volume(lab)
    flipped = volume(lab[::-1].copy(), origin=ref.TransformIndexToPhysicalPoint((0, 0, SHAPE[0] - 1)),
                     direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    write(flipped, tmp_path / "tcia" / "TCIA_pancreas_labels-02-05-2017" / "label0001.nii.gz")
    folder = pancreas_ct.convert(tmp_path / "tcia", 502, progress=False)
    assert np.array_equal(read(folder / "labelsTr" / "pancreasct_0001.nii.gz"), lab)


@pytest.mark.parametrize("organ,values", [("pancreas", (11,)), ("kidney", (2, 3)), ("liver", (6,))])
def test_btcv_keeps_one_organ(verify, raw, tmp_path, organ, values):
    build_btcv(tmp_path / "btcv")
    folder = btcv.convert(tmp_path / "btcv", 503, organ=organ, progress=False)
    meta = verify(folder)
    assert folder.name == "Dataset503_BTCV" + organ.capitalize()
    assert meta["labels"] == {"background": 0, organ: 1, "tumor": 2}
    assert meta["nnunet_synth"]["healthy"] is True
    src = read(tmp_path / "btcv" / "RawData" / "Training" / "label" / "label0002.nii.gz")
    assert np.array_equal(read(folder / "labelsTr" / "btcv_0002.nii.gz"), np.isin(src, values).astype(np.uint8))


def test_atlas(verify, raw, tmp_path, capsys):
    build_atlas(tmp_path / "atlas" / "train")
    rc, err = convert_cli(["atlas", "-i", str(tmp_path / "atlas"), "-d", "504", "--name", "LiverMRI"], capsys)
    assert rc == 0, err
    folder = raw / "Dataset504_LiverMRI"
    meta = verify(folder)
    assert meta["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert cases_of(folder) == ["atlas_000", "atlas_001", "atlas_012"]
    assert np.allclose(read(folder / "imagesTr" / "atlas_012_0000.nii.gz"), mri_array(42))


def test_lld_mmri_boxes_phases_and_categories(verify, raw, tmp_path, capsys):
    build_lld(tmp_path / "lld")
    rc, err = convert_cli(["lld_mmri", "-i", str(tmp_path / "lld"), "-d", "505"], capsys)
    assert rc == 0, err
    folder = raw / "Dataset505_LLDMMRI"
    meta = verify(folder)
    assert meta["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert cases_of(folder) == [f"MR000{i}_{p}" for i in (1, 2) for p in ("arterial", "delay", "venous")]
    label = read(folder / "labelsTr" / "MR0001_arterial.nii.gz")
    want = np.zeros(SHAPE, np.uint8)
    want[3:7, 4:9, 5:11] = 2  # z 3..6, y 4..8, x 5..10 inclusive
    want[10:12, 15:17, 15:18] = 2  # the second lesion (a cyst; all categories kept)
    assert np.array_equal(label, want)
    boxes = json.loads((folder / "lesion_boxes.json").read_text(encoding="utf-8"))
    assert boxes["MR0001_arterial"]["lesions"][0]["box_zyx_max"] == [6, 8, 10]
    assert boxes["MR0001_arterial"]["phase"] == "C+A"


def test_lld_mmri_hcc_only(verify, raw, tmp_path):
    build_lld(tmp_path / "lld")
    folder = lld_mmri.convert(tmp_path / "lld", 505, categories=["hcc"], phases=["C+V"], progress=False)
    verify(folder)
    assert cases_of(folder) == ["MR0001_venous"]  # MR0002 has a cyst only
    boxes = json.loads((folder / "lesion_boxes.json").read_text(encoding="utf-8"))
    arterial = lld_mmri.convert(tmp_path / "lld", 506, categories=["hcc"], phases=["C+A"], progress=False)
    label = read(arterial / "labelsTr" / "MR0001_arterial.nii.gz")
    assert label[10:12, 15:17, 15:18].max() == 0 and label[3:7, 4:9, 5:11].min() == 2  # the cyst box is left out
    assert boxes["MR0001_venous"]["lesions"][0]["category_name"] == "Hepatocellular_carcinoma"


def test_lld_mmri_box_outside_volume(raw, tmp_path):
    info = build_lld(tmp_path / "lld")
    info["MR0002"][1]["annotation"]["lesion"]["0"]["bbox"]["3D_box"]["z_max"] = SHAPE[0]  # one past the last slice
    annotation = tmp_path / "lld" / "labels" / "Annotation.json"
    annotation.write_text(json.dumps({"Annotation_info": info}), encoding="utf-8")
    with pytest.raises(ConversionError, match=r"case MR0002_venous: lesion 0 box .* outside the volume"):
        lld_mmri.convert(tmp_path / "lld", 505, progress=False)
    assert leftovers(raw) == []
    folder = lld_mmri.convert(tmp_path / "lld", 505, clip_boxes=True, progress=False)
    assert read(folder / "labelsTr" / "MR0002_venous.nii.gz")[3:, 4:9, 5:11].min() == 2


@pytest.mark.parametrize("post_phase,expected_cases", [
    ("first", ["duke_001", "duke_002", "ispy1_1001", "nact_01"]),
    ("all", ["duke_001_post1", "duke_001_post2", "duke_002_post1", "duke_002_post2", "duke_002_post3",
             "ispy1_1001_post1", "ispy1_1001_post2", "nact_01_post1", "nact_01_post2"]),
])
def test_mama_mia(verify, raw, tmp_path, capsys, post_phase, expected_cases):
    build_mama(tmp_path / "mama")
    rc, err = convert_cli(["mama_mia", "-i", str(tmp_path / "mama"), "-d", "507", "--post-phase", post_phase,
                           "--split", "official"], capsys)
    assert rc == 0, err
    folder = raw / "Dataset507_MAMAMIA"
    meta = verify(folder)
    assert meta["labels"] == {"background": 0, "tumor": 1}
    assert list(meta["channel_names"].values())[0] == "DCE_pre"
    assert cases_of(folder) == expected_cases
    split = json.loads((folder / "splits_final.json").read_text(encoding="utf-8"))
    assert len(split) == 1
    assert split[0]["val"] == [c for c in expected_cases if c.startswith("nact_01")]
    assert sorted(split[0]["train"] + split[0]["val"]) == expected_cases
    # channel 1 is the k-th post-contrast phase of that patient
    case = "duke_002_post3" if post_phase == "all" else "duke_002"
    want = mri_array(40 + 10 + (3 if post_phase == "all" else 1))
    assert np.allclose(read(folder / "imagesTr" / f"{case}_0001.nii.gz"), want)
    assert np.allclose(read(folder / "imagesTr" / f"{case}_0000.nii.gz"), mri_array(50))


def test_mama_mia_isotropic_resampling_and_grouped_split(verify, raw, tmp_path):
    build_mama(tmp_path / "mama")
    folder = mama_mia.convert(tmp_path / "mama", 507, spacing=[1.0], post_phase="all", progress=False)
    verify(folder)
    img = sitk.ReadImage(str(folder / "imagesTr" / "duke_001_post1_0000.nii.gz"))
    assert np.allclose(img.GetSpacing(), (1, 1, 1))
    assert img.GetSize() == (17, 17, 32)  # 24 * 0.7, 24 * 0.7, 16 * 2.0
    label = read(folder / "labelsTr" / "duke_001_post1.nii.gz")
    assert label.shape == (32, 17, 17) and set(np.unique(label)) == {0, 1}
    assert abs(label.sum() * 1.0 - organ_tumour(tumour=False).sum() * 0.7 * 0.7 * 2.0) < 0.15 * label.sum()
    folds = json.loads((folder / "splits_final.json").read_text(encoding="utf-8"))
    assert len(folds) == 4  # four patients: one per fold at most
    for fold in folds:  # phases of one patient never straddle train and val
        patients = lambda ids: {c.rsplit("_post", 1)[0] for c in ids}  # noqa: E731
        assert not patients(fold["train"]) & patients(fold["val"])


def test_mama_mia_split_must_cover_cases(raw, tmp_path):
    build_mama(tmp_path / "mama")
    with open(tmp_path / "mama" / "train_test_splits.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["train_split", "test_split"], ["DUKE_001", "NACT_01"], ["DUKE_002", ""]])
    with pytest.raises(ConversionError, match=r"not in the official split file: \['ispy1_1001'\]"):
        mama_mia.convert(tmp_path / "mama", 507, split="official", progress=False)
    assert leftovers(raw) == []


@pytest.mark.parametrize("breast_mask", [True, False])
def test_duke_fgt(verify, raw, tmp_path, capsys, breast_mask):
    expected = build_duke(tmp_path / "duke")
    args = ["duke_fgt", "-i", str(tmp_path / "duke"), "-d", "508"] + ([] if breast_mask else ["--no-breast-mask"])
    rc, err = convert_cli(args, capsys)
    assert rc == 0, err
    folder = raw / "Dataset508_DukeFGT"
    meta = verify(folder)
    assert cases_of(folder) == ["dukefgt_001", "dukefgt_002"]
    for case, (image, want) in expected.items():
        if not breast_mask:
            want = np.select([want == 2, want == 3], [1, 2], 0)
        assert np.array_equal(read(folder / "imagesTr" / f"{case}_0000.nii.gz"), image)  # the pre-contrast series
        assert np.array_equal(read(folder / "labelsTr" / f"{case}.nii.gz"), want), case
    if breast_mask:
        assert meta["labels"] == {"background": 0, "breast": 1, "fibroglandular tissue": 2, "vessels": 3}
    else:
        assert meta["labels"] == {"background": 0, "fibroglandular tissue": 1, "vessels": 2}


def test_duke_fgt_unknown_segment_name(raw, tmp_path):
    build_duke(tmp_path / "duke", layered_case=False)
    bad = (tmp_path / "duke" / "Segmentation_Masks_NRRD" / "Breast_MRI_002" /
           "Segmentation_Breast_MRI_002_Dense_and_Vessels.seg.nrrd")
    write_seg_nrrd(bad, [organ_tumour()], [{"Name": "Vessels", "LabelValue": 1}, {"Name": "Tumor", "LabelValue": 2}])
    with pytest.raises(ConversionError, match=r"case Breast_MRI_002: segment 'Tumor' in .*Breast_MRI_002_Dense"):
        duke_fgt.convert(tmp_path / "duke", 508, progress=False)


def test_duke_fgt_undeclared_value(raw, tmp_path):
    build_duke(tmp_path / "duke", layered_case=False)
    bad = (tmp_path / "duke" / "Segmentation_Masks_NRRD" / "Breast_MRI_001" /
           "Segmentation_Breast_MRI_001_Dense_and_Vessels.seg.nrrd")
    write_seg_nrrd(bad, [organ_tumour(tumour_value=4)], [{"Name": "Vessels", "LabelValue": 1},
                                                         {"Name": "Dense", "LabelValue": 2}])
    with pytest.raises(ConversionError, match=r"Breast_MRI_001: .* holds label values \[4\] that no segment"):
        duke_fgt.convert(tmp_path / "duke", 508, progress=False)
    assert leftovers(raw) == []


def build_generic(root: Path, n: int = 3) -> None:
    """Two channels in different formats, masks in a third, as a lab's export might look."""
    for i in range(n):
        write(volume(mri_array(70 + i)), root / "scans" / f"pat{i}_t1.nrrd")
        write(volume(mri_array(80 + i)), root / "scans" / f"pat{i}_t2.mha")
        write(volume(np.choose(organ_tumour(), [0, 128, 255]).astype(np.uint8)), root / "masks" / f"pat{i}.mha")


def test_generic_multichannel(verify, raw, tmp_path, capsys):
    build_generic(tmp_path / "g")
    rc, err = convert_cli(["generic", "-i", str(tmp_path / "g"), "-d", "509", "--image-pattern",
                           "scans/{case}_t1.nrrd", "scans/{case}_t2.mha", "--channel-names", "T1", "T2",
                           "--label-pattern", "masks/{case}.mha", "--binarize", "--labels", "background=0",
                           "breast=1"], capsys)
    assert rc == 0, err
    folder = raw / "Dataset509_Generic"
    meta = verify(folder)
    assert meta["channel_names"] == {"0": "T1", "1": "T2"} and meta["labels"] == {"background": 0, "breast": 1}
    assert cases_of(folder) == ["pat0", "pat1", "pat2"]
    assert np.allclose(read(folder / "imagesTr" / "pat1_0001.nii.gz"), mri_array(81))
    assert np.array_equal(read(folder / "labelsTr" / "pat1.nii.gz"), (organ_tumour() > 0).astype(np.uint8))


@pytest.mark.parametrize("selection,expected", [("all", SHAPE[0]), ("foreground", 8)])
def test_generic_2d_slices(verify, raw, tmp_path, selection, expected):
    build_generic(tmp_path / "g", n=2)
    folder = generic.convert(tmp_path / "g", 510, image_patterns=["scans/{case}_t1.nrrd"],
                             label_pattern="masks/{case}.mha", binarize=True, slices=True,
                             slice_selection=selection, progress=False)
    verify(folder)
    names = cases_of(folder)
    assert len(names) == 2 * expected
    img = sitk.ReadImage(str(folder / "imagesTr" / f"{names[0]}_0000.nii.gz"))
    assert img.GetDimension() == 2 and np.allclose(img.GetSpacing(), SPACING[:2])
    assert np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / "pat1_s007_0000.nii.gz"))),
                       mri_array(71)[7])
    assert np.array_equal(read(folder / "labelsTr" / "pat1_s007.nii.gz"), (organ_tumour()[7] > 0).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------------------------


def three_pancreas_datasets(tmp_path: Path) -> None:
    msd.convert("msd_pancreas", build_msd(tmp_path / "msd"), 501, progress=False)
    build_pancreas_ct(tmp_path / "tcia")
    pancreas_ct.convert(tmp_path / "tcia", 502, progress=False)
    build_btcv(tmp_path / "btcv")
    btcv.convert(tmp_path / "btcv", 503, organ="pancreas", progress=False)


def test_merge_tumour_and_healthy(verify, raw, tmp_path, capsys):
    three_pancreas_datasets(tmp_path)
    rc, err = convert_cli(["merge", "-i", "501", "--healthy", "Dataset502_PancreasCT",
                           str(raw / "Dataset503_BTCVPancreas"), "-d", "510", "--name", "PancreasMerged"], capsys)
    assert rc == 0, err
    folder = raw / "Dataset510_PancreasMerged"
    meta = verify(folder)
    assert meta["labels"] == {"background": 0, "pancreas": 1, "tumor": 2}
    assert meta["numTraining"] == 3 + 2 + 2
    healthy = json.loads((folder / "healthy_cases.json").read_text(encoding="utf-8"))
    assert healthy == ["btcv_0001", "btcv_0002", "pancreasct_0001", "pancreasct_0002"]
    sources = json.loads((folder / "merge_sources.json").read_text(encoding="utf-8"))
    assert sources["pancreas_001"] == "Dataset501_MSDPancreas" and sources["btcv_0002"] == "Dataset503_BTCVPancreas"
    assert np.array_equal(read(folder / "labelsTr" / "pancreas_003.nii.gz"), organ_tumour())
    btcv_src = read(tmp_path / "btcv" / "RawData" / "Training" / "label" / "label0001.nii.gz")
    assert np.array_equal(read(folder / "labelsTr" / "btcv_0001.nii.gz"), (btcv_src == 11).astype(np.uint8))


def test_merge_renumbers_labels_by_name(verify, raw, tmp_path):
    """A dataset with another label order and a tumour synonym is mapped onto the first one's values."""
    msd.convert("msd_pancreas", build_msd(tmp_path / "msd"), 501, progress=False)
    other = raw / "Dataset520_Other"
    for sub in ("imagesTr", "labelsTr"):
        (other / sub).mkdir(parents=True)
    write(volume(ct_array(5)), other / "imagesTr" / "other_001_0000.nii.gz")
    write(volume(organ_tumour(tumour=False, organ_value=2)), other / "labelsTr" / "other_001.nii.gz")
    (other / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {
        "background": 0, "pancreatic lesion": 1, "Pancreas": 2}, "numTraining": 1, "file_ending": ".nii.gz"}))
    folder = merge.convert(["501"], 511, healthy=["520"], progress=False)
    verify(folder)
    assert np.array_equal(read(folder / "labelsTr" / "other_001.nii.gz"), organ_tumour(tumour=False))


@pytest.mark.parametrize("problem,match", [
    ("labels", r"Dataset503_BTCVKidney: labels .* do not match"),
    ("tumour_in_healthy", r"case pancreas_001 of healthy dataset Dataset501_MSDPancreas has tumour voxels"),
    ("collision", r"case identifier 'pancreas_001' occurs in Dataset501_MSDPancreas and Dataset502_MSDPancreasCopy"),
])
def test_merge_refusals(raw, tmp_path, problem, match):
    msd.convert("msd_pancreas", build_msd(tmp_path / "msd"), 501, progress=False)
    if problem == "labels":
        build_btcv(tmp_path / "btcv")
        btcv.convert(tmp_path / "btcv", 503, organ="kidney", progress=False)
        inputs, healthy = ["501"], ["503"]
    elif problem == "tumour_in_healthy":
        build_btcv(tmp_path / "btcv")
        btcv.convert(tmp_path / "btcv", 503, organ="pancreas", progress=False)
        inputs, healthy = ["503"], ["501"]
    else:
        msd.convert("msd_pancreas", tmp_path / "msd", 502, name="MSDPancreasCopy", progress=False)
        inputs, healthy = ["501", "502"], []
    before = leftovers(raw)
    with pytest.raises(ConversionError, match=match):
        merge.convert(inputs, 530, healthy=healthy, progress=False)
    assert leftovers(raw) == before
    if problem == "collision":
        folder = merge.convert(inputs, 530, healthy=healthy, prefix_source=True, progress=False)
        assert "msdpancreas_pancreas_001" in cases_of(folder)


# ----------------------------------------------------------------------------------------------------------------
# Rules every converter follows: checked inputs, atomic output, no silent overwrite
# ----------------------------------------------------------------------------------------------------------------


def _missing_label(src: Path) -> None:
    (src / "labelsTr" / "pancreas_002.nii.gz").unlink()


def _missing_image(src: Path) -> None:
    (src / "imagesTr" / "pancreas_003.nii.gz").unlink()


def _shifted_label(src: Path) -> None:
    write(volume(organ_tumour(), origin=(-10.0, 5.0, 4.3)), src / "labelsTr" / "pancreas_002.nii.gz")


def _resized_label(src: Path) -> None:
    write(volume(organ_tumour(shape=(15, 24, 24))), src / "labelsTr" / "pancreas_002.nii.gz")


def _bad_values(src: Path) -> None:
    write(volume(organ_tumour(tumour_value=3)), src / "labelsTr" / "pancreas_003.nii.gz")


def _four_d_image(src: Path) -> None:
    img = sitk.JoinSeries([volume(ct_array(1)), volume(ct_array(2))])
    write(img, src / "imagesTr" / "pancreas_002.nii.gz")


def _vector_image(src: Path) -> None:
    img = sitk.Compose([volume(ct_array(1)), volume(ct_array(2))])
    write(img, src / "imagesTr" / "pancreas_001.nii.gz")


@pytest.mark.parametrize("damage,match", [
    (_missing_label, r"case pancreas_002: label missing: .*labelsTr/pancreas_002\.nii\.gz"),
    (_missing_image, r"case pancreas_003: image missing: .*imagesTr/pancreas_003\.nii\.gz"),
    (_shifted_label, r"case pancreas_002: label does not align with the image.*labelsTr/pancreas_002\.nii\.gz"),
    (_resized_label, r"case pancreas_002: label does not align with the image.*labelsTr/pancreas_002\.nii\.gz"),
    (_bad_values, r"case pancreas_003: unexpected label values \[3\].*labelsTr/pancreas_003\.nii\.gz"),
    (_four_d_image, r"case pancreas_002: expected a single-channel 3D CT, got 4D .*imagesTr/pancreas_002\.nii\.gz"),
    (_vector_image, r"case pancreas_001: expected a single-channel 3D CT, got 3D with 2 .*pancreas_001\.nii\.gz"),
])
def test_input_errors_name_case_and_file_and_leave_nothing(raw, tmp_path, capsys, damage, match):
    src = build_msd(tmp_path / "in")
    damage(src)
    rc, err = convert_cli(["msd_pancreas", "-i", str(src), "-d", "501"], capsys)
    assert rc == 2
    assert err.startswith("nnUNetv2_synth_convert msd_pancreas: error: ")
    import re

    assert re.search(match, err, re.DOTALL), err
    assert leftovers(raw) == []  # neither the dataset nor a temporary folder


def test_failure_midway_removes_the_temporary_folder(raw, tmp_path, monkeypatch):
    """An error after some cases were written (here: label values, read only when converting) leaves nothing."""
    src = build_msd(tmp_path / "in", n=3)
    _bad_values(src)  # case 3 of 3: cases 1 and 2 are already in the temporary folder when it fails
    written = []
    real_write = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", lambda *a, **k: (written.append(a[1]), real_write(*a, **k)))
    with pytest.raises(ConversionError, match="pancreas_003"):
        msd.convert("msd_pancreas", src, 501, progress=False)
    assert any("pancreas_002" in w for w in written) and all(".partial-" in w for w in written)
    assert leftovers(raw) == []


def test_existing_dataset_needs_overwrite(raw, tmp_path, capsys):
    src = build_msd(tmp_path / "in")
    assert convert_cli(["msd_pancreas", "-i", str(src), "-d", "501"], capsys)[0] == 0
    marker = raw / "Dataset501_MSDPancreas" / "imagesTr" / "pancreas_001_0000.nii.gz"
    mtime = marker.stat().st_mtime_ns
    rc, err = convert_cli(["msd_pancreas", "-i", str(src), "-d", "501"], capsys)
    assert rc == 2 and "already exists; pass --overwrite" in err
    assert marker.stat().st_mtime_ns == mtime
    # a failed --overwrite keeps the old dataset
    _bad_values(src)
    assert convert_cli(["msd_pancreas", "-i", str(src), "-d", "501", "--overwrite"], capsys)[0] == 2
    assert marker.stat().st_mtime_ns == mtime and leftovers(raw) == ["Dataset501_MSDPancreas"]
    (src / "labelsTr" / "pancreas_003.nii.gz").unlink()
    (src / "imagesTr" / "pancreas_003.nii.gz").unlink()
    src_json = json.loads((src / "dataset.json").read_text(encoding="utf-8"))
    src_json["training"] = src_json["training"][:2]
    (src / "dataset.json").write_text(json.dumps(src_json), encoding="utf-8")
    assert convert_cli(["msd_pancreas", "-i", str(src), "-d", "501", "--overwrite"], capsys)[0] == 0
    assert cases_of(raw / "Dataset501_MSDPancreas") == ["pancreas_001", "pancreas_002"]
    assert leftovers(raw) == ["Dataset501_MSDPancreas"]


def test_dataset_id_clash_is_refused(raw, tmp_path):
    src = build_msd(tmp_path / "in")
    msd.convert("msd_pancreas", src, 501, progress=False)
    with pytest.raises(ConversionError, match="dataset ID 501 is already used by .*Dataset501_MSDPancreas"):
        msd.convert("msd_pancreas", src, 501, name="Other", overwrite=True, progress=False)
    (Path(os.environ["nnUNet_preprocessed"]) / "Dataset502_Old").mkdir()
    with pytest.raises(ConversionError, match="dataset ID 502 is already used by .*nnUNet_preprocessed"):
        msd.convert("msd_pancreas", src, 502, progress=False)


def test_excluded_cases_and_unknown_exclusions(raw, tmp_path):
    src = build_msd(tmp_path / "in")
    _bad_values(src)
    folder = msd.convert("msd_pancreas", src, 501, exclude=["pancreas_003"], progress=False)
    assert cases_of(folder) == ["pancreas_001", "pancreas_002"]
    with pytest.raises(ConversionError, match=r"--exclude names unknown case\(s\): \['pancreas_9'\]"):
        msd.convert("msd_pancreas", src, 502, exclude=["pancreas_9"], progress=False)


def test_pancreas_ct_misaligned_label_names_case(raw, tmp_path):
    build_pancreas_ct(tmp_path / "tcia")
    write(volume(organ_tumour(tumour=False), spacing=(0.8, 0.8, 3.0)),
          tmp_path / "tcia" / "TCIA_pancreas_labels-02-05-2017" / "label0002.nii.gz")
    with pytest.raises(ConversionError, match=r"(?s)case PANCREAS_0002: label does not align.*label0002\.nii\.gz"):
        pancreas_ct.convert(tmp_path / "tcia", 502, progress=False)
    # a label without its DICOM folder, and the way to leave it out deliberately
    write(volume(organ_tumour(tumour=False)),
          tmp_path / "tcia" / "TCIA_pancreas_labels-02-05-2017" / "label0025.nii.gz")
    with pytest.raises(ConversionError, match=r"case PANCREAS_0025: DICOM folder PANCREAS_0025 missing"):
        pancreas_ct.convert(tmp_path / "tcia", 502, exclude=["PANCREAS_0002"], progress=False)
    folder = pancreas_ct.convert(tmp_path / "tcia", 502, exclude=["PANCREAS_0002", "PANCREAS_0025"], progress=False)
    assert cases_of(folder) == ["pancreasct_0001"]


def test_mama_mia_wrong_channel_count(raw, tmp_path):
    build_mama(tmp_path / "mama")
    (tmp_path / "mama" / "images" / "DUKE_002" / "duke_002_0001.nii.gz").unlink()
    with pytest.raises(ConversionError, match=r"case duke_002: needs .* post-contrast .*found phases \[0, 2, 3\]"):
        mama_mia.convert(tmp_path / "mama", 507, progress=False)


def test_mama_mia_phase_geometry_mismatch(raw, tmp_path):
    build_mama(tmp_path / "mama")
    write(volume(mri_array(1), spacing=(0.7, 0.7, 2.0), origin=(0.0, 0.0, 0.0)),
          tmp_path / "mama" / "images" / "ISPY1_1001" / "ispy1_1001_0001.nii.gz")
    with pytest.raises(ConversionError, match=r"(?s)case ispy1_1001: phase ispy1_1001_0001\.nii\.gz does not align.*"
                                              r"origin differs"):
        mama_mia.convert(tmp_path / "mama", 507, progress=False)


def test_generic_missing_channel_and_ambiguous_pattern(raw, tmp_path):
    build_generic(tmp_path / "g")
    (tmp_path / "g" / "scans" / "pat2_t2.mha").unlink()
    kwargs = dict(image_patterns=["scans/{case}_t1.nrrd", "scans/{case}_t2.mha"], label_pattern="masks/{case}.mha",
                  binarize=True, progress=False)
    with pytest.raises(ConversionError, match=r"case pat2: channel 1 \(image1\) missing: .*scans/pat2_t2\.mha"):
        generic.convert(tmp_path / "g", 509, **kwargs)
    write(volume(organ_tumour()), tmp_path / "g" / "masks" / "pat1.nii.gz")
    with pytest.raises(ConversionError, match=r"case pat1: label is ambiguous"):
        generic.convert(tmp_path / "g", 509, **{**kwargs, "label_pattern": "masks/{case}.*", "exclude": ["pat2"]})


def test_generic_undeclared_label_value(raw, tmp_path):
    build_generic(tmp_path / "g")
    with pytest.raises(ConversionError, match=r"case pat0: unexpected label values \[128, 255\].*masks/pat0\.mha"):
        generic.convert(tmp_path / "g", 509, image_patterns=["scans/{case}_t1.nrrd"], label_pattern="masks/{case}.mha",
                        progress=False)


def build_generic_with_organ_masks(root: Path, n: int = 2) -> None:
    """BraTS's layout: per case folder an image, a multi-class tumour mask (float, values 0/3/4) and a separate
    organ mask (float 0/1) that also covers the tumour."""
    for i in range(n):
        lab = organ_tumour()
        write(volume(mri_array(90 + i)), root / f"pat{i}" / "t1.nii.gz")
        tumour = np.where(lab == 2, 3 + (np.indices(SHAPE)[2] % 2), 0).astype(np.float32)
        write(volume(tumour), root / f"pat{i}" / "tumour.nii.gz")
        write(volume((lab > 0).astype(np.float32)), root / f"pat{i}" / "organmask.nii.gz")


@pytest.mark.parametrize("labels,organ_label,expected", [
    (None, "organ", {"background": 0, "tumor": 1, "organ": 2}),  # the organ label appended with the next value
    (["background=0", "brain=1", "tumour=2"], "brain", {"background": 0, "brain": 1, "tumour": 2}),
])
def test_generic_organ_pattern_merges_the_organ_mask(verify, raw, tmp_path, capsys, labels, organ_label, expected):
    build_generic_with_organ_masks(tmp_path / "g")
    args = ["generic", "-i", str(tmp_path / "g"), "-d", "511", "--image-pattern", "{case}/t1.nii.gz",
            "--label-pattern", "{case}/tumour.nii.gz", "--binarize", "--organ-pattern", "{case}/organmask.nii.gz",
            "--organ-label", organ_label] + (["--labels", *labels] if labels else [])
    rc, err = convert_cli(args, capsys)
    assert rc == 0, err
    folder = raw / "Dataset511_Generic"
    meta = verify(folder)
    assert meta["labels"] == expected
    lab = organ_tumour()
    want = np.where(lab == 2, expected.get("tumour", expected.get("tumor")), np.where(lab == 1, expected[organ_label],
                                                                                       0))
    for case in ("pat0", "pat1"):
        assert np.array_equal(read(folder / "labelsTr" / f"{case}.nii.gz"), want)  # the tumour keeps its label
    assert meta["nnunet_synth"]["source_patterns"][-1] == "{case}/organmask.nii.gz"


def test_generic_organ_pattern_refusals(raw, tmp_path):
    build_generic_with_organ_masks(tmp_path / "g")
    kwargs = dict(image_patterns=["{case}/t1.nii.gz"], label_pattern="{case}/tumour.nii.gz", binarize=True,
                  organ_pattern="{case}/organmask.nii.gz", progress=False)
    with pytest.raises(ConversionError, match="one foreground label .* besides the organ label"):
        generic.convert(tmp_path / "g", 511, labels=["background=0", "a=1", "b=2"], organ_label="organ", **kwargs)
    with pytest.raises(ConversionError, match="'background' is the background label"):
        generic.convert(tmp_path / "g", 511, organ_label="background", **kwargs)
    (tmp_path / "g" / "pat1" / "organmask.nii.gz").unlink()
    with pytest.raises(ConversionError, match=r"case pat1: organ mask missing: .*pat1/organmask\.nii\.gz"):
        generic.convert(tmp_path / "g", 511, **kwargs)


def test_pancreas_ct_trust_voxel_grid(raw, tmp_path):
    """A label whose header is wrong (unit spacing, zero origin) is refused unless the voxel grid is trusted."""
    arrays = build_pancreas_ct(tmp_path / "tcia", n=1)
    bogus = sitk.GetImageFromArray(arrays["0001"][1])
    write(bogus, tmp_path / "tcia" / "TCIA_pancreas_labels-02-05-2017" / "label0001.nii.gz")
    with pytest.raises(ConversionError, match="case PANCREAS_0001: label does not align"):
        pancreas_ct.convert(tmp_path / "tcia", 502, progress=False)
    folder = pancreas_ct.convert(tmp_path / "tcia", 502, trust_voxel_grid=True, progress=False)
    out = sitk.ReadImage(str(folder / "labelsTr" / "pancreasct_0001.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(out), arrays["0001"][1]) and np.allclose(out.GetSpacing(), SPACING)


def _atlas_missing_label(root: Path) -> None:
    (root / "labelsTr" / "lb12.nii.gz").unlink()


def _atlas_bad_values(root: Path) -> None:
    write(volume(organ_tumour(tumour_value=5)), root / "labelsTr" / "lb1.nii.gz")


def _btcv_missing_image(root: Path) -> None:
    (root / "RawData" / "Training" / "img" / "img0002.nii.gz").unlink()


def _btcv_bad_values(root: Path) -> None:
    write(volume(organ_tumour(tumour_value=14)), root / "RawData" / "Training" / "label" / "label0001.nii.gz")


def _btcv_other_spacing(root: Path) -> None:
    write(volume(organ_tumour(), spacing=(0.8, 0.9, 2.5)), root / "RawData" / "Training" / "label" / "label0002.nii.gz")


@pytest.mark.parametrize("cohort,damage,match", [
    ("atlas", _atlas_missing_label, r"case atlas_012: label missing: .*labelsTr/lb12\.nii\.gz"),
    ("atlas", _atlas_bad_values, r"case atlas_001: unexpected label values \[5\] .*labelsTr/lb1\.nii\.gz"),
    ("btcv", _btcv_missing_image, r"case btcv_0002: image missing: .*img/img0002\.nii\.gz"),
    ("btcv", _btcv_bad_values, r"case btcv_0001: unexpected label values \[14\] .*label/label0001\.nii\.gz"),
    ("btcv", _btcv_other_spacing, r"(?s)case btcv_0002: label does not align.*label/label0002\.nii\.gz"),
])
def test_atlas_btcv_input_errors(raw, tmp_path, capsys, cohort, damage, match):
    import re

    root = tmp_path / cohort
    build_atlas(root) if cohort == "atlas" else build_btcv(root)
    damage(root)
    rc, err = convert_cli([cohort, "-i", str(root), "-d", "512"], capsys)
    assert rc == 2 and re.search(match, err), err
    assert leftovers(raw) == []


def test_duke_fgt_missing_breast_mask_and_series(raw, tmp_path):
    build_duke(tmp_path / "duke", layered_case=False)
    seg_dir = tmp_path / "duke" / "Segmentation_Masks_NRRD" / "Breast_MRI_002"
    (seg_dir / "Segmentation_Breast_MRI_002_Breast.seg.nrrd").unlink()
    with pytest.raises(ConversionError, match=r"case Breast_MRI_002: breast mask missing: .*_Breast\.seg\.nrrd"):
        duke_fgt.convert(tmp_path / "duke", 508, progress=False)
    with pytest.raises(ConversionError, match=r"case Breast_MRI_001: expected one pre-contrast series .*"
                                              r"'ax dyn 1st pass'"):
        duke_fgt.convert(tmp_path / "duke", 508, breast_mask=False, series_description="^t1$", progress=False)
    assert leftovers(raw) == []
    folder = duke_fgt.convert(tmp_path / "duke", 508, breast_mask=False, progress=False)
    assert cases_of(folder) == ["dukefgt_001", "dukefgt_002"]


def test_raw_dir_option_without_environment(tmp_path, monkeypatch, capsys):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)
    src = build_msd(tmp_path / "in")
    rc, err = convert_cli(["msd_pancreas", "-i", str(src), "-d", "501"], capsys)
    assert rc == 2 and "nnUNet_raw is not set" in err
    rc, err = convert_cli(["msd_pancreas", "-i", str(src), "-d", "501", "--raw-dir", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    assert (tmp_path / "out" / "Dataset501_MSDPancreas" / "dataset.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------------------------------------------


def test_raw_dir_is_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "a"))
    assert nnunet_raw_dir() == (tmp_path / "a").resolve()
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "b"))
    assert nnunet_raw_dir() == (tmp_path / "b").resolve() and (tmp_path / "b").is_dir()
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(ConversionError, match="nnUNet_raw is not set"):
        nnunet_raw_dir()
    assert nnunet_raw_dir(tmp_path / "c") == (tmp_path / "c").resolve()


@pytest.mark.parametrize("dataset_id,name,ok", [(7, "Liver", True), (999, "a-b_c", True), (0, "X", False),
                                                (1000, "X", False), (5, "has space", False), (5, "_x", False)])
def test_dataset_folder_name(dataset_id, name, ok):
    if ok:
        assert dataset_folder_name(dataset_id, name) == f"Dataset{dataset_id:03d}_{name}"
    else:
        with pytest.raises(ConversionError):
            dataset_folder_name(dataset_id, name)


@pytest.mark.parametrize("items,ok", [(["background=0", "tumor=1"], True), (["bg=0", "a=1", "b=2"], True),
                                      (["tumor=1"], False), (["background=0", "tumor=2"], False),
                                      (["background"], False), (["background=0", "background=1"], False)])
def test_parse_label_spec(items, ok):
    if ok:
        assert list(parse_label_spec(items).values()) == list(range(len(items)))
    else:
        with pytest.raises(ConversionError):
            parse_label_spec(items)


def test_align_permuted_subgrid_and_refusal():
    image = volume(ct_array(0))
    sub = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    # the sub-box z 2..5, y 3..7, x 4..9 stored with x reversed
    moving = volume(sub[:, :, ::-1].copy(), origin=image.TransformIndexToPhysicalPoint((9, 3, 2)),
                    direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    out = align_to_reference(moving, image, case="c", what="label", files=["f"], allow_partial=True)
    want = np.zeros(SHAPE, np.uint8)
    want[2:6, 3:8, 4:10] = sub
    assert Geometry.of(out) == Geometry.of(image)
    assert np.array_equal(sitk.GetArrayFromImage(out), want)
    with pytest.raises(ConversionError, match="case c: label does not align"):
        align_to_reference(moving, image, case="c", what="label", files=["f"], allow_partial=False)
    half_voxel = volume(sub, origin=np.add(image.TransformIndexToPhysicalPoint((4, 3, 2)), (0.4, 0, 0)))
    with pytest.raises(ConversionError, match="voxel grids do not correspond"):
        align_to_reference(half_voxel, image, case="c", what="label", files=["f"], allow_partial=True)


def test_every_cohort_has_a_subcommand():
    assert set(COHORTS) == {"msd_pancreas", "msd_liver", "pancreas_ct", "btcv", "merge", "atlas", "lld_mmri",
                            "mama_mia", "duke_fgt", "generic"}
    for cohort in COHORTS:
        with pytest.raises(SystemExit) as exc:
            main([cohort, "--help"])
        assert exc.value.code == 0


def test_console_script_reads_sys_argv(raw, tmp_path):
    src = build_msd(tmp_path / "in")
    result = subprocess.run([sys.executable, "-c", "import sys; from nnunet_synth.dataset_conversion.cli import main;"
                             " sys.exit(main())", "msd_pancreas", "-i", str(src), "-d", "501", "--quiet"],
                            capture_output=True, encoding="utf-8", errors="replace", env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert (raw / "Dataset501_MSDPancreas" / "dataset.json").is_file()


@pytest.mark.slow
def test_plan_and_preprocess_accepts_converted_dataset(raw, tmp_path):
    """The real nnU-Net entry point with --verify_dataset_integrity on a converted two-channel dataset; the official
    split written by the converter reaches nnUNet_preprocessed."""
    build_mama(tmp_path / "mama")
    mama_mia.convert(tmp_path / "mama", 507, split="official", progress=False)
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
    result = subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "507", "--verify_dataset_integrity", "-c",
                             "3d_fullres", "-np", "1"], capture_output=True, encoding="utf-8", errors="replace",
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "verify_dataset_integrity Done" in result.stdout
    pre = Path(os.environ["nnUNet_preprocessed"]) / "Dataset507_MAMAMIA"
    assert json.loads((pre / "splits_final.json").read_text(encoding="utf-8"))[0]["val"] == ["nact_01"]
    assert (pre / "nnUNetPlans.json").is_file()
    assert len(list((pre / "nnUNetPlans_3d_fullres").glob("*.b2nd"))) + len(
        list((pre / "nnUNetPlans_3d_fullres").glob("*.npz"))) >= 4
