"""DICOM series discovery and reading (SimpleITK/GDCM for pixels and geometry, pydicom for descriptions; pydicom
comes with the ``[convert]`` extra and is imported when a series is searched)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from nnunet_synth.dataset_conversion.common import ConversionError, _first_line
from nnunet_synth.extras import require_extra


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series: its UID, folder, slice files in GDCM's spatial order and SeriesDescription."""

    uid: str
    folder: Path
    files: tuple[str, ...]
    description: str


def find_series(root: Path) -> list[DicomSeries]:
    """All DICOM series below ``root`` (any depth), sorted by folder.

    Raises:
        MissingExtraError: pydicom is not installed (the ``[convert]`` extra).
    """
    require_extra("convert", "pydicom")  # here, not in _description, which takes any error for a bad header
    series = []
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    for folder in folders:
        if not any(p.is_file() for p in folder.iterdir()):
            continue
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ():
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            if files:
                series.append(DicomSeries(uid, folder, files, _description(files[0])))
    return series


def _description(file: str) -> str:
    import pydicom

    try:
        return str(pydicom.dcmread(file, stop_before_pixels=True).get("SeriesDescription", "") or "")
    except Exception:  # noqa: BLE001 - an unreadable header only loses the description
        return ""


def read_series(series: DicomSeries, *, case: str) -> sitk.Image:
    """Read a series into one 3D image (geometry from the DICOM tags, LPS).

    Raises:
        ConversionError: GDCM cannot assemble the slices into a volume.
    """
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise ConversionError(f"case {case}: cannot read DICOM series {series.uid} in {series.folder}: "
                              f"{_first_line(err)}") from err
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"case {case}: DICOM series in {series.folder} is not a single-channel 3D volume")
    if image.GetPixelID() == sitk.sitkFloat64:
        image = sitk.Cast(image, sitk.sitkFloat32)
    return image
