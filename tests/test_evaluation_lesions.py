"""Lesion-wise analysis (nnunet_synth.evaluation.lesions): components, diameters, matching, groups."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import pdist

from nnunet_synth.evaluation.lesions import (
    area_group,
    diameter_group,
    label_components,
    lesion_diameters,
    match_lesions,
    max_diameter,
)


def brute_force_diameter(mask: np.ndarray, spacing) -> float:
    """Largest distance between any two corners of any two voxels (no hull, no boundary shortcut)."""
    offsets = np.array(list(itertools.product((0, 1), repeat=mask.ndim)))
    corners = (np.argwhere(mask)[:, None, :] + offsets[None]).reshape(-1, mask.ndim) * np.asarray(spacing)
    return float(pdist(np.unique(corners, axis=0)).max())


@pytest.mark.parametrize("size", [(1, 1, 1), (3, 5, 2), (7, 1, 4), (10, 12, 6)])
@pytest.mark.parametrize("spacing", [(2.5, 0.8, 0.8), (1.0, 1.0, 1.0), (0.6, 1.4, 3.0)])
def test_box_diameter_closed_form(size, spacing):
    mask = np.zeros((14, 16, 10), dtype=bool)
    mask[tuple(slice(2, 2 + s) for s in size)] = True
    expected = np.sqrt(np.sum((np.array(size) * np.array(spacing)) ** 2))
    assert max_diameter(mask, spacing) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("size,spacing", [((4, 9), (0.5, 1.5)), ((1, 1), (1.0, 2.0)), ((20, 3), (1.0, 1.0))])
def test_rectangle_diameter_2d(size, spacing):
    mask = np.zeros((24, 12), dtype=bool)
    mask[1:1 + size[0], 2:2 + size[1]] = True
    assert max_diameter(mask, spacing) == pytest.approx(np.hypot(size[0] * spacing[0], size[1] * spacing[1]))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", [(2.0, 0.7, 0.7), (1.0, 1.3, 0.9)])
def test_diameter_against_brute_force(seed, spacing):
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.standard_normal((10, 14, 12)), 1.5) > 0.15
    assert mask.sum() > 20
    assert max_diameter(mask, spacing) == pytest.approx(brute_force_diameter(mask, spacing), rel=1e-12)


@pytest.mark.parametrize("spacing", [(2.5, 0.8, 0.8), (1.0, 1.0, 1.0)])
@pytest.mark.parametrize("radius", [6.0, 15.0, 31.0])
def test_ball_diameter_bounds(spacing, radius):
    """A voxelised ball of radius r (voxel centres inside) spans between 2r and 2r + one voxel diagonal."""
    shape = [int(2 * (radius + 4) / s) + 1 for s in spacing]
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)],
                        indexing="ij", sparse=True)
    mask = sum(g**2 for g in grids) <= radius**2
    d = max_diameter(mask, spacing)
    assert 2 * radius <= d <= 2 * radius + np.linalg.norm(spacing)


def test_flat_lesion_and_empty_mask():
    mask = np.zeros((5, 20, 20), dtype=bool)
    assert np.isnan(max_diameter(mask, (1, 1, 1)))
    mask[2, 3:13, 5:9] = True  # one slice thick: the centres are coplanar
    assert max_diameter(mask, (3.0, 1.0, 1.0)) == pytest.approx(np.sqrt(3.0**2 + 10**2 + 4**2))
    with pytest.raises(ValueError):
        max_diameter(mask, (1.0, 1.0))


def test_large_tumour_is_fast():
    spacing = (1.0, 0.7, 0.7)
    shape = (120, 240, 240)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij", sparse=True)
    mask = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, (60, 84, 84), (55, 80, 70), strict=True)) <= 1
    start = time.process_time()
    d = max_diameter(mask, spacing)
    assert time.process_time() - start < 5.0
    assert 160.0 <= d <= 160.0 + np.linalg.norm(spacing)


def test_components_use_full_connectivity():
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner neighbours: one lesion
    mask[4, 4, 4] = True  # separate
    labels, n = label_components(mask)
    assert n == 2
    assert labels[1, 1, 1] == labels[2, 2, 2] != labels[4, 4, 4]
    assert label_components(np.zeros((3, 3), bool))[1] == 0


def test_lesion_diameters_per_component():
    mask = np.zeros((10, 30, 30), dtype=bool)
    mask[1:3, 1:4, 1:5] = True
    mask[5:9, 10:25, 12:20] = True
    labels, n = label_components(mask)
    d = lesion_diameters(labels, n, (2.0, 1.0, 0.5))
    assert sorted(d) == pytest.approx(sorted([np.sqrt(4**2 + 3**2 + 2**2), np.sqrt(8**2 + 15**2 + 4**2)]))


def _lesion_scene():
    ref = np.zeros((10, 40, 40), dtype=bool)
    pred = np.zeros_like(ref)
    ref[2:6, 2:10, 2:10] = True  # lesion A: well predicted
    pred[2:6, 3:10, 2:10] = True
    ref[2:6, 20:30, 20:30] = True  # lesion B: touched by one voxel only
    pred[5, 29, 29] = True
    ref[7:9, 32:36, 2:6] = True  # lesion C: missed
    pred[7:9, 2:6, 32:36] = True  # false positive component
    return label_components(ref), label_components(pred)


@pytest.mark.parametrize("threshold,detected,matched", [(0.0, 2, 2), (0.5, 1, 1), (0.99, 0, 0)])
def test_match_lesions(threshold, detected, matched):
    (rl, nr), (pl, npred) = _lesion_scene()
    assert (nr, npred) == (3, 3)
    res = match_lesions(rl, nr, pl, npred, iou_threshold=threshold)
    assert res["n_detected"] == detected
    assert res["n_matched_predictions"] == matched
    assert res["detected"].sum() == detected
    a_label = rl[3, 5, 5]
    assert res["best_iou"][a_label - 1] == pytest.approx(7 / 8)


def test_match_lesions_empty_sides():
    (rl, nr), _ = _lesion_scene()
    empty = np.zeros_like(rl)
    res = match_lesions(rl, nr, empty, 0)
    assert res["n_detected"] == 0 and res["n_reference"] == 3 and res["n_prediction"] == 0
    res = match_lesions(empty, 0, rl, nr)
    assert res["n_matched_predictions"] == 0 and res["n_prediction"] == 3


@pytest.mark.parametrize(
    "diameter,group",
    [(0.5, "<=2cm"), (20.0, "<=2cm"), (20.01, "2-5cm"), (50.0, "2-5cm"), (50.1, ">5cm"), (float("nan"), None)],
)
def test_diameter_groups(diameter, group):
    assert diameter_group(diameter) == group


@pytest.mark.parametrize(
    "area,group",
    [(0, None), (1, "tiny"), (199, "tiny"), (200, "small"), (399, "small"), (400, "medium"), (699, "medium"),
     (700, "large"), (1599, "large"), (1600, "very large"), (10**6, "very large")],
)
def test_area_groups(area, group):
    assert area_group(area) == group
