"""The lesion pipeline's fast paths (benchmarks/lesion_cost.py) give the lesions their exact definitions give.

Each shortcut is compared with the definition it replaces: the deformed ellipsoid evaluated on a coarse grid with
the equation evaluated at every voxel, the compiled distance transform with SciPy's, the inside distance found in
the mask's box with the distance over the whole array, candidate centres drawn by rejection with a uniform draw
from the listed voxels, the compiled threshold of the interpolated quadric with the interpolation, the compiled
one-piece test with SciPy's labelling, the simplex window read axis by axis with SciPy's trilinear interpolation.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_erosion, distance_transform_edt, gaussian_filter, map_coordinates, zoom

from nnunet_synth.generators.appearance import signed_distance
from nnunet_synth.generators.placement import GridMask, candidate_centres, central_window
from nnunet_synth.generators.shapes import (
    ELASTIC_SMOOTHING,
    LABELFREE_RADIUS_MM,
    SIMPLEX_FEATURE,
    SIMPLEX_STEP,
    ellipsoid,
    resize_linear,
    sample_axis_radii,
    simplex_field,
)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 0.8), (0.7, 0.7)])
@pytest.mark.parametrize("deformation", ["elastic", "simplex"])
@pytest.mark.parametrize("size_class", ["medium", "large"])
def test_coarse_ellipsoid_matches_its_definition(spacing, deformation, size_class):
    """Same seed, same fields: the coarse-grid mask is the voxel-wise one up to sub-voxel differences, so sizes and
    surface (the shape statistics) are unchanged."""
    ndim = len(spacing)
    for seed in range(3):
        radii = sample_axis_radii(LABELFREE_RADIUS_MM[size_class], ndim, np.random.default_rng(100 + seed))
        smoothing = max((ELASTIC_SMOOTHING if deformation == "elastic" else SIMPLEX_FEATURE) * radii.mean(), 1.5)
        args = (radii, spacing, 0.15 * radii.mean(), smoothing, deformation)
        fast = ellipsoid(args[0], args[1], np.random.default_rng(seed), *args[2:])
        exact = ellipsoid(args[0], args[1], np.random.default_rng(seed), *args[2:], exact=True)
        assert fast.shape == exact.shape
        assert _dice(fast, exact) >= 0.98
        assert fast.sum() == pytest.approx(exact.sum(), rel=0.02)
        surface = [(m & ~binary_erosion(m)).sum() for m in (fast, exact)]
        assert surface[0] == pytest.approx(surface[1], rel=0.05)


def _signed_distance_whole_array(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """The definition: inside and outside distances over the whole array."""
    sp = np.asarray(spacing, dtype=float)
    half = 0.5 * float(sp.min())
    if mask.all():
        return distance_transform_edt(np.pad(mask, 1), sampling=sp)[(slice(1, -1),) * mask.ndim] - half
    inside = distance_transform_edt(mask, sampling=sp)
    outside = distance_transform_edt(~mask, sampling=sp)
    return np.where(mask, inside - half, half - outside)


@pytest.mark.parametrize("ndim", [2, 3])
def test_signed_distance_in_the_masks_box_is_the_whole_arrays(ndim):
    rng = np.random.default_rng(ndim)
    for case in range(12):
        shape = tuple(rng.integers(5, 25, ndim))
        spacing = tuple(rng.uniform(0.5, 3.0, ndim))
        mask = gaussian_filter(rng.normal(size=shape), 2) > rng.uniform(-0.1, 0.3)  # touches the array's edges
        if case == 0:
            mask[:] = True
        if case == 1:
            mask[:] = False
            mask[(0,) * ndim] = True
        distance, nearest = signed_distance(mask, spacing, nearest=True)
        np.testing.assert_allclose(distance, _signed_distance_whole_array(mask, spacing), atol=1e-9)
        assert not mask.any() or mask[tuple(nearest)].all(), "every voxel's nearest is a mask voxel"


@pytest.mark.parametrize("shape, spacing", [((23, 31, 17), (1.0, 1.0, 1.0)), ((12, 40, 33), (2.5, 0.8, 0.7)),
                                            ((45, 38), (0.7, 0.7)), ((60,), (1.3,)), ((1, 9, 30), (3.0, 0.5, 0.5))])
def test_feature_transform_is_scipys_distance_transform(shape, spacing):
    """The compiled transform gives SciPy's distances (bit for bit where the nearest seed is the same) and, for every
    voxel, a seed at that distance."""
    from nnunet_synth.generators.distance import feature_transform

    rng = np.random.default_rng(len(shape))
    for threshold in (1.0, 0.0, 2.5):
        field = gaussian_filter(rng.normal(size=shape), 1.5)
        seeds = field > threshold * field.std()
        seeds.flat[rng.integers(seeds.size)] = True
        distance, nearest = feature_transform(seeds, spacing)
        expected = distance_transform_edt(~seeds, sampling=spacing)
        np.testing.assert_allclose(distance, expected, rtol=1e-12, atol=0)
        assert (distance == expected).mean() > 0.99
        coords = np.unravel_index(nearest, shape)
        assert seeds[coords].all()
        to_nearest = np.sqrt(sum(((c - g) * s) ** 2 for c, g, s in zip(coords, np.indices(shape), spacing)))
        np.testing.assert_allclose(to_nearest, expected, rtol=1e-12, atol=1e-12)
        alone, none = feature_transform(seeds, spacing, nearest=False)
        assert none is None
        np.testing.assert_array_equal(alone, distance)
        # a limit: the same distances (and seeds) up to it, infinity past it
        limit = float(np.median(expected[expected > 0])) if (expected > 0).any() else 1.0
        for with_nearest in (True, False):
            near, near_seed = feature_transform(seeds, spacing, nearest=with_nearest, limit_mm=limit)
            np.testing.assert_array_equal(near[distance <= limit], distance[distance <= limit])
            assert np.isinf(near[distance > limit * (1 + 1e-9)]).all()
            if with_nearest:
                within = distance <= limit
                np.testing.assert_allclose(to_nearest[within], expected[within], rtol=1e-12, atol=1e-12)
                assert seeds[np.unravel_index(near_seed[within], shape)].all()
    with pytest.raises(ValueError, match="at least one seed"):
        feature_transform(np.zeros(shape, bool), spacing)


@pytest.mark.parametrize("shape", [(9, 14, 11), (17, 12), (2, 7, 5)])
@pytest.mark.parametrize("kind", ["cross", "cube", "ball"])
def test_shifted_morphology_is_scipys(shape, kind):
    """Erosion (borders 0 and 1), dilation, closing and opening by the cross and the cube as shifted logical
    operations give SciPy's results; other structures are SciPy's own."""
    from scipy import ndimage

    from nnunet_synth.generators import morphology

    ndim = len(shape)
    structure = {"cross": ndimage.generate_binary_structure(ndim, 1), "cube": np.ones((3,) * ndim, bool),
                 "ball": ndimage.generate_binary_structure(ndim, 1 if ndim == 2 else 2)}[kind]
    rng = np.random.default_rng(len(shape))
    for density in (0.3, 0.7, 0.95):
        mask = rng.random(shape) < density
        for border in (0, 1):
            np.testing.assert_array_equal(morphology.binary_erosion(mask, structure, border_value=border),
                                          ndimage.binary_erosion(mask, structure, border_value=border))
        np.testing.assert_array_equal(morphology.binary_dilation(mask, structure),
                                      ndimage.binary_dilation(mask, structure))
        np.testing.assert_array_equal(morphology.binary_closing(mask, structure),
                                      ndimage.binary_closing(mask, structure))
        np.testing.assert_array_equal(morphology.binary_opening(mask, structure),
                                      ndimage.binary_opening(mask, structure))


@pytest.mark.parametrize("shape", [(9, 14, 11), (17, 12), (1, 7, 5)])
def test_neighbourhood_range_is_scipys_maximum_minus_minimum(shape):
    from scipy.ndimage import maximum_filter, minimum_filter

    from nnunet_synth.generators.morphology import neighbourhood_range

    rng = np.random.default_rng(3)
    array = np.round(rng.normal(size=shape), 1).astype(np.float32)  # ties, as constant fill has
    np.testing.assert_array_equal(neighbourhood_range(array),
                                  maximum_filter(array, size=3) - minimum_filter(array, size=3))


def _two_boxes(shape: tuple[int, ...], sizes: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Region of two disjoint cubes of the given side lengths, and each cube alone."""
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[2:2 + sizes[0], 2:2 + sizes[0], 2:2 + sizes[0]] = True
    b[-2 - sizes[1]:-2, -2 - sizes[1]:-2, -2 - sizes[1]:-2] = True
    return a | b, a, b


@pytest.mark.parametrize("sides, path", [((8, 12), "rejection"), ((2, 3), "listing")])
def test_candidate_centres_are_uniform_over_the_region(sides, path):
    """Distinct voxels of the region, in the window, each voxel as likely as any other: the two cubes are hit in
    proportion to their volumes, whether drawn by rejection (dense region) or from the listed voxels (sparse)."""
    shape = (40, 40, 40)
    region, a, b = _two_boxes(shape, sides)
    assert (region.mean() > 0.02) == (path == "rejection")
    rng = np.random.default_rng(0)
    window = central_window(shape, None)
    hits_a = total = 0
    for _ in range(300):
        centres = candidate_centres(region, None, window, rng, 5)
        assert len(centres) == 5 and len({tuple(c) for c in centres}) == 5
        assert region[tuple(centres.T)].all()
        hits_a += int(a[tuple(centres.T)].sum())
        total += len(centres)
    expected = a.sum() / region.sum()
    assert hits_a / total == pytest.approx(expected, abs=4 * np.sqrt(expected * (1 - expected) / total))


@pytest.mark.parametrize("origin, hole", [((0, 0, 0), False), ((3, 1, 2), True)])
def test_candidate_centres_from_a_depth_grid_are_uniform_over_its_voxels(origin, hole):
    """Drawn from the deep grid's blocks (cut by the window and an offset origin), then checked against the region
    and the tumours: still each allowed voxel of the window as likely as any other."""
    shape, step = (40, 40, 40), np.array([4, 4, 4])
    coarse = np.zeros((12, 12, 12), bool)
    coarse[1:3, 1:4, 1:3] = True  # cut by the window
    coarse[6:8, 6:9, 6:9] = True
    deep = GridMask(coarse, step, shape, origin)
    region = np.ones(shape, bool)
    tumour = np.zeros(shape, bool)
    if hole:  # most of one block outside the region, a tumour in another
        region[:10, :10, :10] = False
        tumour[24:30, 24:30, 24:30] = True
    window = central_window(shape, (30, 30, 30))
    pool = np.zeros(shape, bool)
    pool[window] = (deep[window] & region[window] & ~tumour[window])
    low = np.zeros(shape, bool)
    low[:20, :20, :20] = True
    rng = np.random.default_rng(0)
    hits = total = 0
    for _ in range(300):
        centres = candidate_centres(region, deep, window, rng, 5, excluded=tumour)
        assert len(centres) == 5 and len({tuple(c) for c in centres}) == 5
        assert pool[tuple(centres.T)].all()
        hits += int(low[tuple(centres.T)].sum())
        total += len(centres)
    expected = (pool & low).sum() / pool.sum()
    assert 0.05 < expected < 0.95
    assert hits / total == pytest.approx(expected, abs=4 * np.sqrt(expected * (1 - expected) / total))
    sparse = np.zeros_like(coarse)
    sparse[7, 7, 7] = True  # one block: 64 voxels, fewer than rejection needs to find 80 -> listed
    found = candidate_centres(region, GridMask(sparse, step, shape, origin), window, rng, 80, excluded=tumour)
    assert len(found) == int((GridMask(sparse, step, shape, origin)[window] & region[window] & ~tumour[window]).sum())


def test_whole_placement_probing_border_voxels_first_places_what_the_full_check_places(monkeypatch):
    """The probe only refuses centres the whole-mask check refuses: the same lesions, from the same draws."""
    from nnunet_synth.generators import placement
    from nnunet_synth.generators.shapes import lesion_mask

    outcomes = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        shape, spacing = (40, 64, 64), (2.0, 1.0, 1.0)
        region = gaussian_filter(rng.normal(size=shape), 4) > 0  # irregular, with holes
        tumour = np.zeros(shape, bool)
        tumour[10:20, 20:34, 30:44] = True
        mask = lesion_mask(9.0, spacing, rng)
        border = placement.border_points(mask, 64)
        assert len(border) == 64 and mask[tuple(border.T)].all()
        assert not binary_erosion(mask)[tuple(border.T)].any(), "a probe point that is not on the border"
        placed = []
        for probe in (placement.PROBE_POINTS, 0):
            monkeypatch.setattr(placement, "PROBE_POINTS", probe)
            lesions = [placement.place_lesion(mask, region & ~tumour, region, tumour, spacing,
                                              np.random.default_rng(k), placement.PlacementRules(),
                                              central_window(shape, None), attempts=40, whole=True)
                       for k in range(6)]
            placed.append([None if le is None else (le.bbox, le.mask.tobytes()) for le in lesions])
        assert placed[0] == placed[1], f"seed {seed}: the probe changed what was placed"
        outcomes += [p is not None for p in placed[0]]
    assert any(outcomes) and not all(outcomes), "every draw placed, or none: nothing compared"


def test_candidate_centres_respect_window_and_centres():
    shape = (30, 30, 30)
    region = np.ones(shape, bool)
    deep = np.zeros(shape, bool)
    deep[10:20, 10:20, 10:20] = True
    window = central_window(shape, (12, 12, 12))
    centres = candidate_centres(region, deep, window, np.random.default_rng(1), 40)
    assert len(centres) == 40
    assert deep[tuple(centres.T)].all()
    assert all(s.start <= c < s.stop for row in centres for c, s in zip(row, window))
    assert len(candidate_centres(np.zeros(shape, bool), None, window, np.random.default_rng(1), 5)) == 0


@pytest.mark.parametrize("source, target", [((20, 21, 22), (45, 50, 47)), ((5, 6), (17, 30)), ((1, 4, 5), (1, 9, 13)),
                                            ((4, 4, 4), (4, 9, 4))])
def test_resize_linear_is_scipy_zoom_order_one(source, target):
    array = np.random.default_rng(0).normal(size=source).astype(np.float32)
    expected = zoom(array, [t / s for s, t in zip(source, target)], order=1, grid_mode=False)
    resized = resize_linear(array, target)
    assert resized.shape == target and resized.dtype == np.float32
    np.testing.assert_allclose(resized, expected, atol=1e-5)


@pytest.mark.parametrize("shape, spacing, feature_mm", [((31, 33, 29), (1.0, 1.0, 1.0), 8.0),
                                                        ((12, 40, 36), (2.5, 0.8, 0.8), 5.0),
                                                        ((50, 45), (0.7, 0.7), 6.0),
                                                        ((60, 70, 64), (1.5, 1.0, 1.0), 2.0)])  # wider than the lattice
@pytest.mark.parametrize("seed", range(3))
def test_simplex_window_is_scipys_trilinear_read_of_the_lattice(shape, spacing, feature_mm, seed):
    from nnunet_synth.generators.shapes import _SIMPLEX_LATTICE

    field = simplex_field(shape, np.asarray(spacing), feature_mm, np.random.default_rng(seed))
    lattice, rng = _SIMPLEX_LATTICE[0], np.random.default_rng(seed)  # the same draws, in the same order
    steps = [np.arange(n) * s / feature_mm / SIMPLEX_STEP for n, s in zip(shape, spacing)]
    room = np.maximum(lattice.shape[0] - 1 - np.array([st[-1] for st in steps]), 0)
    grid = list(np.meshgrid(*[st + o for st, o in zip(steps, rng.uniform(0, room))], indexing="ij"))
    if len(shape) == 2:
        grid.append(np.full_like(grid[0], rng.uniform(0, lattice.shape[0] - 1)))
    order = rng.permutation(3)
    expected = map_coordinates(lattice, [grid[i] for i in order], order=1, mode="mirror")
    assert field.shape == shape and field.dtype == np.float32
    np.testing.assert_allclose(field, expected, atol=1e-5)


def _paint_whole_box(image, bbox, mask, spacing, values, sigma, offset, halo, clips=None, additive=False,
                     tissue=None):
    """The definition paint_lesion evaluates on the changed voxels alone: every array over the whole box."""
    from scipy.special import ndtr

    from nnunet_synth.generators.appearance import MIN_RING_VOXELS, RING_MM, expand_box, ring, ring_statistics

    box, inner = expand_box(bbox, max(halo, RING_MM[1]), spacing, image.shape[1:])
    m = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    m[inner] = mask
    distance, nearest = signed_distance(m, spacing, nearest=True)
    weight = ndtr((distance - offset) / sigma)
    weight[distance < 0.5 * min(spacing) - halo] = 0.0
    changed = weight > 0
    ring_voxels = ring(distance, None if tissue is None else tissue[box] & ~m)
    if ring_voxels.sum() < MIN_RING_VOXELS and tissue is not None:
        ring_voxels = ring(distance)
    if ring_voxels.sum() < MIN_RING_VOXELS and not additive:
        ring_voxels = ~m
    for c in range(image.shape[0]):
        region = image[c][box]
        tumour = np.zeros(m.shape)
        tumour[m] = values[c]
        tumour = tumour[tuple(nearest)]
        if additive:
            shared = float((weight[m] * tumour[m]).mean())
            new = region + weight * tumour * (float(np.mean(values[c])) / shared)
        else:
            centre, spread = ring_statistics(region, ring_voxels)
            new = weight * (centre + spread * tumour) + (1 - weight) * region
        if clips is not None and clips[c] is not None:
            new = np.clip(new, *clips[c])
        region[changed] = new[changed]


@pytest.mark.parametrize("spacing, additive, clip", [((1.0, 1.0, 1.0), False, None), ((2.5, 0.8, 0.8), True, None),
                                                     ((0.7, 0.7), False, (-0.5, 1.5)), ((1.0, 1.0, 1.0), True,
                                                                                        (-1.0, 1.2))])
def test_paint_lesion_on_changed_voxels_is_the_whole_box_definition(spacing, additive, clip):
    """paint_lesion evaluates the edge, the outward carry and the blend on the voxels it changes only; the image it
    writes is the one the whole-box formulas give (edge cut at the halo, ring statistics, clips)."""
    from nnunet_synth.generators.appearance import paint_lesion

    rng = np.random.default_rng(7)
    ndim = len(spacing)
    shape = (40,) * ndim
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    radii = sample_axis_radii(LABELFREE_RADIUS_MM["small"], ndim, rng)
    mask = ellipsoid(radii, spacing, rng, 0.15 * radii.mean(), 3.0)
    start = [(n - s) // 2 for n, s in zip(shape, mask.shape)]
    bbox = tuple(slice(a, a + s) for a, s in zip(start, mask.shape))
    values = rng.normal(0.5, 1.0, size=(2, int(mask.sum())))
    tissue = rng.random(shape) > 0.3
    # then: an edge complete a few mm inside (inside distances only that deep), edges complete at the shallowest
    # inside voxel (none) and edges that reach no voxel outside the mask (no nearest mask voxels), as sharp real
    # edges give
    for sigma, offset, halo in [(0.8, 0.0, 2.0), (1.5, 0.5, 3.25), (0.01, 0.0, 40.0), (0.4, 0.2, 1.5),
                                (0.09, -0.3, 0.52), (0.2, 0.0, 0.5)]:
        fast, reference = image.copy(), image.copy()
        args = (bbox, mask, spacing, values, sigma, offset, halo, [clip, None])
        paint_lesion(fast, *args, additive=additive, tissue=None if additive else tissue)
        _paint_whole_box(reference, *args, additive=additive, tissue=None if additive else tissue)
        assert (fast != image).any()
        np.testing.assert_allclose(fast, reference, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(fast == image, reference == image)  # the same voxels stay bit-identical


@pytest.mark.parametrize("spacing, gap", [((1.0, 1.0, 1.0), 2.0), ((2.5, 0.8, 0.8), 3.0), ((0.7, 0.7), 1.4)])
def test_gap_check_in_the_tumours_box_is_the_whole_lesions_dilation(spacing, gap):
    """The gap check dilates the lesion only near the tumour voxels; it decides as the whole dilated lesion does."""
    from nnunet_synth.generators.placement import _halo, _halo_pad, _LazyHalo, too_close

    rng = np.random.default_rng(3)
    sp = np.asarray(spacing)
    radii = sample_axis_radii(LABELFREE_RADIUS_MM["small"], len(spacing), rng)
    mask = ellipsoid(radii, spacing, rng, 0.15 * radii.mean(), 3.0)
    pad = _halo_pad(sp, gap)
    whole = distance_transform_edt(~np.pad(mask, [(p, p) for p in pad]), sampling=sp) <= gap
    decisions, built = [], 0
    for _ in range(200):
        tumour = np.zeros(whole.shape, dtype=bool)
        corner = rng.integers(0, whole.shape)
        size = rng.integers(1, 4, size=len(spacing))
        tumour[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
        decisions.append(too_close(mask, tumour, sp, gap))
        assert decisions[-1] == bool((tumour & whole).any())
        shared = _LazyHalo(mask, sp, gap)
        shared.spent = shared.size  # the whole dilation serves this check
        assert too_close(mask, tumour, sp, gap, shared) == decisions[-1]
        built += shared.array is not None  # (an outright overlap decides without any dilation)
        if shared.array is not None:
            np.testing.assert_array_equal(shared.array, _halo(mask, sp, gap))
    assert 0 < sum(decisions) < len(decisions)  # both answers were tested
    assert built > 0  # and the whole dilation was used


@pytest.mark.parametrize("shape, step", [((61, 77, 73), (3, 3, 3)), ((10, 33, 30), (1, 3, 3)), ((40, 41), (2, 5)),
                                         ((30,), (4,)), ((9, 9, 9), (1, 1, 1))])
def test_threshold_of_the_interpolated_grid_is_the_interpolations(shape, step):
    """The compiled threshold decides cells whole where their corners agree and interpolates the rest; the mask is
    the interpolated grid's (resize_linear) thresholded."""
    from nnunet_synth.generators.kernels import linear_at_most

    rng = np.random.default_rng(len(shape))
    coarse = tuple(int(np.ceil((n - 1) / s)) + 1 for n, s in zip(shape, step))
    grid = np.meshgrid(*[np.linspace(-1.3, 1.3, c) for c in coarse], indexing="ij")
    quadric = (sum(g ** 2 for g in grid) + 0.1 * rng.normal(size=coarse)).astype(np.float32)
    fine = tuple((c - 1) * s + 1 for c, s in zip(coarse, step))
    expected = resize_linear(quadric, fine)[tuple(slice(0, n) for n in shape)] <= 1.0
    mask = linear_at_most(quadric, np.array(step), shape, 1.0)
    assert mask.shape == shape and 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_one_piece_test_is_scipys_labelling(ndim):
    from scipy.ndimage import generate_binary_structure, label

    from nnunet_synth.generators.kernels import face_connected
    from nnunet_synth.generators.placement import largest_component

    rng = np.random.default_rng(ndim)
    answers = set()
    for _ in range(150):
        mask = rng.random((5, 6, 7)[:ndim]) < rng.uniform(0.3, 0.95)
        if not mask.any():
            continue
        pieces = label(mask, generate_binary_structure(ndim, 1))[1]
        assert face_connected(mask) == (pieces == 1)
        answers.add(pieces == 1)
        full, n = label(mask, np.ones((3,) * ndim, bool))
        largest = full == np.argmax(np.bincount(full.ravel())[1:]) + 1
        np.testing.assert_array_equal(largest_component(mask), largest if n > 1 else mask)
    assert answers == {True, False}


@pytest.mark.parametrize("shape", [(20, 24, 18), (30, 25)])
def test_label_mask_reads_as_the_whole_comparison(shape):
    """Placement reads the organ and tumour masks of a patch where it looks only; every crop and every set of points
    reads as the whole array ``seg == label`` with the placed lesions or-ed in."""
    from nnunet_synth.generators.placement import LabelMask

    rng = np.random.default_rng(len(shape))
    seg = rng.integers(-1, 3, size=shape).astype(np.int16)
    lazy, whole = LabelMask(seg, 2), seg == 2
    for _ in range(3):  # lesions placed one after the other, some reaching the array's edge
        start = rng.integers(0, np.array(shape) - 3)
        size = rng.integers(3, 9, len(shape))
        bbox = tuple(slice(int(a), int(min(a + s, n))) for a, s, n in zip(start, size, shape))
        mask = rng.random(tuple(b.stop - b.start for b in bbox)) < 0.6
        lazy.add(bbox, mask)
        whole[bbox] |= mask
        for _ in range(20):
            lo = rng.integers(0, shape)
            hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, shape)]
            crop = tuple(slice(int(a), b) for a, b in zip(lo, hi))
            np.testing.assert_array_equal(lazy[crop], whole[crop])
            points = tuple(rng.integers(0, n, 50) for n in shape)
            np.testing.assert_array_equal(lazy[points], whole[points])
        full = tuple(slice(None) for _ in shape)
        np.testing.assert_array_equal(lazy[full], whole)
