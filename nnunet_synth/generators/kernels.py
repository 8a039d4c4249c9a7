"""Compiled loops of the lesion mask stage (numba), where whole-array NumPy passes would touch every voxel of a
large lesion's box several times. Imported when first needed (``--help`` stays fast); compiled once per machine.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _linear_at_most(points: np.ndarray, step: np.ndarray, out: np.ndarray, level: float) -> None:
    """``out`` (3D, False on entry) becomes True where the trilinear interpolation of ``points`` (grid point k on
    voxel ``k * step``, one point past ``out`` per axis) is at most ``level``; cells whose corners all lie on one
    side of it are decided whole (an interpolation stays between its corner values)."""
    n0, n1, n2 = out.shape
    s0, s1, s2 = step[0], step[1], step[2]
    corner = np.empty(8)
    for c0 in range(points.shape[0] - 1):
        for c1 in range(points.shape[1] - 1):
            for c2 in range(points.shape[2] - 1):
                low, high = np.inf, -np.inf
                for k in range(8):
                    v = points[c0 + (k >> 2), c1 + ((k >> 1) & 1), c2 + (k & 1)]
                    corner[k] = v
                    low = min(low, v)
                    high = max(high, v)
                if low > level:
                    continue
                whole = high <= level
                for i in range(s0):
                    x0 = c0 * s0 + i
                    if x0 >= n0:
                        break
                    f0 = i / s0
                    for j in range(s1):
                        x1 = c1 * s1 + j
                        if x1 >= n1:
                            break
                        f1 = j / s1
                        # interpolated along axes 0 and 1 at the cell's two faces along axis 2
                        a = (1 - f0) * ((1 - f1) * corner[0] + f1 * corner[2]) + f0 * (
                            (1 - f1) * corner[4] + f1 * corner[6])
                        b = (1 - f0) * ((1 - f1) * corner[1] + f1 * corner[3]) + f0 * (
                            (1 - f1) * corner[5] + f1 * corner[7])
                        for k in range(s2):
                            x2 = c2 * s2 + k
                            if x2 >= n2:
                                break
                            if whole:
                                out[x0, x1, x2] = True
                            else:
                                f2 = k / s2
                                out[x0, x1, x2] = (1 - f2) * a + f2 * b <= level


def linear_at_most(coarse: np.ndarray, step: np.ndarray, shape: tuple[int, ...], level: float) -> np.ndarray:
    """Where the linear interpolation of ``coarse`` (grid point k on voxel ``k * step``, 1-3D) is at most
    ``level``, on the voxels of ``shape`` (the grid reaches at least the last voxel)."""
    lead = 3 - coarse.ndim  # 1D and 2D as 3D with one-point leading axes
    # one more grid point per axis (edge value): every voxel lies in a whole cell
    points = np.pad(np.asarray(coarse, dtype=np.float64).reshape((1,) * lead + coarse.shape), [(0, 1)] * 3,
                    mode="edge")
    out = np.zeros((1,) * lead + tuple(shape), dtype=bool)
    _linear_at_most(points, np.array((1,) * lead + tuple(int(s) for s in step), dtype=np.int64), out, float(level))
    return out.reshape(tuple(shape))


@numba.njit(cache=True, nogil=True)
def _face_connected(padded: np.ndarray) -> bool:
    """Whether the True voxels of a 3D mask (at least one), padded by one False voxel on every side, form one
    piece through shared faces: a walk from the first voxel counts what it reaches (the padding spares bounds
    checks)."""
    n0, n1, n2 = padded.shape
    flat = padded.ravel()
    offsets = np.array([-n1 * n2, n1 * n2, -n2, n2, -1, 1])
    seen = np.zeros(flat.size, dtype=np.bool_)
    stack = np.empty(flat.size, dtype=np.int64)
    total, first = 0, -1
    for v in range(flat.size):
        if flat[v]:
            total += 1
            if first < 0:
                first = v
    seen[first] = True
    stack[0] = first
    top, reached = 1, 1
    while top > 0:
        top -= 1
        v = stack[top]
        for o in offsets:
            u = v + o
            if flat[u] and not seen[u]:
                seen[u] = True
                stack[top] = u
                top += 1
                reached += 1
    return reached == total


def face_connected(mask: np.ndarray) -> bool:
    """Whether a non-empty 1-3D mask is one piece through shared faces (then also through edges and corners)."""
    mask = np.asarray(mask, dtype=bool)
    return bool(_face_connected(np.pad(mask.reshape((1,) * (3 - mask.ndim) + mask.shape), 1)))
