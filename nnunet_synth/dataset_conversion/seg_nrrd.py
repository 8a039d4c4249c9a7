"""Reading 3D Slicer segmentation files (``.seg.nrrd``).

A ``.seg.nrrd`` is an NRRD with one label layer (3D) or several (4D, ``kinds: list domain domain domain``) plus
per-segment metadata: ``Segment<N>_Name``, ``Segment<N>_LabelValue`` (the voxel value of that segment in its layer)
and ``Segment<N>_Layer``. Files written before Slicer 4.11 lack the last two; then every layer is taken as one
binary segment (value 1, layer N). The stored extent may be a sub-box of the reference image; ``space origin``
refers to the first stored voxel, so the geometry built here places it correctly. pynrrd comes with the
``[convert]`` extra and is imported when a file is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_synth.dataset_conversion.common import ConversionError, Geometry
from nnunet_synth.extras import require_extra

_SEGMENT_KEY = re.compile(r"^Segment(\d+)_Name$")


@dataclass(frozen=True)
class Segment:
    """One segment: its name, voxel value and layer."""

    name: str
    label_value: int
    layer: int


@dataclass
class SlicerSegmentation:
    """Segment layers as SimpleITK images (all on the file's grid) and the segment metadata."""

    layers: list[sitk.Image]
    segments: list[Segment]

    def mask(self, segment: Segment) -> np.ndarray:
        """Boolean (z, y, x) mask of one segment."""
        return sitk.GetArrayViewFromImage(self.layers[segment.layer]) == segment.label_value


@dataclass(frozen=True)
class _Header:
    geometry: Geometry
    layer_axis: int | None
    num_layers: int
    segments: list[Segment]


def _parse_header(header: dict, path: Path, case: str) -> _Header:
    sizes = [int(s) for s in header.get("sizes", [])]
    try:
        directions = np.asarray(header.get("space directions"), dtype=float)
    except (TypeError, ValueError):
        directions = np.empty(0)
    if directions.ndim != 2 or directions.shape[1] != 3 or directions.shape[0] != len(sizes):
        raise ConversionError(f"case {case}: {path} has no usable 'space directions'")
    spatial = [i for i in range(len(sizes)) if np.all(np.isfinite(directions[i]))]
    listed = [i for i in range(len(sizes)) if i not in spatial]
    if len(spatial) != 3 or len(listed) > 1:
        raise ConversionError(f"case {case}: {path} is not a 3D label map or a stack of 3D layers (sizes {sizes})")
    axes = directions[spatial]  # rows: physical step of index axes i, j, k
    origin = np.asarray(header.get("space origin", [0.0, 0.0, 0.0]), dtype=float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("right-anterior-superior", "ras"):
        flip = np.array([-1.0, -1.0, 1.0])  # SimpleITK works in LPS
        axes, origin = axes * flip, origin * flip
    elif space not in ("left-posterior-superior", "lps"):
        raise ConversionError(f"case {case}: {path} uses space {space!r}; expected LPS or RAS")
    spacing = np.linalg.norm(axes, axis=1)
    direction = (axes / spacing[:, None]).T  # columns: unit vectors of the index axes
    geometry = Geometry(tuple(sizes[i] for i in spatial), tuple(spacing.tolist()), tuple(origin.tolist()),
                        tuple(direction.flatten().tolist()))
    num_layers = sizes[listed[0]] if listed else 1

    numbers = sorted(int(m.group(1)) for k in header if (m := _SEGMENT_KEY.match(str(k))))
    if not numbers:
        raise ConversionError(f"case {case}: {path} has no Segment<N>_Name metadata (not a Slicer segmentation?)")
    segments = []
    for n in numbers:
        value, layer = header.get(f"Segment{n}_LabelValue"), header.get(f"Segment{n}_Layer")
        try:
            seg = Segment(str(header[f"Segment{n}_Name"]), int(value) if value is not None else 1,
                          int(layer) if layer is not None else (n if num_layers > 1 else 0))
        except ValueError as err:
            raise ConversionError(f"case {case}: {path}: malformed metadata of Segment{n}: {err}") from err
        if not 0 <= seg.layer < num_layers:
            raise ConversionError(f"case {case}: {path}: Segment{n} ({seg.name}) refers to layer {seg.layer}, the "
                                  f"file has {num_layers}")
        if any((s.layer, s.label_value) == (seg.layer, seg.label_value) for s in segments):
            raise ConversionError(f"case {case}: {path}: two segments share layer {seg.layer} value "
                                  f"{seg.label_value}")
        segments.append(seg)
    return _Header(geometry, listed[0] if listed else None, num_layers, segments)


def read_seg_header(path: Path, *, case: str) -> tuple[Geometry, list[Segment]]:
    """Grid and segment metadata of a ``.seg.nrrd`` without reading the voxels.

    Raises:
        ConversionError: Missing/unreadable file, no segment metadata or an unusable geometry.
    """
    if not Path(path).is_file():
        raise ConversionError(f"case {case}: segmentation file not found: {path}")
    require_extra("convert", "nrrd")
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as err:  # noqa: BLE001 - pynrrd raises several error types
        raise ConversionError(f"case {case}: cannot read {path}: {err}") from err
    parsed = _parse_header(header, Path(path), case)
    return parsed.geometry, parsed.segments


def read_seg_nrrd(path: Path, *, case: str) -> SlicerSegmentation:
    """Read a Slicer ``.seg.nrrd`` with its segment metadata.

    Raises:
        ConversionError: As :func:`read_seg_header`, or voxel values that no segment declares.
    """
    if not Path(path).is_file():
        raise ConversionError(f"case {case}: segmentation file not found: {path}")
    require_extra("convert", "nrrd")
    import nrrd

    try:
        data, header = nrrd.read(str(path))
    except Exception as err:  # noqa: BLE001 - pynrrd raises several error types
        raise ConversionError(f"case {case}: cannot read {path}: {err}") from err
    parsed = _parse_header(header, Path(path), case)
    data = np.moveaxis(data, parsed.layer_axis, 0) if parsed.layer_axis is not None else data[None]
    g = parsed.geometry
    layers = []
    for i, layer in enumerate(data):
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(layer, (2, 1, 0))))  # (i,j,k) -> (z,y,x)
        img.SetSpacing(g.spacing)
        img.SetOrigin(g.origin)
        img.SetDirection(g.direction)
        declared = {s.label_value for s in parsed.segments if s.layer == i}
        found = {int(v) for v in np.unique(layer)} - {0}
        if found - declared:
            raise ConversionError(f"case {case}: {path} layer {i} holds label values {sorted(found - declared)} "
                                  f"that no segment declares (declared: {sorted(declared)})")
        layers.append(img)
    return SlicerSegmentation(layers, parsed.segments)
