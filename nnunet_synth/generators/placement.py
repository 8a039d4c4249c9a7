"""Where a lesion may go: inside the organ, away from real tumours, centred in the central window.

All checks are local to the lesion's bounding box and candidate centres are drawn by rejection, so placing costs
about as much as the lesion itself, whatever the size of the patch or volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import generate_binary_structure
from scipy.ndimage import label as connected_components

from nnunet_synth.generators.base import Lesion
from nnunet_synth.generators.morphology import binary_erosion
from nnunet_synth.generators.shapes import bounding_box, repeat_to

# a lesion placed whole is first checked at this many of its border voxels: most centres that leave no room for it
# fail there, before the gap to tumours and the whole mask are checked
PROBE_POINTS = 512

# candidate centres are drawn by rejection in at most this many rounds of this many points per wanted centre:
# enough for a region of 2% of the window to give them with near certainty
REJECTION_ROUNDS, REJECTION_BATCH = 4, 64


@dataclass(frozen=True)
class PlacementRules:
    """Constraints on where a lesion may be placed.

    Attributes:
        margin_mm: the lesion centre lies at least this far inside the organ.
        gap_mm: no lesion voxel within this distance of an existing tumour voxel.
        min_inside: share of the lesion that must fall inside the allowed region before it is clipped to it
            (organ-label datasets; without an organ label a lesion is placed whole or not at all).
    """

    margin_mm: float = 2.0
    gap_mm: float = 2.0
    min_inside: float = 0.8

    def relaxed(self) -> PlacementRules:
        """The one relaxation tried when nothing fits: no margin, half inside; the gap to tumours stays."""
        return PlacementRules(margin_mm=0.0, gap_mm=self.gap_mm, min_inside=min(self.min_inside, 0.5))


class LabelMask:
    """``seg == label`` of a patch, evaluated only where it is read (crops and points), with the voxels of lesions
    placed since (:meth:`add`): the organ and tumour masks that placement reads around a few candidate centres,
    without a pass over the patch.

    Args:
        seg: (*spatial) labels.
        label: the label.
    """

    def __init__(self, seg: np.ndarray, label: int):
        self.seg, self.label = seg, label
        self.shape, self.ndim = seg.shape, seg.ndim
        self._added: list[tuple[tuple[slice, ...], np.ndarray]] = []

    def add(self, bbox: tuple[slice, ...], mask: np.ndarray) -> None:
        """Voxels of ``mask`` (at ``bbox``) read True from now on."""
        self._added.append((bbox, mask))

    def __getitem__(self, key: tuple) -> np.ndarray:
        out = np.asarray(self.seg[key] == self.label)
        for bbox, mask in self._added:
            if all(isinstance(k, slice) for k in key):  # a crop: the part of the lesion inside it
                span = [k.indices(n)[:2] for k, n in zip(key, self.shape)]
                part, _, dst = _crop(mask, np.array([a - b.start for (a, _), b in zip(span, bbox)]),
                                     tuple(z - a for a, z in span))
                out[dst] |= part
            else:  # points: one index array per axis
                points = np.stack([np.asarray(k) for k in key])
                inside = np.all([(p >= b.start) & (p < b.stop) for p, b in zip(points, bbox)], axis=0)
                out[inside] |= mask[tuple(p[inside] - b.start for p, b in zip(points, bbox))]
        return out


class GridMask:
    """A bool grid (one value per block of ``step`` voxels) read as voxels, only where indexed: at points (one index
    array per axis) or crops (slices), as placement reads candidate centres; voxels off the grid read False.

    Args:
        coarse: the grid's values.
        step: voxels per grid point along each axis.
        shape: the voxel array's shape.
        origin: where the voxel array's first voxel lies in the grid's frame (default: on grid point 0's first voxel).
    """

    def __init__(self, coarse: np.ndarray, step: np.ndarray, shape: tuple[int, ...],
                 origin: tuple[int, ...] | None = None):
        self.coarse, self.step, self.shape = coarse, np.asarray(step, dtype=int), tuple(shape)
        self.origin = np.zeros(len(shape), dtype=int) if origin is None else np.asarray(origin, dtype=int)
        self.ndim = len(shape)
        self._cells: tuple[tuple, tuple[np.ndarray, np.ndarray]] | None = None  # the last window's blocks

    def __getitem__(self, key: tuple) -> np.ndarray:
        if all(isinstance(k, slice) for k in key):  # a crop: the grid's blocks that cover it, repeated
            span = [k.indices(n)[:2] for k, n in zip(key, self.shape)]
            lo = np.array([a for a, _ in span]) + self.origin
            hi = np.array([b for _, b in span]) + self.origin
            first, last = lo // self.step, -(-hi // self.step)
            blocks = np.zeros(tuple(last - first), dtype=bool)  # False off the grid
            a, b = np.maximum(first, 0), np.minimum(last, self.coarse.shape)
            if (b > a).all():
                blocks[tuple(slice(x - f, y - f) for x, y, f in zip(a, b, first))] = self.coarse[
                    tuple(slice(x, y) for x, y in zip(a, b))]
            voxels = repeat_to(blocks, self.step, tuple((last - first) * self.step))
            return np.ascontiguousarray(voxels[tuple(slice(x - f * s, y - f * s) for x, y, f, s in
                                                     zip(lo, hi, first, self.step))])
        return self._read([np.asarray(k) for k in key])

    def cells(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The voxel boxes ``[lower, upper)`` (two (k, ndim) arrays) of the True grid points' blocks, clipped to
        the voxels ``[lo, hi)``, empty ones dropped (kept for the next query of the same window: one lesion size's
        feasibility check and both rule sets' candidate draws ask for the same)."""
        key = (tuple(int(v) for v in lo), tuple(int(v) for v in hi))
        if self._cells is None or self._cells[0] != key:
            self._cells = key, self._blocks(np.asarray(lo), np.asarray(hi))
        return self._cells[1]

    def _blocks(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first = np.maximum((lo + self.origin) // self.step, 0)
        last = np.minimum(-(-(hi + self.origin) // self.step), self.coarse.shape)
        if (last <= first).any():
            return np.zeros((0, self.ndim), dtype=int), np.zeros((0, self.ndim), dtype=int)
        points = np.argwhere(self.coarse[tuple(slice(a, b) for a, b in zip(first, last))]) + first
        lower = np.maximum(points * self.step - self.origin, lo)
        upper = np.minimum((points + 1) * self.step - self.origin, hi)
        keep = (upper > lower).all(1)
        return lower[keep], upper[keep]

    def _read(self, voxels: list[np.ndarray]) -> np.ndarray:
        grid = [(v + o) // s for v, o, s in zip(voxels, self.origin, self.step)]
        inside = np.ones(np.broadcast_shapes(*(g.shape for g in grid)), dtype=bool)
        for g, n in zip(grid, self.coarse.shape):
            inside &= (g >= 0) & (g < n)
        out = np.zeros(inside.shape, dtype=bool)
        clipped = [np.broadcast_to(np.clip(g, 0, n - 1), inside.shape) for g, n in zip(grid, self.coarse.shape)]
        out[inside] = self.coarse[tuple(c[inside] for c in clipped)]
        return out


def central_window(shape: tuple[int, ...], window: tuple[int, ...] | None) -> tuple[slice, ...]:
    """Slices of the centred ``window`` (nnU-Net's final patch size) inside an enlarged patch of ``shape``."""
    if window is None:
        return tuple(slice(0, n) for n in shape)
    starts = [max(0, (n - w) // 2) for n, w in zip(shape, window)]
    return tuple(slice(s, min(n, s + w)) for s, n, w in zip(starts, shape, window))


def place_lesion(mask: np.ndarray, allowed: np.ndarray, organ: np.ndarray, tumour: np.ndarray,
                 spacing: tuple[float, ...], rng: np.random.Generator, rules: PlacementRules,
                 window: tuple[slice, ...], attempts: int = 20, whole: bool = False,
                 centres: np.ndarray | None = None, texture: np.ndarray | None = None,
                 one_piece: bool = False) -> Lesion | None:
    """Places a lesion mask in a patch, trying the rules, then their relaxation once.

    A placed lesion is always one connected piece: clipped to ``allowed`` and reduced to its largest component
    (which must hold ``min_inside`` of the mask), or with ``whole`` placed only where every voxel is allowed (the
    array's edge may cut it, keeping ``min_inside`` of it: a patch's edge cuts real tumours too).

    Args:
        mask: bool lesion mask cropped to its bounding box.
        allowed: bool, voxels a lesion may occupy (organ, minus -1/ignore voxels), less ``tumour`` (an array or
            a :class:`LabelMask`, as ``organ``).
        organ: bool, the organ (placement region) of the patch.
        tumour: existing tumour voxels (real and placed, a :class:`LabelMask`); never occupied, and kept ``gap_mm``
            away from.
        spacing: voxel spacing in mm.
        rng: random generator.
        rules: placement constraints.
        window: slices of the central window the lesion centre must lie in.
        attempts: candidate centres tried per rule set.
        whole: place the lesion unclipped, entirely inside ``allowed``, or not at all.
        centres: bool, where a centre may be drawn (default: anywhere in ``allowed``), e.g. deep enough inside
            the region for a whole lesion.
        texture: (C, *mask.shape) texture of the mask (template masks); the placed lesion carries it cropped
            as its mask is.
        one_piece: ``mask`` is one connected piece already (the component search is skipped where nothing of it
            is cut away).

    Returns:
        The placed lesion, or None when nothing fits.
    """
    sp = np.asarray(spacing, dtype=float)
    probe = None
    for rule in (rules, rules.relaxed()):
        candidates = candidate_centres(allowed, centres, window, rng, attempts, excluded=tumour)
        if len(candidates) == 0:
            return None
        if whole and probe is None:
            probe = border_points(mask, PROBE_POINTS)
        halo = _LazyHalo(mask, sp, rule.gap_mm)
        for centre in candidates:
            lesion = _try(mask, halo, centre, allowed, organ, tumour, sp, rule, whole, texture, one_piece, probe)
            if lesion is not None:
                return lesion
    return None


def candidate_centres(allowed: np.ndarray, centres: np.ndarray | None, window: tuple[slice, ...],
                      rng: np.random.Generator, n: int, excluded: np.ndarray | None = None) -> np.ndarray:
    """Up to ``n`` distinct voxels of ``allowed`` (and ``centres``, less ``excluded``) inside ``window``, uniformly
    at random and in random order, as (k, ndim) indices.

    Drawn by rejection from the window, which reads only the drawn voxels: a lesion costs nothing that scales with
    the volume. Where ``centres`` is a :class:`GridMask` (deep enough inside the region for a whole lesion), the
    points are drawn from its True blocks instead (uniformly over their voxels, then the same rejection): a deep
    region is often a small part of the window. Where the region is too sparse for rejection (under about 2% of
    what is drawn from), the region's voxels are listed instead.
    """
    lo = np.array([s.start for s in window])
    hi = np.array([s.stop for s in window])
    if (hi <= lo).any():
        return np.zeros((0, len(window)), dtype=int)
    blocks = centres.cells(lo, hi) if isinstance(centres, GridMask) else None
    if blocks is not None:
        if len(blocks[0]) == 0:
            return np.zeros((0, len(window)), dtype=int)
        sizes = np.prod(blocks[1] - blocks[0], axis=1).astype(float)
        lo, hi = blocks[0].min(0), blocks[1].max(0)  # the listing below needs no more than the blocks' box
    found = np.zeros((0, len(window)), dtype=int)
    for _ in range(REJECTION_ROUNDS):
        if blocks is None:
            points = rng.integers(lo, hi, size=(REJECTION_BATCH * n, len(window)))
        else:  # a block by its voxel count, then a voxel in it: uniform over the blocks' voxels
            picked = rng.choice(len(sizes), size=REJECTION_BATCH * n, p=sizes / sizes.sum())
            points = rng.integers(blocks[0][picked], blocks[1][picked])
        where = tuple(points.T)
        hit = allowed[where]
        if centres is not None and blocks is None:
            hit &= centres[where]
        if excluded is not None:
            hit &= ~excluded[where]
        found = _first_unique(np.concatenate([found, points[hit]]), hi)
        if len(found) >= n:
            return found[:n]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    pool = allowed[box] if centres is None else allowed[box] & centres[box]
    if excluded is not None:
        pool = pool & ~excluded[box]
    flat = np.flatnonzero(pool)
    picked = rng.choice(flat, size=min(n, flat.size), replace=False)
    return np.stack(np.unravel_index(picked, pool.shape), axis=1) + lo if picked.size else found[:0]


def _first_unique(points: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """``points`` without repeats, each kept where it first occurs (the draw order stays random)."""
    flat = np.ravel_multi_index(tuple(points.T), tuple(shape))
    _, first = np.unique(flat, return_index=True)
    return points[np.sort(first)]


class _LazyHalo:
    """The whole dilated lesion (:func:`_halo`), built once the local checks of one lesion have dilated as many
    voxels as it holds (then reused by every later check), never where tumours stay far."""

    def __init__(self, mask: np.ndarray, spacing: np.ndarray, gap_mm: float):
        self.mask, self.spacing, self.gap_mm = mask, spacing, gap_mm
        self.size = int(np.prod(np.array(mask.shape) + 2 * _halo_pad(spacing, gap_mm)))
        self.spent, self.array = 0, None

    def worth_building(self, local_size: int) -> bool:
        """Records a local check of ``local_size`` voxels; True where the whole halo should serve it instead."""
        if self.array is None and self.spent + local_size > self.size:
            self.array = _halo(self.mask, self.spacing, self.gap_mm)
        self.spent += local_size
        return self.array is not None


def too_close(mask: np.ndarray, tumour: np.ndarray, spacing: np.ndarray, gap_mm: float,
              halo: _LazyHalo | None = None) -> bool:
    """Whether a tumour voxel lies within ``gap_mm`` of the mask.

    Args:
        mask: bool lesion mask.
        tumour: bool tumour voxels in the frame of ``mask`` grown by :func:`_halo_pad` on every side.
        spacing: voxel spacing (mm).
        gap_mm: the gap (> 0).
        halo: the lesion's whole dilation, shared by the checks of one lesion: once the local checks have cost as
            much as it, it is built and used.

    Otherwise the lesion is dilated only in the box of the tumour voxels grown by the gap (a voxel's distance from
    the mask depends on mask voxels within the gap alone), not over the whole lesion.
    """
    if not tumour.any():
        return False
    pad = _halo_pad(spacing, gap_mm)
    if (tumour[tuple(slice(p, p + n) for p, n in zip(pad, mask.shape))] & mask).any():
        return True  # overlapping outright: no distance needed
    box = bounding_box(tumour)
    lo = np.maximum([b.start for b in box] - pad, 0)
    hi = np.minimum([b.stop for b in box] + pad, tumour.shape)
    if halo is not None and halo.worth_building(int(np.prod(hi - lo))):
        return bool((tumour & halo.array).any())
    # the mask's part of that box (the mask sits at ``pad`` in the grown frame)
    part = np.zeros(tuple(hi - lo), dtype=bool)
    src = tuple(slice(max(a - p, 0), max(min(b - p, n), max(a - p, 0))) for a, b, p, n in zip(lo, hi, pad, mask.shape))
    dst = tuple(slice(s.start + p - a, s.stop + p - a) for s, a, p in zip(src, lo, pad))
    part[dst] = mask[src]
    if not part.any():
        return False
    from nnunet_synth.generators.distance import feature_transform  # numba: imported when first needed

    near = feature_transform(part, spacing, nearest=False, limit_mm=gap_mm)[0] <= gap_mm
    return bool((near & tumour[tuple(slice(a, b) for a, b in zip(lo, hi))]).any())


def _halo(mask: np.ndarray, spacing: np.ndarray, gap_mm: float) -> np.ndarray:
    """The lesion dilated by ``gap_mm`` (padded by :func:`_halo_pad` so the dilation fits)."""
    from nnunet_synth.generators.distance import feature_transform

    padded = np.pad(mask, [(p, p) for p in _halo_pad(spacing, gap_mm)])
    return feature_transform(padded, spacing, nearest=False, limit_mm=gap_mm)[0] <= gap_mm


def _halo_pad(spacing: np.ndarray, gap_mm: float) -> np.ndarray:
    """Voxels per side within which a gap of ``gap_mm`` reaches."""
    return np.ceil(gap_mm / spacing).astype(int)


def _crop(array: np.ndarray, start: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[slice, ...],
                                                                               tuple[slice, ...]]:
    """Crop of ``array`` at ``start`` with ``shape``, clipped to the array; also the matching slices of the crop."""
    src, dst = [], []
    for s, n, size in zip(start, array.shape, shape):
        lo, hi = max(s, 0), min(s + size, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    return array[tuple(src)], tuple(src), tuple(dst)


def border_points(mask: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` of the mask's border voxels (with a face neighbour outside it), spread evenly over them, as
    (k, ndim) indices."""
    border = np.argwhere(mask & ~binary_erosion(mask, generate_binary_structure(mask.ndim, 1)))
    return border[np.linspace(0, len(border) - 1, count).astype(int)] if len(border) > count else border


def _try(mask: np.ndarray, halo: _LazyHalo, centre: np.ndarray, allowed: np.ndarray,
         organ: np.ndarray, tumour: np.ndarray, spacing: np.ndarray, rule: PlacementRules, whole: bool,
         texture: np.ndarray | None = None, one_piece: bool = False, probe: np.ndarray | None = None
         ) -> Lesion | None:
    start = centre - np.array(mask.shape) // 2
    if probe is not None:  # a whole lesion needs every voxel allowed: a few border voxels refuse most centres
        points = probe + start
        points = points[((points >= 0) & (points < allowed.shape)).all(1)]  # the array's edge may cut it
        where = tuple(points.T)
        if len(points) and (~allowed[where] | tumour[where]).any():
            return None
    if rule.margin_mm > 0:
        r = np.ceil(rule.margin_mm / spacing).astype(int)
        local, _, _ = _crop(organ, centre - r, tuple(2 * r + 1))
        if local.shape != tuple(2 * r + 1):
            return None
        ball = sum(((np.indices(local.shape).T - r) * spacing).T ** 2) <= rule.margin_mm ** 2
        if not local[ball].all():
            return None
    if rule.gap_mm > 0:
        shape = tuple(np.array(mask.shape) + 2 * _halo_pad(spacing, rule.gap_mm))
        local, _, dst = _crop(tumour, centre - np.array(shape) // 2, shape)
        if local.any():
            near = np.zeros(shape, dtype=bool)
            near[dst] = local
            if too_close(mask, near, spacing, rule.gap_mm, halo):
                return None
    local_allowed, src, dst = _crop(allowed, start, mask.shape)
    local_allowed = local_allowed & ~tumour[src]
    total = int(mask.sum())
    part_texture = None if texture is None else texture[(slice(None), *dst)]  # the part of the mask placed
    if whole:  # every voxel allowed; the array's edge may cut it, as a patch's edge cuts a real tumour
        part = mask[dst]
        if (part & ~local_allowed).any():
            return None
        kept = np.count_nonzero(part)
        if total == 0 or kept < rule.min_inside * total:
            return None  # too little inside the array before any component search
        placed = part if one_piece and part.shape == mask.shape else largest_component(part)
        if placed is not part and np.count_nonzero(placed) < rule.min_inside * total:
            return None
        return Lesion(bbox=src, mask=placed.copy(), texture=part_texture)
    part = mask[dst] & local_allowed
    kept = np.count_nonzero(part)
    if total == 0 or kept < rule.min_inside * total:
        return None  # the largest piece is at most what is inside: no component search for a lesion that fails
    placed = part if one_piece and part.shape == mask.shape and kept == total else largest_component(part)
    if placed is not part and np.count_nonzero(placed) < rule.min_inside * total:
        return None
    return Lesion(bbox=src, mask=placed, texture=part_texture)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component (full connectivity) of a boolean mask."""
    from nnunet_synth.generators.kernels import face_connected  # numba: imported when first needed

    if mask.any() and face_connected(mask):  # one piece already (the usual case): no labelling of its box
        return mask
    components, n = connected_components(mask, structure=np.ones((3,) * mask.ndim, bool))
    if n <= 1:
        return mask
    return components == (np.argmax(np.bincount(components.ravel())[1:]) + 1)
