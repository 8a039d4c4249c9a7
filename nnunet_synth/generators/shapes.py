"""Lesion masks: randomly rotated ellipsoids with sizes in mm, deformed by smooth random displacement fields.

Sizes are always physical (mm) and converted with the patch spacing, so anisotropic data get round lesions.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import special_ortho_group

SIZE_CLASSES = ("tiny", "small", "medium", "large")

# Label-free liver tumour synthesis (Hu et al., CVPR 2023): radius per size class; each axis ~ U(0.75 r, 1.25 r).
LABELFREE_RADIUS_MM = {"tiny": 4.0, "small": 8.0, "medium": 16.0, "large": 32.0}
RADIUS_SPREAD = 0.25

# Boundary deformation, as fractions of the lesion radius so the wobble scales with the lesion (the
# label-free paper's per-class sigma table serves the same purpose). Elastic fields are Gaussian-smoothed
# white noise (liver-MRI paper, appendix A.1) with a short coherence length; simplex fields (A.2) are
# smooth at the scale of their features, which is why they survive larger displacements in one piece.
DEFORMATIONS = ("elastic", "simplex", "none")
DEFAULT_AMPLITUDE = 0.15
ELASTIC_SMOOTHING = 0.35
SIMPLEX_FEATURE = 1.2
MIN_SMOOTHING_MM = 1.5
QUADRIC_STEP = 0.15  # of the smallest semi-axis: the coarse grid a deformed ellipsoid is evaluated on


def sample_axis_radii(radius_mm: float, ndim: int, rng: np.random.Generator,
                      spread: float = RADIUS_SPREAD) -> np.ndarray:
    """Per-axis radii ~ U((1 - spread) r, (1 + spread) r)."""
    return rng.uniform((1 - spread) * radius_mm, (1 + spread) * radius_mm, size=ndim)


def ellipsoid(radii_mm: np.ndarray, spacing: tuple[float, ...], rng: np.random.Generator,
              displacement_mm: float = 0.0, smoothing_mm: float = 1.0, deformation: str = "elastic",
              exact: bool = False) -> np.ndarray:
    """A randomly rotated solid ellipsoid on a voxel grid, optionally deformed.

    The deformation displaces the sampling grid by a random field per axis whose standard deviation is
    ``displacement_mm`` and evaluates the ellipsoid's implicit equation there: the same as warping the
    mask with nearest-neighbour resampling, without resampling a mask. The fields are smooth at
    ``smoothing_mm`` and the equation is a quadratic, so both are evaluated on a grid of about half that step
    and the equation's value is linearly interpolated to the voxels (its error there is a few hundredths of a
    voxel) before it is thresholded.

    Args:
        radii_mm: semi-axes in mm, one per spatial axis.
        spacing: voxel spacing in mm.
        rng: random generator for orientation and deformation.
        displacement_mm: standard deviation of the displacement (0 = no deformation).
        smoothing_mm: coherence length of the field: Gaussian sigma (elastic) or feature size (simplex).
        deformation: 'elastic' or 'simplex'.
        exact: interpolate the fields to the voxels and evaluate the equation at every voxel (the definition the
            fast path approximates; tests compare the two).

    Returns:
        bool array with odd side lengths around the ellipsoid's centre.
    """
    ndim = len(spacing)
    sp = np.asarray(spacing, dtype=np.float32)
    rotation = special_ortho_group.rvs(ndim, random_state=rng) if ndim > 1 else np.eye(1)
    # extent of the rotated ellipsoid along each grid axis, plus room for the deformation
    extent = np.sqrt(((rotation * radii_mm) ** 2).sum(1)) + 3 * displacement_mm
    half = np.ceil(extent / sp).astype(int)
    shape = tuple(2 * h + 1 for h in half)
    if displacement_mm <= 0:
        return _quadric(_axes_mm(half, sp, np.ones(ndim, int)), rotation, radii_mm, sparse=True) <= 1.0
    # grid step: two points per smoothing length, and fine enough for the quadric's curvature
    step_mm = min(smoothing_mm / 2, QUADRIC_STEP * float(np.min(radii_mm)))
    step = np.maximum(1, np.floor(step_mm / sp)).astype(int)
    coarse = tuple(int(np.ceil((n - 1) / s)) + 1 for n, s in zip(shape, step))
    coords = list(np.meshgrid(*_axes_mm(half, sp, step, coarse), indexing="ij"))
    for axis, field in enumerate(displacement_fields(deformation, coarse, sp * step, smoothing_mm, rng)):
        coords[axis] = coords[axis] + field * (displacement_mm / (field.std() + 1e-8))
    if exact:
        if coarse != shape:
            fine = tuple((c - 1) * s + 1 for c, s in zip(coarse, step))
            coords = [resize_linear(c, fine)[tuple(slice(0, n) for n in shape)] for c in coords]
        return _quadric(coords, rotation, radii_mm) <= 1.0
    from nnunet_synth.generators.kernels import linear_at_most  # numba: imported when first needed

    # the quadric is smooth at the grid's step: interpolated, and thresholded, only in cells its surface crosses
    return linear_at_most(_quadric(coords, rotation, radii_mm), step, shape, 1.0)


def _axes_mm(half: np.ndarray, spacing: np.ndarray, step: np.ndarray, count: tuple[int, ...] | None = None
             ) -> list[np.ndarray]:
    """Positions (mm) along each axis of a grid centred on the ellipsoid, every ``step`` voxels."""
    count = tuple(2 * h + 1 for h in half) if count is None else count
    return [(np.arange(c, dtype=np.float32) * st - h) * s for c, st, h, s in zip(count, step, half, spacing)]


def _quadric(coords: list[np.ndarray], rotation: np.ndarray, radii_mm: np.ndarray, sparse: bool = False
             ) -> np.ndarray:
    """The ellipsoid's implicit equation (<= 1 inside) at the given positions (dense grids, or 1D axes)."""
    ndim = len(coords)
    if sparse:
        coords = np.meshgrid(*coords, indexing="ij", sparse=True)
    return sum(((sum(coords[i] * rotation[i, j] for i in range(ndim))) / radii_mm[j]) ** 2 for j in range(ndim))


def displacement_fields(deformation: str, shape: tuple[int, ...], spacing: np.ndarray, scale_mm: float,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """One random field per axis on a grid of ``shape`` (unnormalised; callers rescale to their amplitude)."""
    if deformation == "elastic":
        return list(smooth_field(shape, scale_mm / spacing, rng, count=len(shape)))
    if deformation == "simplex":
        return [simplex_field(shape, spacing, scale_mm, rng) for _ in shape]
    raise ValueError(f"unknown deformation {deformation!r}; expected one of {DEFORMATIONS}")


_SIMPLEX_LATTICE: dict[int, np.ndarray] = {}
SIMPLEX_STEP = 0.25  # lattice spacing in noise units: four samples per simplex feature


def simplex_field(shape: tuple[int, ...], spacing: np.ndarray, feature_mm: float, rng: np.random.Generator
                  ) -> np.ndarray:
    """OpenSimplex noise with features of about ``feature_mm``, on a grid of ``shape``.

    opensimplex evaluates ~30 us per point in pure Python, so three fields per lesion would cost a second:
    a 3D lattice of noise is evaluated once per process and lesion-sized windows are read from it at a
    random offset, orientation and scale by trilinear interpolation (simplex noise is smooth at the lattice
    step, so this is the same noise). The window's grid is aligned with the lattice's axes, so the trilinear
    interpolation is one linear interpolation per axis: three small matrix products on the lattice's block under the
    window instead of eight lattice reads per point.
    """
    import opensimplex

    lattice = _SIMPLEX_LATTICE.get(0)
    if lattice is None:
        n = 40
        axis = np.arange(n) * SIMPLEX_STEP
        lattice = opensimplex.OpenSimplex(seed=1234).noise3array(axis, axis, axis).astype(np.float32)
        _SIMPLEX_LATTICE[0] = lattice
    ndim = len(shape)
    # grid position in lattice samples: mm / feature size = noise units; / step = samples
    steps = [np.arange(n, dtype=np.float32) * s / feature_mm / SIMPLEX_STEP for n, s in zip(shape, spacing)]
    span = np.array([st[-1] if len(st) else 0 for st in steps])
    room = np.maximum(lattice.shape[0] - 1 - span[:3] if ndim == 3 else lattice.shape[0] - 1 - span, 0)
    offsets = rng.uniform(0, room)
    positions = [st + o for st, o in zip(steps, offsets)]
    if ndim == 2:  # a random plane of the 3D lattice
        positions.append(np.array([rng.uniform(0, lattice.shape[0] - 1)], dtype=np.float32))
    order = rng.permutation(3)  # random orientation of the lattice axes: lattice axis k runs along grid axis order[k]
    out = lattice
    for k in range(3):  # interpolate lattice axis k (always the leading one), then roll it to the back
        lo, weights = _interpolation_weights(positions[order[k]], lattice.shape[k])
        out = np.tensordot(weights, out[lo:lo + weights.shape[1]], axes=(1, 0))
        out = np.moveaxis(out, 0, -1)
    out = out.transpose(np.argsort(order))  # axes back to the grid's
    return out[..., 0] if ndim == 2 else np.ascontiguousarray(out)


def _interpolation_weights(positions: np.ndarray, n: int) -> tuple[int, np.ndarray]:
    """Linear interpolation at ``positions`` (in samples of an axis of length ``n``, mirrored beyond its ends as
    ``scipy.ndimage.map_coordinates(mode="mirror")`` does) as the first sample it reads and a (len(positions),
    samples read) weight matrix."""
    x = np.mod(np.asarray(positions, dtype=np.float64), 2 * (n - 1))
    x = np.where(x > n - 1, 2 * (n - 1) - x, x)
    lo = np.minimum(np.floor(x).astype(int), n - 2)
    first = int(lo.min())
    weights = np.zeros((len(x), int(lo.max()) - first + 2), dtype=np.float32)
    rows = np.arange(len(x))
    weights[rows, lo - first] = 1 - (x - lo)
    weights[rows, lo - first + 1] = x - lo
    return first, weights


def smooth_field(shape: tuple[int, ...], sigma_vox: np.ndarray, rng: np.random.Generator,
                 distribution: str = "normal", count: int | None = None) -> np.ndarray:
    """Gaussian-filtered N(0, 1) or U(0, 1) noise of the given shape (``count`` independent fields stacked on a
    leading axis, drawn and filtered at once).

    Wide kernels are applied on a grid coarsened to about two voxels per sigma and linearly upsampled:
    the same smooth field at a fraction of the cost, which keeps large lesions in milliseconds.
    """
    sigma_vox = np.broadcast_to(np.asarray(sigma_vox, dtype=float), (len(shape),))
    factor = np.maximum(1.0, sigma_vox / 2.0)
    coarse = tuple(max(2, int(np.ceil(n / f)) + 1) if f > 1 else n for n, f in zip(shape, factor))
    lead = () if count is None else (count,)
    draw = rng.standard_normal if distribution == "normal" else rng.random
    noise = gaussian_filter(draw(size=(*lead, *coarse), dtype=np.float32), (*(0,) * len(lead), *sigma_vox / factor))
    return noise if coarse == tuple(shape) else resize_linear(noise, (*lead, *shape))


def resize_linear(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of ``array`` to ``shape``, corners on corners: the values of
    ``scipy.ndimage.zoom(array, order=1, grid_mode=False)`` to that shape, as one matrix product per axis (the
    last axis is interpolated, then rotated to the front), several times faster than the general spline code."""
    out = array
    for k in range(array.ndim):
        n = shape[array.ndim - 1 - k]
        if out.shape[-1] != n:
            out = out @ _linear_weights(out.shape[-1], n).astype(out.dtype, copy=False).T
        out = np.moveaxis(out, -1, 0)
    return np.ascontiguousarray(out)


def repeat_to(coarse: np.ndarray, step: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Each grid point of ``coarse`` repeated over its block of ``step`` voxels, cropped to ``shape`` (one copy)."""
    expanded = np.broadcast_to(coarse[tuple(v for _ in coarse.shape for v in (slice(None), None))],
                               tuple(v for n, s in zip(coarse.shape, step) for v in (n, int(s))))
    return expanded.reshape(tuple(n * int(s) for n, s in zip(coarse.shape, step)))[
        tuple(slice(0, n) for n in shape)]


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation from n_in to n_out samples, end points aligned."""
    weights = np.zeros((n_out, n_in))
    if n_in == 1:
        weights[:] = 1.0
        return weights
    x = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
    lo = np.minimum(np.floor(x).astype(int), n_in - 2)
    frac = x - lo
    weights[np.arange(n_out), lo] = 1 - frac
    weights[np.arange(n_out), lo + 1] = frac
    return weights


def lesion_mask(radius_mm: float | np.ndarray, spacing: tuple[float, ...], rng: np.random.Generator,
                deformation: str = "elastic", amplitude: float = DEFAULT_AMPLITUDE) -> np.ndarray:
    """One lesion mask, cropped to its bounding box.

    Args:
        radius_mm: a class radius (axis radii are drawn around it) or the semi-axes themselves.
        spacing: voxel spacing of the target patch in mm.
        rng: random generator.
        deformation: 'elastic', 'simplex' or 'none'.
        amplitude: displacement as a fraction of the mean radius.
    """
    radii = np.asarray(radius_mm, dtype=float)
    if radii.ndim == 0:
        radii = sample_axis_radii(float(radii), len(spacing), rng)
    mean_r = float(radii.mean())
    if deformation == "none":
        mask = ellipsoid(radii, spacing, rng)
    else:
        scale = (ELASTIC_SMOOTHING if deformation == "elastic" else SIMPLEX_FEATURE) * mean_r
        mask = ellipsoid(radii, spacing, rng, amplitude * mean_r, max(scale, MIN_SMOOTHING_MM), deformation)
    if not mask.any():  # a sub-voxel lesion at coarse spacing: keep the centre voxel
        mask[tuple(n // 2 for n in mask.shape)] = True
    return crop_to_mask(mask)


def crop_to_mask(mask: np.ndarray) -> np.ndarray:
    """The mask cropped to the bounding box of its True voxels."""
    return mask[bounding_box(mask)]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box that holds the True voxels of a non-empty mask (read from the mask's projections
    on the axes, several times faster than listing the voxels)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            raise ValueError("an empty mask has no bounding box")
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def centroid(mask: np.ndarray) -> np.ndarray:
    """Mean voxel index of a non-empty mask's True voxels, per axis (from its projections)."""
    total = np.count_nonzero(mask)
    return np.array([np.dot(np.count_nonzero(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)),
                            np.arange(mask.shape[axis])) / total for axis in range(mask.ndim)])


def equivalent_diameter_mm(num_voxels: int, spacing: tuple[float, ...]) -> float:
    """Diameter of the sphere (circle in 2D) with the same volume (area)."""
    size = num_voxels * float(np.prod(spacing))
    if len(spacing) == 2:
        return float(2 * np.sqrt(size / np.pi))
    return float((6 * size / np.pi) ** (1 / 3))
