"""Milliseconds per lesion (mask + placement) per size class and deformation, at a 3d_fullres-sized patch,
on one core.

    python benchmarks/shapes.py [--spacing 2.5 0.8 0.8] [--patch 80 160 160] [-n 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from nnunet_synth.generators.placement import PlacementRules, central_window, place_lesion
from nnunet_synth.generators.shapes import LABELFREE_RADIUS_MM, SIZE_CLASSES, lesion_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.5, 0.8, 0.8])
    parser.add_argument("--patch", type=int, nargs=3, default=[80, 160, 160], help="enlarged patch, voxels")
    parser.add_argument("-n", "--num", type=int, default=30)
    args = parser.parse_args()
    spacing = tuple(args.spacing)
    shape = tuple(args.patch)
    grid = np.indices(shape, dtype=np.float32) - np.array(shape)[:, None, None, None] / 2
    organ = (((grid * np.array(spacing)[:, None, None, None]) / 70.0) ** 2).sum(0) <= 1  # 70 mm ball
    tumour = np.zeros_like(organ)
    window = central_window(shape, tuple(int(n * 0.7) for n in shape))
    rng = np.random.default_rng(0)
    print(f"patch {shape} at {spacing} mm, one core; median ms per lesion (mask / mask + placement)")
    print(f"{'class':8s} " + " ".join(f"{d:>18s}" for d in ("elastic", "simplex", "none")))
    with threadpool_limits(1):
        lesion_mask(8.0, spacing, rng, "simplex")  # builds the simplex lattice once, as a worker does
        for size_class in SIZE_CLASSES:
            cells = []
            for deformation in ("elastic", "simplex", "none"):
                make, total = [], []
                for _ in range(args.num):
                    start = time.perf_counter()
                    mask = lesion_mask(LABELFREE_RADIUS_MM[size_class], spacing, rng, deformation)
                    made = time.perf_counter()
                    place_lesion(mask, organ, organ, tumour, spacing, rng, PlacementRules(), window)
                    make.append(made - start)
                    total.append(time.perf_counter() - start)
                cells.append(f"{1000 * np.median(make):7.1f} / {1000 * np.median(total):7.1f}")
            print(f"{size_class:8s} " + " ".join(f"{c:>18s}" for c in cells))


if __name__ == "__main__":
    main()
