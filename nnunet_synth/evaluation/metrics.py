"""Per-case overlap and surface metrics of one binary mask pair, computed with MONAI.

All functions take boolean numpy masks of identical shape (2D or 3D, in the array order nnU-Net's
readers return) and the voxel spacing in mm in the same axis order. Distances are in mm.

Conventions (the same as nnU-Net's ``evaluate_predictions`` where it has one):

* **Dice** ``2 TP / (2 TP + FP + FN)``; NaN when reference and prediction are both empty
  (``TP + FP + FN == 0``, nnU-Net's rule), so such cases drop out of means. An empty reference
  with a non-empty prediction gives 0, and so does a non-empty reference with an empty prediction.
* **Precision** ``TP / (TP + FP)``: NaN when the prediction is empty.
  **Recall** ``TP / (TP + FN)``: NaN when the reference is empty.
* **Surface Dice** at a tolerance in mm (MONAI ``compute_surface_dice``, boundary voxels counted, not
  sub-voxel areas): NaN when both are empty, 0 when exactly one is empty (MONAI's convention).
* **HD, HD95, ASSD** (MONAI ``compute_hausdorff_distance`` / ``compute_average_surface_distance``):
  undefined, recorded as NaN, when either mask is empty; the evaluation counts such cases. HD95 is
  MONAI's: the larger of the two directed 95th percentiles of boundary-voxel distances. ASSD is the
  mean over the union of both directed distance sets.

Boundary voxels are MONAI's: foreground voxels with at least one face neighbour in the background
(voxels on the image border count as boundary). Distances are between boundary-voxel centres.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_surface_dice,
)

#: per-case metric names, in report order
METRICS: tuple[str, ...] = ("dice", "hd95", "hd", "assd", "surface_dice", "precision", "recall")

#: whether a larger value is better (sets the side of one-tailed tests and the sign of "improved")
HIGHER_IS_BETTER: dict[str, bool] = {
    "dice": True,
    "hd95": False,
    "hd": False,
    "assd": False,
    "surface_dice": True,
    "precision": True,
    "recall": True,
}

#: metrics in mm (the others are fractions in [0, 1])
DISTANCE_METRICS: frozenset[str] = frozenset({"hd95", "hd", "assd"})


def crop_to_union(*masks: np.ndarray, margin: int = 1) -> tuple[np.ndarray, ...]:
    """Crops masks of one shape to the bounding box of their union, plus a margin.

    Overlap counts and boundary distances do not change under this crop (MONAI pads with background
    where a mask touches the image border), but MONAI's tensors get small.

    Args:
        masks: boolean arrays of one shape.
        margin: voxels kept around the bounding box on every side (clipped at the image border).

    Returns:
        The cropped masks, in the order given. All-empty masks come back as one-voxel arrays.
    """
    union = np.zeros(masks[0].shape, dtype=bool)
    for m in masks:
        union |= m
    if not union.any():
        return tuple(np.zeros((1,) * m.ndim, dtype=bool) for m in masks)
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(idx[0]) - margin, 0), int(idx[-1]) + margin + 1))
    return tuple(m[tuple(slices)] for m in masks)


def confusion_counts(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int]:
    """Voxel counts of true positives, false positives and false negatives.

    Args:
        reference: boolean reference mask.
        prediction: boolean predicted mask of the same shape.

    Returns:
        ``(tp, fp, fn)`` as Python ints.
    """
    tp = int(np.count_nonzero(reference & prediction))
    return tp, int(np.count_nonzero(prediction)) - tp, int(np.count_nonzero(reference)) - tp


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    """A boolean mask as MONAI's one-hot batch layout ``[1, 1, *spatial]``."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))[None, None]


def _validate(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]) -> tuple[float, ...]:
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} and prediction shape {prediction.shape} differ")
    if reference.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {reference.ndim}D")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != reference.ndim:
        raise ValueError(f"spacing {spacing} does not match a {reference.ndim}D mask")
    if not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {spacing}")
    return spacing


def segmentation_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 5.0,
) -> dict[str, float | int]:
    """Dice, HD95, HD, ASSD, surface Dice, precision and recall of one mask pair.

    Args:
        reference: boolean reference mask, 2D or 3D.
        prediction: boolean predicted mask of the same shape.
        spacing: voxel spacing in mm, one value per axis of the masks.
        tolerance_mm: surface Dice tolerance in mm.

    Returns:
        The metrics of :data:`METRICS` (float, NaN where undefined; see the module docstring) plus the
        voxel counts ``tp``, ``fp``, ``fn``, ``n_reference`` and ``n_prediction`` and the volumes
        ``reference_volume_mm3`` and ``prediction_volume_mm3``.

    Raises:
        ValueError: on differing shapes, a spacing of the wrong length or a negative tolerance.
    """
    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    spacing = _validate(reference, prediction, spacing)
    if not tolerance_mm >= 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    tp, fp, fn = confusion_counts(reference, prediction)
    n_ref, n_pred = tp + fn, tp + fp
    voxel_volume = float(np.prod(spacing))
    out: dict[str, float | int] = dict.fromkeys(METRICS, float("nan"))
    out.update(
        tp=tp, fp=fp, fn=fn, n_reference=n_ref, n_prediction=n_pred,
        reference_volume_mm3=n_ref * voxel_volume, prediction_volume_mm3=n_pred * voxel_volume,
    )
    if n_pred:
        out["precision"] = tp / n_pred
    if n_ref:
        out["recall"] = tp / n_ref
    if n_ref == 0 and n_pred == 0:
        return out  # nothing to compare: every overlap and distance metric stays NaN
    ref_c, pred_c = crop_to_union(reference, prediction)
    y, y_pred = _as_batch(ref_c), _as_batch(pred_c)
    out["dice"] = float(compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0, 0])
    if n_ref == 0 or n_pred == 0:
        out["surface_dice"] = 0.0  # MONAI's value when one side is empty, without its warnings
        return out
    with warnings.catch_warnings():
        # MONAI 1.5/1.6 passes its own deprecated get_mask_edges argument on every call
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        out["surface_dice"] = float(
            compute_surface_dice(y_pred, y, class_thresholds=[float(tolerance_mm)], include_background=True,
                                 spacing=spacing)[0, 0]
        )
        out["hd"] = float(compute_hausdorff_distance(y_pred, y, include_background=True, spacing=spacing)[0, 0])
        out["hd95"] = float(
            compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)[0, 0]
        )
        out["assd"] = float(
            compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True,
                                             spacing=spacing)[0, 0]
        )
    return out


def slice_dice(reference: np.ndarray, prediction: np.ndarray, axis: int = 0) -> np.ndarray:
    """Dice of every 2D slice of a 3D mask pair along one axis (MONAI ``compute_dice``, slices as batch).

    Args:
        reference: boolean 3D reference mask.
        prediction: boolean 3D predicted mask of the same shape.
        axis: the slicing axis.

    Returns:
        float array with one Dice per slice; NaN for slices where both are empty (nnU-Net's rule).
    """
    if reference.shape != prediction.shape or reference.ndim != 3:
        raise ValueError(f"need two 3D masks of one shape, got {reference.shape} and {prediction.shape}")
    ref = np.moveaxis(np.asarray(reference, dtype=bool), axis, 0)
    pred = np.moveaxis(np.asarray(prediction, dtype=bool), axis, 0)
    dice = np.full(ref.shape[0], np.nan)
    present = np.flatnonzero(ref.any(axis=(1, 2)) | pred.any(axis=(1, 2)))
    if present.size == 0:
        return dice
    ref_c, pred_c = crop_to_union(ref[present], pred[present], margin=0)
    dice[present] = compute_dice(
        torch.from_numpy(np.ascontiguousarray(pred_c))[:, None],
        torch.from_numpy(np.ascontiguousarray(ref_c))[:, None],
        include_background=True,
        ignore_empty=False,
    )[:, 0].numpy()
    return dice
