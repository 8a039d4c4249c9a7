"""Lesion-wise analysis: connected components, their largest diameter, matching, and size groups.

* Lesions are connected components of a binary mask with full connectivity (26-neighbourhood in 3D,
  8 in 2D).
* The largest diameter of a lesion is its physical extent: the largest distance in mm between two
  points of the union of its voxels, each voxel taken as a box of the voxel spacing. It is computed
  exactly from the corners of the boundary voxels through their convex hull, so large tumours stay
  fast. A box of ``a x b x c`` voxels at spacing ``(sa, sb, sc)`` has diameter
  ``sqrt((a sa)^2 + (b sb)^2 + (c sc)^2)``; a single voxel has its diagonal.
* A reference lesion is *detected* when some predicted component overlaps it with an intersection
  over union above a threshold (default 0: any overlap); a predicted component is a *true positive*
  when it overlaps some reference lesion that way. One predicted component may detect several
  reference lesions and the other way round.
* The size group of a case is that of its largest reference lesion (by diameter): ``<=2cm``,
  ``2-5cm``, ``>5cm`` (edges belong to the lower group: 20 mm is ``<=2cm``, 50 mm is ``2-5cm``), as in
  the breast 2D paper. 2D data is also binned by tumour pixel area: ``tiny`` < 200, ``small`` 200-399,
  ``medium`` 400-699, ``large`` 700-1599, ``very large`` >= 1600 pixels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import cdist

#: diameter groups, smallest first, with their upper edges in mm (inclusive)
DIAMETER_GROUPS: tuple[str, ...] = ("<=2cm", "2-5cm", ">5cm")
DIAMETER_EDGES_MM: tuple[float, ...] = (20.0, 50.0)
#: how the report writes the diameter groups (the layout of the breast 2D paper's table)
DIAMETER_GROUP_TITLES: dict[str, str] = {"<=2cm": "≤ 2 cm", "2-5cm": "> 2 cm, ≤ 5 cm", ">5cm": "> 5 cm"}

#: per-slice area groups of the breast 2D paper, with their lower edges in pixels (inclusive)
AREA_GROUPS: tuple[str, ...] = ("tiny", "small", "medium", "large", "very large")
AREA_LOWER_EDGES_PX: tuple[int, ...] = (0, 200, 400, 700, 1600)
AREA_GROUP_TITLES: dict[str, str] = {
    "tiny": "tiny (< 200 px)",
    "small": "small (200-399 px)",
    "medium": "medium (400-699 px)",
    "large": "large (700-1599 px)",
    "very large": "very large (≥ 1600 px)",
}


def diameter_group(diameter_mm: float) -> str | None:
    """The size group of a largest diameter in mm; None for NaN (no tumour)."""
    if not np.isfinite(diameter_mm):
        return None
    for name, edge in zip(DIAMETER_GROUPS, DIAMETER_EDGES_MM, strict=False):
        if diameter_mm <= edge:
            return name
    return DIAMETER_GROUPS[-1]


def area_group(area_pixels: int) -> str | None:
    """The area group of a tumour pixel count; None for 0 (no tumour)."""
    if area_pixels <= 0:
        return None
    idx = int(np.searchsorted(AREA_LOWER_EDGES_PX, area_pixels, side="right")) - 1
    return AREA_GROUPS[idx]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask with full connectivity.

    Args:
        mask: boolean array, 2D or 3D.

    Returns:
        ``(labels, n)``: int32 array with 0 for background and 1..n for the components, and n.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, n = ndimage.label(mask, structure=structure, output=np.int32)
    return labels, int(n)


def _max_pairwise_distance(points: np.ndarray, chunk: int = 2048) -> float:
    best = 0.0
    for start in range(0, len(points), chunk):
        best = max(best, float(cdist(points[start:start + chunk], points).max()))
    return best


def _hull_vertices(points: np.ndarray) -> np.ndarray:
    """Vertices of the convex hull of points; all points where the hull is degenerate (flat)."""
    if len(points) <= points.shape[1] + 1:
        return points
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:
        return points


def max_diameter(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Largest diameter in mm of a mask, taking each voxel as a box of the voxel spacing.

    Args:
        mask: boolean array, 2D or 3D (one lesion, or the union of several).
        spacing: voxel spacing in mm per axis.

    Returns:
        The largest distance between two points of the mask's voxels; NaN for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (mask.ndim,):
        raise ValueError(f"spacing {tuple(spacing)} does not match a {mask.ndim}D mask")
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box or box[0] is None:
        return float("nan")
    crop = mask[box[0]]
    boundary = crop & ~ndimage.binary_erosion(crop, border_value=0)
    centres = np.argwhere(boundary).astype(np.float64)
    # the hull of all voxel corners has its vertices among the corners of the hull vertices of the
    # voxel centres (Minkowski sum with the voxel box), so shrink the point set first
    centres = _hull_vertices(centres)
    offsets = np.array(list(itertools.product((0.0, 1.0), repeat=mask.ndim)))
    corners = np.unique((centres[:, None, :] + offsets[None]).reshape(-1, mask.ndim), axis=0) * spacing_arr
    return _max_pairwise_distance(_hull_vertices(corners))


def lesion_diameters(labels: np.ndarray, n: int, spacing: Sequence[float]) -> np.ndarray:
    """Largest diameter in mm of each labelled component.

    Args:
        labels: component labels from :func:`label_components`.
        n: number of components.
        spacing: voxel spacing in mm per axis.

    Returns:
        float array of length n; entry i is the diameter of component i + 1.
    """
    out = np.zeros(n, dtype=np.float64)
    for i, box in enumerate(ndimage.find_objects(labels, max_label=n)):
        if box is not None:
            out[i] = max_diameter(labels[box] == i + 1, spacing)
    return out


def match_lesions(
    ref_labels: np.ndarray,
    n_ref: int,
    pred_labels: np.ndarray,
    n_pred: int,
    iou_threshold: float = 0.0,
) -> dict[str, object]:
    """Matches reference lesions to predicted components by overlap.

    Args:
        ref_labels: labelled reference components (0 = background).
        n_ref: number of reference components.
        pred_labels: labelled predicted components, same shape.
        n_pred: number of predicted components.
        iou_threshold: a pair matches when its intersection over union is strictly above this
            (0 means any overlap).

    Returns:
        dict with ``detected`` (bool array, one per reference lesion), ``matched_predictions`` (bool
        array, one per predicted component), ``best_iou`` (float array, best IoU of each reference
        lesion), and the counts ``n_reference``, ``n_prediction``, ``n_detected``, ``n_matched_predictions``.
    """
    if ref_labels.shape != pred_labels.shape:
        raise ValueError(f"label maps differ in shape: {ref_labels.shape} vs {pred_labels.shape}")
    detected = np.zeros(n_ref, dtype=bool)
    matched = np.zeros(n_pred, dtype=bool)
    best_iou = np.zeros(n_ref, dtype=np.float64)
    if n_ref and n_pred:
        overlap = (ref_labels > 0) & (pred_labels > 0)
        pair_codes = ref_labels[overlap].astype(np.int64) * (n_pred + 1) + pred_labels[overlap]
        codes, inter = np.unique(pair_codes, return_counts=True)
        r, p = codes // (n_pred + 1), codes % (n_pred + 1)
        ref_size = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)
        pred_size = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
        iou = inter / (ref_size[r] + pred_size[p] - inter)
        np.maximum.at(best_iou, r - 1, iou)
        hit = iou > iou_threshold
        detected[r[hit] - 1] = True
        matched[p[hit] - 1] = True
    return {
        "detected": detected,
        "matched_predictions": matched,
        "best_iou": best_iou,
        "n_reference": int(n_ref),
        "n_prediction": int(n_pred),
        "n_detected": int(detected.sum()),
        "n_matched_predictions": int(matched.sum()),
    }
