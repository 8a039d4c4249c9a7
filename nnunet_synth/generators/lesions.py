"""The lesion pipeline: size -> mask -> placement -> synthesis -> label, for one sample.

Every path that makes synthetic tumours calls this module: the trainer transform, every bank, the online GPU
trainers (which take the placed masks only), the 2D slice insertion of the Stable Diffusion backend, the
``nnUNetv2_synth_masks`` command and the previews. Nothing else draws radii, builds lesion masks or decides
where a lesion goes.

Where the plan has an organ label the lesion goes into the organ (``min_inside`` of it, clipped to the organ
and kept as one piece). Without one, the placement region is a smooth tissue region inside the body (see
:func:`tissue_region`) and a lesion is placed whole or not at all; one that finds no room is tried smaller (down
to half its semi-axes; :class:`LesionInfo` records the semi-axes it was placed with).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.ndimage import label as connected_components

from nnunet_synth.generators.appearance import RING_MM, constant_fill, expand_box, ring_tissue
from nnunet_synth.generators.base import Lesion
from nnunet_synth.generators.morphology import binary_closing, binary_dilation, binary_erosion, binary_opening
from nnunet_synth.generators.placement import GridMask, LabelMask, central_window, largest_component, place_lesion
from nnunet_synth.generators.regions import fgt_region
from nnunet_synth.generators.shapes import centroid, crop_to_mask, lesion_mask, repeat_to
from nnunet_synth.generators.sizes import LesionRequest, lesion_requests, slice_area_class
from nnunet_synth.generators.templates import Template, breast_scale, crop_template, draw_template, scale_requests

if TYPE_CHECKING:
    from nnunet_synth.generators.base import TumourGenerator
    from nnunet_synth.synth_plan import SynthPlan, TissueRegion

MAX_MASK_DRAWS = 10  # masks redrawn per request where a slice-area class is missed
WHOLE_ATTEMPTS = 40  # candidate centres per rule set for lesions placed whole
DEEP_ENOUGH = 0.8  # of the smallest semi-axis: how deep inside the region a whole lesion's centre is drawn
DEPTH_GRID_MM = 2.0  # grid of the region's depth map
TISSUE_GRID_MM = 2.0  # grid the tissue region is found on (it is smooth at 2 mm: TISSUE_SMOOTHING_MM)
WHOLE_SHRINK, WHOLE_SHRINKS = 0.8, 3  # a whole lesion without room is tried at most 3 times, 0.8x smaller each
MAX_FILL_VALUES = 4  # the most common values of constant regions are fill values (background, clipped air/bone)
FILL_VALUE_SAMPLE = 65536  # fill voxels whose values are counted to find them


@dataclass(frozen=True)
class LesionInfo:
    """What was inserted: one synthetic lesion.

    Attributes:
        centre: voxel index of the lesion's centre of mass in the array it was inserted into.
        semi_axes_mm: the ellipsoid semi-axes it was drawn with (mm).
        size_class: size class of the request (``liver_mri`` for that preset).
        voxels: number of lesion voxels.
        bbox: ``[start, stop)`` per spatial axis.
    """

    centre: tuple[int, ...]
    semi_axes_mm: tuple[float, ...]
    size_class: str
    voxels: int
    bbox: tuple[tuple[int, int], ...]

    def to_dict(self) -> dict:
        return {k: (list(map(list, v)) if k == "bbox" else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


@dataclass(frozen=True)
class PlacedLesion:
    """A lesion mask at its place (before synthesis) and its description."""

    lesion: Lesion
    info: LesionInfo


def background_plateau(channel: np.ndarray, clipped: bool = False) -> np.ndarray:
    """Voxels of a constant fill (skull-stripped MRI, padding, clipped air), whatever normalisation made of its
    value.

    Fill voxels are those whose 3x3(x3) neighbourhood holds one value, which no imaged tissue does; the one layer
    of fill next to tissue that this test misses (a dilation by one voxel, which never reaches tissue); and single
    fill voxels in gaps of the tissue (their value is exactly a fill value). A ``clipped`` channel (nnU-Net's
    CTNormalization clips fat and air alike to its window's floor) keeps only the fill connected to the in-plane
    border of its axial slice: clipped values the body encloses are fat (or bone), not air.
    """
    flat = constant_fill(channel)
    if not flat.any():
        return flat
    values = channel[flat]
    # the most common fill values, counted on an evenly strided sample of the fill (a fill value is shared by many
    # voxels, so it is never missed; the whole list would cost a sort of all of them)
    values, counts = np.unique(values[::max(1, values.size // FILL_VALUE_SAMPLE)], return_counts=True)
    fill = binary_dilation(flat, np.ones((3,) * channel.ndim, bool)) | np.isin(
        channel, values[np.argsort(counts)[-MAX_FILL_VALUES:]])
    if not clipped:
        return fill
    # fill reaching the in-plane border of its axial slice is outside the body; fill the body encloses is tissue
    in_plane = np.zeros((3,) * fill.ndim, bool)
    in_plane[(1,) * (fill.ndim - 2)] = True
    pieces, _ = connected_components(fill, structure=in_plane)
    faces = np.concatenate([np.moveaxis(pieces, a, 0)[[0, -1]].ravel() for a in range(fill.ndim - 2, fill.ndim)])
    outside = np.zeros(int(pieces.max()) + 1, dtype=bool)  # a lookup per piece: one read of the labels
    outside[faces] = True
    outside[0] = False
    return outside[pieces]


def tissue_region(channel: np.ndarray, seg0: np.ndarray, tissue: TissueRegion, spacing: tuple[float, ...],
                  margin_mm: float, clipped: bool = False) -> np.ndarray:
    """A smooth, closed tissue region inside the body, for datasets without an organ label.

    Channel ``tissue.channel`` is smoothed at ``tissue.smoothing_mm`` and kept in ``tissue.range`` (the tissue
    around the real tumours) and closed; background fill, voxels outside the image (-1) and labelled voxels are
    removed; an opening removes specks and bridges, and an erosion by ``margin_mm`` (at least one voxel) keeps lesions
    off the body's edge. ``clipped``: the channel is CT-normalised (see :func:`background_plateau`).
    """
    sp = np.asarray(spacing, dtype=float)
    # the region is smooth at smoothing_mm: find it on a grid of about TISSUE_GRID_MM (the grid-spacing neighbourhood
    # of the fill test and the one-step dilation of the fill grow accordingly) and bring it back to the voxels
    step = np.maximum(1, np.round(TISSUE_GRID_MM / sp)).astype(int)
    grid = tuple(slice(None, None, s) for s in step)
    coarse_sp = sp * step
    smooth = smooth_on_grid(channel, tissue.smoothing_mm, sp, step)
    lo, hi = tissue.range
    radius = np.maximum(np.round(tissue.smoothing_mm / coarse_sp), 1).astype(int)
    ball = _ball(radius, coarse_sp)
    # closing fills pores of the band, opening removes specks and thin bridges: a smooth, closed region (on an
    # edge-padded array, so the array's own edge, a patch's border, does not erode it)
    pad = [(int(r), int(r)) for r in 2 * radius]
    inside = tuple(slice(int(r), -int(r)) for r in 2 * radius)
    region = np.pad((smooth >= lo) & (smooth <= hi), pad, mode="edge")
    keep = np.pad((seg0[grid] == 0) & ~background_plateau(channel[grid], clipped), pad, mode="edge")
    region = binary_opening(binary_closing(region, ball) & keep, ball)[inside]
    erosion = _ball(np.maximum(np.round(margin_mm / coarse_sp), 1).astype(int), coarse_sp)
    region = binary_erosion(region, erosion, border_value=1)
    return repeat_to(region, step, channel.shape) & (seg0 == 0)


def smooth_on_grid(channel: np.ndarray, sigma_mm: float, spacing: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``channel`` Gaussian-smoothed at ``sigma_mm`` on the grid of ``step`` voxels: the mean of each block of
    ``step`` voxels (itself a smoothing), then the rest of the Gaussian on the grid (variances add), instead of the
    whole filter at full resolution. Grid point k is the block of voxels ``k * step`` to ``(k + 1) * step - 1``, the
    voxels :func:`~.shapes.repeat_to` gives it back to (edge blocks padded by repetition)."""
    step = np.asarray(step, dtype=int)
    blocks = tuple(int(b) for b in -(-np.asarray(channel.shape) // step))
    means = np.zeros(blocks, dtype=np.float32)
    for offset in np.ndindex(*step):  # one strided read of the channel per position in the block
        part = channel[tuple(slice(int(o), None, int(s)) for o, s in zip(offset, step))]
        if part.shape != blocks:  # a last block cut by the array's edge: its last voxel repeated
            part = np.pad(part, [(0, b - n) for b, n in zip(blocks, part.shape)], mode="edge")
        means += part
    means /= float(np.prod(step))
    block_variance = (step.astype(float) ** 2 - 1) / 12 * np.asarray(spacing, dtype=float) ** 2  # mm^2 per axis
    rest_mm = np.sqrt(np.maximum(sigma_mm ** 2 - block_variance, 0.0))
    return gaussian_filter(means, rest_mm / (np.asarray(spacing, dtype=float) * step))


def _ball(radius_vox: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    grid = np.indices(tuple(2 * radius_vox + 1)) - radius_vox.reshape(-1, *[1] * len(radius_vox))
    mm = (grid * spacing.reshape(-1, *[1] * len(spacing))) / (radius_vox * spacing).reshape(-1, *[1] * len(spacing))
    return (mm ** 2).sum(0) <= 1.0


def placement_region(image: np.ndarray, seg0: np.ndarray, plan: SynthPlan,
                     spacing: tuple[float, ...] | None = None) -> np.ndarray:
    """Voxels a lesion may occupy before tumours and gaps: the organ label, or without one the tissue region or
    (placement region ``fgt``) the fibroglandular tissue inside the breast (:func:`~.regions.fgt_region`).

    Args:
        image: (C, *spatial) image.
        seg0: (*spatial) labels (-1 outside the image).
        plan: the synth plan.
        spacing: voxel spacing; default: the plan's, for the array's dimensionality.
    """
    if plan.organ_label is not None:
        return seg0 == plan.organ_label
    spacing = tuple(plan.spacing[-seg0.ndim:]) if spacing is None else tuple(spacing)
    if plan.region_kind == "fgt":
        return fgt_region(image, seg0, plan, spacing)
    channel = plan.tissue.channel
    clipped = plan.channels[channel].clip is not None  # CTNormalization's window
    return tissue_region(np.asarray(image[channel]), seg0, plan.tissue, spacing, plan.placement.margin_mm, clipped)


@dataclass(frozen=True)
class RegionDepth:
    """Distance (mm) of each voxel from the placement region's edge, on a grid of about ``DEPTH_GRID_MM`` (it only
    picks candidate centres, which placement then checks voxel by voxel).

    Attributes:
        coarse: the distances on the grid (grid point k stands for voxels ``k * step`` to ``(k + 1) * step - 1`` of
            the grid's frame).
        step: voxels per grid point along each axis.
        shape: the shape of the array it is read for.
        origin: where that array's first voxel lies in the grid's frame (a patch of a case whose depth is known:
            its box's lower corner; voxels outside the grid read as not deep).
    """

    coarse: np.ndarray
    step: np.ndarray
    shape: tuple[int, ...]
    origin: tuple[int, ...] | None = None

    def at_least(self, mm: float) -> GridMask:
        """Voxels at least ``mm`` inside the region (read where indexed, the region's shape)."""
        return GridMask(self.coarse >= mm, self.step, self.shape, self.origin)

    def of_patch(self, lower: tuple[int, ...], shape: tuple[int, ...]) -> RegionDepth:
        """The depth read for the patch of ``shape`` whose first voxel is ``lower`` here."""
        origin = (0,) * len(shape) if self.origin is None else self.origin
        return dataclasses.replace(self, shape=tuple(shape), origin=tuple(int(o + v) for o, v in zip(origin, lower)))


def region_depth(region: np.ndarray, spacing: tuple[float, ...]) -> RegionDepth:
    """The :class:`RegionDepth` of a placement region."""
    from nnunet_synth.generators.distance import feature_transform

    sp = np.asarray(spacing, dtype=float)
    step = np.maximum(1, np.round(DEPTH_GRID_MM / sp)).astype(int)
    coarse = region[tuple(slice(None, None, s) for s in step)]
    if coarse.all():  # no edge in the array: SciPy's convention
        depth = distance_transform_edt(coarse, sampling=sp * step)
    else:  # the distance of each region voxel to the nearest voxel outside it
        depth = feature_transform(~coarse, tuple(sp * step), nearest=False)[0]
    return RegionDepth(depth, step, region.shape)


def _mask_for(request: LesionRequest, spacing: tuple[float, ...], plan: SynthPlan, rng: np.random.Generator,
              templates: list[Template] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """One connected lesion mask for a request, by the plan's deformation, and the texture of the real tumour it
    was cut from (templates with textures; None otherwise), both cropped to the mask's bounding box."""
    if plan.shapes.deformation == "template":
        drawn = draw_template(templates, request.radii_mm, spacing, rng)
        return crop_template(largest_component(drawn.mask), drawn.texture)
    mask = lesion_mask(request.radii_mm, spacing, rng, plan.shapes.deformation)
    return crop_to_mask(largest_component(mask)), None


def draw_masks(plan: SynthPlan, spacing: tuple[float, ...], rng: np.random.Generator,
               templates: list[Template] | None = None, room_mm3: float | None = None
               ) -> list[tuple[str, np.ndarray]]:
    """The size and mask stages alone: (size class, mask) of the lesions one sample would get, unplaced."""
    return [(r.size_class, _mask_for(r, spacing, plan, rng, templates)[0])
            for r in lesion_requests(plan, spacing, rng, room_mm3)]


def plan_lesions(image: np.ndarray, seg0: np.ndarray, plan: SynthPlan, rng: np.random.Generator, *,
                 spacing: tuple[float, ...] | None = None, templates: list[Template] | None = None,
                 window: tuple[int, ...] | None = None, max_lesion_shape: tuple[int, ...] | None = None,
                 region: np.ndarray | None = None, depth: RegionDepth | None = None, draws: int = 1
                 ) -> list[PlacedLesion]:
    """Draws and places the lesions of one synthetic sample (no synthesis yet).

    Args:
        image: (C, *spatial) image (used without organ label, to find the tissue region).
        seg0: (*spatial) labels; -1 (outside the image) and the ignore label are never used.
        plan: the synth plan (labels, shapes, placement, tumour sizes).
        rng: random generator.
        spacing: voxel spacing; default: the plan's.
        templates: real tumours of the training fold (deformation ``template``); a placed lesion carries the
            texture of the template it was drawn from, where the templates have textures.
        window: nnU-Net's final patch size: lesion centres lie in this central window (None: anywhere).
        max_lesion_shape: largest lesion box (voxels) the backend can fill; larger masks are scaled down.
        region: the :func:`placement_region` of this image when already known (repeated draws on one case).
        depth: without an organ label, the :func:`region_depth` of ``region`` when already known (a patch's, read
            from its case's).
        draws: independent draws of the sample's lesions (sizes, shapes, positions) tried until one places any.

    Returns:
        The placed lesions, in order; empty when nothing fits.
    """
    seg0 = np.asarray(seg0)
    spacing = tuple(plan.spacing[-seg0.ndim:]) if spacing is None else tuple(float(s) for s in spacing)
    if plan.shapes.deformation == "template" and not templates:
        raise ValueError("deformation 'template' needs the training fold's real tumour masks (templates=...); "
                         "none were given")
    if region is None:  # the organ is read where placement looks (a few crops), not over the patch
        region = LabelMask(seg0, plan.organ_label) if plan.organ_label is not None else placement_region(
            image, seg0, plan, spacing)
    win = central_window(seg0.shape, None if window is None else tuple(window)[-seg0.ndim:])
    room = int(np.count_nonzero(region[win]))
    if room == 0:
        return []
    tumour = LabelMask(seg0, plan.tumour_label)
    # organ voxels, and the tissue and FGT regions' (unlabelled voxels only), are neither tumour, ignore nor -1
    allowed = region
    # a whole lesion's centre lies at least its smallest semi-axis inside the region (most random centres in a
    # large region would not hold it)
    if plan.organ_label is not None:
        depth = None
    elif depth is None:
        depth = region_depth(region, spacing)
    scale = breast_scale(image, plan, spacing, None if window is None else win)  # breast plans' templates
    for _ in range(draws):
        requests = scale_requests(lesion_requests(plan, spacing, rng, room * float(np.prod(spacing))), scale)
        # a draw that places nothing leaves ``tumour`` as it was: no copies of the volume for the next draw
        placed = _place(requests, plan, spacing, rng, region, depth, allowed, tumour, win, templates,
                        max_lesion_shape)
        if placed:
            return placed
    return []


def _place(requests: list[LesionRequest], plan: SynthPlan, spacing: tuple[float, ...], rng: np.random.Generator,
           region: np.ndarray | LabelMask, depth: RegionDepth | None, allowed: np.ndarray | LabelMask,
           tumour: LabelMask,
           win: tuple[slice, ...], templates: list[Template] | None, max_lesion_shape: tuple[int, ...] | None
           ) -> list[PlacedLesion]:
    """Masks for the requests, placed one after the other (``tumour`` gains each placed lesion, in place; placement
    reads ``allowed`` less ``tumour``).

    ``depth`` (mm from the region's edge) is given where lesions are placed whole (no organ label)."""
    whole = depth is not None
    # where nothing but placement can change a request's size, a size with no centre deep enough for it in the
    # window is shrunk without drawing its mask (placement would refuse any)
    foreseeable = whole and max_lesion_shape is None and plan.shapes.size_preset != "slice_area"
    bounds = np.array([s.start for s in win]), np.array([s.stop for s in win])
    placed: list[PlacedLesion] = []
    for request in requests:
        lesion, radii, shrinks = None, np.asarray(request.radii_mm, dtype=float), 0
        for _ in range(MAX_MASK_DRAWS):
            centres = None if depth is None else depth.at_least(DEEP_ENOUGH * float(radii.min()))
            if foreseeable and not len(centres.cells(*bounds)[0]):
                if shrinks < WHOLE_SHRINKS:
                    radii, shrinks = radii * WHOLE_SHRINK, shrinks + 1
                    continue
                break
            mask, texture = _mask_for(LesionRequest(request.size_class, radii), spacing, plan, rng, templates)
            if max_lesion_shape is not None and any(m > lim for m, lim in zip(mask.shape, max_lesion_shape)):
                radii = radii * 0.9 * min(lim / m for m, lim in zip(mask.shape, max_lesion_shape))
                continue  # larger than the backend can fill: the same shape, smaller
            if plan.shapes.size_preset == "slice_area" and slice_area_class(int(mask.sum())) != request.size_class:
                same_class = plan.replace(shapes={"size_class": request.size_class})
                radii = np.asarray(lesion_requests(same_class, spacing, rng)[0].radii_mm)
                continue  # the paper's classes are pixel areas of the mask as drawn
            lesion = place_lesion(mask, allowed, region, tumour, spacing, rng, plan.placement, win,
                                  attempts=WHOLE_ATTEMPTS if whole else 20, whole=whole, centres=centres,
                                  texture=texture, one_piece=True)
            if lesion is not None and plan.shapes.size_preset == "slice_area" and \
                    slice_area_class(lesion.num_voxels) != request.size_class:
                lesion = None  # clipping to the organ changed the class
            if lesion is None and whole and shrinks < WHOLE_SHRINKS:
                radii, shrinks = radii * WHOLE_SHRINK, shrinks + 1
                continue  # a whole lesion that finds no room: the same request, smaller (tissue between tumours)
            break
        if lesion is None:
            continue
        starts = np.array([s.start for s in lesion.bbox])
        centre = tuple(int(v) for v in np.round(centroid(lesion.mask) + starts))
        info = LesionInfo(centre=centre, semi_axes_mm=tuple(float(r) for r in radii), size_class=request.size_class,
                          voxels=lesion.num_voxels, bbox=tuple((int(s.start), int(s.stop)) for s in lesion.bbox))
        placed.append(PlacedLesion(lesion, info))
        # later lesions keep their gap to this one and never overlap it
        tumour.add(lesion.bbox, lesion.mask)
    return placed


def site_box(bbox: tuple[slice, ...], spacing: tuple[float, ...], halo_mm: float, shape: tuple[int, ...]
             ) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The box around one placed lesion that its ring and halo reach, one voxel wider so the fill test of
    :func:`~nnunet_synth.generators.appearance.ring_tissue` sees whole neighbourhoods, and the lesion's box in it."""
    return expand_box(bbox, max(RING_MM[1], halo_mm) + max(spacing), spacing, shape)


def insert_tumours(image: np.ndarray, seg: np.ndarray, spacing: tuple[float, ...] | None, plan: SynthPlan,
                   rng: np.random.Generator, *, generator: TumourGenerator | None = None,
                   templates: list[Template] | None = None, window: tuple[int, ...] | None = None,
                   region: np.ndarray | None = None, depth: RegionDepth | None = None, draws: int = 1,
                   in_place: bool = False) -> tuple[np.ndarray, np.ndarray, list[LesionInfo]]:
    """Inserts the synthetic tumours of one sample into a whole case or a patch.

    Args:
        image: (C, *spatial) image, channels first, any number of channels (normalised as the plan's statistics).
        seg: (*spatial) labels, or (S, *spatial) with the labels in channel 0 (nnU-Net's layout; other channels
            are left alone).
        spacing: voxel spacing in mm of the spatial axes (None: the plan's).
        plan: the synth plan (e.g. :func:`nnunet_synth.load_synth_plan` or :meth:`SynthPlan.for_volume`).
        rng: random generator; the same state gives the same tumours.
        generator: the backend that fills the lesions (default: the plan's backend, built here).
        templates: real tumours for the ``template`` deformation (with textures for the transplant backend).
        window: nnU-Net's final patch size when ``image`` is an enlarged patch (lesion centres in its centre).
        region: the placement region when already known (see :func:`plan_lesions`).
        depth: its depth when already known (see :func:`plan_lesions`).
        draws: independent draws of the sample's lesions tried until one fits (see :func:`plan_lesions`).
        in_place: paint into ``image`` (when float32) and ``seg`` themselves instead of copies: for a caller that
            owns them (a loader's freshly decompressed crop), saving two copies of the patch.

    Returns:
        (new image, new seg, lesions); the inputs are never written to unless ``in_place``. When no lesion fits,
        the inputs themselves and an empty list.
    """
    from nnunet_synth.generators import get_backend

    image = np.asarray(image)
    seg = np.asarray(seg)
    with_channel = seg.ndim == image.ndim
    seg0 = seg[0] if with_channel else seg
    if seg0.shape != image.shape[1:]:
        raise ValueError(f"image {image.shape} (channels first) and segmentation {seg.shape} do not match")
    if generator is None:
        generator = get_backend(plan.backend)(plan)
    placed = plan_lesions(image, seg0, plan, rng, spacing=spacing, templates=templates, window=window,
                          max_lesion_shape=generator.max_lesion_shape, region=region, depth=depth, draws=draws)
    if not placed:
        return image, seg, []
    spacing = tuple(plan.spacing[-seg0.ndim:]) if spacing is None else tuple(float(s) for s in spacing)
    halo = generator.halo_mm
    # every lesion's site and edge are judged on the input as it was before any lesion was painted: keep its sites
    sites = [site_box(p.lesion.bbox, spacing, halo, seg0.shape) for p in placed]
    before = [(image[(slice(None), *box)].copy(), seg0[box].copy()) for box, _ in sites]
    new_image = image if in_place and image.dtype == np.float32 else np.array(image, dtype=np.float32, copy=True)
    new_seg = seg if in_place else np.array(seg, copy=True)
    labels = new_seg[0] if with_channel else new_seg
    tissue = np.zeros(seg0.shape, dtype=bool)  # one buffer for every lesion's site (cleared after each)
    for p, (box, inner), (site_image, site_seg0) in zip(placed, sites, before):
        # the site's ring is measured on the voxels real tumours' rings were measured on
        tissue[box] = ring_tissue(site_image[plan.tissue_channel], site_seg0, plan.organ_label, plan.clip_floor)
        generator.synthesize(new_image, dataclasses.replace(p.lesion, tissue=tissue), spacing, rng)
        tissue[box] = False
        if halo > 0:  # a feathered edge never reaches padding, ignored or real tumour voxels
            edge, _ = expand_box(inner, halo, spacing, site_seg0.shape)
            protected = (site_seg0[edge] < 0) | (site_seg0[edge] == plan.tumour_label)
            if plan.ignore_label is not None:
                protected |= site_seg0[edge] == plan.ignore_label
            new_image[(slice(None), *box)][(slice(None), *edge)][:, protected] = \
                site_image[(slice(None), *edge)][:, protected]
    for p in placed:
        labels[p.lesion.bbox][p.lesion.mask] = plan.tumour_label
    return new_image, new_seg, [p.info for p in placed]


def insert_tumours_in_case(data: np.ndarray, seg: np.ndarray, plan: SynthPlan, rng: np.random.Generator,
                           generator: TumourGenerator, templates: list[Template] | None = None, draws: int = 20
                           ) -> tuple[np.ndarray, np.ndarray, list[LesionInfo], int | None]:
    """Inserts tumours into a whole preprocessed case (C, Z, Y, X) for a bank.

    A 3D plan inserts into the volume. A 2d plan inserts into one slice, drawn among the slices with
    placement room and, where there are any, without real tumour (the breast 2D paper's healthy targets).

    Returns:
        (new data, new seg, lesions, slice index or None); lesions is empty when nothing fits.
    """
    data, seg = np.asarray(data), np.asarray(seg)
    if len(plan.spacing) == seg.ndim - 1:
        new_data, new_seg, lesions = insert_tumours(data, seg, None, plan, rng, generator=generator,
                                                    templates=templates, draws=draws)
        return new_data, new_seg, lesions, None
    regions = [placement_region(data[:, z], seg[0, z], plan) for z in range(seg.shape[1])]
    has_room = np.array([r.any() for r in regions])
    healthy = has_room & ~(seg[0] == plan.tumour_label).any(axis=(1, 2))
    # slices without real tumour first (the breast 2D paper's healthy targets), then the others
    order = [*rng.permutation(np.flatnonzero(healthy)), *rng.permutation(np.flatnonzero(has_room & ~healthy))]
    for z in order[:draws]:
        new_slice, new_seg_slice, lesions = insert_tumours(data[:, z], seg[:, z], None, plan, rng,
                                                           generator=generator, templates=templates,
                                                           region=regions[z])
        if lesions:
            new_data = np.array(data, dtype=np.float32, copy=True)
            new_seg = np.array(seg, copy=True)
            new_data[:, z], new_seg[:, z] = new_slice, new_seg_slice
            return new_data, new_seg, lesions, int(z)
    return data, seg, [], None
