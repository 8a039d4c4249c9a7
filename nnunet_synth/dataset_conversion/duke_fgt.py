"""Duke-Breast-Cancer-MRI breast, fibroglandular tissue (FGT) and vessel masks on the pre-contrast series.

Layout as downloaded from TCIA (https://doi.org/10.7937/TCIA.e3sv-re93; images with the NBIA Data Retriever,
"Classic Directory Name"; masks from the collection's segmentation supplement)::

    Duke-Breast-Cancer-MRI/Breast_MRI_001/<study>/<series>/1-001.dcm ...
    Segmentation_Masks_NRRD/Breast_MRI_001/Segmentation_Breast_MRI_001_Dense_and_Vessels.seg.nrrd
    Segmentation_Masks_NRRD/Breast_MRI_001/Segmentation_Breast_MRI_001_Breast.seg.nrrd

Cases are the ``*_Dense_and_Vessels.seg.nrrd`` files found below ``-i`` (or ``--segmentations``). The segment
of each voxel value comes from the file's metadata (``Segment<N>_Name`` / ``_LabelValue`` / ``_Layer``), never
from a fixed numbering: names containing "vessel" are vessels, "dense"/"fgt"/"fibroglandular" FGT, "breast" the
breast. The matching image is the patient's pre-contrast DICOM series: the series whose SeriesDescription matches
``--series-description`` (default ``pre``), and, if several do, the one whose grid the mask fits.

Labels: breast 1, fibroglandular tissue 2, vessels 3 (FGT wins where it overlaps vessels, vessels and FGT win over
breast), or without ``*_Breast.seg.nrrd`` (``--no-breast-mask``): FGT 1, vessels 2. A model trained on this dataset
segments the tissue that gives the placement region for synthetic breast tumours. ``--single-breast`` writes each
breast as its own case (``dukefgt_NNN_L``, ``dukefgt_NNN_R``, cut at the body's midline, see
:mod:`~nnunet_synth.dataset_conversion.single_breast`) and a 5-fold split grouped by patient.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_synth.dataset_conversion.common import (
    CaseTask,
    ConversionError,
    DatasetSpec,
    Geometry,
    OutputCase,
    align_to_reference,
    check_alignable,
    grid_relation,
    grouped_folds,
    image_from_array,
    resumable,
    write_dataset,
)
from nnunet_synth.dataset_conversion.dicom import DicomSeries, find_series, read_series
from nnunet_synth.dataset_conversion.seg_nrrd import Segment, read_seg_header, read_seg_nrrd
from nnunet_synth.dataset_conversion.single_breast import single_breast_ids, split_breasts

REFERENCE = ("Saha et al., Dynamic contrast-enhanced magnetic resonance images of breast cancer patients with "
             "tumor locations, The Cancer Imaging Archive (2021), https://doi.org/10.7937/TCIA.e3sv-re93")
_DV_RE = re.compile(r"^Segmentation_(?P<pid>.+)_Dense_and_Vessels\.seg\.nrrd$")


def segment_class(name: str) -> str | None:
    """Tissue class of a segment name: ``vessels``, ``fgt``, ``breast`` or None."""
    low = name.lower()
    if "vessel" in low:
        return "vessels"
    if "dense" in low or "fgt" in low or "fibroglandular" in low:
        return "fgt"
    if "breast" in low:
        return "breast"
    return None


def _classify(segments: list[Segment], allowed: tuple[str, ...], path: Path, case: str) -> dict[str, list[Segment]]:
    out: dict[str, list[Segment]] = {k: [] for k in allowed}
    for seg in segments:
        # A breast file with one segment is the breast whatever the segment is called.
        cls = allowed[0] if allowed == ("breast",) and len(segments) == 1 else segment_class(seg.name)
        if cls not in allowed:
            raise ConversionError(f"case {case}: segment {seg.name!r} in {path} is not one of {list(allowed)} "
                                  "(segment names must contain vessel, dense/fgt/fibroglandular or breast)")
        out[cls].append(seg)
    return out


def _case_id(pid: str) -> str:
    m = re.search(r"(\d+)$", pid)
    return f"dukefgt_{m.group(1)}" if m else "dukefgt_" + re.sub(r"[^A-Za-z0-9]+", "_", pid)


@resumable
def convert(input_dir: str | os.PathLike, dataset_id: int, *, name: str | None = None, overwrite: bool = False,
            raw_dir: str | os.PathLike | None = None, exclude: list[str] | None = None,
            images_dir: str | os.PathLike | None = None, segmentations_dir: str | os.PathLike | None = None,
            series_description: str = "pre", breast_mask: bool = True, progress: bool = True,
            num_processes: int = 1, single_breast: bool = False) -> Path:
    """Convert the Duke FGT/vessel masks.

    Args:
        input_dir: Folder above the DICOM patient folders and the segmentation folders.
        dataset_id: nnU-Net dataset ID.
        name: Dataset name (default DukeFGT).
        overwrite: Replace an existing dataset folder of the same name.
        raw_dir: Output root instead of ``nnUNet_raw``.
        exclude: Patients (``Breast_MRI_001``) to leave out.
        images_dir: Where the ``Breast_MRI_NNN`` DICOM folders are (default: below ``input_dir``).
        segmentations_dir: Where the ``.seg.nrrd`` files are (default: below ``input_dir``).
        series_description: Regular expression (case-insensitive) for the pre-contrast SeriesDescription.
        breast_mask: Also use ``Segmentation_<ID>_Breast.seg.nrrd`` (required for every case).
        progress: Show progress bars.
        num_processes: Worker processes converting cases (1: in this process).
        single_breast: One case per breast (``<case>_L``, ``<case>_R``) and a patient-grouped 5-fold split.

    Returns:
        The written dataset folder.
    """
    root = Path(input_dir)
    seg_root = Path(segmentations_dir) if segmentations_dir else root
    img_root = Path(images_dir) if images_dir else root
    try:
        pattern = re.compile(series_description, re.IGNORECASE)
    except re.error as err:
        raise ConversionError(f"--series-description {series_description!r} is not a regular expression: "
                              f"{err}") from err
    dv_files = {m.group("pid"): p for p in sorted(seg_root.rglob("*_Dense_and_Vessels.seg.nrrd"))
                if (m := _DV_RE.match(p.name))}
    if not dv_files:
        raise ConversionError(f"{seg_root}: no Segmentation_<ID>_Dense_and_Vessels.seg.nrrd files found")
    excluded = set(exclude or ())
    unknown = excluded - set(dv_files)
    if unknown:
        raise ConversionError(f"--exclude names unknown patient(s): {sorted(unknown)}")
    patients = [p for p in dv_files if p not in excluded]
    seg_dirs = {p.parent.resolve() for p in dv_files.values()}
    patient_dirs: dict[str, list[Path]] = {}
    for pid in patients:
        # Patient folders sit a few levels down; globbing by name avoids walking every DICOM file of the collection.
        for depth in range(4):
            for d in img_root.glob("*/" * depth + pid):
                if d.is_dir() and d.resolve() not in seg_dirs:
                    patient_dirs.setdefault(pid, []).append(d)
    for pid in patients:
        if len(patient_dirs.get(pid, [])) != 1:
            raise ConversionError(f"case {pid}: expected one DICOM folder named {pid} below {img_root}, found "
                                  f"{[str(d) for d in patient_dirs.get(pid, [])]}")
        if breast_mask and not (dv_files[pid].parent / f"Segmentation_{pid}_Breast.seg.nrrd").is_file():
            raise ConversionError(f"case {pid}: breast mask missing: "
                                  f"{dv_files[pid].parent / f'Segmentation_{pid}_Breast.seg.nrrd'} "
                                  "(pass --no-breast-mask to convert FGT and vessels only)")

    values = {"breast": 1, "vessels": 3, "fgt": 2} if breast_mask else {"vessels": 2, "fgt": 1}

    def make_task(pid: str) -> CaseTask:
        dv_path = dv_files[pid]
        br_path = dv_path.parent / f"Segmentation_{pid}_Breast.seg.nrrd"
        state: dict = {}

        def pick_series(g_seg: Geometry) -> DicomSeries:
            series = find_series(patient_dirs[pid][0])
            matching = [s for s in series if pattern.search(s.description)]
            if len(matching) > 1:
                # Several "pre" series (e.g. a non-fat-saturated one): keep those the mask fits.
                matching = [s for s in matching if grid_relation(g_seg, _series_geometry(s), True) is not None]
            if len(matching) != 1:
                found = [f"{s.folder.name}: {s.description!r}" for s in series]
                raise ConversionError(f"case {pid}: expected one pre-contrast series (SeriesDescription matching "
                                      f"{pattern.pattern!r}) that fits {dv_path.name} in {patient_dirs[pid][0]}; "
                                      f"series found: {found}")
            return matching[0]

        def check() -> None:
            g_dv, dv_segments = read_seg_header(dv_path, case=pid)
            _classify(dv_segments, ("vessels", "fgt"), dv_path, pid)
            series = pick_series(g_dv)
            g_img = _series_geometry(series)
            check_alignable(g_dv, g_img, case=pid, what="segmentation", files=(series.folder, dv_path),
                            allow_partial=True)
            if breast_mask:
                g_br, br_segments = read_seg_header(br_path, case=pid)
                _classify(br_segments, ("breast",), br_path, pid)
                check_alignable(g_br, g_img, case=pid, what="breast mask", files=(series.folder, br_path),
                                allow_partial=True)
            state["series"] = series

        def load() -> list[OutputCase]:
            dv = read_seg_nrrd(dv_path, case=pid)
            series = state.get("series") or pick_series(Geometry.of(dv.layers[0]))
            image = read_series(series, case=pid)
            label = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
            parts = [(dv, dv_path, ("vessels", "fgt"))]
            if breast_mask:
                parts.insert(0, (read_seg_nrrd(br_path, case=pid), br_path, ("breast",)))
            for seg, path, classes in parts:  # later classes overwrite earlier ones where masks overlap
                by_class = _classify(seg.segments, classes, path, pid)
                for cls in classes:
                    for segment in by_class[cls]:
                        mask = sitk.GetImageFromArray(seg.mask(segment).astype(np.uint8))
                        mask.CopyInformation(seg.layers[segment.layer])
                        mask = align_to_reference(mask, image, case=pid, what="segmentation",
                                                  files=(series.folder, path), allow_partial=True)
                        label[sitk.GetArrayViewFromImage(mask) > 0] = values[cls]
            case = OutputCase(_case_id(pid), [image], image_from_array(label, image), (series.folder, dv_path))
            return split_breasts(case) if single_breast else [case]

        return CaseTask(pid, load, check)

    labels = ({"background": 0, "breast": 1, "fibroglandular tissue": 2, "vessels": 3} if breast_mask
              else {"background": 0, "fibroglandular tissue": 1, "vessels": 2})
    spec = DatasetSpec(dataset_id, name or "DukeFGT", {0: "T1_pre"}, labels, cohort="duke_fgt",
                       description="Duke-Breast-Cancer-MRI pre-contrast T1, breast / fibroglandular tissue / vessel "
                       "masks (tissue segmentation for the breast placement region)",
                       reference=REFERENCE, licence="CC BY-NC 4.0",
                       extra={"organ": "breast" if breast_mask else "fibroglandular tissue", "tumour": None,
                              "placement_labels": [k for k in labels if k != "background"],
                              "single_breast": single_breast})
    # the two breasts of a patient in one fold
    splits = grouped_folds({p: single_breast_ids([_case_id(p)]) for p in patients}) if single_breast else None
    return write_dataset(spec, [make_task(p) for p in patients], overwrite=overwrite, raw_dir=raw_dir,
                         splits=splits, progress=progress, num_processes=num_processes)


def _series_geometry(series: DicomSeries) -> Geometry:
    """Grid of a DICOM series from the first two slice headers (pixels are not read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(series.files[0])
    reader.ReadImageInformation()
    first = Geometry.of(reader)
    if len(series.files) < 2:
        return first
    reader.SetFileName(series.files[1])
    reader.ReadImageInformation()
    step = np.asarray(reader.GetOrigin()) - np.asarray(first.origin)
    dz = float(np.linalg.norm(step)) or first.spacing[2]
    direction = np.asarray(first.direction).reshape(3, 3).copy()
    if np.linalg.norm(step) > 0:
        direction[:, 2] = step / np.linalg.norm(step)
    return Geometry((first.size[0], first.size[1], len(series.files)), (first.spacing[0], first.spacing[1], dz),
                    first.origin, tuple(direction.flatten().tolist()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Cohort options."""
    parser.add_argument("--images", default=None, metavar="DIR", help="folder above the Breast_MRI_NNN DICOM folders")
    parser.add_argument("--segmentations", default=None, metavar="DIR", help="folder above the .seg.nrrd files")
    parser.add_argument("--series-description", default="pre",
                        help="regular expression for the pre-contrast SeriesDescription")
    parser.add_argument("--no-breast-mask", action="store_true",
                        help="convert FGT and vessels only (no Segmentation_<ID>_Breast.seg.nrrd needed)")
    parser.add_argument("--single-breast", action="store_true",
                        help="one case per breast (<case>_L, <case>_R), cut at the body's left-right midline; folds "
                             "grouped by patient")


def run(args: argparse.Namespace) -> Path:
    """Entry from the command line."""
    return convert(args.input, args.dataset_id, name=args.name, overwrite=args.overwrite, raw_dir=args.raw_dir,
                   exclude=args.exclude, images_dir=args.images, segmentations_dir=args.segmentations,
                   series_description=args.series_description, breast_mask=not args.no_breast_mask,
                   progress=not args.quiet, num_processes=args.num_processes, single_breast=args.single_breast)
