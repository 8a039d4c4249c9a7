"""Stage 3 (``diffusion``) of the ``ldm`` backend: a latent U-Net restores the real tumour's latent from noise,
conditioned on the latent of the tumour-removed volume and the mask on the latent grid. ``--save-every K`` keeps
``checkpoint_iter{N:07d}.pth`` (VQ-VAE + U-Net, loadable as the generator) every K iterations."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_synth.generators.checkpoints import load_checkpoint
from nnunet_synth.generators.ldm.model import NUM_TRAIN_TIMESTEPS, build_training_scheduler, build_unet, build_vqvae
from nnunet_synth.generators.ldm.sampling import LDMModels, condition_of, encode
from nnunet_synth.generators.ldm.stages import (
    BACKEND,
    GRAD_CLIP_NORM,
    SCALE_CROPS,
    VAL_CROPS,
    StageData,
    previous_stage,
    run_stage,
    stage_dir,
)
from nnunet_synth.generators.training_utils import MixedPrecision, as_tensor, intensity_range


def _tumour_batch(data: StageData, sites: list, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    crops = [data.volumes.crop(s, rng) for s in sites]
    return np.stack([c[0] for c in crops]), np.stack([c[1] for c in crops])


def _training_batch(data: StageData, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Volumes around ``batch_size`` random training tumours, randomly shifted and flipped, and their masks."""
    sites = [data.train_sites[i] for i in rng.integers(len(data.train_sites), size=batch_size)]
    return _tumour_batch(data, sites, rng)


def train_diffusion(job, data: StageData, preset, resume: bool) -> Path:
    dist = data.dist
    device = dist.device
    vqvae = build_vqvae(preset, data.num_channels).to(device)
    vqvae.load_state_dict(previous_stage(job, data, "diffusion")["vqvae"])
    vqvae.eval().requires_grad_(False)
    models = LDMModels(vqvae, None, preset.vq_patch_size, preset.compression, blend_margin=preset.blend_margin,
                       halo=preset.encode_halo)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        unet = build_unet(preset).to(device)
    net = dist.wrap(unet)
    amp = MixedPrecision(device, job.amp)
    optimizer = torch.optim.Adam(unet.parameters(), lr=preset.diffusion_learning_rate)
    scheduler = build_training_scheduler()

    config = dict(data.config, stage="diffusion", blend_margin=preset.blend_margin,
                  intensity_range=intensity_range(data.volumes, data.train_sites, job.seed))
    with torch.no_grad():  # latents scaled to unit variance (MONAI's latent-diffusion recipe)
        picks = np.random.default_rng([job.seed, 13]).choice(len(data.train_sites), min(SCALE_CROPS,
                                                              len(data.train_sites)), replace=False)
        x, _ = _tumour_batch(data, [data.train_sites[i] for i in picks], None)
        z = encode(models, torch.from_numpy(x).to(device))
        config["scale_factor"] = float(1.0 / z.std().clamp(min=1e-6))
    if resume:
        config["scale_factor"] = load_checkpoint(stage_dir(job.output_dir, "diffusion") / "checkpoint_latest.pth",
                                                 BACKEND)["config"]["scale_factor"]
    models.scale_factor = config["scale_factor"]

    def latents(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            z0 = encode(models, x) * models.scale_factor
            return z0, condition_of(models, x, mask)

    val_x, val_mask = _tumour_batch(data, data.val_sites[:VAL_CROPS], None)
    val_z, val_cond = latents(torch.from_numpy(val_x).to(device), torch.from_numpy(val_mask).to(device))
    generator = torch.Generator(device=device).manual_seed(job.seed)
    val_noise = torch.randn(val_z.shape, generator=generator, device=device)
    val_t = torch.linspace(0, NUM_TRAIN_TIMESTEPS - 1, len(val_z), device=device).long()

    def step(iteration: int, batch, noise_gen: torch.Generator) -> dict[str, float]:
        x, mask = (as_tensor(b).to(device, non_blocking=True) for b in batch)
        z0, cond = latents(x, mask)
        noise = torch.randn(z0.shape, generator=noise_gen, device=device)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(z0),), generator=noise_gen, device=device)
        with amp.autocast():
            prediction = net(torch.cat([scheduler.add_noise(z0, noise, t), cond], 1), timesteps=t)
        loss = F.mse_loss(prediction.float(), noise)
        amp.step(loss, optimizer, unet.parameters(), GRAD_CLIP_NORM)
        return {"noise": float(loss.detach())}

    @torch.no_grad()
    def validate() -> float:
        unet.eval()
        with amp.autocast():
            prediction = unet(torch.cat([scheduler.add_noise(val_z, val_noise, val_t), val_cond], 1), timesteps=val_t)
        unet.train()
        return float(F.mse_loss(prediction.float(), val_noise))

    iterations = int(job.iterations if job.iterations is not None else preset.diffusion_iterations)
    config["iterations"] = iterations
    draw = functools.partial(_training_batch, data, preset.diffusion_batch_size)
    return run_stage(job, data, "diffusion", {"vqvae": vqvae, "unet": unet}, {"optimizer": optimizer}, step,
                     validate, iterations, preset.val_every, config, resume, draw, {"amp": amp},
                     save_every=getattr(job, "save_every", None))
