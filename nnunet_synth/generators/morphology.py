"""Binary erosion and dilation by the two structuring elements the placement region uses most, the one-voxel cross
and the 3x3(x3) cube, and the grey-value range of the 3x3(x3) neighbourhood, as shifted operations on whole arrays:
the results of ``scipy.ndimage``'s ``binary_erosion`` / ``binary_dilation`` / ``maximum_filter`` -
``minimum_filter`` (same border handling), several times faster than its generic loops, which otherwise dominate
finding the tissue region of a patch without an organ label. Other structures go to SciPy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _cross(ndim: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, 1)


def _along(axis: int, ndim: int, start: int | None, stop: int | None) -> tuple[slice, ...]:
    return tuple(slice(start, stop) if a == axis else slice(None) for a in range(ndim))


def _neighbours(out: np.ndarray, source: np.ndarray, axis: int, combine: np.ufunc) -> None:
    """``out`` combined (in place) with ``source`` shifted by +1 and by -1 along ``axis``, where the shift reaches."""
    ndim = source.ndim
    for target, shifted in ((_along(axis, ndim, None, -1), _along(axis, ndim, 1, None)),
                            (_along(axis, ndim, 1, None), _along(axis, ndim, None, -1))):
        combine(out[target], source[shifted], out=out[target])


def _step(out: np.ndarray, source: np.ndarray, axis: int, erode: bool, border: bool) -> None:
    """``out`` AND (erode) or OR (dilate, border 0) ``source``'s neighbours along ``axis``, in place; for an erosion
    what lies past the array's edge is ``border``."""
    _neighbours(out, source, axis, np.logical_and if erode else np.logical_or)
    if erode and not border:  # the first and last layers meet the outside
        out[_along(axis, source.ndim, None, 1)] = False
        out[_along(axis, source.ndim, -1, None)] = False


def _shifted(mask: np.ndarray, structure: np.ndarray, erode: bool, border: bool) -> np.ndarray | None:
    """The fast path for the cross and the cube; None for any other structure."""
    shape = (3,) * mask.ndim
    if structure.shape != shape or mask.ndim == 0 or min(mask.shape) < 2:
        return None
    mask = np.asarray(mask, dtype=bool)
    if np.array_equal(structure, np.ones(shape, bool)):  # the cube: separable, one axis after the other
        out = mask
        for axis in range(mask.ndim):
            source, out = out, out.copy()
            _step(out, source, axis, erode, border)
        return out
    if np.array_equal(structure, _cross(mask.ndim)):  # the cross: each axis's neighbours of the original
        out = mask.copy()
        for axis in range(mask.ndim):
            _step(out, mask, axis, erode, border)
        return out
    return None


def neighbourhood_range(array: np.ndarray) -> np.ndarray:
    """``maximum_filter(array, size=3) - minimum_filter(array, size=3)`` (SciPy's reflecting border adds no value
    a size-3 window does not already hold), one axis after the other."""
    high, low = np.array(array, copy=True), np.array(array, copy=True)
    for axis in range(array.ndim):
        if array.shape[axis] < 2:
            continue
        for values, pick in ((high, np.maximum), (low, np.minimum)):
            _neighbours(values, values.copy(), axis, pick)
    return high - low


def binary_erosion(mask: np.ndarray, structure: np.ndarray, border_value: int = 0) -> np.ndarray:
    """``scipy.ndimage.binary_erosion(mask, structure, border_value=border_value)``."""
    structure = np.asarray(structure, dtype=bool)
    fast = _shifted(mask, structure, True, bool(border_value))
    return ndimage.binary_erosion(mask, structure, border_value=border_value) if fast is None else fast


def binary_dilation(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, structure)`` (border 0) for symmetric structures."""
    structure = np.asarray(structure, dtype=bool)
    fast = _shifted(mask, structure, False, False)
    return ndimage.binary_dilation(mask, structure) if fast is None else fast


def binary_closing(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_closing(mask, structure)``: dilation, then erosion (borders 0)."""
    return binary_erosion(binary_dilation(mask, structure), structure)


def binary_opening(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_opening(mask, structure)``: erosion, then dilation (borders 0)."""
    return binary_dilation(binary_erosion(mask, structure), structure)
