"""Finding, pairing and reading the segmentation files of a reference folder and prediction folders.

Files are read with nnU-Net's own reader for their file ending (every format nnU-Net reads works:
NIfTI, NRRD, MHA, PNG/BMP/TIF, 3D TIFF with its spacing json). The spacing comes from the files, in
the array axis order nnU-Net's readers return. Cases are matched by file name: ``case.nii.gz`` in
the reference folder pairs with ``case.nii.gz`` in every prediction folder.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES, determine_reader_writer_from_file_ending

from nnunet_synth.dataset_conversion.common import Geometry
from nnunet_synth.files import nifti_truncation

#: name fragments that mark a tumour label in dataset.json
TUMOUR_NAME_HINTS: tuple[str, ...] = ("tumour", "tumor", "lesion", "cancer", "mass", "metast", "neoplasm", "carcinoma")


def supported_file_endings() -> list[str]:
    """Every file ending some nnU-Net reader supports, longest first."""
    endings = {e for io_class in LIST_OF_IO_CLASSES for e in io_class.supported_file_endings}
    return sorted(endings, key=lambda e: (-len(e), e))


def _ending_of(name: str, endings: list[str]) -> str | None:
    lower = name.lower()
    for ending in endings:
        if lower.endswith(ending):
            return ending
    return None


def detect_file_ending(folder: str) -> str:
    """The most common segmentation file ending in a folder.

    Raises:
        FileNotFoundError: if the folder does not exist or holds no file nnU-Net can read.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"reference folder {folder} does not exist")
    endings = supported_file_endings()
    counts = Counter(
        e for name in os.listdir(folder)
        if not name.startswith(".") and (e := _ending_of(name, endings)) is not None
    )
    if not counts:
        raise FileNotFoundError(f"no segmentation file in {folder} (nnU-Net reads {', '.join(endings)})")
    return counts.most_common(1)[0][0]


def list_cases(folder: str, file_ending: str) -> dict[str, str]:
    """Case identifier (file name without the ending) -> path, for every file with that ending."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder} does not exist")
    return {
        name[: -len(file_ending)]: os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if name.endswith(file_ending) and not name.startswith(".") and os.path.isfile(os.path.join(folder, name))
    }


def match_cases(
    reference_folder: str, prediction_folders: list[str], file_ending: str
) -> tuple[list[str], dict[str, str], list[dict[str, str]]]:
    """Pairs every reference file with the file of the same name in each prediction folder.

    Returns:
        ``(case_ids, reference_files, prediction_files)``: the sorted case identifiers, case -> reference
        path, and one case -> path dict per prediction folder.

    Raises:
        FileNotFoundError: if the reference folder is empty or a prediction folder lacks a case (the
            message names the folder and the missing cases).
    """
    reference = list_cases(reference_folder, file_ending)
    if not reference:
        raise FileNotFoundError(f"no '*{file_ending}' file in reference folder {reference_folder}")
    case_ids = sorted(reference)
    predictions = []
    for folder in prediction_folders:
        found = list_cases(folder, file_ending)
        missing = [c for c in case_ids if c not in found]
        if missing:
            shown = ", ".join(f"{c}{file_ending}" for c in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise FileNotFoundError(
                f"prediction folder {folder} lacks {len(missing)} of {len(case_ids)} reference cases: {shown}{more}"
            )
        predictions.append({c: found[c] for c in case_ids})
    return case_ids, reference, predictions


def reader_for(file_ending: str, example_file: str) -> BaseReaderWriter:
    """An instance of nnU-Net's reader for a file ending (checked on an example file)."""
    return determine_reader_writer_from_file_ending(file_ending, example_file, verbose=False)()


@dataclass
class Segmentation:
    """A segmentation read from disk.

    Attributes:
        array: integer label map with the spatial axes only (2D for 2D data, else 3D).
        spacing: voxel spacing in mm per axis of ``array``.
        is_2d: True for 2D images (nnU-Net's readers give them a leading axis of size 1).
        geometry: the file's voxel grid (spacing, origin, direction; SimpleITK's index order, the reverse of
            ``array``'s axes), or None where the reader reports no origin and direction (PNG, TIFF).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    is_2d: bool
    geometry: Geometry | None = None


def _geometry(props: dict, shape: tuple[int, ...]) -> Geometry | None:
    """The voxel grid an nnU-Net reader reports in its properties (SimpleITK or nibabel), else None."""
    if "sitk_stuff" in props:
        sitk_stuff = props["sitk_stuff"]
        n = len(sitk_stuff["spacing"])
        return Geometry(tuple(int(s) for s in shape[::-1][:n]), tuple(float(v) for v in sitk_stuff["spacing"]),
                        tuple(float(v) for v in sitk_stuff["origin"]), tuple(float(v) for v in sitk_stuff["direction"]))
    if "nibabel_stuff" in props:
        stuff = props["nibabel_stuff"]
        affine = np.asarray(stuff.get("reoriented_affine", stuff["original_affine"]), dtype=float)
        n = affine.shape[0] - 1
        spacing = np.linalg.norm(affine[:n, :n], axis=0)
        direction = (affine[:n, :n] / spacing).ravel()
        return Geometry(tuple(int(s) for s in shape[::-1][:n]), tuple(float(v) for v in spacing),
                        tuple(float(v) for v in affine[:n, n]), tuple(float(v) for v in direction))
    return None


def resample_to_reference(seg: Segmentation, reference: Segmentation) -> Segmentation:
    """``seg`` resampled onto the reference's voxel grid (nearest neighbour; outside its own grid: 0).

    Raises:
        ValueError: when either file's reader reports no geometry.
    """
    if seg.geometry is None or reference.geometry is None:
        raise ValueError("resampling needs files with a geometry (origin and direction), e.g. NIfTI, NRRD, MHA")
    g, r = seg.geometry, reference.geometry
    image = sitk.GetImageFromArray(seg.array.reshape(g.size[::-1]))
    image.SetSpacing(g.spacing)
    image.SetOrigin(g.origin)
    image.SetDirection(g.direction)
    out = sitk.Resample(image, list(r.size), sitk.Transform(), sitk.sitkNearestNeighbor, r.origin, r.spacing,
                        r.direction, 0, image.GetPixelID())
    return Segmentation(sitk.GetArrayFromImage(out).reshape(reference.array.shape), reference.spacing,
                        reference.is_2d, r)


def read_segmentation(path: str, reader: BaseReaderWriter) -> Segmentation:
    """Reads one segmentation file with an nnU-Net reader.

    Raises:
        RuntimeError: naming the file, if it is truncated (a NIfTI reader would fill it with zeros: an empty
            prediction), if the reader fails or returns something that is no label map.
    """
    truncated = nifti_truncation(path)
    if truncated is not None:
        raise RuntimeError(f"segmentation {path} is truncated: {truncated}")
    try:
        seg, props = reader.read_seg(path)
    except Exception as e:  # any reader failure becomes an error naming the file
        raise RuntimeError(f"could not read segmentation {path}: {e}") from e
    seg = np.asarray(seg)
    if seg.ndim != 4 or seg.shape[0] != 1:
        raise RuntimeError(f"{path}: expected one label channel, the reader returned shape {seg.shape}")
    spacing = tuple(float(s) for s in props["spacing"])
    array = seg[0]
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise RuntimeError(f"{path}: segmentation holds non-integer values")
        array = rounded
    array = array.astype(np.int32, copy=False)
    geometry = _geometry(props, array.shape)
    if array.shape[0] == 1:
        return Segmentation(array[0], spacing[1:], True, geometry)
    return Segmentation(array, spacing, False, geometry)


def _dataset_json_candidates(reference_folder: str, prediction_folders: list[str]) -> list[str]:
    folders = [*prediction_folders, reference_folder, os.path.dirname(os.path.abspath(reference_folder))]
    return [os.path.join(f, "dataset.json") for f in folders if os.path.isfile(os.path.join(f, "dataset.json"))]


def guess_tumour_label(reference_folder: str, prediction_folders: list[str]) -> tuple[int, str]:
    """Guesses the tumour label from the first dataset.json found (prediction folders, then the
    reference folder and its parent).

    A label whose name contains one of :data:`TUMOUR_NAME_HINTS` wins; a dataset with a single
    foreground label uses it; without dataset.json the label is 1.

    Returns:
        ``(label, explanation)``.

    Raises:
        ValueError: if a dataset.json names several tumour-like labels, or none and more than one
            foreground label (pass ``-l``).
    """
    candidates = _dataset_json_candidates(reference_folder, prediction_folders)
    if not candidates:
        return 1, "no dataset.json found next to the folders: tumour label 1 (set it with -l)"
    with open(candidates[0], encoding="utf-8") as f:
        labels = json.load(f).get("labels", {})
    foreground = {name: v for name, v in labels.items() if name not in ("background", "ignore") and isinstance(v, int)}
    tumour = {name: v for name, v in foreground.items() if any(h in name.lower() for h in TUMOUR_NAME_HINTS)}
    if len(tumour) == 1:
        (name, value), = tumour.items()
        return value, f"tumour label {value} ('{name}') from {candidates[0]}"
    if not tumour and len(foreground) == 1:
        (name, value), = foreground.items()
        return value, f"the only foreground label {value} ('{name}') of {candidates[0]}"
    raise ValueError(
        f"cannot tell the tumour label from {candidates[0]} (labels {labels}); pass it with -l"
    )
