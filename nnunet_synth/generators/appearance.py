"""A tumour's appearance relative to the tissue around it, shared by the synth plan's measurements, the analytic
and transplant backends and the realism features.

Everything is scale-free: intensities are expressed in units of the *ring* (the tissue just outside the
tumour: its mean is 0 and its standard deviation 1), so a case in raw units and the same case in nnU-Net's
normalised units give the same values. Distances are signed and in mm: positive inside the tumour, negative
outside, zero on the label border. A tumour's edge is modelled as a normal-CDF transition of width
``edge_sigma_mm`` centred ``edge_offset_mm`` from the label border, so it straddles the border as real edges do.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.special import ndtr

from nnunet_synth.generators.morphology import binary_dilation, neighbourhood_range
from nnunet_synth.generators.shapes import bounding_box

RING_MM = (2.0, 7.0)  # the ring: tissue between these distances outside the tumour (past its partial-volume edge)
QUANTILE_LEVELS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
MIN_RING_VOXELS = 8
MIN_CORRELATION = 0.05  # autocorrelation below this is not fitted (sampling noise)
EDGE_REACH = 2.5  # edge widths past its centre where the transition is cut off (the tumour's share there < 0.7%)
EDGE_COMPLETE = 8.5  # edge widths past its centre where the tumour's share is 1.0 in float64 (ndtr(8.3) is)
MAX_HALO_MM = 10.0
# relative spread below which a neighbourhood counts as constant fill (float32 resampling noise is ~1e-7)
PLATEAU_TOLERANCE = 1e-5


def constant_fill(channel: np.ndarray) -> np.ndarray:
    """Voxels whose 3x3(x3) neighbourhood holds one value (background fill, padding, clipped air), which no imaged
    tissue does."""
    spread = neighbourhood_range(channel)
    return spread <= PLATEAU_TOLERANCE * max(1.0, float(np.abs(channel).max()))


def ring_tissue(channel: np.ndarray, seg: np.ndarray, organ_label: int | None, clip_floor: float | None = None
                ) -> np.ndarray:
    """The voxels a tumour's ring is measured on, the same for real tumours (plan, templates, realism) and for
    synthetic sites: the organ; without an organ label the unlabelled voxels less constant fill and its one-voxel
    rim, and less voxels at a CT window's floor (``clip_floor``: clipped air or fat is no texture to match).

    Local: the same voxels come out of a whole case and of a box cut from it (away from the box's faces).
    """
    if organ_label is not None:
        return seg == organ_label
    fill = constant_fill(channel)
    keep = (seg == 0) & ~binary_dilation(fill, np.ones((3,) * channel.ndim, bool))
    if clip_floor is not None:
        keep &= channel > clip_floor + PLATEAU_TOLERANCE * max(1.0, abs(clip_floor))
    return keep


def expand_box(bbox: tuple[slice, ...], pad_mm: float, spacing: tuple[float, ...], shape: tuple[int, ...]
               ) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """``bbox`` grown by ``pad_mm`` (at least one voxel) on every side, clipped to ``shape``.

    Returns:
        (the grown box in the array, the original box inside the grown one).
    """
    pad = np.maximum(1, np.ceil(pad_mm / np.asarray(spacing, dtype=float))).astype(int)
    box = tuple(slice(max(0, s.start - p), min(n, s.stop + p)) for s, p, n in zip(bbox, pad, shape))
    inner = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(bbox, box))
    return box, inner


def signed_distance(mask: np.ndarray, spacing: tuple[float, ...], nearest: bool = False
                    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Signed distance (mm) of every voxel centre from the mask's border: positive inside, negative outside.

    The border lies half a voxel (of the finest spacing) outside the outermost mask voxels.

    Args:
        mask: bool mask.
        spacing: voxel spacing (mm).
        nearest: also return, per voxel, the index of the nearest mask voxel (``(ndim, *mask.shape)``, as
            ``distance_transform_edt(return_indices=True)``; mask voxels are their own nearest).
    """
    if not nearest:
        return signed_distance_flat(mask, spacing, nearest=False)[0]
    distance, flat = signed_distance_flat(mask, spacing)
    if flat is None:
        return distance, distance_transform_edt(np.ones(mask.shape, bool), return_indices=True)[1]
    return distance, np.stack(np.unravel_index(flat, mask.shape))


def signed_distance_flat(mask: np.ndarray, spacing: tuple[float, ...], nearest: bool = True,
                         inside_mm: float = np.inf, outside_mm: float = np.inf) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`signed_distance` and the flat (C order) index of every voxel's nearest mask voxel, by the compiled
    :func:`~.distance.feature_transform`, computed only as far as the caller reads.

    Args:
        mask: bool mask.
        spacing: voxel spacing (mm).
        nearest: find the nearest mask voxels (None is returned without, and for an empty mask).
        inside_mm: signed distances above this are not needed: they read ``inf`` (below half a voxel, the least an
            inside voxel has, no inside distance is computed).
        outside_mm: signed distances below ``-outside_mm`` are not needed: they read ``-inf`` (and have no nearest
            mask voxel).
    """
    from nnunet_synth.generators.distance import feature_transform  # numba: imported when first needed

    mask = np.asarray(mask, dtype=bool)
    half = 0.5 * float(min(spacing))
    if not mask.any():  # no border: SciPy's convention (distances to a seed before the array's first voxel)
        outside = distance_transform_edt(np.ones(mask.shape, bool), sampling=spacing)
        return half - outside, None
    if mask.all():  # no background at all: the array's outside is
        distance = np.full(mask.shape, np.inf)
        if inside_mm >= half:
            distance = feature_transform(~np.pad(mask, 1), spacing, nearest=False, limit_mm=inside_mm + half)[0][
                (slice(1, -1),) * mask.ndim] - half
        return distance, np.arange(mask.size).reshape(mask.shape) if nearest else None
    distance, flat = feature_transform(mask, spacing, nearest=nearest, limit_mm=outside_mm + half)
    np.subtract(half, distance, out=distance)
    if inside_mm < half:
        distance[mask] = np.inf
        return distance, flat
    # the nearest background voxel of an inside voxel lies in the mask's bounding box grown by one voxel
    # (projecting any farther one onto that box comes closer), so the inside distance is found there alone
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in bounding_box(mask))
    inner = mask[box]
    distance[box][inner] = feature_transform(~inner, spacing, nearest=False, limit_mm=inside_mm + half)[0][
        inner] - half
    return distance, flat


def ring(distance: np.ndarray, valid: np.ndarray | None = None, ring_mm: tuple[float, float] = RING_MM
         ) -> np.ndarray:
    """Voxels of the ring: outside the tumour between ``ring_mm`` of its border (and ``valid``)."""
    out = (distance <= -ring_mm[0]) & (distance >= -ring_mm[1])
    return out if valid is None else out & valid


def ring_statistics(channel: np.ndarray, ring_voxels: np.ndarray) -> tuple[float, float]:
    """Robust centre and spread of the ring: the median and the interquartile range / 1.349 (the standard
    deviation of normal values; air or a neighbouring structure in the ring does not distort them). The spread is
    floored so that a constant phantom does not divide by zero; NaN where the ring has fewer than
    ``MIN_RING_VOXELS`` voxels."""
    values = channel[ring_voxels].astype(np.float64)
    if values.size < MIN_RING_VOXELS:
        return float("nan"), float("nan")
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return float(median), max(float(q75 - q25) / 1.349, 1e-6 * max(1.0, abs(float(median))))


def edge_halo_mm(sigma_mm: float, offset_mm: float = 0.0) -> float:
    """How far outside the mask an edge of width ``sigma_mm`` centred ``offset_mm`` inside the border reaches
    (``EDGE_REACH`` widths past its centre, at most ``MAX_HALO_MM``)."""
    return float(min(max(EDGE_REACH * sigma_mm - offset_mm, 0.0), MAX_HALO_MM))


def edge_weight(distance: np.ndarray, sigma_mm: float, offset_mm: float = 0.0) -> np.ndarray:
    """The tumour's share of each voxel across its edge: a normal CDF of the signed distance (1.0 from
    ``EDGE_COMPLETE`` widths past the edge's centre on, and at ``inf``)."""
    return ndtr((distance - offset_mm) / max(float(sigma_mm), 1e-3))


def quantile_map(field: np.ndarray, levels: tuple[float, ...], values: np.ndarray) -> np.ndarray:
    """Gives ``field`` (1D) the distribution with quantiles ``values`` at ``levels`` and keeps its ranks (so its
    spatial structure): the k-th smallest of n samples gets the quantile at (k + 0.5) / n.

    ``values`` of shape (C, len(levels)) map the one field to C channels (ranked once), giving (C, n).
    """
    # ties have probability zero in a continuous field, so the unstable (several times faster) sort ranks alike
    order = np.argsort(field)
    ranks = (np.arange(field.size) + 0.5) / field.size  # in sorted order: np.interp's search runs on ascending input
    values = np.asarray(values, dtype=np.float64)
    out = np.empty((*values.shape[:-1], field.size))
    out[..., order] = np.interp(ranks, levels, values) if values.ndim == 1 else np.stack(
        [np.interp(ranks, levels, v) for v in values])
    return out


def correlation_length(residual: np.ndarray, inside: np.ndarray, spacing: tuple[float, ...],
                       axes: tuple[int, ...] | None = None, max_lag: int = 8) -> tuple[float, float]:
    """Spatial scale of a texture: fits ``C(l) = (1 - nugget) * exp(-l^2 / (4 sigma^2))`` (Gaussian-filtered
    noise of standard deviation ``sigma`` mm plus white noise) to the residual's autocorrelation along ``axes``.

    Args:
        residual: texture with its mean removed.
        inside: voxels where it is defined (pairs with both ends inside count).
        spacing: voxel spacing (mm).
        axes: axes to measure along (default: the in-plane axes, the finest ones).
        max_lag: largest lag in voxels.

    Returns:
        (sigma_mm, nugget); NaN where fewer than 20 pairs exist at lag one.
    """
    sp = np.asarray(spacing, dtype=float)
    axes = tuple(range(max(0, residual.ndim - 2), residual.ndim)) if axes is None else axes
    variance = float(residual[inside].var())
    if variance <= 0:
        return float("nan"), float("nan")
    lags_mm, corr = [], []
    for axis in axes:
        for lag in range(1, max_lag + 1):
            if lag >= residual.shape[axis]:
                break
            a = np.take(residual, np.arange(residual.shape[axis] - lag), axis=axis)
            b = np.take(residual, np.arange(lag, residual.shape[axis]), axis=axis)
            both = np.take(inside, np.arange(residual.shape[axis] - lag), axis=axis) & np.take(
                inside, np.arange(lag, residual.shape[axis]), axis=axis)
            if both.sum() < 20:
                break
            c = float((a[both] * b[both]).mean() / variance)
            if c <= MIN_CORRELATION and lag > 1:
                break  # past the texture's reach: further lags are sampling noise
            lags_mm.append(lag * sp[axis])
            corr.append(c)
    if not corr:
        return float("nan"), float("nan")
    lags_mm, corr = np.asarray(lags_mm), np.clip(np.asarray(corr), 1e-3, 1.0)
    # log C = log(1 - nugget) - l^2 / (4 sigma^2): a line in l^2, fitted where the correlation is above noise
    keep = corr > MIN_CORRELATION
    if keep.sum() >= 2 and np.ptp(lags_mm[keep]) > 0:
        slope, intercept = np.polyfit(lags_mm[keep] ** 2, np.log(corr[keep]), 1)
        if slope < 0:
            return float(np.sqrt(-1 / (4 * slope))), float(np.clip(1 - np.exp(intercept), 0.0, 1.0))
    # no smooth component resolved: texture finer than the voxels
    return float(0.5 * sp[list(axes)].min()), float(np.clip(1 - corr[0], 0.0, 1.0))


EDGE_FIT_MM = 6.0  # the edge profile is fitted on voxels within this distance of the border
MIN_EDGE_CONTRAST = 1.0  # ring standard deviations: fainter tumours have no measurable edge
INTERIOR_MM = 1.0  # texture and contrast are measured this far inside the border


def edge_profile(z: np.ndarray, distance: np.ndarray, inside: np.ndarray, spacing: tuple[float, ...],
                 valid: np.ndarray | None = None) -> tuple[float, float]:
    """Width and centre of a tumour's edge: fits ``contrast * ndtr((d - offset) / sigma)`` to the ring-unit
    intensities ``z`` against the signed distance ``d`` (voxels within ``EDGE_FIT_MM`` of the border, averaged
    in bins of half the finest spacing; outside the tumour only ``valid`` voxels, the tissue it sits in).

    Returns:
        (edge_sigma_mm, edge_offset_mm); NaN for a tumour fainter than ``MIN_EDGE_CONTRAST`` or a failed fit.
    """
    from scipy.optimize import curve_fit

    contrast = float(np.median(z[inside])) if inside.any() else float("nan")
    near = np.abs(distance) <= EDGE_FIT_MM
    if valid is not None:
        near &= valid | (distance > 0)
    if not abs(contrast) >= MIN_EDGE_CONTRAST or near.sum() < 20:
        return float("nan"), float("nan")
    width = 0.5 * float(min(spacing))
    bins = np.round(distance[near] / width).astype(int)
    bins -= bins.min()
    counts = np.bincount(bins)
    used = counts > 0
    d = (np.bincount(bins, distance[near])[used] / counts[used])
    p = (np.bincount(bins, z[near])[used] / counts[used]) / contrast

    def model(x: np.ndarray, sigma: float, offset: float) -> np.ndarray:
        return ndtr((x - offset) / sigma)

    try:
        (sigma, offset), _ = curve_fit(model, d, p, p0=(1.0, 0.0), sigma=1 / np.sqrt(counts[used]),
                                       bounds=([0.05, -EDGE_FIT_MM / 2], [EDGE_FIT_MM, EDGE_FIT_MM / 2]))
    except (RuntimeError, ValueError):
        return float("nan"), float("nan")
    return float(sigma), float(offset)


def measure_tumour(image: np.ndarray, tumour: np.ndarray, valid: np.ndarray, spacing: tuple[float, ...],
                   levels: tuple[float, ...] = QUANTILE_LEVELS) -> dict | None:
    """The appearance of one real tumour in units of its ring.

    Args:
        image: (C, *spatial) image.
        tumour: (*spatial) bool mask of the tumour (one component).
        valid: (*spatial) voxels that may form its ring (unlabelled tissue inside the image).
        spacing: voxel spacing (mm).
        levels: quantile levels of the intensity distribution.

    Returns:
        ``quantiles`` (per channel, the ring-unit intensities at ``levels`` of the tumour's interior, where the
        edge has reached 98% of the way: at least ``INTERIOR_MM`` and two edge widths past the edge's centre, where
        that leaves 8 voxels; the edge is described apart), ``texture_sigma_mm`` and
        ``nugget`` (see :func:`correlation_length`, on the channel of highest contrast), ``edge_sigma_mm`` and
        ``edge_offset_mm`` (see :func:`edge_profile`; NaN where not measurable) and ``contrast`` (median
        ring-unit intensity inside, per channel); None when the ring is too small to measure against.
    """
    where = np.argwhere(tumour)
    bbox = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(where.min(0), where.max(0)))
    box, _ = expand_box(bbox, RING_MM[1] + EDGE_FIT_MM, spacing, tumour.shape)
    mask = tumour[box]
    distance = signed_distance(mask, spacing)
    ring_voxels = ring(distance, valid[box] & ~mask)
    z = []
    for channel in image[(slice(None), *box)]:
        mean, std = ring_statistics(channel, ring_voxels)
        if np.isnan(mean):
            return None
        z.append((channel.astype(np.float64) - mean) / std)
    interior = mask & (distance >= INTERIOR_MM)
    if interior.sum() < 8:
        interior = mask
    contrast = [float(np.median(zc[interior])) for zc in z]
    main = int(np.argmax(np.abs(contrast)))
    edge_sigma, edge_offset = edge_profile(z[main], distance, interior, spacing, valid[box])
    if np.isfinite(edge_sigma):  # the interior starts where the edge has (nearly) reached the tumour's values
        past_edge = mask & (distance >= max(INTERIOR_MM, edge_offset + 2 * edge_sigma))
        interior = past_edge if past_edge.sum() >= 8 else interior
    residual = np.where(interior, z[main] - z[main][interior].mean(), 0.0)
    sigma, nugget = correlation_length(residual, interior, spacing)
    return {"quantiles": [[float(v) for v in np.quantile(zc[interior], levels)] for zc in z],
            "texture_sigma_mm": sigma, "nugget": nugget, "edge_sigma_mm": edge_sigma, "edge_offset_mm": edge_offset,
            "contrast": contrast}


def paint_lesion(image: np.ndarray, bbox: tuple[slice, ...], mask: np.ndarray, spacing: tuple[float, ...],
                 values: np.ndarray, edge_sigma_mm: float, edge_offset_mm: float, halo_mm: float,
                 clips: list[tuple[float, float] | None] | None = None, additive: bool = False,
                 tissue: np.ndarray | None = None) -> None:
    """Paints a tumour given in ring units into ``image`` (in place), feathered across its border.

    The target site's own ring (median and spread per channel, see :func:`ring_statistics`) turns the ring-unit
    ``values`` into intensities; beyond the mask they continue from the nearest mask voxel, and the tumour's share
    of each voxel follows :func:`edge_weight`, so the edge straddles the label border as real edges do. Voxels
    farther than ``halo_mm`` outside the mask stay bit-identical.

    Args:
        image: (C, *spatial) image.
        bbox: the mask's place in ``image``.
        mask: bool lesion mask of the shape of ``bbox``.
        spacing: voxel spacing (mm).
        values: (C, mask.sum()) ring-unit intensities of the mask voxels (C order of ``mask``'s True voxels).
        edge_sigma_mm: width of the edge transition.
        edge_offset_mm: centre of the transition relative to the label border (positive: inside).
        halo_mm: how far outside the mask the transition may reach.
        clips: per channel, the range values are clipped to (CT window), or None.
        additive: ``values`` are changes in image units, added to the voxels (the label-free paper's texture),
            not ring-unit intensities; they are scaled so that the mean change over the mask stays their mean.
        tissue: (*spatial) bool, the tissue around the site that its ring is measured on (not air, bone or
            another structure that happens to lie within the ring's reach); None: every voxel.
    """
    box, inner = expand_box(bbox, max(halo_mm, RING_MM[1]), spacing, image.shape[1:])
    m = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    m[inner] = mask
    half = 0.5 * min(spacing)
    # distances only as far as they are read: inside to the depth past which the edge is complete (every voxel
    # wholly tumour, weights rise with depth), outside to the ring's and the edge's reach (RING_MM are signed
    # distances), the nearest mask voxel only where the edge reaches outside voxels (signed distance at most
    # half - min(spacing))
    complete = edge_offset_mm + EDGE_COMPLETE * max(float(edge_sigma_mm), 1e-3)
    deep = complete >= half
    outward = halo_mm >= min(spacing)
    distance, nearest = signed_distance_flat(m, spacing, nearest=outward, inside_mm=complete,
                                             outside_mm=max(RING_MM[1], halo_mm - half))
    # only voxels within halo_mm of the mask change: the edge is evaluated there alone (flat indices, C order)
    changed = distance >= half - halo_mm
    where = np.flatnonzero(changed)
    if nearest is None:  # no voxel outside the mask changes: the changed voxels are the mask's, in its C order
        source = np.arange(where.size)
    else:  # each changed voxel's value comes from its nearest mask voxel: its place in ``values`` (C order)
        source = (np.cumsum(m.ravel()) - 1)[nearest.ravel()[where]]
    in_mask = m.ravel()[where]
    if deep:
        weight = edge_weight(distance.ravel()[where], edge_sigma_mm, edge_offset_mm)
    else:  # wholly tumour inside
        weight = np.ones(where.size)
        weight[~in_mask] = edge_weight(distance.ravel()[where[~in_mask]], edge_sigma_mm, edge_offset_mm)
    if not weight.all():  # the normal CDF underflows to 0 far out: those voxels stay bit-identical
        keep = weight > 0
        changed.ravel()[where[~keep]] = False
        where, weight, source, in_mask = where[keep], weight[keep], source[keep], in_mask[keep]
    ring_voxels = ring(distance, None if tissue is None else tissue[box] & ~m)
    if ring_voxels.sum() < MIN_RING_VOXELS and tissue is not None:
        ring_voxels = ring(distance)
    if ring_voxels.sum() < MIN_RING_VOXELS and not additive:  # a lesion filling its patch: whatever surrounds it
        ring_voxels = ~m
    for c in range(image.shape[0]):
        region = image[c][box]
        old = region[changed].astype(np.float64)
        tumour = np.asarray(values[c], dtype=np.float64)[source]  # carried outward from the nearest mask voxel
        if additive:
            shared = float((weight[in_mask] * tumour[in_mask]).sum()) / max(int(m.sum()), 1)
            new = old + weight * tumour * (float(np.mean(values[c])) / shared if shared != 0 else 1.0)
        else:
            centre, spread = ring_statistics(region, ring_voxels)
            if np.isnan(centre):
                centre, spread = float(np.median(region)), max(float(np.std(region)), 1e-6)
            new = weight * (centre + spread * tumour) + (1 - weight) * old
        if clips is not None and clips[c] is not None:
            new = np.clip(new, *clips[c])
        region[changed] = new
