"""Training of the 3D DDPM inpainting model on nnU-Net's preprocessed data (liver-MRI paper, section 2.3).

Patches of the preset's size are cropped around real tumours (connected components of the tumour label,
with random shifts that keep a tumour that fits wholly inside, and random flips); the paper's "random flipping and
rotation" (section 2.3) adds, with probability ``ROTATION_PROBABILITY``, a rotation in the axial plane (the last two
axes, in mm so anisotropic voxels are not sheared) by an angle uniform within ``MAX_ROTATION_DEG`` (the paper gives
no angle; small angles keep the anatomy the model inpaints into as it is at sampling time), cut from a larger crop
so no corner is padding. The tumour voxels are the inpainting mask. Noise goes only inside the mask and the loss
is computed only there (eqs. 1 and 3). A few of the training-fold cases are held out of the generator's training
for a validation loss on fixed noise and timesteps; the best checkpoint by that loss is kept, and ``--save-every K``
keeps ``checkpoint_iter{N:07d}.pth`` every K iterations (for checkpoint selection). ``torchrun`` runs one process
per GPU with DistributedDataParallel: every rank draws its own patches, rank 0 validates and writes. Patches are
drawn in background processes (``-np``), mixed precision on CUDA (``--amp``); see
:mod:`nnunet_synth.generators.training_utils`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_synth.generators.checkpoints import (
    GeneratorCheckpointError,
    iteration_checkpoint_name,
    load_checkpoint,
    save_checkpoint,
)
from nnunet_synth.generators.ddpm.model import (
    BETA_SCHEDULE,
    NUM_TRAIN_TIMESTEPS,
    PRESETS,
    build_model,
    build_training_scheduler,
    get_preset,
)
from nnunet_synth.generators.ddpm.sampling import masked_noise_loss, masked_noisy_sample
from nnunet_synth.generators.training_utils import (
    MixedPrecision,
    PatchSource,
    TumourSite,
    append_log,
    as_tensor,
    batch_loader,
    find_tumours,
    intensity_range,
    iteration_seed,
    plot_losses,
    setup_distributed,
    split_generator_cases,
)

__all__ = ["PRESETS", "TrainingPatches", "rotate_axial", "train", "training_crop"]

BACKEND = "ddpm"
MAX_VAL_CROPS = 32
VAL_TIMESTEPS_PER_CROP = 4
GRAD_CLIP_NORM = 1.0
# config entries a resumed run must share with its checkpoint
RESUME_KEYS = ("dataset_name", "configuration", "fold", "num_channels", "preset", "patch_size", "tumour_label")
# training-patch rotation in the axial plane (the paper's "random flipping and rotation"; no angle given)
ROTATION_PROBABILITY = 0.5
MAX_ROTATION_DEG = 15.0


def rotate_axial(image: np.ndarray, mask: np.ndarray, angle_deg: float, spacing: tuple[float, ...],
                 patch_size: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The central ``patch_size`` of (C, z, y, x) ``image`` and (1, z, y, x) ``mask``, rotated by ``angle_deg`` in
    the (y, x) plane about the central voxel (index ``shape // 2``, as :class:`PatchSource` centres its crops).

    The rotation is in mm (``spacing`` of z, y, x), so it stays a rotation for anisotropic in-plane voxels. Linear
    interpolation; the mask is the rotated mask thresholded at one half.
    """
    from scipy.ndimage import affine_transform

    angle = np.deg2rad(angle_deg)
    sp = np.asarray(spacing, dtype=float)[-3:]
    rotation = np.eye(3)
    rotation[1:, 1:] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    # output voxel o -> input voxel: centre_in + S^-1 R S (o - centre_out), S = diag(spacing)
    matrix = np.diag(1 / sp) @ rotation @ np.diag(sp)
    centre_out = np.array(patch_size) // 2
    offset = np.array(image.shape[1:]) // 2 - matrix @ centre_out
    kwargs = dict(matrix=matrix, offset=offset, output_shape=tuple(patch_size), order=1, mode="nearest")
    new_image = np.stack([affine_transform(c, **kwargs) for c in image.astype(np.float32)])
    new_mask = affine_transform(mask[0].astype(np.float32), **kwargs)[None] >= 0.5
    return new_image.astype(np.float32), new_mask.astype(np.float32)


def training_crop(source: PatchSource, site: TumourSite, rng: np.random.Generator, spacing: tuple[float, ...]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One training patch: shifted and flipped as :meth:`PatchSource.crop`, and with probability
    ``ROTATION_PROBABILITY`` rotated in the axial plane by up to ``MAX_ROTATION_DEG`` (see :func:`rotate_axial`).

    Returns:
        float32 image (C, *patch) and float32 mask (1, *patch) in {0, 1}.
    """
    if rng.uniform() >= ROTATION_PROBABILITY:
        return source.crop(site, rng)
    angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
    patch = np.array(source.patch_size)
    slack = np.maximum(patch - np.array(site.size), 0) // 2  # PatchSource's shift: a tumour that fits stays whole
    centre = np.array(site.centre) + rng.integers(-slack, slack + 1)
    # the rotated patch's footprint in the (y, x) plane, in voxels of each axis, plus a voxel for interpolation
    sp = np.asarray(spacing, dtype=float)[-3:]
    half_mm = patch[1:] * sp[1:] / 2
    c, s = abs(np.cos(np.deg2rad(angle))), abs(np.sin(np.deg2rad(angle)))
    footprint = np.array([c * half_mm[0] + s * half_mm[1], s * half_mm[0] + c * half_mm[1]]) / sp[1:]
    larger = (patch[0], *(2 * np.ceil(footprint).astype(int) + 3))
    wide = PatchSource(source.dataset, larger, source.tumour_label)
    image, mask = wide.crop(dataclasses.replace(site, centre=tuple(int(v) for v in centre)), None)
    image, mask = rotate_axial(image, mask, angle, tuple(sp), tuple(int(v) for v in patch))
    flips = tuple(a + 1 for a in range(len(patch)) if rng.uniform() < 0.5)
    if flips:
        image, mask = np.flip(image, flips), np.flip(mask, flips)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


@dataclasses.dataclass(frozen=True)
class TrainingPatches:
    """Draws one training batch (images, masks) of :func:`training_crop` patches around random training tumours;
    picklable, so background loader processes can run it."""

    source: PatchSource
    sites: list[TumourSite]
    batch_size: int
    spacing: tuple[float, ...]

    def __call__(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        picks = rng.integers(len(self.sites), size=self.batch_size)
        crops = [training_crop(self.source, self.sites[i], rng, self.spacing) for i in picks]
        return np.stack([c[0] for c in crops]), np.stack([c[1] for c in crops])


class _Validation:
    """Fixed held-out crops, noise and timesteps: a validation loss comparable across the whole training."""

    def __init__(self, source: PatchSource, sites: list[TumourSite], seed: int, device: torch.device):
        rng = np.random.default_rng([seed, 7])
        if len(sites) > MAX_VAL_CROPS:
            sites = [sites[i] for i in sorted(rng.choice(len(sites), MAX_VAL_CROPS, replace=False))]
        crops = [source.crop(s, None) for s in sites]
        self.images = torch.from_numpy(np.stack([c[0] for c in crops]))
        self.masks = torch.from_numpy(np.stack([c[1] for c in crops]))
        generator = torch.Generator().manual_seed(seed)
        self.noise = [torch.randn(self.images.shape, generator=generator) for _ in range(VAL_TIMESTEPS_PER_CROP)]
        # timesteps spread over the whole chain, one set per noise draw
        spread = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, VAL_TIMESTEPS_PER_CROP * len(crops)).round().astype(np.int64)
        self.timesteps = torch.from_numpy(rng.permutation(spread).reshape(VAL_TIMESTEPS_PER_CROP, len(crops)))
        self.device = device

    @torch.no_grad()
    def loss(self, model: torch.nn.Module, scheduler, batch_size: int, amp: MixedPrecision) -> float:
        model.eval()
        total, weight = 0.0, 0.0
        for noise, timesteps in zip(self.noise, self.timesteps):
            for start in range(0, len(self.images), batch_size):
                sl = slice(start, start + batch_size)
                x0, m = self.images[sl].to(self.device), self.masks[sl].to(self.device)
                eps, t = noise[sl].to(self.device), timesteps[sl].to(self.device)
                with amp.autocast():
                    pred = model(torch.cat([masked_noisy_sample(scheduler, x0, m, eps, t), m], 1), timesteps=t)
                w = float(m.sum()) * x0.shape[1]
                total += float(masked_noise_loss(pred.float(), eps, m)) * w
                weight += w
        model.train()
        return total / max(weight, 1.0)


def train(job) -> Path:
    """Trains the DDPM of ``job`` (a :class:`nnunet_synth.generators.training_utils.GeneratorJob`).

    Returns:
        Path of the final checkpoint.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_synth.planning import load_synth_plan, preprocessed_dir, write_json_atomic

    preset = get_preset(job.preset)
    iterations = int(job.iterations if job.iterations is not None else preset.iterations)
    dist = setup_distributed(job.device)
    rank, world, device = dist.rank, dist.world, dist.device
    amp = MixedPrecision(device, job.amp)
    out = Path(job.output_dir)
    synth_plan = load_synth_plan(job.dataset_name, job.configuration, job.plans_identifier)
    plans = PlansManager(load_json(preprocessed_dir(job.dataset_name) / f"{job.plans_identifier}.json"))
    conf = plans.get_configuration(job.configuration)
    if len(conf.patch_size) != 3:
        raise ValueError(f"the ddpm generator is 3D; configuration {job.configuration} is 2D")
    dataset = infer_dataset_class(str(job.preprocessed_folder))(str(job.preprocessed_folder), list(job.cases))
    source = PatchSource(dataset, preset.patch_size, synth_plan.tumour_label)
    sites = find_tumours(dataset, list(job.cases), synth_plan.tumour_label)
    train_cases, val_cases = split_generator_cases(sites, job.seed)
    train_sites = [s for s in sites if s.case in train_cases]
    val_sites = [s for s in sites if s.case in val_cases]
    num_channels = int(dataset.load_case(job.cases[0])[0].shape[0])
    config = {
        "backend": BACKEND, "preset": job.preset, "preset_params": preset.to_dict(),
        "dataset_name": str(job.dataset_name), "configuration": job.configuration,
        "plans_identifier": job.plans_identifier, "fold": job.fold, "num_channels": num_channels,
        "spacing": [float(s) for s in conf.spacing], "patch_size": list(preset.patch_size),
        "normalization_schemes": list(conf.normalization_schemes), "tumour_label": synth_plan.tumour_label,
        "intensity_range": intensity_range(source, train_sites, job.seed),
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_schedule": dict(BETA_SCHEDULE),
        "train_cases": train_cases, "val_cases": val_cases, "segmenter_val_excluded": True,
        "iterations": iterations, "world_size": world, "seed": job.seed, "amp": amp.state_dict()["dtype"],
        "num_workers": job.num_workers,
    }

    with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's global RNG untouched
        torch.manual_seed(job.seed)
        model = build_model(preset, num_channels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.learning_rate, weight_decay=preset.weight_decay)
    scheduler = build_training_scheduler()
    noise_gen = torch.Generator(device=device)
    iteration, best, train_loss, history = 0, math.inf, [], []

    latest = out / "checkpoint_latest.pth"
    if job.resume:
        if not latest.is_file():
            raise GeneratorCheckpointError(f"--c given but {latest} does not exist; start without --c")
        state = load_checkpoint(latest, BACKEND, {k: config[k] for k in RESUME_KEYS})
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        amp.load_state_dict(state.get("amp"))
        iteration, best = int(state["iteration"]), float(state["best_val_loss"])
        train_loss, history = list(state["train_loss"]), list(state["history"])
        config["intensity_range"] = state["config"]["intensity_range"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        start = f"resumed at iteration {iteration}" if job.resume else "started"
        append_log(out, f"{start}: preset {job.preset}, "
                  f"{len(train_sites)} training tumours in {len(train_cases)} cases, {len(val_sites)} validation "
                  f"tumours in {len(val_cases)} held-out cases, {world} process(es), device {device}, "
                  f"{amp.describe()}, {job.num_workers} loader worker(s) per process")
    validation = _Validation(source, val_sites, job.seed, device) if rank == 0 else None
    net = dist.wrap(model)

    def save(name: str, resumable: bool = True) -> None:
        """Weights, configuration and history; resumable ones also the optimiser and scaler states."""
        state = {"backend": BACKEND, "config": config, "model": model.state_dict(), "iteration": iteration,
                 "best_val_loss": best, "history": history}
        if resumable:
            state.update(optimizer=optimizer.state_dict(), amp=amp.state_dict(), train_loss=train_loss)
        save_checkpoint(state, out / name)

    # every batch depends on (seed, rank, iteration) only: reproducible for any -np, exact on resume
    batches = batch_loader(TrainingPatches(source, train_sites, preset.batch_size, tuple(conf.spacing)),
                           (job.seed, rank), iteration, iterations, job.num_workers, pin_memory=device.type == "cuda")
    net.train()
    bar = tqdm(total=iterations, initial=iteration, desc=f"ddpm {job.preset}", unit="it", disable=rank != 0)
    for images, masks in batches:
        x0 = as_tensor(images).to(device, non_blocking=True)
        mask = as_tensor(masks).to(device, non_blocking=True)
        noise_gen.manual_seed(iteration_seed(job.seed, rank, iteration))
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=noise_gen, device=device)
        noisy = torch.cat([masked_noisy_sample(scheduler, x0, mask, noise, timesteps), mask], 1)
        with amp.autocast():
            prediction = net(noisy, timesteps=timesteps)
        loss = masked_noise_loss(prediction.float(), noise, mask)
        amp.step(loss, optimizer, model.parameters(), GRAD_CLIP_NORM)
        iteration += 1
        train_loss.append(round(float(loss.detach()), 6))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(train_loss[-preset.val_every:]):.4f}")
        if rank == 0 and job.save_every and iteration % job.save_every == 0:
            save(iteration_checkpoint_name(iteration), resumable=False)
        if iteration % preset.val_every == 0 or iteration == iterations:
            if rank == 0:
                val_loss = validation.loss(model, scheduler, preset.batch_size, amp)
                recent = float(np.mean(train_loss[-preset.val_every:]))
                improved = val_loss < best
                best = min(best, val_loss)
                history.append({"iteration": iteration, "train_loss": recent, "val_loss": val_loss})
                append_log(out, f"iteration {iteration}: training loss {recent:.5f}, validation loss {val_loss:.5f}"
                          + (" (new best)" if improved else ""))
                save("checkpoint_latest.pth")
                if improved:
                    save("checkpoint_best.pth")
                write_json_atomic({"config": config, "history": history, "train_loss": train_loss},
                                  out / "training_log.json")
                plot_losses(out / "progress.png", train_loss, history)
            dist.barrier()
    bar.close()
    replicas = dist.check_replicas({"model": model})
    if rank == 0:
        save("checkpoint_final.pth")
        append_log(out, f"finished at iteration {iteration}; best validation loss {best:.5f}; {replicas}")
        print(json.dumps({"output": str(out), "iteration": iteration, "best_val_loss": best}))
    dist.close()
    return out / "checkpoint_final.pth"
