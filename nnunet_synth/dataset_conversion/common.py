"""Shared machinery of the cohort converters.

Every converter describes its cases as :class:`CaseTask` objects (a cheap ``check`` that reads headers only and a
``load`` that returns the finished :class:`OutputCase` objects) and hands them to :func:`write_dataset`, which

* resolves ``nnUNet_raw/DatasetNNN_Name`` at call time and refuses an existing dataset (or another dataset with the
  same ID) unless ``overwrite`` is set,
* runs every ``check`` before the first case is converted,
* validates each output case (channel count, dimensionality, geometry of every channel and of the label, NaNs,
  label values) and writes it with SimpleITK so that spacing, origin and direction are kept,
* writes ``dataset.json`` with nnU-Net's own ``generate_dataset_json``,
* builds everything in a hidden temporary folder beside the target and renames it into place only when complete, so
  a failed or interrupted conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_synth.files import nifti_truncation, process_tag, remove_stale

FILE_ENDING = ".nii.gz"
#: File endings SimpleITK reads and the generic converter accepts.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
CONVERTED_BY = "nnunet_synth.dataset_conversion"

# Geometry tolerances. NIfTI stores geometry as float32, so a label written by another tool can differ from its
# image in the 5th digit; a genuine mismatch is orders of magnitude larger.
_SPACING_RTOL = 1e-4
_DIRECTION_ATOL = 1e-4
_ORIGIN_VOXEL_FRACTION = 0.01

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


class ConversionError(RuntimeError):
    """A problem with the input data or the target folder; the message names the case and the file."""


# ----------------------------------------------------------------------------------------------------------------
# nnU-Net paths and dataset names
# ----------------------------------------------------------------------------------------------------------------


def _nnunet_path(env_name: str) -> str | None:
    """Value of one of nnU-Net's path variables, read now rather than at import time.

    nnunetv2 2.8.1 exposes the paths as lazy ``_EnvPath`` objects (``.get()`` reads the environment on every call);
    older releases bound plain strings at import time, so the environment is the fallback.
    """
    import nnunetv2.paths as paths

    value = getattr(paths, env_name, None)
    if hasattr(value, "get"):
        value = value.get()
    if value is None:
        value = os.environ.get(env_name)
    return str(value) if value else None


def nnunet_raw_dir(raw_dir: str | os.PathLike | None = None) -> Path:
    """The ``nnUNet_raw`` folder (created if missing).

    Args:
        raw_dir: Explicit folder; overrides the environment variable.

    Raises:
        ConversionError: Neither ``raw_dir`` nor ``nnUNet_raw`` is set.
    """
    value = str(raw_dir) if raw_dir is not None else _nnunet_path("nnUNet_raw")
    if not value:
        raise ConversionError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (or pass --raw-dir)")
    path = Path(value).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetNNN_Name`` after validating ID and name.

    Raises:
        ConversionError: ID outside 1..999 (nnU-Net parses exactly three digits) or a name nnU-Net cannot use.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset ID must be in 1..999, got {dataset_id}")
    if not _NAME_RE.match(name):
        raise ConversionError(f"dataset name {name!r} must start with a letter or digit and contain only "
                              "letters, digits, '_' and '-'")
    return f"Dataset{int(dataset_id):03d}_{name}"


def check_dataset_id_free(dataset_id: int, folder_name: str, raw: Path) -> None:
    """Refuses an ID that another dataset (another name) uses in nnUNet_raw, nnUNet_preprocessed or nnUNet_results:
    replacing ``folder_name`` must never touch it, and nnU-Net could not tell the two apart.

    Raises:
        ConversionError: naming the other dataset's folders.
    """
    clashes = _conflicting_datasets(dataset_id, folder_name, raw)
    if clashes:
        raise ConversionError(f"dataset ID {dataset_id} is already used by {', '.join(map(str, clashes))}; "
                              "choose another ID (-d) or remove that dataset")


def partial_folder(raw: Path, folder_name: str) -> Path:
    """A new hidden folder in ``raw`` to build ``folder_name`` in (named per process; those of killed runs, whose
    process is gone, are removed first)."""
    remove_stale(raw, ".*.partial-*")
    tmp = raw / f".{folder_name}.partial-{uuid.uuid4().hex[:8]}{process_tag()}"
    tmp.mkdir(parents=True)
    return tmp


def _conflicting_datasets(dataset_id: int, folder_name: str, raw: Path) -> list[Path]:
    """Folders of *other* datasets that use the same ID in nnUNet_raw, nnUNet_preprocessed or nnUNet_results."""
    prefix = f"Dataset{int(dataset_id):03d}_"
    roots = [raw] + [Path(p) for p in (_nnunet_path("nnUNet_preprocessed"), _nnunet_path("nnUNet_results")) if p]
    found = []
    for root in roots:
        if root.is_dir():
            found += [p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix) and p.name != folder_name]
    return found


def find_raw_dataset(dataset: str | os.PathLike, raw_dir: str | os.PathLike | None = None) -> Path:
    """Locate an existing raw dataset given as folder path, ``DatasetNNN_Name`` or numeric ID.

    Raises:
        ConversionError: Nothing or more than one dataset matches.
    """
    path = Path(dataset).expanduser()
    if path.is_dir() and (path / "dataset.json").is_file():
        return path.resolve()
    raw = nnunet_raw_dir(raw_dir)
    text = str(dataset)
    if text.isdigit():
        matches = sorted(p for p in raw.iterdir() if p.is_dir() and p.name.startswith(f"Dataset{int(text):03d}_"))
    else:
        matches = [raw / text] if (raw / text).is_dir() else []
    if len(matches) != 1:
        raise ConversionError(f"input dataset {text!r}: expected one folder with a dataset.json (a path, a "
                              f"DatasetNNN_Name or an ID in {raw}), found {[m.name for m in matches]}")
    if not (matches[0] / "dataset.json").is_file():
        raise ConversionError(f"input dataset {matches[0]} has no dataset.json")
    return matches[0]


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of an image in SimpleITK conventions (index order x, y, z; LPS physical space)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        """Geometry of an image or of a reader after ``ReadImageInformation``."""
        return cls(tuple(int(s) for s in image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @property
    def ndim(self) -> int:
        return len(self.size)

    def describe(self) -> str:
        """One line for error messages."""
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        return (f"size {self.size}, spacing {fmt(self.spacing)}, origin {fmt(self.origin)}, "
                f"direction {fmt(self.direction)}")


def geometry_mismatch(a: Geometry, b: Geometry) -> str | None:
    """Name the first property in which two grids differ beyond rounding, or None if they agree."""
    if a.size != b.size:
        return "size"
    if not np.allclose(a.spacing, b.spacing, rtol=_SPACING_RTOL, atol=1e-6):
        return "spacing"
    if not np.allclose(a.direction, b.direction, rtol=0, atol=_DIRECTION_ATOL):
        return "direction"
    if not np.allclose(a.origin, b.origin, rtol=0, atol=_ORIGIN_VOXEL_FRACTION * min(a.spacing)):
        return "origin"
    return None


def read_header(path: Path, *, case: str) -> tuple[Geometry, int]:
    """Geometry and number of components per voxel of an image file, reading the header only.

    Raises:
        ConversionError: The file is missing or unreadable.
    """
    if not Path(path).is_file():
        raise ConversionError(f"case {case}: file not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ConversionError(f"case {case}: cannot read {path}: {_first_line(err)}") from err
    return Geometry.of(reader), int(reader.GetNumberOfComponents())


def read_image(path: Path, *, case: str) -> sitk.Image:
    """Read an image with SimpleITK, turning reader errors into a :class:`ConversionError` naming case and file.

    A truncated NIfTI file is refused too: SimpleITK would fill the missing voxels with zeros and raise nothing.
    """
    if not Path(path).is_file():
        raise ConversionError(f"case {case}: file not found: {path}")
    truncated = nifti_truncation(path)
    if truncated is not None:
        raise ConversionError(f"case {case}: {path} is truncated: {truncated}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ConversionError(f"case {case}: cannot read {path}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def check_same_geometry(reference: Geometry, other: Geometry, *, case: str, what: str,
                        files: Sequence[os.PathLike | str]) -> None:
    """Raise a :class:`ConversionError` naming case, files and both grids if two grids differ."""
    problem = geometry_mismatch(reference, other)
    if problem is not None:
        raise ConversionError(
            f"case {case}: {what} does not align with the image ({problem} differs)\n"
            f"  files: {', '.join(str(f) for f in files)}\n"
            f"  image: {reference.describe()}\n  {what}: {other.describe()}")


def _affine(geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
    n = geom.ndim
    direction = np.asarray(geom.direction, dtype=float).reshape(n, n)
    return direction @ np.diag(geom.spacing), np.asarray(geom.origin, dtype=float)


def grid_relation(g_m: Geometry, g_r: Geometry, allow_partial: bool) -> str | None:
    """How a label grid relates to an image grid: "same", "voxelwise" (exact correspondence of voxel centres under
    an axis permutation/flip, optionally over a sub-box) or None (no voxel-exact correspondence)."""
    if g_m.ndim != g_r.ndim:
        return None
    if geometry_mismatch(g_r, g_m) is None:
        return "same"
    a_m, o_m = _affine(g_m)
    a_r, o_r = _affine(g_r)
    inv_r = np.linalg.inv(a_r)
    matrix = inv_r @ a_m  # moving index -> reference index
    shift = inv_r @ (o_m - o_r)
    rounded = np.round(matrix)
    is_perm = (np.allclose(matrix, rounded, atol=1e-3) and np.all(np.abs(rounded).sum(0) == 1)
               and np.all(np.abs(rounded).sum(1) == 1))
    if not (is_perm and np.allclose(shift, np.round(shift), atol=0.05)):
        return None
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in g_m.size], indexing="ij")).reshape(g_m.ndim, -1)
    mapped = rounded @ corners + np.round(shift)[:, None]
    lo, hi = mapped.min(1), mapped.max(1)
    inside = np.all(lo >= 0) and np.all(hi <= np.asarray(g_r.size) - 1)
    full = np.all(lo == 0) and np.all(hi == np.asarray(g_r.size) - 1)
    return "voxelwise" if inside and (full or allow_partial) else None


def check_alignable(moving: Geometry, reference: Geometry, *, case: str, what: str,
                    files: Sequence[os.PathLike | str], allow_partial: bool = False) -> None:
    """Header-only version of :func:`align_to_reference`: raise if the two grids cannot be put in register."""
    if grid_relation(moving, reference, allow_partial) is None:
        raise ConversionError(
            f"case {case}: {what} does not align with the image (the voxel grids do not correspond)\n"
            f"  files: {', '.join(str(f) for f in files)}\n"
            f"  image: {reference.describe()}\n  {what}: {moving.describe()}")


def align_to_reference(moving: sitk.Image, reference: sitk.Image, *, case: str, what: str,
                       files: Sequence[os.PathLike | str], allow_partial: bool = False) -> sitk.Image:
    """Put a label map on the voxel grid of its image without interpolating.

    Accepted relations: the same grid (up to rounding), or a grid whose voxel centres coincide with image voxel
    centres under an axis permutation/flip and, with ``allow_partial``, a sub-box of the image (3D Slicer stores a
    segmentation over its own extent). Anything else is a misalignment and raises.

    Args:
        moving: The label map.
        reference: The image whose grid the result takes.
        case: Case name for error messages.
        what: What ``moving`` is, for error messages ("label", "segmentation").
        files: Source files, for error messages.
        allow_partial: Accept a label grid that covers only part of the image (the rest becomes background).

    Returns:
        The label map on exactly the reference grid.

    Raises:
        ConversionError: The grids do not correspond voxel by voxel.
    """
    g_m, g_r = Geometry.of(moving), Geometry.of(reference)
    check_alignable(g_m, g_r, case=case, what=what, files=files, allow_partial=allow_partial)
    if grid_relation(g_m, g_r, allow_partial) == "same":
        out = sitk.Image(moving)
        out.CopyInformation(reference)
        return out
    # Voxel centres coincide, so nearest-neighbour resampling copies values without interpolation.
    return sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, moving.GetPixelID())


def resample_to_spacing(image: sitk.Image, spacing: Sequence[float], *, is_label: bool) -> sitk.Image:
    """Resample to a new spacing over the same physical extent (linear for images, nearest for labels).

    Args:
        image: Input image.
        spacing: Target spacing in SimpleITK order (x, y, z); one value means isotropic.
        is_label: Use nearest-neighbour interpolation and keep the pixel type.
    """
    if len(spacing) == 1:
        spacing = list(spacing) * image.GetDimension()
    old_size = np.asarray(image.GetSize(), dtype=float)
    old_spacing = np.asarray(image.GetSpacing(), dtype=float)
    new_size = [max(1, int(round(s))) for s in old_size * old_spacing / np.asarray(spacing, dtype=float)]
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    pixel = image.GetPixelID() if is_label else sitk.sitkFloat32
    # Same origin: voxel 0 keeps its centre, the extent changes by less than one new voxel.
    return sitk.Resample(image, new_size, sitk.Transform(), interpolator, image.GetOrigin(),
                         [float(s) for s in spacing], image.GetDirection(), 0, pixel)


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------


def label_array(label: sitk.Image, *, case: str, file: os.PathLike | str) -> np.ndarray:
    """Label voxels as an integer array (z, y, x), refusing non-integer or multi-component labels."""
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"case {case}: label has {label.GetNumberOfComponentsPerPixel()} components per "
                              f"voxel, expected 1: {file}")
    arr = sitk.GetArrayFromImage(label)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ConversionError(f"case {case}: label holds non-integer values: {file}")
        arr = arr.astype(np.int64)
    return arr


def remap_labels(array: np.ndarray, mapping: Mapping[int, int], *, case: str, file: os.PathLike | str) -> np.ndarray:
    """Map source label values to output values; any value not in ``mapping`` is an error.

    Args:
        array: Integer label array.
        mapping: Source value -> output value (values that become background map to 0).
        case: Case name for error messages.
        file: Source file for error messages.

    Returns:
        uint8 array of output values.
    """
    found = np.unique(array)
    unexpected = sorted(int(v) for v in found if int(v) not in mapping)
    if unexpected:
        raise ConversionError(f"case {case}: unexpected label values {unexpected} (expected a subset of "
                              f"{sorted(mapping)}) in {file}")
    out = np.zeros(array.shape, dtype=np.uint8)
    for src, dst in mapping.items():
        if dst:
            out[array == src] = dst
    return out


def image_from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """SimpleITK image from a (z, y, x) array with the geometry of ``reference``."""
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(reference)
    return img


def parse_label_spec(items: Sequence[str]) -> dict[str, int]:
    """Parse ``NAME=VALUE`` pairs into an nnU-Net label dict, checking 0 = background and consecutive values.

    Raises:
        ConversionError: Malformed pair, duplicate, missing background or gap in the values.
    """
    labels: dict[str, int] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name or not value.strip().isdigit():
            raise ConversionError(f"label {item!r} must be NAME=VALUE, e.g. tumor=1")
        if name in labels:
            raise ConversionError(f"label name {name!r} given twice")
        labels[name] = int(value)
    values = sorted(labels.values())
    if values != list(range(len(values))) or 0 not in values:
        raise ConversionError(f"label values must be 0 (background), 1, 2, ... without gaps, got {labels}")
    return labels


# ----------------------------------------------------------------------------------------------------------------
# Cases and the dataset writer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class OutputCase:
    """One finished training case: one image per channel and the label map, all on one grid."""

    identifier: str
    images: list[sitk.Image]
    label: sitk.Image
    sources: Sequence[os.PathLike | str] = ()


@dataclass
class CaseTask:
    """One input case: ``check`` reads headers only, ``load`` returns the output case(s) it yields."""

    name: str
    load: Callable[[], list[OutputCase]]
    check: Callable[[], None] = lambda: None


@dataclass
class DatasetSpec:
    """What goes into dataset.json, plus the dimensionality of the cases."""

    dataset_id: int
    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    cohort: str
    description: str = ""
    reference: str = ""
    licence: str = "see the cohort's download page"
    ndim: int = 3
    extra: dict = field(default_factory=dict)

    @property
    def folder_name(self) -> str:
        return dataset_folder_name(self.dataset_id, self.name)


def _validate_case(case: OutputCase, spec: DatasetSpec) -> tuple[list[sitk.Image], sitk.Image]:
    """Check one output case against the dataset spec; return images and label ready to write."""
    src = ", ".join(str(s) for s in case.sources) or "(generated)"
    cid = case.identifier
    if not _IDENTIFIER_RE.match(cid):
        raise ConversionError(f"case {cid!r}: identifier must contain only letters, digits, '_', '-', '.'")
    if len(case.images) != len(spec.channel_names):
        raise ConversionError(f"case {cid}: {len(case.images)} image channel(s), expected {len(spec.channel_names)} "
                              f"({', '.join(spec.channel_names.values())}); sources: {src}")
    images = []
    ref_geom = None
    for c, img in enumerate(case.images):
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ConversionError(f"case {cid}: channel {c} has {img.GetNumberOfComponentsPerPixel()} components "
                                  f"per voxel (a multi-channel file); expected one file per channel; sources: {src}")
        if img.GetDimension() != spec.ndim:
            raise ConversionError(f"case {cid}: channel {c} is {img.GetDimension()}D, expected {spec.ndim}D; "
                                  f"sources: {src}")
        if img.GetPixelID() == sitk.sitkFloat64:
            img = sitk.Cast(img, sitk.sitkFloat32)
        if ref_geom is None:
            ref_geom = Geometry.of(img)
            reference = img
        else:
            check_same_geometry(ref_geom, Geometry.of(img), case=cid, what=f"channel {c}", files=case.sources)
            img = sitk.Image(img)
            img.CopyInformation(reference)
        arr = sitk.GetArrayViewFromImage(img)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise ConversionError(f"case {cid}: channel {c} contains NaN or infinite values; sources: {src}")
        images.append(img)
    label = case.label
    if label.GetDimension() != spec.ndim:
        raise ConversionError(f"case {cid}: label is {label.GetDimension()}D, expected {spec.ndim}D; sources: {src}")
    check_same_geometry(ref_geom, Geometry.of(label), case=cid, what="label", files=case.sources)
    arr = label_array(label, case=cid, file=src)
    allowed = set(spec.labels.values())
    unexpected = sorted(int(v) for v in np.unique(arr) if int(v) not in allowed)
    if unexpected:
        raise ConversionError(f"case {cid}: unexpected label values {unexpected}, dataset declares "
                              f"{spec.labels}; sources: {src}")
    out_label = sitk.GetImageFromArray(arr.astype(np.uint8 if max(allowed) < 256 else np.uint16))
    out_label.CopyInformation(reference)
    return images, out_label


def write_dataset(spec: DatasetSpec, tasks: Sequence[CaseTask], *, overwrite: bool = False,
                  raw_dir: str | os.PathLike | None = None,
                  finalize: Callable[[Path, list[str]], None] | None = None,
                  splits: list[dict[str, list[str]]] | None = None, progress: bool = True) -> Path:
    """Convert all cases into ``nnUNet_raw/DatasetNNN_Name`` atomically.

    Args:
        spec: Dataset description (ID, name, channels, labels, ...).
        tasks: The input cases.
        overwrite: Replace an existing folder of the same name (a different dataset with the same ID is always an
            error).
        raw_dir: Use this folder instead of ``nnUNet_raw``.
        finalize: Called with the temporary folder and the written case identifiers after the last case, to add
            extra files beside dataset.json.
        splits: Written as ``splits_final.json`` beside dataset.json; nnU-Net's planner copies it into
            ``nnUNet_preprocessed`` (``[{"train": [...], "val": [...]}, ...]``).
        progress: Show progress bars.

    Returns:
        The dataset folder.

    Raises:
        ConversionError: Any input problem, an existing dataset without ``overwrite``, or an ID clash.
    """
    raw = nnunet_raw_dir(raw_dir)
    folder_name = spec.folder_name
    target = raw / folder_name
    check_dataset_id_free(spec.dataset_id, folder_name, raw)
    if target.exists() and not overwrite:
        raise ConversionError(f"{target} already exists; pass --overwrite to replace it")
    if not tasks:
        raise ConversionError(f"no cases found for {folder_name}")

    for task in tqdm(tasks, desc=f"{folder_name}: checking", unit="case", disable=not progress):
        task.check()

    tmp = partial_folder(raw, folder_name)
    try:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        written: list[str] = []
        seen: dict[str, str] = {}
        for task in tqdm(tasks, desc=f"{folder_name}: converting", unit="case", disable=not progress):
            for case in task.load():
                if case.identifier in seen:
                    raise ConversionError(f"case identifier {case.identifier!r} produced twice (inputs "
                                          f"{seen[case.identifier]!r} and {task.name!r})")
                seen[case.identifier] = task.name
                images, label = _validate_case(case, spec)
                for c, img in enumerate(images):
                    sitk.WriteImage(img, str(tmp / "imagesTr" / f"{case.identifier}_{c:04d}{FILE_ENDING}"), True)
                sitk.WriteImage(label, str(tmp / "labelsTr" / f"{case.identifier}{FILE_ENDING}"), True)
                written.append(case.identifier)
        if not written:
            raise ConversionError(f"no cases were produced for {folder_name}")
        if splits is not None:
            _check_splits(splits, written)
            (tmp / "splits_final.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")
        if finalize is not None:
            finalize(tmp, written)
        _write_dataset_json(tmp, spec, len(written))
        move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_splits(splits: list[dict[str, list[str]]], written: list[str]) -> None:
    known = set(written)
    for i, fold in enumerate(splits):
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
        if unknown:
            raise ConversionError(f"split fold {i} names cases that were not converted: {unknown[:10]}")
        if set(fold["train"]) & set(fold["val"]):
            raise ConversionError(f"split fold {i} has cases in both train and val")


def _write_dataset_json(folder: Path, spec: DatasetSpec, num_cases: int) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    extra = {"nnunet_synth": {"cohort": spec.cohort, **spec.extra}}
    generate_dataset_json(str(folder), dict(spec.channel_names), dict(spec.labels), num_cases, FILE_ENDING,
                          dataset_name=spec.folder_name, reference=spec.reference or None,
                          description=spec.description or None, license=spec.licence,
                          converted_by=f"{CONVERTED_BY} ({spec.cohort})", **extra)


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder onto the target; an existing target is only removed once the new one is in."""
    if not target.exists():
        tmp.rename(target)
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(backup)
    try:
        tmp.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def write_json(path: Path, data: object) -> None:
    """Write JSON with a stable layout."""
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Small helpers shared by the cohort modules
# ----------------------------------------------------------------------------------------------------------------


def strip_image_suffix(filename: str) -> str | None:
    """File name without a supported image suffix, or None for other files and macOS ``._`` resource forks."""
    if filename.startswith("."):
        return None
    for suffix in IMAGE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return None


def list_images(folder: Path) -> dict[str, Path]:
    """Image files in ``folder`` by name without suffix, skipping hidden files and macOS ``._*`` files."""
    out = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            stem = strip_image_suffix(p.name)
            if stem is not None and p.is_file():
                out[stem] = p
    return out


def select_cases(names: Iterable[str], exclude: Iterable[str] | None) -> list[str]:
    """Drop excluded case names; an exclusion that matches nothing is an error (likely a typo)."""
    names = list(names)
    exclude = set(exclude or ())
    unknown = exclude - set(names)
    if unknown:
        raise ConversionError(f"--exclude names unknown case(s): {sorted(unknown)}")
    return [n for n in names if n not in exclude]


def sanitize_identifier(text: str) -> str:
    """Make a string safe as (part of) an nnU-Net case identifier."""
    out = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")
    return out or "case"
