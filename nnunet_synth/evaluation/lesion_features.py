"""Intensity, edge and texture features of one tumour in a crop, for the generator-quality checks.

Everything is measured per image channel in nnU-Net's normalised intensity space, on a crop that holds the
lesion, its organ surroundings and a context margin:

* lesion intensity: mean, standard deviation, 10th/50th/90th percentile inside the lesion mask;
* contrast: lesion mean minus the mean of a surrounding *shell* of organ voxels (organ voxels within
  ``shell_mm`` of the lesion, measured with the voxel spacing), also in units of the shell's standard
  deviation;
* edge: mean gradient magnitude (normalised units per mm, ``np.gradient`` with the spacing) on the boundary
  band (lesion voxels with a face neighbour outside and outside voxels with a face neighbour inside); the
  same on the lesion interior (the mask eroded once) and its standard deviation as a texture measure;
* texture: grey-level co-occurrence statistics (``skimage.feature.graycomatrix``/``graycoprops``: contrast,
  homogeneity, energy, correlation; distance 1, four directions, symmetric, averaged) of the lesion voxels
  on its central slice, quantised into ``levels`` bins of a fixed per-channel range shared by all crops so
  that values are comparable between crops.

Quantities that cannot be measured (no organ shell around a lesion that fills its organ, no interior in a
two-voxel lesion, no co-occurring pair on a one-pixel slice) are NaN.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation, binary_erosion, distance_transform_edt, generate_binary_structure
from skimage.feature import graycomatrix, graycoprops

GLCM_PROPERTIES = ("contrast", "homogeneity", "energy", "correlation")
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
# per channel, in this order; "lesion_*" describe the lesion alone, the rest relate it to its surroundings
CHANNEL_FEATURES = (
    "lesion_mean", "lesion_std", "lesion_p10", "lesion_p50", "lesion_p90",
    "shell_mean", "shell_std", "contrast", "contrast_shell_std",
    "edge_gradient", "interior_gradient", "interior_gradient_std",
    *(f"glcm_{p}" for p in GLCM_PROPERTIES),
)


def shell_mask(lesion: np.ndarray, organ: np.ndarray, spacing: tuple[float, ...], shell_mm: float) -> np.ndarray:
    """Organ voxels outside the lesion within ``shell_mm`` of it (Euclidean, in mm).

    The width is raised to the largest voxel spacing so that the shell is at least one voxel thick on every
    axis.
    """
    width = max(float(shell_mm), float(max(spacing)))
    distance = distance_transform_edt(~lesion, sampling=spacing)
    return organ & ~lesion & (distance <= width)


def boundary_band(lesion: np.ndarray) -> np.ndarray:
    """Voxels on either side of the lesion boundary (face connectivity)."""
    structure = generate_binary_structure(lesion.ndim, 1)
    inner = lesion & ~binary_erosion(lesion, structure, border_value=0)
    outer = binary_dilation(lesion, structure) & ~lesion
    return inner | outer


def central_slice(lesion: np.ndarray) -> int:
    """Index along the first axis of the lesion's largest cross-section (ties: the one nearest its centroid)."""
    z = np.nonzero(lesion)[0]
    areas = np.bincount(z, minlength=lesion.shape[0])
    best = np.flatnonzero(areas == areas.max())
    return int(best[np.argmin(np.abs(best - z.mean()))])


def glcm_features(values: np.ndarray, mask: np.ndarray, value_range: tuple[float, float],
                  levels: int = 16) -> dict[str, float]:
    """Co-occurrence statistics of the masked pixels of a 2D image.

    Pixels are quantised into ``levels`` bins of ``value_range`` (values outside are clipped); pixels outside
    the mask get an extra grey level 0 whose row and column are dropped from the co-occurrence matrix, so only
    pairs of lesion pixels count. Directions without a pair of lesion pixels are left out of the average.

    Returns:
        ``glcm_<property>`` for each of :data:`GLCM_PROPERTIES`; NaN when no pair of lesion pixels exists.
    """
    if values.ndim != 2 or values.shape != mask.shape:
        raise ValueError(f"texture needs a 2D slice and a mask of its shape, got {values.shape} and {mask.shape}")
    nan = {f"glcm_{p}": float("nan") for p in GLCM_PROPERTIES}
    lo, hi = value_range
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values, dtype=np.float64)
    quantised = 1 + np.clip(np.floor(scaled * levels), 0, levels - 1).astype(np.uint8)
    quantised[~mask] = 0
    matrix = graycomatrix(quantised, [1], GLCM_ANGLES, levels=levels + 1, symmetric=True, normed=False)
    matrix = matrix[1:, 1:].astype(np.float64)
    keep = matrix.sum(axis=(0, 1))[0] > 0
    if not keep.any():
        return nan
    matrix = matrix[:, :, :, keep]
    out = {}
    for prop in GLCM_PROPERTIES:
        with np.errstate(invalid="ignore", divide="ignore"):
            value = graycoprops(matrix, prop)
        out[f"glcm_{prop}"] = float(np.nanmean(value)) if np.isfinite(value).any() else float("nan")
    return out


def volume_features(image: np.ndarray, lesion: np.ndarray, organ: np.ndarray, spacing: tuple[float, ...],
                    shell_mm: float = 4.0) -> list[dict[str, float]]:
    """The intensity, contrast and edge features (all of :data:`CHANNEL_FEATURES` but the ``glcm_*`` ones).

    Args:
        image: (C, *spatial) crop in nnU-Net's normalised intensities.
        lesion: (*spatial) bool mask of the tumour.
        organ: (*spatial) bool mask of the organ around it (voxels of ``lesion`` are ignored).
        spacing: voxel spacing in mm of the spatial axes.
        shell_mm: width of the organ shell the contrast is measured against.

    Returns:
        One dict per channel.

    Raises:
        ValueError: for an empty lesion mask or mismatched shapes.
    """
    if image.shape[1:] != lesion.shape or lesion.shape != organ.shape or len(spacing) != lesion.ndim:
        raise ValueError(f"crop shapes differ: image {image.shape}, lesion {lesion.shape}, organ {organ.shape}, "
                         f"spacing {spacing}")
    if not lesion.any():
        raise ValueError("empty lesion mask")
    shell = shell_mask(lesion, organ & ~lesion, spacing, shell_mm)
    band = boundary_band(lesion)
    interior = binary_erosion(lesion, generate_binary_structure(lesion.ndim, 1), border_value=0)
    nan = float("nan")
    out = []
    for channel in image.astype(np.float64):
        if min(channel.shape) > 1:
            gradient = np.sqrt(sum(g ** 2 for g in np.gradient(channel, *spacing)))
        else:
            gradient = np.full(channel.shape, nan)
        inside = channel[lesion]
        p10, p50, p90 = np.percentile(inside, [10, 50, 90])
        f = {"lesion_mean": float(inside.mean()), "lesion_std": float(inside.std()),
             "lesion_p10": float(p10), "lesion_p50": float(p50), "lesion_p90": float(p90),
             "shell_mean": nan, "shell_std": nan, "contrast": nan, "contrast_shell_std": nan}
        if shell.any():
            surround = channel[shell]
            f["shell_mean"], f["shell_std"] = float(surround.mean()), float(surround.std())
            f["contrast"] = f["lesion_mean"] - f["shell_mean"]
            if f["shell_std"] > 0:
                f["contrast_shell_std"] = f["contrast"] / f["shell_std"]
        f["edge_gradient"] = float(gradient[band].mean())
        f["interior_gradient"] = float(gradient[interior].mean()) if interior.any() else nan
        f["interior_gradient_std"] = float(gradient[interior].std()) if interior.any() else nan
        out.append(f)
    return out


def lesion_features(image: np.ndarray, lesion: np.ndarray, organ: np.ndarray, spacing: tuple[float, ...],
                    glcm_ranges: list[tuple[float, float]], shell_mm: float = 4.0,
                    levels: int = 16) -> list[dict[str, float]]:
    """All features of :data:`CHANNEL_FEATURES` for every channel of a crop (texture on the central slice).

    Args:
        image: (C, *spatial) crop in nnU-Net's normalised intensities (2D or 3D).
        lesion: (*spatial) bool mask of the tumour.
        organ: (*spatial) bool mask of the organ around it.
        spacing: voxel spacing in mm of the spatial axes.
        glcm_ranges: per channel, the intensity range quantised for the co-occurrence matrix.
        shell_mm: width of the organ shell the contrast is measured against.
        levels: grey levels of the co-occurrence matrix.

    Returns:
        One dict per channel, keys :data:`CHANNEL_FEATURES`.
    """
    if len(glcm_ranges) != image.shape[0]:
        raise ValueError(f"{len(glcm_ranges)} texture ranges for {image.shape[0]} channels")
    out = volume_features(image, lesion, organ, spacing, shell_mm)
    if lesion.ndim == 3:
        z = central_slice(lesion)
        image, lesion = image[:, z], lesion[z]
    for c, f in enumerate(out):
        f.update(glcm_features(image[c], lesion, glcm_ranges[c], levels))
    return out


# Scale-free features (the realism benchmark): intensities in units of the lesion's tissue ring (median 0,
# spread 1, see nnunet_synth.generators.appearance), so raw-unit and normalised-unit cases give the same values.
RING_FEATURES = (
    "z_mean", "z_std", "z_p10", "z_p50", "z_p90", "z_skew", "z_kurtosis",
    "laplacian", "edge_gradient", "interior_gradient", "edge_step",
    *(f"glcm_{p}" for p in GLCM_PROPERTIES),
)
RING_GLCM_RANGE = (-6.0, 6.0)  # ring units quantised for the co-occurrence matrix


def _in_plane_derivatives(z: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Gradient magnitude and Laplacian (per mm, per mm^2) along the in-plane axes (the last two: through-plane
    spacing of clinical scans is too coarse for a voxel-scale texture measure)."""
    axes = range(max(0, z.ndim - 2), z.ndim)
    gradient = np.sqrt(sum(np.gradient(z, spacing[a], axis=a) ** 2 for a in axes))
    laplacian = sum(np.gradient(np.gradient(z, spacing[a], axis=a), spacing[a], axis=a) for a in axes)
    return gradient, laplacian


def ring_features(image: np.ndarray, lesion: np.ndarray, valid: np.ndarray, spacing: tuple[float, ...],
                  levels: int = 16) -> list[dict[str, float]] | None:
    """The :data:`RING_FEATURES` of one lesion per channel, in units of its ring.

    * distribution: mean, standard deviation, 10/50/90th percentile, skewness and excess kurtosis of the lesion's
      ring-unit intensities;
    * texture: mean |Laplacian| and mean gradient magnitude inside (the mask eroded once), co-occurrence statistics
      on the central slice (ring units quantised in :data:`RING_GLCM_RANGE`);
    * edge: mean gradient magnitude on the boundary band, and the step across the border (mean of the inner rim
      minus that of the outer rim, one voxel each, in ring units).

    Args:
        image: (C, *spatial) image, any intensity units.
        lesion: (*spatial) bool mask of one lesion.
        valid: (*spatial) voxels that may form its ring (unlabelled tissue inside the image).
        spacing: voxel spacing (mm).
        levels: grey levels of the co-occurrence matrix.

    Returns:
        One dict per channel; None when the ring is too small to measure against.
    """
    from scipy.stats import kurtosis, skew

    from nnunet_synth.generators.appearance import RING_MM, expand_box, ring, ring_statistics, signed_distance

    where = np.argwhere(lesion)
    bbox = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(where.min(0), where.max(0)))
    box, _ = expand_box(bbox, RING_MM[1] + 1.0, spacing, lesion.shape)
    mask = lesion[box]
    distance = signed_distance(mask, spacing)
    ring_voxels = ring(distance, valid[box] & ~mask)
    structure = generate_binary_structure(mask.ndim, 1)
    interior = binary_erosion(mask, structure, border_value=0)
    interior = interior if interior.any() else mask
    inner_rim = mask & ~binary_erosion(mask, structure, border_value=0)
    outer_rim = binary_dilation(mask, structure) & ~mask
    out = []
    for channel in image[(slice(None), *box)]:
        centre, spread = ring_statistics(channel, ring_voxels)
        if np.isnan(centre):
            return None
        z = (channel.astype(np.float64) - centre) / spread
        inside = z[mask]
        gradient, laplacian = _in_plane_derivatives(z, spacing)
        mean = float(inside.mean())
        f = {"z_mean": mean, "z_std": float(inside.std()),
             **dict(zip(("z_p10", "z_p50", "z_p90"), map(float, np.percentile(inside, [10, 50, 90])))),
             "z_skew": float(skew(inside)) if inside.size > 2 else float("nan"),
             "z_kurtosis": float(kurtosis(inside)) if inside.size > 3 else float("nan"),
             "laplacian": float(np.abs(laplacian[interior]).mean()),
             "edge_gradient": float(gradient[inner_rim | outer_rim].mean()),
             "interior_gradient": float(gradient[interior].mean()),
             "edge_step": float(z[inner_rim].mean() - z[outer_rim].mean())}
        if mask.ndim == 3:
            zc, mc = z[central_slice(mask)], mask[central_slice(mask)]
        else:
            zc, mc = z, mask
        f.update(glcm_features(zc, mc, RING_GLCM_RANGE, levels))
        out.append(f)
    return out
