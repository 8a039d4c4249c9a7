"""The cost of one lesion: milliseconds per synthetic lesion of the whole lesion pipeline (size, mask, placement,
texture, label) on the label-free liver paper's benchmark volume, per size class and deformation, on one core.

The volume is the label-free paper's (Hu et al., CVPR 2023) benchmark geometry: 160 x 256 x 256 voxels at 1 mm
with an ellipsoid organ, its size classes and lesion counts (``labelfree`` preset). Each repetition is one
:func:`~nnunet_synth.generators.lesions.insert_tumours` call (as the trainer transform and the banks make it) with a
fresh seed; its time is divided by the lesions it placed. The same figures are printed in units of a reference
operation timed in the same run (one ``scipy.ndimage.gaussian_filter(sigma=1)`` of the volume), so numbers compare
across machines. The issue's targets (5x below the peer's generator on this volume and machine class): tiny <= 6 ms,
small <= 7, medium <= 15, large <= 60 ms per lesion.

    python benchmarks/lesion_cost.py [-n 7] [--deformations elastic simplex none] [--json cost.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from threadpoolctl import threadpool_limits

from nnunet_synth import SynthPlan, insert_tumours
from nnunet_synth.generators.shapes import SIZE_CLASSES

SHAPE = (160, 256, 256)
SPACING = (1.0, 1.0, 1.0)
ORGAN_SEMI_AXES_MM = (55.0, 95.0, 85.0)  # a liver-sized ellipsoid
TARGET_MS = {"tiny": 6.0, "small": 7.0, "medium": 15.0, "large": 60.0}


def benchmark_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(1, Z, Y, X) CT-like image and (Z, Y, X) labels: background 0, organ 1, one real 6 mm tumour 2."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    centre = [n / 2 for n in SHAPE]
    organ = sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grid, centre, SPACING, ORGAN_SEMI_AXES_MM)) <= 1
    seg = organ.astype(np.uint8)
    tumour = sum(((g - c - 20) * s / 6.0) ** 2 for g, c, s in zip(grid, centre, SPACING)) <= 1
    seg[tumour & organ] = 2
    image = rng.normal(0.0, 0.3, SHAPE).astype(np.float32)
    image[organ] += 1.0
    image[seg == 2] -= 0.8
    return image[None], seg


def time_reference(image: np.ndarray, repeats: int = 5) -> float:
    """Median seconds of the reference operation: one gaussian_filter(sigma=1) of the volume."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gaussian_filter(image[0], 1.0)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def lesion_cost(plan: SynthPlan, image: np.ndarray, seg: np.ndarray, repeats: int, seed: int = 0) -> list[float]:
    """Seconds per placed lesion of ``repeats`` insert_tumours calls (one synthetic sample each)."""
    per_lesion = []
    for r in range(repeats):
        rng = np.random.default_rng(seed + r)
        start = time.perf_counter()
        _, _, lesions = insert_tumours(image, seg, SPACING, plan, rng)
        elapsed = time.perf_counter() - start
        if lesions:
            per_lesion.append(elapsed / len(lesions))
    return per_lesion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--repeats", type=int, default=7, help="insert_tumours calls per class and deformation")
    parser.add_argument("--deformations", nargs="+", default=["elastic", "simplex", "none"],
                        choices=["elastic", "simplex", "none"], help="mask deformations measured")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    image, seg = benchmark_volume()
    base = SynthPlan.for_volume(image, seg, SPACING, tumour_label=2, organ_label=1, name="lesion_cost")
    rows = []
    with threadpool_limits(1):
        reference = time_reference(image)
        print(f"volume {SHAPE} at {SPACING} mm, one core; reference gaussian_filter(sigma=1) of the volume: "
              f"{1000 * reference:.0f} ms")
        print(f"{'class':7s} {'deformation':11s} {'ms/lesion (median, min-max)':>30s} {'x reference':>12s} "
              f"{'target ms':>10s}")
        insert_tumours(image, seg, SPACING, base, np.random.default_rng(99))  # warm-up: simplex lattice, imports
        for size_class in SIZE_CLASSES:
            for deformation in args.deformations:
                plan = base.replace(shapes={"size_preset": "labelfree", "size_class": size_class,
                                            "deformation": deformation})
                ms = 1000 * np.asarray(lesion_cost(plan, image, seg, args.repeats))
                median = float(np.median(ms)) if ms.size else float("nan")
                spread = f"{ms.min():.1f}-{ms.max():.1f}" if ms.size else "-"
                rows.append({"size_class": size_class, "deformation": deformation, "median_ms": median,
                             "min_ms": float(ms.min()) if ms.size else None,
                             "max_ms": float(ms.max()) if ms.size else None,
                             "reference_units": median / (1000 * reference), "target_ms": TARGET_MS[size_class]})
                print(f"{size_class:7s} {deformation:11s} {f'{median:.1f} ({spread})':>30s} "
                      f"{median / (1000 * reference):12.3f} {TARGET_MS[size_class]:10.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"reference_ms": 1000 * reference, "shape": SHAPE, "rows": rows}, indent=1),
                             encoding="utf-8")


if __name__ == "__main__":
    main()
