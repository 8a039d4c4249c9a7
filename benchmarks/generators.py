"""Tumours per second and peak memory of the generator backends, per device, at the preset's patch size.

Every learned backend is timed with a randomly initialised model of its preset (sampling cost does not
depend on the weights; pass --checkpoint to time a trained one) and the analytic backend on the same patch
in the same run. Each measurement runs in a fresh process, so peak memory is its own: peak GPU memory
allocated on cuda, peak resident memory of the process on cpu (with the resident memory after imports,
before the backend is built, for reference).

    python benchmarks/generators.py                  # cpu, tiny presets, the papers' DDIM steps (ddpm 250, ldm 10)
    python benchmarks/generators.py --device cpu cuda --preset paper --sampling-steps 50 --num 5
    python benchmarks/generators.py --threads 1     # on a shared CPU: avoids OpenMP stalls between threads
    python benchmarks/generators.py --backends ldm --device cuda --preset paper   # one backend only
    python benchmarks/generators.py --online --device cuda   # ldm online trainers: generation share of a step
    python benchmarks/generators.py --training --device cuda --preset paper   # training s/iteration, AMP on/off

``--online`` times what ``nnUNetTrainerSynthNLDMOnline.train_step`` does per batch: LDM inpainting of every
sample of an nnU-Net batch, then a training step of nnU-Net's default 3d_fullres U-Net on it, and prints the
share of the step spent in generation (the trainers log the same share for real training every epoch).

``--training`` times optimiser steps of generator training (``nnUNetv2_synth_train_generator``'s step: forward in
autocast, the shared :class:`~nnunet_synth.generators.training_utils.MixedPrecision` step) with mixed precision
off and on, on random batches of the preset's size: the ddpm U-Net, the ldm VQ-VAE (stage 1) and the ldm latent
U-Net (stage 3); seconds per iteration and peak memory.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np

ORGAN, TUMOUR = 1, 2
SPACING = (3.0, 1.5, 1.5)  # the liver-MRI paper's 1.5 x 1.5 x 3 mm in nnU-Net's (z, y, x) order


def make_plan(spacing: tuple[float, ...], num_channels: int):
    """A synth plan for a patch of the benchmark (hypodense contrast of 1-2 organ standard deviations)."""
    from nnunet_synth.synth_plan import ChannelPrior, SynthPlan

    channels = tuple(ChannelPrior(name=f"c{c}", normalization="ZScoreNormalization", organ_mean=0.0, organ_std=1.0,
                                  contrast_range=(-2.0, -1.0)) for c in range(num_channels))
    plan = SynthPlan(dataset_name="Dataset999_Benchmark", configuration="3d_fullres", spacing=tuple(spacing),
                     tumour_label=TUMOUR, organ_label=ORGAN, channels=channels)
    return plan.replace(shapes={"size_class": "medium"}).validated("benchmark plan")


def random_checkpoint(preset_name: str, plan: dict, path: Path) -> Path:
    """A valid ddpm checkpoint with randomly initialised weights of ``preset_name``."""
    import torch

    from nnunet_synth.generators.checkpoints import save_checkpoint
    from nnunet_synth.generators.ddpm.model import build_model, get_preset

    preset = get_preset(preset_name)
    channels = len(plan.channels)
    torch.manual_seed(0)
    model = build_model(preset, channels)
    config = {"preset": preset_name, "preset_params": preset.to_dict(), "dataset_name": plan.dataset_name,
              "configuration": plan.configuration, "num_channels": channels, "spacing": list(plan.spacing),
              "patch_size": list(preset.patch_size), "intensity_range": [[-10.0, 10.0]] * channels}
    save_checkpoint({"backend": "ddpm", "config": config, "model": model.state_dict()}, path)
    return path


def random_ldm_checkpoint(preset_name: str, plan: dict, path: Path) -> Path:
    """A valid diffusion-stage ldm checkpoint with randomly initialised VQ-VAE and U-Net of ``preset_name``."""
    import torch

    from nnunet_synth.generators.checkpoints import save_checkpoint
    from nnunet_synth.generators.ldm.model import build_unet, build_vqvae, get_preset

    preset = get_preset(preset_name)
    channels = len(plan.channels)
    torch.manual_seed(0)
    config = {"preset": preset_name, "preset_params": preset.to_dict(), "dataset_name": plan.dataset_name,
              "configuration": plan.configuration, "num_channels": channels, "spacing": list(plan.spacing),
              "volume_size": list(preset.volume_size), "intensity_range": [[-10.0, 10.0]] * channels,
              "scale_factor": 1.0, "blend_margin": preset.blend_margin, "stage": "diffusion"}
    save_checkpoint({"backend": "ldm", "stage": "diffusion", "config": config,
                     "vqvae": build_vqvae(preset, channels).state_dict(), "unet": build_unet(preset).state_dict()},
                    path)
    return path


def patch_and_limit(learned: str, preset_name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The learned backend's working patch and its largest lesion box (the analytic run gets the same)."""
    if learned == "ldm":
        from nnunet_synth.generators.ldm.model import get_preset as ldm_preset

        preset = ldm_preset(preset_name)
        patch = tuple(preset.volume_size)
        return patch, tuple(p - 2 * max(preset.blend_margin + 1, p // 8) for p in patch)
    from nnunet_synth.generators.ddpm.model import get_preset

    patch = tuple(get_preset(preset_name).patch_size)
    # the ddpm backend's limit (an eighth of the patch as context per side)
    return patch, tuple(p - 2 * max(1, p // 8) for p in patch)


def lesion_in_patch(patch: tuple[int, ...], plan, limit: tuple[int, ...], rng: np.random.Generator):
    """A lesion from the lesion pipeline, about half the largest size the backend allows, in an all-organ patch."""
    from nnunet_synth.generators.lesions import plan_lesions
    from nnunet_synth.generators.shapes import SIZE_CLASSES
    from nnunet_synth.synth_plan import TumourSizes

    radius = 0.25 * min(lim * s for lim, s in zip(limit, plan.spacing))
    sizes = TumourSizes(count=4, cases=4, class_radius_mm=dict.fromkeys(SIZE_CLASSES, radius))
    sized = plan.replace(shapes={"size_preset": "quartile", "size_class": "small"}, tumour_sizes=sizes)
    organ = np.full(patch, ORGAN, dtype=np.int16)
    for _ in range(100):
        placed = plan_lesions(np.zeros((1, *patch), np.float32), organ, sized, rng, max_lesion_shape=limit)
        if placed:
            return placed[0].lesion
    raise RuntimeError(f"no lesion fits {limit}")


def measure(backend: str, device: str, preset: str, steps: int, num: int, channels: int,
            checkpoint: str | None, threads: int | None, learned: str = "ddpm") -> dict:
    """Runs in a fresh process: builds the backend, inserts ``num`` tumours after one warm-up, reports."""
    import resource

    import torch

    if threads:
        torch.set_num_threads(threads)

    from nnunet_synth.generators import get_backend

    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    patch, limit = patch_and_limit(learned, preset)
    plan = make_plan(SPACING, channels)
    with tempfile.TemporaryDirectory() as tmp:
        if backend != "analytic":
            make = random_ldm_checkpoint if backend == "ldm" else random_checkpoint
            path = checkpoint or str(make(preset, plan, Path(tmp) / "random.pth"))
            plan = plan.replace(backend=backend, backend_params={"checkpoint": path, "sampling_steps": steps,
                                                                 "device": device})
        generator = get_backend(backend)(plan)
        # the learned backend's lesion limit for both, so both get equal lesions
        rng = np.random.default_rng(0)
        image = rng.normal(0, 1, (channels, *patch)).astype(np.float32)
        lesions = [lesion_in_patch(patch, plan, limit, rng) for _ in range(num + 1)]
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        generator.synthesize(image.copy(), lesions[0], SPACING, rng)  # warm-up (kernels, caches)
        start = time.perf_counter()
        for lesion in lesions[1:]:
            generator.synthesize(image.copy(), lesion, SPACING, rng)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" and backend != "analytic" else None
    return {"backend": backend, "device": device if backend != "analytic" else "cpu", "preset": preset,
            "patch": patch, "steps": steps if backend != "analytic" else None, "tumours_per_s": num / elapsed,
            "s_per_tumour": elapsed / num, "voxels": int(np.mean([les.num_voxels for les in lesions])),
            "peak_gpu_mb": peak, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "baseline_rss_mb": baseline_mb}


ONLINE_PATCH = {"cpu": (16, 32, 32), "cuda": (64, 128, 128)}  # nnU-Net batch patch per device (batch 2)


def measure_online(device: str, preset: str, steps: int, threads: int | None) -> dict:
    """Runs in a fresh process: seconds of LDM inpainting and of an nnU-Net training step for one batch."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_synth.generators.ldm.backend import load_models
    from nnunet_synth.generators.ldm.model import build_sampling_scheduler
    from nnunet_synth.generators.ldm.online import inpaint_batch

    if threads:
        torch.set_num_threads(threads)
    patch, channels = ONLINE_PATCH[device], 1
    plan = make_plan(SPACING, channels)
    stages = 4 if device == "cpu" else 6  # nnU-Net's default depth for such patches
    network = PlainConvUNet(channels, stages, [min(32 * 2 ** i, 320) for i in range(stages)], torch.nn.Conv3d, 3,
                            [1] + [2] * (stages - 1), 2, 3, 2, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                            nonlin_kwargs={"inplace": True}).to(device)
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, momentum=0.99, nesterov=True)
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.normal(0, 1, (2, channels, *patch)).astype(np.float32)).to(device)
    target = torch.zeros((2, 1, *patch), device=device)
    target[:, :, 2:-2, 4:-4, 4:-4] = ORGAN

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        models, _ = load_models(random_ldm_checkpoint(preset, plan, Path(tmp) / "random.pth"), device=device)
    scheduler = build_sampling_scheduler(steps)
    generation, training = [], []
    for _ in range(4):  # the first round warms up kernels and caches
        sync()
        start = time.perf_counter()
        new_data, new_target, _ = inpaint_batch(models, scheduler, data, target, plan, 1.0, rng)
        sync()
        generation.append(time.perf_counter() - start)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, enabled=device == "cuda"):
            loss = torch.nn.functional.cross_entropy(network(new_data), new_target[:, 0].long())
        loss.backward()
        optimizer.step()
        sync()
        training.append(time.perf_counter() - start)
    gen, train = float(np.mean(generation[1:])), float(np.mean(training[1:]))
    return {"device": device, "preset": preset, "patch": patch, "steps": steps, "generation_s": gen,
            "training_s": train, "share": gen / (gen + train)}


TRAINING_PARTS = ("ddpm", "ldm-vqvae", "ldm-diffusion")


def measure_training(part: str, device: str, preset_name: str, amp: bool, iterations: int, channels: int,
                     threads: int | None) -> dict:
    """Runs in a fresh process: seconds per optimiser step of one generator network, mixed precision on or off."""
    import resource

    import torch

    from nnunet_synth.generators.training_utils import MixedPrecision

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    if part == "ddpm":
        from nnunet_synth.generators.ddpm.model import build_model, get_preset

        preset = get_preset(preset_name)
        model = build_model(preset, channels).to(dev)
        x = torch.randn(preset.batch_size, channels + 1, *preset.patch_size, device=dev)

        def forward():
            t = torch.randint(0, 1000, (len(x),), device=dev)
            return torch.nn.functional.mse_loss(model(x, timesteps=t).float(), x[:, :channels])
    elif part == "ldm-vqvae":
        from nnunet_synth.generators.ldm.model import build_vqvae, get_preset

        preset = get_preset(preset_name)
        model = build_vqvae(preset, channels).to(dev)
        x = torch.randn(preset.vq_batch_size, channels, *preset.vq_patch_size, device=dev)

        def forward():
            recon, quantization = model(x)
            return torch.nn.functional.l1_loss(recon.float(), x) + quantization
    else:
        from nnunet_synth.generators.ldm.model import build_unet, get_preset

        preset = get_preset(preset_name)
        model = build_unet(preset).to(dev)
        x = torch.randn(preset.diffusion_batch_size, 2 * preset.embedding_dim + 1, *preset.latent_volume, device=dev)

        def forward():
            t = torch.randint(0, 1000, (len(x),), device=dev)
            return torch.nn.functional.mse_loss(model(x, timesteps=t).float(), x[:, :preset.embedding_dim])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    precision = MixedPrecision(dev, amp)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(iterations + 1):  # the first warms up kernels and caches
        if i == 1 and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        with precision.autocast():
            loss = forward()
        precision.step(loss, optimizer, model.parameters(), 1.0)
        sync()
        times.append(time.perf_counter() - start)
    peak = (f"{torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB GPU" if device == "cuda" else
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS")
    return {"part": part, "device": device, "preset": preset_name, "precision": precision.describe(),
            "s_per_iteration": float(np.median(times[1:])), "peak": peak,
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", nargs="+", choices=["cpu", "cuda"], default=["cpu"])
    parser.add_argument("--backends", nargs="+", choices=["ddpm", "ldm"], default=["ddpm", "ldm"],
                        help="learned backends to time (each with the analytic backend on its patch)")
    parser.add_argument("--preset", default=None, help="preset (default: tiny on cpu, paper on cuda)")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="DDIM steps (default: the papers', ddpm 250, ldm 10)")
    parser.add_argument("--num", type=int, default=3, help="tumours timed per backend and device")
    parser.add_argument("--channels", type=int, default=1, help="image channels")
    parser.add_argument("--checkpoint", default=None, help="trained checkpoint of the (one) learned backend "
                        "(default: random weights)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--online", action="store_true", help="ldm online trainers: share of a training step "
                        "spent in generation (every sample of the batch inpainted)")
    parser.add_argument("--training", action="store_true", help="generator training: seconds per optimiser step "
                        "and peak memory with mixed precision off and on")
    parser.add_argument("--iterations", type=int, default=5, help="--training: timed steps per measurement")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    if args.training:
        print(f"{'network':14} {'device':6} {'preset':7} {'params':>8} {'precision':46} {'s/iteration':>11} "
              f"{'peak memory':>16}")
        for device in args.device:
            preset = args.preset or ("paper" if device == "cuda" else "tiny")
            for part in TRAINING_PARTS:
                for amp in (False, True):
                    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                        r = pool.submit(measure_training, part, device, preset, amp, args.iterations, args.channels,
                                        args.threads).result()
                    print(f"{r['part']:14} {r['device']:6} {r['preset']:7} {r['parameters'] / 1e6:>7.1f}M "
                          f"{r['precision']:46} {r['s_per_iteration']:>11.4f} {r['peak']:>16}")
        return
    if args.online:
        print("ldm online: batch 2, every sample inpainted, then one nnU-Net training step (random weights)")
        for device in args.device:
            preset = args.preset or ("paper" if device == "cuda" else "tiny")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                r = pool.submit(measure_online, device, preset, args.sampling_steps or 10, args.threads).result()
            print(f"  {r['device']:5} preset {r['preset']:6} patch {r['patch']} {r['steps']} DDIM steps: generation "
                  f"{r['generation_s']:.3f} s, training step {r['training_s']:.3f} s, generation share "
                  f"{r['share']:.1%}")
        return

    if args.checkpoint and len(args.backends) > 1:
        parser.error("--checkpoint needs exactly one --backends entry")
    default_steps = {"ddpm": 250, "ldm": 10}
    jobs = []
    for learned in args.backends:
        for device in args.device:
            preset = args.preset or ("paper" if device == "cuda" else "tiny")
            steps = args.sampling_steps or default_steps[learned]
            jobs.append((learned, device, preset, steps, learned))
            jobs.append(("analytic", "cpu", preset, steps, learned))  # same patch, same run
    rows = []
    for backend, device, preset, steps, learned in jobs:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            rows.append(pool.submit(measure, backend, device, preset, steps, args.num, args.channels,
                                    args.checkpoint, args.threads, learned).result())
    import torch

    print(f"torch {torch.__version__}, CPU threads {args.threads or torch.get_num_threads()}")
    print(f"{'backend':9} {'device':6} {'preset':7} {'patch (z,y,x)':15} {'steps':>5} {'lesion vox':>10} "
          f"{'tumours/s':>10} {'s/tumour':>9} {'peak memory':>32}")
    for r in rows:
        memory = (f"{r['peak_gpu_mb']:.0f} MiB GPU" if r["peak_gpu_mb"] is not None else
                  f"{r['peak_rss_mb']:.0f} MiB RSS ({r['baseline_rss_mb']:.0f} after imports)")
        print(f"{r['backend']:9} {r['device']:6} {r['preset']:7} {str(tuple(r['patch'])):15} "
              f"{r['steps'] if r['steps'] else '-':>5} {r['voxels']:>10} {r['tumours_per_s']:>10.3f} "
              f"{r['s_per_tumour']:>9.3f} {memory:>32}")


if __name__ == "__main__":
    main()
