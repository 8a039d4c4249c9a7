"""Stages 1 (``vqvae``: the whole VQ-VAE on sub-patches) and 2 (``vqvae-volume``: the decoder on whole volumes
from tile-wise latents of the frozen encoder and codebook) of the ``ldm`` backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_synth.generators.ldm.model import build_discriminator, build_vqvae
from nnunet_synth.generators.ldm.sampling import LDMModels, decode_volume, encode
from nnunet_synth.generators.ldm.stages import GRAD_CLIP_NORM, VAL_CROPS, StageData, previous_stage, run_stage


class _Adversarial:
    """Optional least-squares patch-GAN loss on reconstructions (weight 0: off)."""

    def __init__(self, weight: float, start: int, num_channels: int, patch_size: tuple[int, ...], lr: float,
                 device: torch.device):
        from monai.losses import PatchAdversarialLoss

        self.weight, self.start = weight, start
        self.net = build_discriminator(num_channels, patch_size).to(device) if weight > 0 else None
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr) if self.net is not None else None
        self.loss = PatchAdversarialLoss(criterion="least_squares")

    def active(self, iteration: int) -> bool:
        return self.net is not None and iteration >= self.start

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return self.weight * self.loss(self.net(fake)[-1], target_is_real=True, for_discriminator=False)

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        loss = 0.5 * (self.loss(self.net(fake.detach())[-1], target_is_real=False, for_discriminator=True)
                      + self.loss(self.net(real)[-1], target_is_real=True, for_discriminator=True))
        self.optimizer.zero_grad(set_to_none=True)
        (self.weight * loss).backward()
        self.optimizer.step()

    def register(self, modules: dict, optimizers: dict) -> None:
        if self.net is not None:
            modules["discriminator"], optimizers["optimizer_discriminator"] = self.net, self.optimizer


def train_vqvae(job, data: StageData, preset, resume: bool) -> Path:
    device = torch.device(job.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        vqvae = build_vqvae(preset, data.num_channels).to(device)
    optimizer = torch.optim.Adam(vqvae.parameters(), lr=preset.vq_learning_rate)
    adversarial = _Adversarial(preset.adversarial_weight, preset.adversarial_start, data.num_channels,
                               preset.vq_patch_size, preset.vq_learning_rate, device)
    val = data.random_batch(data.val_cases, preset.vq_patch_size, VAL_CROPS, np.random.default_rng([job.seed, 11]))

    def step(iteration: int, rng: np.random.Generator, _) -> float:
        x = data.random_batch(data.train_cases, preset.vq_patch_size, preset.vq_batch_size, rng).to(device)
        recon, quantization_loss = vqvae(x)
        l1 = F.l1_loss(recon, x)
        loss = l1 + quantization_loss
        if adversarial.active(iteration):
            loss = loss + adversarial.generator_loss(recon)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vqvae.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        if adversarial.active(iteration):
            adversarial.discriminator_step(x, recon)
        return float(l1.detach())  # logged: the reconstruction error

    @torch.no_grad()
    def validate() -> float:
        vqvae.eval()
        loss = float(np.mean([float(F.l1_loss(vqvae(v[None].to(device))[0], v[None].to(device))) for v in val]))
        vqvae.train()
        return loss

    modules, optimizers = {"vqvae": vqvae}, {"optimizer": optimizer}
    adversarial.register(modules, optimizers)
    iterations = int(job.iterations if job.iterations is not None else preset.vq_iterations)
    config = dict(data.config, stage="vqvae", iterations=iterations)
    return run_stage(job, data, "vqvae", modules, optimizers, step, validate, iterations, preset.val_every,
                      config, resume)


def frozen_autoencoder(vqvae: torch.nn.Module) -> None:
    """Encoder and codebook frozen (no gradients, no EMA codebook updates); the decoder stays trainable."""
    vqvae.eval()
    for module in (vqvae.encoder, vqvae.quantizer):
        for p in module.parameters():
            p.requires_grad_(False)
    vqvae.decoder.train()


def train_volume(job, data: StageData, preset, resume: bool) -> Path:
    device = torch.device(job.device)
    vqvae = build_vqvae(preset, data.num_channels).to(device)
    vqvae.load_state_dict(previous_stage(job, data, "vqvae-volume")["vqvae"])
    frozen_autoencoder(vqvae)
    models = LDMModels(vqvae, None, preset.vq_patch_size, preset.compression, halo=preset.encode_halo)
    optimizer = torch.optim.Adam(vqvae.decoder.parameters(), lr=preset.volume_learning_rate)
    adversarial = _Adversarial(preset.adversarial_weight, 0, data.num_channels, preset.volume_size,
                               preset.volume_learning_rate, device)
    val = data.random_batch(data.val_cases, preset.volume_size, max(1, VAL_CROPS // 4),
                            np.random.default_rng([job.seed, 12]))

    def step(iteration: int, rng: np.random.Generator, _) -> float:
        x = data.random_batch(data.train_cases, preset.volume_size, preset.volume_batch_size, rng).to(device)
        with torch.no_grad():
            latent = encode(models, x)
        recon = vqvae.decode(latent)
        l1 = F.l1_loss(recon, x)
        loss = l1 + (adversarial.generator_loss(recon) if adversarial.active(iteration) else 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vqvae.decoder.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        if adversarial.active(iteration):
            adversarial.discriminator_step(x, recon)
        return float(l1.detach())

    @torch.no_grad()
    def validate() -> float:
        vqvae.decoder.eval()
        loss = float(np.mean([float(F.l1_loss(decode_volume(models, v[None].to(device)), v[None].to(device)))
                              for v in val]))
        vqvae.decoder.train()
        return loss

    modules, optimizers = {"vqvae": vqvae}, {"optimizer": optimizer}
    adversarial.register(modules, optimizers)
    iterations = int(job.iterations if job.iterations is not None else preset.volume_iterations)
    config = dict(data.config, stage="vqvae-volume", iterations=iterations)
    return run_stage(job, data, "vqvae-volume", modules, optimizers, step, validate, iterations, preset.val_every,
                      config, resume)
