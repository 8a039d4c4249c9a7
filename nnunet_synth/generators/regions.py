"""Placement regions found in the image itself: the breast (body) and the fibroglandular tissue (FGT) inside it.

The SynBT paper places synthetic tumours in FGT found by a segmentation model trained (SynthSeg pipeline) on the
Duke FGT masks, post-processed to the most plausible regions. No such weights can be downloaded, so the region is
found without training, from the pre-contrast channel (nnU-Net's normalised units):

- **body** (the breasts and the chest in the field of view): the channel above an air threshold (the lowest of
  three-class Otsu thresholds, learned at planning: air, then the darker and the brighter tissue, so fat that fat
  suppression made dark still counts as body), connected pieces of at least :data:`MIN_PIECE_SHARE` of the
  largest, holes filled (in 3D and slice by slice), on a grid of about :data:`BODY_GRID_MM`; its inside
  (:func:`inner_body`) leaves :data:`SKIN_MARGIN_MM` of skin out.
- **FGT**: inside the body, the channel smoothed at :data:`FGT_SMOOTHING_MM` is split into :data:`FGT_CLASSES`
  intensity classes by Otsu's method; the FGT class is the one most enriched within 10 mm of the real tumours (the
  tumours of these cohorts sit in FGT), or without real tumours the darker class (non-fat-suppressed T1: fat is
  bright, FGT darker; on fat-suppressed sequences FGT is the brighter class, which the tumour vote then finds).
  The region is that class's intensity range, closed and opened at the smoothing scale (the tissue region of
  :func:`~nnunet_synth.generators.lesions.tissue_region`), inside the body's inside.

``nnUNetv2_synth_plan`` learns the thresholds from the training cases (:func:`measure_fgt`, :func:`summarise_fgt`)
and stores them as the plan's ``fgt`` (a :class:`~nnunet_synth.synth_plan.FGTRegion`); the lesion pipeline
recomputes the region on any case or patch from them (:func:`fgt_region`) at the cost of one smoothing and a few
morphological operations on a coarse grid. The breast size (:func:`breast_size_mm`, equivalent diameter of the body
in the array or in a patch window) scales template masks (see :func:`~nnunet_synth.generators.templates.
breast_scale`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import binary_erosion, generate_binary_structure
from scipy.ndimage import label as connected_components
from skimage.filters import threshold_multiotsu, threshold_otsu

from nnunet_synth.generators.shapes import equivalent_diameter_mm, repeat_to

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import FGTRegion, SynthPlan

BODY_GRID_MM = 2.0  # the body is found on a grid of about this spacing (it is smooth at this scale)
MIN_PIECE_SHARE = 0.1  # body pieces kept: at least this share of the largest (a patch may cut the body in two)
SKIN_MARGIN_MM = 5.0  # FGT this close to the body's surface is skin or partial volume
FGT_SMOOTHING_MM = 2.0  # smoothing of the channel before its classes are told apart (and of the region's shape)
FGT_CLASSES = 2  # intensity classes inside the body: FGT and fat
MAX_SAMPLE = 200_000  # voxels the thresholds are computed on (a regular subsample)
#: cohorts whose plans place synthetic tumours in FGT (``cohort`` of dataset.json, written by the converters)
BREAST_COHORTS = ("mama_mia", "duke_fgt")


def _grid(spacing: tuple[float, ...]) -> tuple[np.ndarray, tuple[slice, ...], np.ndarray]:
    """Steps, slices and spacing of a grid of about :data:`BODY_GRID_MM`."""
    sp = np.asarray(spacing, dtype=float)
    step = np.maximum(1, np.round(BODY_GRID_MM / sp)).astype(int)
    return step, tuple(slice(None, None, s) for s in step), sp * step


def _sample(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32).ravel()
    return values[::max(1, values.size // MAX_SAMPLE)]


def air_threshold(values: np.ndarray) -> float:
    """The intensity between air and the darkest tissue: the lowest of three-class Otsu thresholds (air, darker
    tissue, brighter tissue; with fat suppression fat is the darker tissue, without it fibroglandular tissue)."""
    return float(threshold_multiotsu(_sample(values), 3)[0])


def body_mask(channel: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """The body: voxels above ``threshold``, pieces of at least :data:`MIN_PIECE_SHARE` of the largest, holes filled.

    Args:
        channel: (*spatial) image (2D or 3D), at the resolution the mask is wanted at.
        threshold: the air threshold; None: :func:`air_threshold` of ``channel`` itself.

    Returns:
        bool mask of ``channel``'s shape (empty where nothing exceeds the threshold).
    """
    channel = np.asarray(channel)
    if threshold is None:
        threshold = air_threshold(channel)
    above = channel > threshold
    pieces, n = connected_components(above, structure=np.ones((3,) * above.ndim, bool))
    if n == 0:
        return above
    sizes = np.bincount(pieces.ravel())[1:]
    body = np.isin(pieces, np.flatnonzero(sizes >= MIN_PIECE_SHARE * sizes.max()) + 1)
    # holes filled slice by slice (first axis): what the body encloses in its slice, also where a 3D hole opens to
    # the array's edge; one labelling of all slices (it fills every hole a 3D filling would)
    in_plane = np.zeros((3,) * body.ndim, bool)
    in_plane[(1,) * (body.ndim - 2)] = generate_binary_structure(2, 1)
    gaps, _ = connected_components(~body, structure=in_plane)
    edges = np.concatenate([np.moveaxis(gaps, a, 0)[[0, -1]].ravel() for a in range(body.ndim - 2, body.ndim)])
    return ~np.isin(gaps, edges[edges > 0])


def inner_body(channel: np.ndarray, threshold: float, spacing: tuple[float, ...],
               skin_margin_mm: float = SKIN_MARGIN_MM) -> np.ndarray:
    """The body (:func:`body_mask` on a grid of about :data:`BODY_GRID_MM`) without ``skin_margin_mm`` of its
    surface; the array's edge (a patch's border) is not a surface."""
    step, grid, coarse_sp = _grid(spacing)
    body = body_mask(np.asarray(channel)[grid], threshold)
    if skin_margin_mm > 0 and body.any():
        radius = np.ceil(skin_margin_mm / coarse_sp).astype(int)
        offsets = (np.indices(tuple(2 * radius + 1)) - radius.reshape(-1, *[1] * len(radius))) * \
            coarse_sp.reshape(-1, *[1] * len(radius))
        body = binary_erosion(body, (offsets ** 2).sum(0) <= skin_margin_mm ** 2, border_value=1)
    return repeat_to(body, step, np.shape(channel))


def fgt_region(image: np.ndarray, seg0: np.ndarray, plan: SynthPlan, spacing: tuple[float, ...]) -> np.ndarray:
    """The plan's FGT placement region of an image (a whole case or a patch).

    Args:
        image: (C, *spatial) image, normalised as at planning.
        seg0: (*spatial) labels (-1 outside the image); labelled voxels are left out.
        plan: a synth plan with ``fgt`` (see :class:`~nnunet_synth.synth_plan.FGTRegion`).
        spacing: voxel spacing (mm) of the spatial axes.

    Returns:
        bool mask: the FGT class's smooth region (closed, opened and eroded by the plan's placement margin, as the
        tissue region) inside the body's inside.
    """
    from nnunet_synth.generators.lesions import tissue_region
    from nnunet_synth.synth_plan import TissueRegion

    spec = plan.fgt
    channel = np.asarray(image[spec.channel])
    lo, hi = spec.range
    band = TissueRegion(spec.channel, (spec.body_threshold if lo is None else lo, np.inf if hi is None else hi),
                        spec.smoothing_mm)
    region = tissue_region(channel, seg0, band, spacing, plan.placement.margin_mm)
    return region & inner_body(channel, spec.body_threshold, spacing, spec.skin_margin_mm)


def breast_size_mm(channel: np.ndarray, threshold: float, spacing: tuple[float, ...],
                   window: tuple[slice, ...] | None = None) -> float:
    """Size of the breast in an image: the equivalent diameter (mm) of its body (:func:`body_mask` on the coarse
    grid), within ``window`` where given (a patch's central window)."""
    channel = np.asarray(channel if window is None else channel[window])
    _, grid, coarse_sp = _grid(spacing)
    return equivalent_diameter_mm(int(np.count_nonzero(body_mask(channel[grid], threshold))), tuple(coarse_sp))


def centred_window(mask: np.ndarray, size: tuple[int, ...]) -> tuple[slice, ...]:
    """A window of ``size`` (clipped to the array) centred on the mask's centre of mass."""
    centre = np.argwhere(mask).mean(0).round().astype(int) if mask.any() else np.array(mask.shape) // 2
    return tuple(slice(max(0, c - s // 2), min(n, c - s // 2 + s)) for c, s, n in zip(centre, size, mask.shape))


def measure_fgt(channel: np.ndarray, smooth: np.ndarray, seg: np.ndarray, spacing: tuple[float, ...],
                near_tumour: np.ndarray | None, patch_size: tuple[int, ...] | None = None) -> dict | None:
    """The FGT statistics of one training case (see :func:`summarise_fgt`).

    Args:
        channel: (*spatial) pre-contrast channel, normalised.
        smooth: ``channel`` smoothed at :data:`FGT_SMOOTHING_MM`.
        seg: (*spatial) labels (only unlabelled voxels are classified).
        spacing: voxel spacing (mm) of all axes of ``channel``.
        near_tumour: unlabelled voxels near the real tumours (they vote for the FGT class), or None.
        patch_size: the configuration's patch size (3D): the breast size is also measured in a window of it
            centred on the body.

    Returns:
        ``body_threshold``, class ``cuts``, per-class ``enrichment`` near tumours (None without), breast sizes
        (``breast_size_mm`` of the case, ``breast_size_patch_mm`` in the patch window or None); None where the
        case has too little body to measure.
    """
    threshold = air_threshold(channel)
    inner = inner_body(channel, threshold, spacing) & (seg == 0)
    values = _sample(smooth[inner])
    if values.size < 100 or np.ptp(values) == 0:
        return None
    cuts = [float(threshold_otsu(values))] if FGT_CLASSES == 2 else \
        [float(c) for c in threshold_multiotsu(values, FGT_CLASSES)]
    classes = np.digitize(smooth, cuts)
    enrichment = None
    near = None if near_tumour is None else near_tumour & inner
    if near is not None and near.any():
        everywhere = np.bincount(classes[inner], minlength=FGT_CLASSES) / np.count_nonzero(inner)
        around = np.bincount(classes[near], minlength=FGT_CLASSES) / np.count_nonzero(near)
        enrichment = [float(a / max(e, 1e-6)) for a, e in zip(around, everywhere)]
    patch = None
    if patch_size is not None and len(patch_size) == channel.ndim == 3:
        _, grid, _ = _grid(spacing)
        step = np.array([g.step for g in grid])
        coarse = centred_window(body_mask(channel[grid], threshold), tuple(np.ceil(np.array(patch_size) / step)
                                                                          .astype(int)))
        window = tuple(slice(c.start * s, c.stop * s) for c, s in zip(coarse, step))
        patch = breast_size_mm(channel, threshold, spacing, window)
    return {"body_threshold": threshold, "cuts": cuts, "enrichment": enrichment,
            "breast_size_mm": breast_size_mm(channel, threshold, spacing) if channel.ndim == 3 else None,
            "breast_size_patch_mm": patch}


def summarise_fgt(cases: list[dict], channel: int = 0) -> FGTRegion | None:
    """The plan's FGT region from the training cases' :func:`measure_fgt` (medians over cases; the FGT class by the
    real tumours' vote, else the darkest class)."""
    from nnunet_synth.synth_plan import FGTRegion

    cases = [c for c in cases if c is not None]
    if not cases:
        return None
    cuts = np.median([c["cuts"] for c in cases], axis=0)
    votes = [c["enrichment"] for c in cases if c["enrichment"] is not None]
    if votes:
        fgt = int(np.argmax(np.median(votes, axis=0)))
        why = f"the class most enriched within 10 mm of the real tumours ({len(votes)} cases)"
    else:
        fgt = 0
        why = "no real tumours: the darker class (non-fat-suppressed T1, fat bright)"
    lo = None if fgt == 0 else float(cuts[fgt - 1])
    hi = None if fgt == len(cuts) else float(cuts[fgt])

    def median(key: str) -> float | None:
        values = [c[key] for c in cases if c[key] is not None]
        return float(np.median(values)) if values else None

    return FGTRegion(channel=channel, body_threshold=float(np.median([c["body_threshold"] for c in cases])),
                     range=(lo, hi), smoothing_mm=FGT_SMOOTHING_MM, skin_margin_mm=SKIN_MARGIN_MM,
                     breast_size_mm=median("breast_size_mm"), breast_size_patch_mm=median("breast_size_patch_mm"),
                     source=f"{len(cases)} training cases: body above the air threshold of channel {channel}, "
                            f"{FGT_CLASSES} Otsu classes of the channel smoothed {FGT_SMOOTHING_MM} mm inside it "
                            f"({SKIN_MARGIN_MM} mm of skin left out); FGT is class {fgt} of {FGT_CLASSES} "
                            f"(0 darkest), {why}")
