"""Data-loader throughput of nnUNetTrainerSynth20 (analytic) against vanilla nnUNetTrainer, in one run.

Both trainers build nnU-Net's real training loader (same dataset, patch size, batch size and worker
count); each round times a fresh loader of one trainer after a warm-up, the order alternating, so machine
noise hits both alike. Also times one
analytic lesion (shape + placement + texture) in patches of the enlarged 3d_fullres patch size.

    python benchmarks/loader_throughput.py                 # on a generated phantom (64x128x128)
    python benchmarks/loader_throughput.py -d 501 -c 3d_fullres --workers 4

Target (DESIGN.md): ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_phantom(root: Path) -> int:
    from nnunet_synth.phantom import PhantomConfig, write_phantom_dataset

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(root / name)
    config = PhantomConfig(shape=(64, 128, 128), spacing=(2.5, 1.0, 1.0), tumour_radii_mm=(4.0, 8.0, 12.0, 16.0))
    write_phantom_dataset(995, num_train=6, num_test=0, config=config, seed=5)
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}  # planning breaks with 0
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "995", "-c", "3d_fullres", "-np", "2"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return 995


def build_trainer(name: str, dataset: str, configuration: str):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_synth.planning import preprocessed_dir
    from nnunet_synth.trainers import nnUNetTrainerSynth20

    cls = {"nnUNetTrainer": nnUNetTrainer, "nnUNetTrainerSynth20": nnUNetTrainerSynth20}[name]
    base = preprocessed_dir(dataset)
    plans = load_json(base / "nnUNetPlans.json")
    plans["continue_training"] = False
    trainer = cls(plans, configuration, 0, load_json(base / "dataset.json"), torch.device("cpu"))
    trainer.initialize()
    return trainer


def time_batches(loader, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        next(loader)
    return n / (time.perf_counter() - start)


def finish(loader) -> None:
    """Stops a multi-process augmenter's workers (a single-threaded one has none)."""
    if hasattr(loader, "_finish"):
        loader._finish()


def lesion_milliseconds(trainer, num: int, seed: int = 0) -> dict[str, float]:
    """Milliseconds per inserted lesion by size class, on enlarged patches cropped around placement-region voxels
    (the organ, or the tissue region without an organ label)."""
    import torch
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_synth.generators.lesions import placement_region
    from nnunet_synth.generators.shapes import SIZE_CLASSES
    from nnunet_synth.injection import SynthTumourTransform

    _, _, initial_patch, _ = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    ds = infer_dataset_class(trainer.preprocessed_dataset_folder)(trainer.preprocessed_dataset_folder)
    rng = np.random.default_rng(seed)
    patches = []
    for identifier in sorted(ds.identifiers):
        data, seg, _, _ = ds.load_case(identifier)
        region = np.argwhere(placement_region(np.asarray(data), np.asarray(seg[0]), trainer.synth_plan))
        if not len(region):
            continue
        centre = region[rng.integers(len(region))]
        bbox = [[int(c) - p // 2, int(c) - p // 2 + p] for c, p in zip(centre, initial_patch)]
        patches.append((torch.from_numpy(crop_and_pad_nd(np.asarray(data), bbox, 0).astype(np.float32)),
                        torch.from_numpy(crop_and_pad_nd(np.asarray(seg), bbox, -1).astype(np.int16))))
    result = {}
    for size_class in (*SIZE_CLASSES, "any"):
        plan = trainer.synth_plan.replace(shapes={"size_class": size_class}).validated(f"size class {size_class}")
        transform = SynthTumourTransform(plan, 1.0, trainer.configuration_manager.patch_size, seed)
        times = []
        for i in range(num):
            image, seg = patches[i % len(patches)]
            start = time.perf_counter()
            transform.insert(image, seg, rng)
            times.append(time.perf_counter() - start)
        result[size_class] = 1000 * float(np.median(times))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", help="preprocessed dataset (default: generate a phantom)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--workers", type=int, default=2, help="nnUNet_n_proc_DA for both loaders")
    parser.add_argument("--batches", type=int, default=20, help="batches per round and trainer")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=8, help="batches drawn before timing (drains prefetch)")
    parser.add_argument("--lesions", type=int, default=30, help="lesions timed per size class")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or str(make_phantom(Path(tmp)))
        os.environ["nnUNet_n_proc_DA"] = str(args.workers)
        trainers = {name: build_trainer(name, dataset, args.configuration)
                    for name in ("nnUNetTrainer", "nnUNetTrainerSynth20")}
        rates: dict[str, list[float]] = {name: [] for name in trainers}
        for r in range(args.rounds):
            # one loader alive at a time, fresh each round, order alternating: no worker of the other
            # trainer competes for the cores, and prefetched batches are drained before timing starts
            for name in (list(trainers) if r % 2 == 0 else list(reversed(list(trainers)))):
                train_loader, val_loader = trainers[name].get_dataloaders()
                finish(val_loader)
                time_batches(train_loader, args.warmup)
                rates[name].append(time_batches(train_loader, args.batches))
                finish(train_loader)
        synth = trainers["nnUNetTrainerSynth20"]
        ms = lesion_milliseconds(synth, args.lesions)
        from nnunet_synth.injection import achieved_rates

        counts = achieved_rates(synth.synth_counters)
        conf = synth.configuration_manager
        print(f"dataset {synth.plans_manager.dataset_name}, {args.configuration}: patch {conf.patch_size}, "
              f"batch {synth.batch_size}, workers {args.workers}, {args.rounds} rounds x {args.batches} batches")
        base = statistics.median(rates["nnUNetTrainer"])
        for name, values in rates.items():
            print(f"  {name:22s} {statistics.median(values):7.3f} batches/s (rounds: "
                  f"{', '.join(f'{v:.3f}' for v in values)})")
        print(f"  ratio Synth20 / vanilla: {statistics.median(rates['nnUNetTrainerSynth20']) / base:.3f} "
              f"(target >= 0.95)")
        print(f"  achieved synthetic rate: {counts['synthetic']}/{counts['seen']} samples, {counts['skipped']} skipped")
        print("  ms per injected lesion (median, shape + placement + texture): "
              + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()))


if __name__ == "__main__":
    sys.exit(main())
