"""Per-case metrics (nnunet_synth.evaluation.metrics) against closed forms and a second implementation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from nnunet_synth.evaluation.metrics import METRICS, crop_to_union, segmentation_metrics, slice_dice

ANISOTROPIC = [(0.8, 1.0, 1.5), (1.2, 0.75, 0.9), (1.0, 0.6, 1.15)]


# ----------------------------------------------------------------------------------------------
# closed forms: concentric boxes
# ----------------------------------------------------------------------------------------------
def concentric_boxes(size: tuple[int, int, int], shape=(20, 22, 18)) -> tuple[np.ndarray, np.ndarray]:
    """An inner box of ``size`` voxels and the box one voxel larger on every side."""
    inner = np.zeros(shape, dtype=bool)
    outer = np.zeros(shape, dtype=bool)
    inner[tuple(slice(4, 4 + s) for s in size)] = True
    outer[tuple(slice(3, 5 + s) for s in size)] = True
    return inner, outer


def box_surface_distances(size, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form boundary distances of :func:`concentric_boxes`.

    A boundary voxel of the outer box (sizes a_i + 2) that is extreme along the axis set S (|S| >= 1;
    there are 2^|S| prod_{i not in S} a_i of them) lies sqrt(sum_{i in S} s_i^2) from the nearest
    inner boundary voxel (its clamp onto the inner box). An inner boundary voxel extreme along S
    (2^|S| prod_{i not in S} (a_i - 2) of them) lies min_{i in S} s_i from the outer boundary, as long as
    no spacing is twice another (the other faces are >= 2 voxels away).
    """
    a = np.asarray(size)
    s = np.asarray(spacing, dtype=np.float64)
    assert s.max() < 2 * s.min(), "closed form needs max spacing < 2 x min spacing"
    outer_to_inner, inner_to_outer = [], []
    for subset in itertools.product((False, True), repeat=3):
        S = np.array(subset)
        if not S.any():
            continue
        outer_to_inner += [np.sqrt((s[S] ** 2).sum())] * int(2 ** S.sum() * np.prod(a[~S]))
        inner_to_outer += [s[S].min()] * int(2 ** S.sum() * np.prod(a[~S] - 2))
    return np.array(outer_to_inner), np.array(inner_to_outer)


@pytest.mark.parametrize("spacing", ANISOTROPIC)
@pytest.mark.parametrize("size", [(6, 8, 5), (3, 4, 7)])
@pytest.mark.parametrize("tolerance", [0.5, 1.2, 1.6, 2.5])
def test_concentric_boxes_closed_form(size, spacing, tolerance):
    inner, outer = concentric_boxes(size)
    m = segmentation_metrics(inner, outer, spacing, tolerance_mm=tolerance)
    d_out, d_in = box_surface_distances(size, spacing)
    v_in, v_out = np.prod(size), np.prod(np.add(size, 2))
    both = np.concatenate([d_out, d_in])
    assert m["dice"] == pytest.approx(2 * v_in / (v_in + v_out), rel=1e-6)
    assert m["precision"] == pytest.approx(v_in / v_out, rel=1e-12)
    assert m["recall"] == 1.0
    assert m["hd"] == pytest.approx(np.sqrt(np.sum(np.square(spacing))), rel=1e-6)
    assert m["hd95"] == pytest.approx(max(np.percentile(d_out, 95), np.percentile(d_in, 95)), rel=1e-6)
    assert m["assd"] == pytest.approx(both.mean(), rel=1e-6)
    assert m["surface_dice"] == pytest.approx(np.mean(both <= tolerance), rel=1e-6)
    assert (m["tp"], m["fp"], m["fn"]) == (v_in, v_out - v_in, 0)
    assert m["reference_volume_mm3"] == pytest.approx(v_in * np.prod(spacing))


@pytest.mark.parametrize("spacing", [(3.0, 0.7, 0.7), (0.5, 2.2, 1.0)])
def test_concentric_boxes_strong_anisotropy(spacing):
    """HD (corner to corner), Dice and the outer-to-inner distances hold at any spacing."""
    inner, outer = concentric_boxes((6, 8, 5))
    m = segmentation_metrics(inner, outer, spacing)
    assert m["hd"] == pytest.approx(np.sqrt(np.sum(np.square(spacing))), rel=1e-6)
    assert m["dice"] == pytest.approx(2 * 240 / (240 + 8 * 10 * 7), rel=1e-6)
    # inner-to-outer distances are at most the largest spacing, and over a third of the outer boundary
    # voxels lie at least that far from the inner box, so HD95 is the outer-to-inner 95th percentile
    s, a = np.array(spacing), np.array([6, 8, 5])
    d_out = []
    for subset in itertools.product((False, True), repeat=3):
        S = np.array(subset)
        if S.any():
            d_out += [np.sqrt((s[S] ** 2).sum())] * int(2 ** S.sum() * np.prod(a[~S]))
    assert m["hd95"] == pytest.approx(np.percentile(d_out, 95), rel=1e-6)


@pytest.mark.parametrize("spacing", ANISOTROPIC)
def test_metrics_symmetric_in_distances_and_swap_precision_recall(spacing):
    inner, outer = concentric_boxes((5, 6, 4))
    a = segmentation_metrics(inner, outer, spacing)
    b = segmentation_metrics(outer, inner, spacing)
    for k in ("dice", "hd", "hd95", "assd", "surface_dice"):
        assert a[k] == pytest.approx(b[k], rel=1e-6), k
    assert a["precision"] == pytest.approx(b["recall"])
    assert a["recall"] == pytest.approx(b["precision"])


def test_shifted_box_exact_distances():
    """A box shifted by k voxels along one axis: every distance is a multiple of that spacing."""
    spacing = (2.0, 0.7, 0.9)
    ref = np.zeros((16, 20, 20), dtype=bool)
    ref[4:10, 5:15, 5:15] = True
    pred = np.roll(ref, 1, axis=0)
    m = segmentation_metrics(ref, pred, spacing, tolerance_mm=1.9)
    assert m["dice"] == pytest.approx(5 / 6, rel=1e-6)  # 5 of 6 slices overlap
    assert m["hd"] == pytest.approx(2.0, rel=1e-6)
    assert m["surface_dice"] < 1.0
    assert segmentation_metrics(ref, pred, spacing, tolerance_mm=2.0)["surface_dice"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# closed forms: concentric spheres (exact up to discretisation)
# ----------------------------------------------------------------------------------------------
def ball(radius: float, spacing, half_extent: float = 19.0, offset=(0.31, 0.17, 0.07)) -> np.ndarray:
    shape = [int(2 * half_extent / s) + 1 for s in spacing]
    axes = [(np.arange(n) - (n - 1) / 2 + o) * s for n, s, o in zip(shape, spacing, offset, strict=True)]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    return sum(g**2 for g in grids) <= radius**2


@pytest.mark.parametrize("spacing", [(1.5, 0.7, 1.0), (0.8, 1.0, 1.4), (2.0, 0.9, 0.9)])
@pytest.mark.parametrize("radii", [(10.0, 14.0), (8.0, 15.0)])
def test_concentric_spheres(spacing, radii):
    r1, r2 = radii
    inner, outer = ball(r1, spacing), ball(r2, spacing)
    gap, voxel = r2 - r1, max(spacing)
    v1, v2 = r1**3, r2**3
    assert inner.sum() * np.prod(spacing) == pytest.approx(4 / 3 * np.pi * v1, rel=0.02)
    m = segmentation_metrics(inner, outer, spacing, tolerance_mm=gap + voxel + 0.1)
    assert m["dice"] == pytest.approx(2 * v1 / (v1 + v2), rel=0.02)
    assert m["precision"] == pytest.approx(v1 / v2, rel=0.03)
    assert m["recall"] == 1.0
    assert m["hd"] == pytest.approx(gap, abs=voxel)
    assert m["hd95"] == pytest.approx(gap, abs=voxel)
    assert m["hd95"] <= m["hd"]
    assert m["assd"] == pytest.approx(gap, abs=0.5 * voxel)
    assert m["surface_dice"] == 1.0
    assert segmentation_metrics(inner, outer, spacing, tolerance_mm=gap - voxel - 0.1)["surface_dice"] == 0.0


# ----------------------------------------------------------------------------------------------
# a second implementation: scipy's Euclidean distance transform
# ----------------------------------------------------------------------------------------------
def reference_metrics(ref: np.ndarray, pred: np.ndarray, spacing, tolerance: float) -> dict[str, float]:
    """Surface metrics from scipy.ndimage.distance_transform_edt on boundary voxels."""

    def boundary(m):
        padded = np.pad(m, 1)
        return (padded & ~ndimage.binary_erosion(padded))[(slice(1, -1),) * m.ndim]

    b_ref, b_pred = boundary(ref), boundary(pred)
    d_pred = ndimage.distance_transform_edt(~b_ref, sampling=spacing)[b_pred]
    d_ref = ndimage.distance_transform_edt(~b_pred, sampling=spacing)[b_ref]
    both = np.concatenate([d_pred, d_ref])
    tp = np.sum(ref & pred)
    return {
        "dice": 2 * tp / (ref.sum() + pred.sum()),
        "precision": tp / pred.sum(),
        "recall": tp / ref.sum(),
        "hd": both.max(),
        "hd95": max(np.percentile(d_pred, 95), np.percentile(d_ref, 95)),
        "assd": both.mean(),
        "surface_dice": np.mean(both <= tolerance),
    }


def random_pair(seed: int, shape) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.standard_normal(shape), 3)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2)
    ref = base > 0.05
    pred = base + 0.6 * noise > 0.05
    return ref, pred


@pytest.mark.parametrize(
    "seed,shape,spacing",
    [
        (0, (24, 40, 36), (2.0, 0.8, 0.8)),
        (1, (30, 30, 30), (0.7, 1.3, 1.0)),
        (2, (48, 56), (0.6, 1.1)),
        (3, (64, 40), (1.0, 1.0)),
    ],
)
@pytest.mark.parametrize("tolerance", [1.0, 3.0])
def test_against_scipy_distance_transform(seed, shape, spacing, tolerance):
    ref, pred = random_pair(seed, shape)
    assert ref.any() and pred.any() and (ref != pred).any()
    ours = segmentation_metrics(ref, pred, spacing, tolerance_mm=tolerance)
    theirs = reference_metrics(ref, pred, spacing, tolerance)
    for k, v in theirs.items():
        assert ours[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_cropping_does_not_change_metrics():
    ref, pred = random_pair(4, (20, 30, 30))
    spacing = (1.7, 0.9, 1.1)
    padded = [np.pad(m, ((3, 5), (0, 7), (9, 2))) for m in (ref, pred)]
    a = segmentation_metrics(ref, pred, spacing)
    b = segmentation_metrics(*padded, spacing)
    for k in METRICS:
        assert a[k] == pytest.approx(b[k], rel=1e-6), k


def test_crop_to_union_keeps_margin_and_all_voxels():
    a = np.zeros((10, 10, 10), dtype=bool)
    b = np.zeros_like(a)
    a[2, 3, 4] = True
    b[5, 6, 4] = True
    ca, cb = crop_to_union(a, b, margin=1)
    assert ca.shape == (6, 6, 3)
    assert ca.sum() == 1 and cb.sum() == 1


def test_mask_touching_image_border():
    """Voxels on the image border are boundary voxels (as if the image were padded with background)."""
    ref = np.zeros((6, 12, 12), dtype=bool)
    ref[:, :6, :] = True  # touches five image faces
    pred = np.zeros_like(ref)
    pred[:, :5, :] = True
    spacing = (3.0, 1.0, 0.5)
    ours = segmentation_metrics(ref, pred, spacing)
    theirs = reference_metrics(ref, pred, spacing, 5.0)
    for k in ("hd", "hd95", "assd", "surface_dice"):
        assert ours[k] == pytest.approx(theirs[k], rel=1e-5), k


# ----------------------------------------------------------------------------------------------
# empty masks
# ----------------------------------------------------------------------------------------------
def _masks(ref_empty: bool, pred_empty: bool):
    ref = np.zeros((8, 8, 8), dtype=bool)
    pred = np.zeros_like(ref)
    if not ref_empty:
        ref[2:5, 2:5, 2:5] = True
    if not pred_empty:
        pred[3:6, 3:6, 3:6] = True
    return ref, pred


@pytest.mark.parametrize(
    "ref_empty,pred_empty,expected",
    [
        (True, True, {"dice": None, "surface_dice": None, "precision": None, "recall": None}),
        (False, True, {"dice": 0.0, "surface_dice": 0.0, "precision": None, "recall": 0.0}),
        (True, False, {"dice": 0.0, "surface_dice": 0.0, "precision": 0.0, "recall": None}),
    ],
)
def test_empty_conventions(ref_empty, pred_empty, expected):
    ref, pred = _masks(ref_empty, pred_empty)
    with np.errstate(all="raise"):
        m = segmentation_metrics(ref, pred, (1.0, 2.0, 0.5))
    for k, v in expected.items():
        if v is None:
            assert np.isnan(m[k]), k
        else:
            assert m[k] == v, k
    for k in ("hd", "hd95", "assd"):  # undefined whenever one side is empty
        assert np.isnan(m[k]), k


def test_both_present_has_finite_distances():
    ref, pred = _masks(False, False)
    m = segmentation_metrics(ref, pred, (1.0, 2.0, 0.5))
    assert all(np.isfinite(m[k]) for k in METRICS)


@pytest.mark.parametrize(
    "ref_shape,pred_shape,spacing,tolerance",
    [
        ((4, 4, 4), (4, 4, 5), (1, 1, 1), 1.0),
        ((4, 4, 4), (4, 4, 4), (1, 1), 1.0),
        ((4, 4, 4), (4, 4, 4), (1, 0, 1), 1.0),
        ((4, 4, 4), (4, 4, 4), (1, 1, 1), -1.0),
        ((4,), (4,), (1,), 1.0),
    ],
)
def test_invalid_input_raises(ref_shape, pred_shape, spacing, tolerance):
    with pytest.raises(ValueError):
        segmentation_metrics(np.ones(ref_shape, bool), np.ones(pred_shape, bool), spacing, tolerance)


def test_slice_dice_matches_numpy():
    ref, pred = random_pair(5, (12, 30, 30))
    ref[3] = False
    pred[3] = False  # both empty in slice 3
    pred[7] = False  # missed slice
    got = slice_dice(ref, pred)
    for z in range(ref.shape[0]):
        r, p = ref[z], pred[z]
        denom = r.sum() + p.sum()
        if denom == 0:
            assert np.isnan(got[z])
        else:
            assert got[z] == pytest.approx(2 * np.sum(r & p) / denom, rel=1e-6)
    assert got[7] == 0.0 and np.isnan(got[3])
