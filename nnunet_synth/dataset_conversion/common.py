"""Shared machinery of the cohort converters.

Every converter describes its cases as :class:`CaseTask` objects (a cheap ``check`` that reads headers only and a
``load`` that returns the finished :class:`OutputCase` objects) and hands them to :func:`write_dataset`, which

* resolves ``nnUNet_raw/DatasetNNN_Name`` at call time and refuses an existing dataset (or another dataset with the
  same ID) unless ``overwrite`` is set,
* runs every ``check`` before the first case is converted,
* validates each output case (channel count, dimensionality, geometry of every channel and of the label, NaNs,
  label values) and writes it with SimpleITK so that spacing, origin and direction are kept,
* writes ``dataset.json`` with nnU-Net's own ``generate_dataset_json``,
* builds everything in a hidden staging folder beside the target (``.DatasetNNN_Name.partial-resumable``) and renames
  the dataset into place only when complete, so nnUNet_raw never holds a half-written dataset,
* converts the cases in ``num_processes`` worker processes (nnU-Net's spawn pool) and keeps every finished input
  case in the staging folder (its files first, then a per-case marker, each moved in atomically): a conversion that
  is killed or crashes resumes where it stopped when the same command runs again, while one with other settings is
  refused (``overwrite`` discards the old staging folder); a refused input (:class:`ConversionError`) still leaves
  nothing behind,
* with ``num_parts`` / ``part_id`` converts only every ``num_parts``-th case (in sorted order of the input cases);
  the part that finishes the last case writes the dataset.

Worker processes cannot receive the converters' closures, so a converter's entry function is decorated with
:func:`resumable`: a worker calls it again with the same arguments and :func:`write_dataset` hands back the case
list instead of converting (the cases are built once per worker process).
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_synth.files import creation_lock, nifti_truncation, process_tag, remove_stale

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
    #: JSON data about the case for the converter's ``finalize`` (kept with the finished case, so it survives worker
    #: processes and resumed runs; see ``records`` of :func:`write_dataset`)
    record: object = None


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


#: Suffix of the staging folder of ``DatasetNNN_Name`` in nnUNet_raw (``.DatasetNNN_Name.partial-resumable``).
STAGING_SUFFIX = ".partial-resumable"
#: Arguments of a converter's entry function that change how it runs, not what it writes: left out of the settings
#: a resumed conversion must share (``exclude`` too: a rerun may leave out a case that failed).
RUNTIME_ARGUMENTS = frozenset({"progress", "num_processes", "overwrite", "exclude", "num_parts", "part_id", "verbose",
                               "raw_dir"})
_SETTINGS_FILE = "conversion.json"


@dataclass(frozen=True)
class _Recipe:
    """A converter's entry function and the arguments it was called with (picklable: sent to worker processes)."""

    func: Callable
    args: tuple
    kwargs: dict


_RECIPE: contextvars.ContextVar[_Recipe | None] = contextvars.ContextVar("nnunet_synth_conversion", default=None)
_COLLECTING: contextvars.ContextVar[bool] = contextvars.ContextVar("nnunet_synth_collecting", default=False)
_WORKER_TASKS: dict[str, dict[str, CaseTask]] = {}  # per worker process: the cases of the conversion it serves


class _TasksCollected(BaseException):  # noqa: N818 - not an error: carries the cases out of the converter
    """Raised by :func:`write_dataset` in a worker process to hand the converter's cases back (a BaseException, so
    a converter's ``except Exception`` does not swallow it)."""

    def __init__(self, tasks: list[CaseTask]):
        super().__init__("cases collected")
        self.tasks = tasks


def resumable(func: Callable) -> Callable:
    """Decorates a converter's entry function (module-level, picklable arguments) so that :func:`write_dataset` can
    convert its cases in worker processes and record its arguments for resuming.

    Args:
        func: The function that builds the cases and calls :func:`write_dataset`.

    Returns:
        The wrapped function (same name, signature and result).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        token = _RECIPE.set(_Recipe(wrapper, args, kwargs))
        try:
            return func(*args, **kwargs)
        finally:
            _RECIPE.reset(token)

    return wrapper


def _collect_tasks(recipe: _Recipe) -> list[CaseTask]:
    """The cases a converter builds for :func:`write_dataset`, without converting any."""
    token = _COLLECTING.set(True)
    try:
        recipe.func(*recipe.args, **recipe.kwargs)
    except _TasksCollected as found:
        return found.tasks
    finally:
        _COLLECTING.reset(token)
    raise RuntimeError(f"{recipe.func.__qualname__} returned without calling write_dataset")


def _task_key(name: str) -> str:
    """File-name-safe key of an input case (names may hold '/', e.g. merge's ``source/case``)."""
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class _Staging:
    """The staging folder of one dataset: ``dataset/`` (becomes the dataset), ``cases/`` (one marker per finished
    input case), ``work/`` (per-case temporaries, process-tagged) and the settings of the conversion."""

    root: Path

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def cases(self) -> Path:
        return self.root / "cases"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def lock(self):
        return creation_lock(self.root)

    def finished(self, names: Iterable[str]) -> dict[str, dict]:
        """Markers of the finished input cases among ``names``."""
        out = {}
        for name in names:
            path = self.cases / f"{_task_key(name)}.json"
            if path.is_file():
                try:
                    marker = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue  # written atomically, so unreadable means foreign: convert the case again
                if marker.get("task") == name:
                    out[name] = marker
        return out

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _settings(spec: DatasetSpec) -> dict:
    """What a resumed conversion must share with the interrupted one: the dataset description and the converter's
    arguments (those of :data:`RUNTIME_ARGUMENTS` left out), as JSON."""
    recipe = _RECIPE.get()
    call = None if recipe is None else {
        "function": f"{recipe.func.__module__}.{recipe.func.__qualname__}", "args": list(recipe.args),
        "kwargs": {k: v for k, v in sorted(recipe.kwargs.items()) if k not in RUNTIME_ARGUMENTS}}
    return json.loads(json.dumps({"dataset": asdict(spec), "converter": call}, default=str))


def _differences(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted keys at which two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "settings"]


def _open_staging(raw: Path, folder_name: str, settings: dict, overwrite: bool) -> _Staging:
    """The staging folder of ``folder_name``: resumed when it holds a conversion with these settings, else new.

    Raises:
        ConversionError: It holds a conversion with other settings and ``overwrite`` is not set.
    """
    staging = _Staging(raw / f".{folder_name}{STAGING_SUFFIX}")
    with staging.lock:
        if staging.root.exists():
            try:
                old = json.loads((staging.root / _SETTINGS_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = None  # killed while being created or moved into place: nothing to resume
            if old is None or not staging.dataset.is_dir():
                staging.discard()
            elif old != settings:
                if not overwrite:
                    raise ConversionError(
                        f"{staging.root} holds an interrupted conversion of {folder_name} with other settings "
                        f"(differing: {', '.join(_differences(old, settings)[:8])}); run the same command again "
                        "to resume it, or pass --overwrite to discard it and start again")
                print(f"{folder_name}: discarding the interrupted conversion with other settings in {staging.root}",
                      file=sys.stderr, flush=True)
                staging.discard()
        if not staging.root.exists():
            for sub in (staging.dataset / "imagesTr", staging.dataset / "labelsTr", staging.cases, staging.work):
                sub.mkdir(parents=True, exist_ok=True)
            _write_atomically(staging.root / _SETTINGS_FILE, json.dumps(settings, indent=1))  # last: it is complete
    remove_stale(staging.work)  # per-case temporaries of killed workers
    return staging


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}{process_tag()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _convert_task(task: CaseTask, spec: DatasetSpec, staging: _Staging) -> dict:
    """Convert one input case into the staging folder: its files, then its marker (both moved in atomically, so an
    interrupted case is converted again and a finished one never is).

    Returns:
        The marker: the task name, its case identifiers, their files and records.
    """
    work = staging.work / f"{_task_key(task.name)}{process_tag()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "imagesTr").mkdir(parents=True)
    (work / "labelsTr").mkdir()
    try:
        identifiers, files, records = [], [], {}
        for case in task.load():
            if case.identifier in identifiers:
                raise ConversionError(f"case identifier {case.identifier!r} produced twice by input {task.name!r}")
            images, label = _validate_case(case, spec)
            names = [f"imagesTr/{case.identifier}_{c:04d}{FILE_ENDING}" for c in range(len(images))]
            for name, img in zip(names, images, strict=True):
                sitk.WriteImage(img, str(work / name), True)
            names.append(f"labelsTr/{case.identifier}{FILE_ENDING}")
            sitk.WriteImage(label, str(work / names[-1]), True)
            identifiers.append(case.identifier)
            files += names
            if case.record is not None:
                records[case.identifier] = case.record
        for name in files:
            os.replace(work / name, staging.dataset / name)
        marker = {"task": task.name, "identifiers": identifiers, "files": files, "records": records}
        _write_atomically(staging.cases / f"{_task_key(task.name)}.json", json.dumps(marker, default=str))
        return marker
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert_in_worker(key: str, recipe: _Recipe, spec: DatasetSpec, name: str, staging: _Staging) -> dict:
    """Worker-process side of :func:`_convert_task`: the converter's cases are rebuilt once per process."""
    tasks = _WORKER_TASKS.get(key)
    if tasks is None:
        _WORKER_TASKS.clear()
        tasks = _WORKER_TASKS[key] = {t.name: t for t in _collect_tasks(recipe)}
    return _convert_task(tasks[name], spec, staging)


def _naming_case(error: BaseException, name: str) -> BaseException:
    """The error of one input case, naming the case (a ConversionError whose message does not yet name it is
    re-made with the name; other errors keep their type and get a note)."""
    if isinstance(error, ConversionError):
        return error if name in str(error) else ConversionError(f"case {name}: {error}")
    if hasattr(error, "add_note"):
        error.add_note(f"while converting input case {name}")
    return error


def _run_tasks(pending: Sequence[CaseTask], spec: DatasetSpec, staging: _Staging, num_processes: int,
               bar: tqdm) -> Iterator[dict]:
    """Convert ``pending`` in this process (``num_processes`` <= 1, a single case, or a converter without
    :func:`resumable`) or in a spawn pool as nnU-Net's preprocessing does; yields each case's marker as it
    finishes."""
    recipe = _RECIPE.get()
    if num_processes <= 1 or len(pending) <= 1 or recipe is None:
        for task in pending:
            try:
                marker = _convert_task(task, spec, staging)
            except BaseException as err:
                named = _naming_case(err, task.name)
                if named is err:
                    raise
                raise named from err
            bar.update()
            yield marker
        return
    key = uuid.uuid4().hex
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(pending))) as pool:
        workers = list(pool._pool)
        remaining = {task.name: pool.starmap_async(_convert_in_worker, ((key, recipe, spec, task.name, staging),))
                     for task in pending}
        while remaining:
            # A worker killed from outside (out of memory) is replaced by the pool and its case never returns.
            if not all(w.is_alive() for w in workers):
                raise RuntimeError("a conversion worker process died (out of memory? try a smaller -np); the "
                                   "finished cases are kept and the same command resumes")
            done = [name for name, result in remaining.items() if result.ready()]
            for name in done:
                try:
                    marker = remaining.pop(name).get()[0]
                except BaseException as err:
                    named = _naming_case(err, name)
                    if named is err:
                        raise
                    raise named from err
                bar.update()
                yield marker
            if not done:
                time.sleep(0.05)


def _part_of(tasks: Sequence[CaseTask], num_parts: int, part_id: int) -> list[CaseTask]:
    """The input cases of one part: case i (sorted by name) belongs to part i % num_parts."""
    order = sorted(range(len(tasks)), key=lambda i: tasks[i].name)
    mine = {order[k] for k in range(part_id, len(order), num_parts)}
    return [t for i, t in enumerate(tasks) if i in mine]


def write_dataset(spec: DatasetSpec, tasks: Sequence[CaseTask], *, overwrite: bool = False,
                  raw_dir: str | os.PathLike | None = None,
                  finalize: Callable[[Path, list[str]], None] | None = None,
                  splits: list[dict[str, list[str]]] | None = None, progress: bool = True, num_processes: int = 1,
                  num_parts: int = 1, part_id: int = 0, records: dict[str, object] | None = None) -> Path:
    """Convert all cases into ``nnUNet_raw/DatasetNNN_Name``, resumably, and move the dataset into place when
    complete.

    Args:
        spec: Dataset description (ID, name, channels, labels, ...).
        tasks: The input cases (unique names).
        overwrite: Replace an existing folder of the same name (a different dataset with the same ID is always an
            error); also discards an interrupted conversion of that name made with other settings.
        raw_dir: Use this folder instead of ``nnUNet_raw``.
        finalize: Called with the staged dataset folder and the written case identifiers after the last case, to
            add extra files beside dataset.json.
        splits: Written as ``splits_final.json`` beside dataset.json; nnU-Net's planner copies it into
            ``nnUNet_preprocessed`` (``[{"train": [...], "val": [...]}, ...]``).
        progress: Show progress bars.
        num_processes: Worker processes converting cases (1: in this process). Needs a converter entry function
            decorated with :func:`resumable`; without one the cases are converted in this process.
        num_parts: Split the input cases into this many parts (separate processes or machines sharing nnUNet_raw).
        part_id: The part this call converts (0 to ``num_parts - 1``); the call that finishes the last case of all
            parts writes the dataset, the others return its (not yet existing) folder.
        records: Filled with each written case's :attr:`OutputCase.record` (identifier -> record) before
            ``finalize`` runs.

    Returns:
        The dataset folder.

    Raises:
        ConversionError: Any input problem, an existing dataset without ``overwrite``, an ID clash, or an
            interrupted conversion of that name with other settings.
    """
    if _COLLECTING.get():
        raise _TasksCollected(list(tasks))
    raw = nnunet_raw_dir(raw_dir)
    folder_name = spec.folder_name
    target = raw / folder_name
    check_dataset_id_free(spec.dataset_id, folder_name, raw)
    if target.exists() and not overwrite:
        raise ConversionError(f"{target} already exists; pass --overwrite to replace it")
    if not tasks:
        raise ConversionError(f"no cases found for {folder_name}")
    if not 0 <= part_id < num_parts:
        raise ConversionError(f"-part_id must be in [0, {num_parts}), got {part_id}")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConversionError(f"input case names are not unique: {sorted({n for n in names if names.count(n) > 1})}")

    remove_stale(raw, ".*.partial-*")  # temporaries of killed runs (hidden-tumour conversions, older releases)
    # Every part checks every case, so that none converts anything of an input that would be refused.
    for task in tqdm(tasks, desc=f"{folder_name}: checking", unit="case", disable=not progress):
        task.check()

    staging = _open_staging(raw, folder_name, _settings(spec), overwrite)
    mine = _part_of(tasks, num_parts, part_id)
    pending = [t for t in mine if t.name not in staging.finished(t.name for t in mine)]
    part = f" part {part_id}/{num_parts}" if num_parts > 1 else ""
    try:
        with tqdm(total=len(mine), initial=len(mine) - len(pending), desc=f"{folder_name}: converting{part}",
                  unit="case", disable=not progress) as bar:
            for _ in _run_tasks(pending, spec, staging, num_processes, bar):
                pass
        with staging.lock:
            if not staging.root.is_dir():
                return target  # another part finished the dataset meanwhile
            finished = staging.finished(names)
            if len(finished) < len(tasks):
                print(f"{folder_name}:{part} done; {len(finished)} of {len(tasks)} input cases are converted, the "
                      "dataset is written when the last part finishes", flush=True)
                return target
            _finish(spec, tasks, finished, staging, target, finalize, splits, records)
        Path(staging.lock.lock_file).unlink(missing_ok=True)
    except ConversionError:
        # A refused input leaves nothing behind; other parts may still be writing into a shared staging folder.
        if num_parts == 1:
            staging.discard()
            Path(staging.lock.lock_file).unlink(missing_ok=True)
        raise
    except BaseException:
        kept = len(staging.finished(names)) if staging.root.is_dir() else 0
        if kept:
            print(f"{folder_name}: {kept} finished input case(s) kept in {staging.root}; run the same command again "
                  "to convert the rest", file=sys.stderr, flush=True)
        elif num_parts == 1:  # nothing to resume
            staging.discard()
            Path(staging.lock.lock_file).unlink(missing_ok=True)
        raise
    return target


def _finish(spec: DatasetSpec, tasks: Sequence[CaseTask], finished: dict[str, dict], staging: _Staging,
            target: Path, finalize: Callable[[Path, list[str]], None] | None,
            splits: list[dict[str, list[str]]] | None, records: dict[str, object] | None) -> None:
    """Complete the staged dataset (the files of the current input cases only, extra files, dataset.json) and move
    it into place; the staging folder goes afterwards."""
    written: list[str] = []
    seen: dict[str, str] = {}
    keep: set[str] = set()
    for task in tasks:  # the order of the input cases, whatever order they finished in
        marker = finished[task.name]
        for identifier in marker["identifiers"]:
            if identifier in seen:
                raise ConversionError(f"case identifier {identifier!r} produced twice (inputs {seen[identifier]!r} "
                                      f"and {task.name!r})")
            seen[identifier] = task.name
            written.append(identifier)
        keep.update(marker["files"])
        if records is not None:
            records.update(marker.get("records") or {})
    if not written:
        raise ConversionError(f"no cases were produced for {target.name}")
    for sub in ("imagesTr", "labelsTr"):  # cases converted earlier but since excluded (or left half-moved)
        for path in (staging.dataset / sub).iterdir():
            if f"{sub}/{path.name}" not in keep:
                path.unlink()
    tmp = staging.dataset
    if splits is not None:
        _check_splits(splits, written)
        (tmp / "splits_final.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")
    if finalize is not None:
        finalize(tmp, written)
    _write_dataset_json(tmp, spec, len(written))
    move_into_place(tmp, target)
    staging.discard()


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


def grouped_folds(groups: dict[str, list[str]], n_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """K-fold split over groups (patients), listing their cases; deterministic. The cases of one group (a patient's
    post-contrast phases, its two breasts) never fall in different folds."""
    keys = sorted(groups)
    order = np.random.RandomState(seed).permutation(len(keys))
    n = min(n_folds, len(keys))
    folds = []
    for k in range(n):
        val_keys = {keys[i] for i in order[k::n]}
        folds.append({"train": sorted(c for g in keys if g not in val_keys for c in groups[g]),
                      "val": sorted(c for g in sorted(val_keys) for c in groups[g])})
    return folds


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
