"""Data-loader throughput of synthetic-tumour trainers against vanilla nnUNetTrainer, in one run.

Every trainer builds nnU-Net's real training loader (same dataset, patch size, batch size and worker count).
Rounds are interleaved (vanilla, synth, vanilla, synth, ... for each synth trainer), each timing a fresh loader after
a warm-up, so machine noise hits both alike, and paired: the trainers of a round draw the same cases, patches and
nnU-Net augmentations (global seeds set alike), so the difference is the synthesis. A round's ratio is the synth
rate over the mean of the vanilla rates timed just before and after it, and the median ratio over rounds is printed
with its spread. ``--workers 0`` is nnU-Net's single-process loader (``nnUNet_n_proc_DA=0``): the pure CPU cost
per batch, the quantity that limits nnU-Net on a fast GPU; there the batches themselves are interleaved (vanilla,
synth, ... batch by batch, each pair after the same seeds), which cancels the machine's drift far better than rounds
do. Also times one analytic lesion (shape + placement + texture) in enlarged patches.

    python benchmarks/loader_throughput.py                 # Synth20 on a generated phantom (64x128x128)
    python benchmarks/loader_throughput.py --workers 0 --trainer nnUNetTrainerSynth20 nnUNetTrainerSynth60 \\
        nnUNetTrainerSynth20Large
    python benchmarks/loader_throughput.py -d 501 -c 3d_fullres --workers 4

Target (issue 15): median ratio >= 0.95 single-process for Synth20, Synth60 and Synth20Large.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


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

    import nnunet_synth.trainers
    from nnunet_synth.planning import preprocessed_dir

    cls = nnUNetTrainer if name == "nnUNetTrainer" else getattr(nnunet_synth.trainers, name, None)
    if cls is None:
        raise SystemExit(f"loader_throughput: no trainer {name!r} in nnunet_synth.trainers")
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


def find_case_regions(loader) -> None:
    """Without an organ label, finds every case's placement region up front (a training's loader process finds each
    once and keeps it; ``lesion_milliseconds`` reports that one-off cost per case), so the timed batches measure
    the steady state, not which cases the first batches happen to meet."""
    data_loader = getattr(loader, "data_loader", loader)  # single-process: nnU-Net's loader in an augmenter
    synth = getattr(data_loader, "synth_transform", None)
    regions = getattr(synth, "case_regions", None)
    if regions is not None:
        for identifier in data_loader.indices:
            regions.region(identifier)


def paired_batches(trainers: dict, synth_names: list[str], rounds: int, batches: int, warmup: int
                   ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Single-process loaders, timed batch by batch in turn (vanilla and each synth trainer, the order rotated every
    batch), each batch after the same global seeds, so the trainers draw the same cases, patches and augmentations
    at nearly the same moment: machine noise slower than one batch cancels. Returns per round the rates
    (batches/s) and each synth trainer's ratio (its rate over vanilla's on the same batches)."""
    names = ["nnUNetTrainer", *synth_names]
    loaders = {}
    for name in names:
        train_loader, val_loader = trainers[name].get_dataloaders()
        finish(val_loader)
        loaders[name] = train_loader
        find_case_regions(train_loader)
    seconds = {name: [] for name in names}
    for index in range(-warmup, rounds * batches):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in order:
            random.seed(index)
            np.random.seed(index % 2 ** 32)
            torch.manual_seed(index)
            start = time.perf_counter()
            next(loaders[name])
            if index >= 0:
                seconds[name].append(time.perf_counter() - start)
    rates, ratios = {name: [] for name in names}, {name: [] for name in synth_names}
    for r in range(rounds):
        part = slice(r * batches, (r + 1) * batches)
        for name in names:
            rates[name].append(batches / sum(seconds[name][part]))
        for name in synth_names:
            ratios[name].append(sum(seconds["nnUNetTrainer"][part]) / sum(seconds[name][part]))
    return rates, ratios


def lesion_milliseconds(trainer, num: int, seed: int = 0) -> tuple[dict[str, float], float | None]:
    """Milliseconds per inserted lesion by size class, on enlarged patches cropped around placement-region voxels
    (the organ, or the tissue region without an organ label), the region read as the loader reads it (without an
    organ label: the crop of the case's region, found once per case, whose seconds per case are also returned)."""
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
        image = torch.from_numpy(crop_and_pad_nd(np.asarray(data), bbox, 0).astype(np.float32))
        patches.append((identifier, bbox, image, torch.from_numpy(crop_and_pad_nd(np.asarray(seg), bbox, -1)
                                                                  .astype(np.int16))))
    result, per_case = {}, None
    for size_class in (*SIZE_CLASSES, "any"):
        plan = trainer.synth_plan.replace(shapes={"size_class": size_class}).validated(f"size class {size_class}")
        transform = SynthTumourTransform(plan, 1.0, trainer.configuration_manager.patch_size, seed)
        transform.use_case_regions(ds)
        regions = transform.case_regions
        if regions is not None:  # found once per case per loader process, before the patches are timed
            start = time.perf_counter()
            for identifier, *_ in patches:
                regions.region(identifier)
            per_case = (time.perf_counter() - start) / len(patches)
        times = []
        for i in range(num):
            identifier, bbox, image, seg = patches[i % len(patches)]
            start = time.perf_counter()
            region, depth = (None, None) if regions is None else regions.crop(identifier, *zip(*bbox))
            transform.insert(image, seg, rng, region, depth)
            times.append(time.perf_counter() - start)
        result[size_class] = 1000 * float(np.median(times))
    return result, per_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", help="preprocessed dataset (default: generate a phantom)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--trainer", nargs="+", default=["nnUNetTrainerSynth20"],
                        help="synthetic-tumour trainers compared with vanilla nnUNetTrainer")
    parser.add_argument("--workers", type=int, default=2,
                        help="nnUNet_n_proc_DA of every loader (0: nnU-Net's single-process loader)")
    parser.add_argument("--batches", type=int, default=20, help="batches per round and trainer")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=8, help="batches drawn before timing (drains prefetch)")
    parser.add_argument("--lesions", type=int, default=30, help="lesions timed per size class")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or str(make_phantom(Path(tmp)))
        os.environ["nnUNet_n_proc_DA"] = str(args.workers)
        names = ["nnUNetTrainer", *args.trainer]
        trainers = {name: build_trainer(name, dataset, args.configuration) for name in names}

        def rate(name: str, seed: int) -> float:
            # one loader alive at a time, fresh each round: no worker of another trainer competes for the cores,
            # and prefetched batches are drained before timing starts. The global seeds nnU-Net's case choice and
            # augmentation draw from are set alike for the trainers of one round (the synthetic transform has its
            # own generator), so a round compares the same patches and augmentations with and without synthesis:
            # nnU-Net's own cost varies several-fold between batches, which unpaired rounds mistake for synthesis.
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            train_loader, val_loader = trainers[name].get_dataloaders()
            finish(val_loader)
            time_batches(train_loader, args.warmup)
            value = time_batches(train_loader, args.batches)
            finish(train_loader)
            return value

        rates: dict[str, list[float]] = {name: [] for name in names}
        ratios: dict[str, list[float]] = {name: [] for name in args.trainer}
        if args.workers == 0:
            rates, ratios = paired_batches(trainers, args.trainer, args.rounds, args.batches, args.warmup)
        for round_seed in range(args.rounds if args.workers > 0 else 0):
            before = rate("nnUNetTrainer", round_seed)
            rates["nnUNetTrainer"].append(before)
            for name in args.trainer:  # vanilla, synth, vanilla, synth, ...: each synth between two vanilla rounds
                rates[name].append(rate(name, round_seed))
                after = rate("nnUNetTrainer", round_seed)
                rates["nnUNetTrainer"].append(after)
                ratios[name].append(rates[name][-1] / ((before + after) / 2))
                before = after
        first = trainers[args.trainer[0]]
        conf = first.configuration_manager
        mode = ("single-process (nnUNet_n_proc_DA=0), batches interleaved one by one" if args.workers == 0
                else f"{args.workers} workers, interleaved rounds")
        print(f"dataset {first.plans_manager.dataset_name}, {args.configuration}: patch {conf.patch_size}, "
              f"batch {first.batch_size}, {mode}, {args.rounds} rounds x {args.batches} batches")
        for name, values in rates.items():
            print(f"  {name:28s} {statistics.median(values):7.3f} batches/s (rounds: "
                  f"{', '.join(f'{v:.3f}' for v in values)})")
        from nnunet_synth.injection import achieved_rates

        for name, values in ratios.items():
            counts = achieved_rates(trainers[name].synth_counters)
            print(f"  ratio {name} / vanilla: median {statistics.median(values):.3f} (rounds {min(values):.3f}-"
                  f"{max(values):.3f}; target >= 0.95); synthetic {counts['synthetic']}/{counts['seen']} samples, "
                  f"{counts['skipped']} skipped")
        ms, per_case = lesion_milliseconds(first, args.lesions)
        print(f"  ms per injected lesion ({args.trainer[0]}, median, shape + placement + texture): "
              + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()))
        if per_case is not None:
            print(f"  placement region without an organ label: {per_case:.2f} s per case, found once per case and "
                  "loader process (each patch reads its crop)")


if __name__ == "__main__":
    sys.exit(main())
