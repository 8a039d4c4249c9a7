"""Size presets: how many lesions of which size a synthetic sample gets, always in mm.

Presets (``shapes.size_preset`` of the synth plan):

- ``labelfree``: label-free liver paper (Hu et al., CVPR 2023): radius 4/8/16/32 mm for tiny/small/medium/
  large, each axis ~ U(0.75 r, 1.25 r), with its lesion counts per class (tiny 3-10, small 3-10, medium 2-5,
  large 1-3) scaled down to what fits the patch; ``mixed`` draws every class with its count.
- ``quartile``: pancreas paper (Peng et al.): the dataset's real tumour volumes cut at their quartiles into
  tiny/small/medium/large, a radius per class (median of the class), axes ~ U(r - delta, r + delta) with
  delta = 0.25 r; one lesion per sample, ``mixed`` a random class per sample.
- ``liver_mri``: liver-MRI paper (Quinton et al.): every semi-axis ~ N(27 mm, 4.5 mm); one lesion.
- ``slice_area``: breast 2D paper (Luna et al.): per-slice tumour area bins in pixels (tiny < 200, small
  200-399, medium 400-699, large 700-1599, very_large >= 1600) for 2d configurations.

``size_class`` ``any`` (the default) gives one lesion of a class drawn uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nnunet_synth.generators.shapes import LABELFREE_RADIUS_MM, RADIUS_SPREAD, SIZE_CLASSES

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan

PRESETS = ("labelfree", "quartile", "liver_mri", "slice_area")
LABELFREE_COUNTS = {"tiny": (3, 10), "small": (3, 10), "medium": (2, 5), "large": (1, 3)}
LIVER_MRI_SEMI_AXIS_MM = (27.0, 4.5)
SLICE_AREA_BINS_PX = {"tiny": (50, 200), "small": (200, 400), "medium": (400, 700), "large": (700, 1600),
                      "very_large": (1600, 3200)}
# total synthetic volume may take at most this share of the placement region in the patch
ROOM_FRACTION = 0.3


@dataclass(frozen=True)
class LesionRequest:
    """One lesion to make: its class and semi-axes in mm."""

    size_class: str
    radii_mm: np.ndarray


def slice_area_class(area_px: int) -> str | None:
    """The ``slice_area`` class of a pixel area; None for an empty slice."""
    if area_px <= 0:
        return None
    for name, (_, upper) in SLICE_AREA_BINS_PX.items():
        if name == "very_large" or area_px < upper:
            return name
    raise AssertionError("unreachable")


def class_radii_mm(plan: SynthPlan) -> dict[str, float]:
    """Radius in mm of each size class: the real tumours' quartiles (``quartile``) or the label-free paper's."""
    if plan.shapes.size_preset == "quartile" and plan.tumour_sizes.class_radius_mm:
        return {k: float(v) for k, v in plan.tumour_sizes.class_radius_mm.items()}
    return dict(LABELFREE_RADIUS_MM)


def class_names(preset: str) -> tuple[str, ...]:
    """The size classes a preset knows (besides 'any' and 'mixed')."""
    if preset == "slice_area":
        return tuple(SLICE_AREA_BINS_PX)
    if preset == "liver_mri":
        return ()
    return SIZE_CLASSES


def _axes(radius: float, ndim: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform((1 - RADIUS_SPREAD) * radius, (1 + RADIUS_SPREAD) * radius, size=ndim)


def lesion_requests(plan: SynthPlan, spacing: tuple[float, ...], rng: np.random.Generator,
                    room_mm3: float | None = None) -> list[LesionRequest]:
    """The lesions one synthetic sample gets, as the plan's size preset and class say.

    Args:
        plan: the synth plan (its ``shapes`` and tumour sizes).
        spacing: voxel spacing of the patch (its length gives 2D or 3D).
        rng: random generator.
        room_mm3: volume (area in 2D) of the placement region in the patch; lesion counts are scaled down
            so the lesions take at most ``ROOM_FRACTION`` of it.
    """
    preset, size_class, ndim = plan.shapes.size_preset, plan.shapes.size_class, len(spacing)
    if preset not in PRESETS:
        raise ValueError(f"synth plan size_preset {preset!r} is not one of {PRESETS}")
    names = class_names(preset)
    if size_class not in (*names, "any", "mixed") and names:
        raise ValueError(f"size_class {size_class!r} is not one of {(*names, 'any', 'mixed')} (preset {preset})")
    if preset == "liver_mri":
        mu, sigma = LIVER_MRI_SEMI_AXIS_MM
        return [LesionRequest("liver_mri", np.maximum(rng.normal(mu, sigma, size=ndim), 1.0))]
    chosen = names[rng.integers(len(names))] if size_class in ("any",) or (
        size_class == "mixed" and preset != "labelfree") else size_class
    if preset == "slice_area":
        if ndim != 2:
            raise ValueError("size preset 'slice_area' is for 2d configurations (per-slice pixel areas)")
        area_px = rng.uniform(*SLICE_AREA_BINS_PX[chosen])
        radius = np.sqrt(area_px / np.pi) * float(np.sqrt(spacing[0] * spacing[1]))
        return [LesionRequest(chosen, _axes(radius, ndim, rng))]
    radii = class_radii_mm(plan)
    if preset == "quartile" or size_class == "any":
        return [LesionRequest(chosen, _axes(radii[chosen], ndim, rng))]
    classes = SIZE_CLASSES if size_class == "mixed" else (chosen,)
    counts = {c: int(rng.integers(LABELFREE_COUNTS[c][0], LABELFREE_COUNTS[c][1] + 1)) for c in classes}
    if room_mm3 is not None:
        unit = (4 / 3 * np.pi) if ndim == 3 else np.pi
        total = sum(n * unit * radii[c] ** ndim for c, n in counts.items())
        scale = min(1.0, ROOM_FRACTION * room_mm3 / total) if total else 1.0
        counts = {c: int(np.floor(n * scale)) for c, n in counts.items()}
        if not any(counts.values()):  # keep the smallest requested lesion: placement decides if it fits
            counts[classes[0]] = 1
    return [LesionRequest(c, _axes(radii[c], ndim, rng)) for c in classes for _ in range(counts[c])]
