"""Lesion shapes in mm and placement rules."""

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from nnunet_synth.generators.placement import PlacementRules, central_window, place_lesion
from nnunet_synth.generators.shapes import LABELFREE_RADIUS_MM, equivalent_diameter_mm, lesion_mask


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.8, 0.8), (0.7, 0.7)])
@pytest.mark.parametrize("size_class", ["tiny", "small", "medium"])
def test_lesion_size_is_in_mm_whatever_the_spacing(spacing, size_class):
    rng = np.random.default_rng(0)
    radius = LABELFREE_RADIUS_MM[size_class]
    radii = [equivalent_diameter_mm(int(lesion_mask(radius, spacing, rng).sum()), spacing) / 2 for _ in range(60)]
    # axis radii ~ U(0.75 r, 1.25 r): the equivalent radius averages close to r; voxelisation costs a little
    # at coarse spacing for tiny lesions
    tolerance = 0.2 if radius / max(spacing) < 2 else 0.1
    assert abs(np.mean(radii) - radius) / radius < tolerance, np.mean(radii)


def test_same_seed_same_mask_and_different_seed_differs():
    a = lesion_mask(8.0, (1.0, 1.0, 1.0), np.random.default_rng(5))
    b = lesion_mask(8.0, (1.0, 1.0, 1.0), np.random.default_rng(5))
    c = lesion_mask(8.0, (1.0, 1.0, 1.0), np.random.default_rng(6))
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def _scene():
    """A 40^3 patch: organ sphere of radius 15 voxels, a real tumour inside it, -1 outside the image."""
    shape = (40, 40, 40)
    grid = np.indices(shape) - 20
    organ = (grid ** 2).sum(0) <= 15 ** 2
    tumour = ((grid - np.array([0, 0, 8])[:, None, None, None]) ** 2).sum(0) <= 3 ** 2
    return organ & ~tumour, tumour


@pytest.mark.parametrize("seed", range(5))
def test_placed_lesion_stays_in_region_away_from_tumour_and_centred(seed):
    rng = np.random.default_rng(seed)
    organ, tumour = _scene()
    spacing = (1.0, 1.0, 1.0)
    rules = PlacementRules(margin_mm=2.0, gap_mm=3.0)
    window = central_window(organ.shape, (20, 20, 20))
    lesion = place_lesion(lesion_mask(4.0, spacing, rng), organ, organ, tumour, spacing, rng, rules, window)
    assert lesion is not None
    placed = np.zeros_like(organ)
    placed[lesion.bbox] = lesion.mask
    assert placed.any()
    assert not (placed & ~organ).any(), "lesion voxels outside the placement region"
    assert distance_transform_edt(~tumour)[placed].min() > rules.gap_mm, "lesion closer to the tumour than the gap"
    centre = [(s.start + s.stop - 1) / 2 for s in lesion.bbox]
    assert all(w.start - 4 <= c < w.stop + 4 for c, w in zip(centre, window))


def test_no_room_returns_none():
    rng = np.random.default_rng(0)
    empty = np.zeros((20, 20, 20), bool)
    assert place_lesion(lesion_mask(4.0, (1, 1, 1), rng), empty, empty, empty, (1, 1, 1), rng,
                        PlacementRules(), central_window(empty.shape, None)) is None


def test_central_window_is_centred():
    assert central_window((48, 80, 80), (32, 64, 64)) == (slice(8, 40), slice(8, 72), slice(8, 72))
    assert central_window((20, 30), (30, 30)) == (slice(0, 20), slice(0, 30))
