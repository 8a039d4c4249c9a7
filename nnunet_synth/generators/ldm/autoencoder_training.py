"""Stages 1 (``vqvae``: the whole VQ-VAE on sub-patches) and 2 (``vqvae-volume``: the decoder on whole volumes
from tile-wise latents of the frozen encoder and codebook) of the ``ldm`` backend.

Both stages train with L1 reconstruction (+ the commitment loss in stage 1), the optional patch-GAN loss and, where
``--perceptual-network`` gives local ResNet-50 weights, the paper's perceptual loss (:class:`Perceptual`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_synth.generators.ldm.model import build_discriminator, build_vqvae
from nnunet_synth.generators.ldm.sampling import LDMModels, decode_volume, encode
from nnunet_synth.generators.ldm.stages import GRAD_CLIP_NORM, VAL_CROPS, StageData, previous_stage, run_stage
from nnunet_synth.generators.training_utils import Distributed, MixedPrecision, as_tensor, iteration_seed

# share of each axis's slices the 2.5D perceptual loss uses (MONAI's 3D autoencoder tutorials; the paper does not say)
FAKE_3D_RATIO = 0.2


class PerceptualNetworkError(ValueError):
    """The file given as perceptual network is not a loadable torchvision ResNet-50 state dict."""


class Perceptual:
    """The paper's perceptual loss: MONAI's ``PerceptualLoss`` in 2.5D (axial, coronal and sagittal slices through
    a torchvision ResNet-50 whose weights are read from a local file; nothing is downloaded), per image channel.

    Args:
        weight: weight of the term in the total loss (0.001 in the paper).
        path: torchvision ResNet-50 state dict (``torch.save(model.state_dict(), path)``, e.g. RadImageNet's or
            ImageNet's ResNet-50 weights).
        device: training device.

    Raises:
        PerceptualNetworkError: the file cannot be read as a ResNet-50 state dict (names the file).
    """

    def __init__(self, weight: float, path: str | Path, device: torch.device):
        import pickle

        from monai.losses import PerceptualLoss

        self.weight, self.path = float(weight), Path(path)
        try:
            self.loss = PerceptualLoss(spatial_dims=3, network_type="resnet50", is_fake_3d=True,
                                       fake_3d_ratio=FAKE_3D_RATIO, pretrained=True,
                                       pretrained_path=str(self.path)).to(device)
        except (RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
            raise PerceptualNetworkError(f"--perceptual-network {self.path} is not a torchvision ResNet-50 state "
                                         f"dict ({type(e).__name__}: {str(e)[:200]})") from e

    def describe(self) -> str:
        return f"perceptual loss weight {self.weight:g} (2.5D ResNet-50 from {self.path})"

    def __call__(self, reconstruction: torch.Tensor, target: torch.Tensor, seed: int) -> torch.Tensor:
        """Weighted perceptual loss, the mean over image channels (the ResNet takes one channel as grey RGB).

        ``seed`` seeds the slices MONAI draws (it uses torch's global generator), so a resumed run repeats them.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            values = [self.loss(reconstruction[:, c:c + 1], target[:, c:c + 1]) for c in range(target.shape[1])]
        return self.weight * torch.stack(values).mean()


def perceptual_for(job, preset, device: torch.device) -> tuple[Perceptual | None, str]:
    """The perceptual loss of ``job`` (None without ``--perceptual-network`` or with weight 0) and a log note."""
    path = getattr(job, "perceptual_network", None)
    if preset.perceptual_weight <= 0:
        return None, "perceptual loss off (preset weight 0)"
    if path is None:
        return None, (f"perceptual loss off: it needs pretrained ResNet-50 weights from a local file, which this "
                      f"package never downloads; give --perceptual-network PATH for the preset's weight "
                      f"{preset.perceptual_weight:g}")
    perceptual = Perceptual(preset.perceptual_weight, path, device)
    return perceptual, perceptual.describe()


class _Adversarial:
    """Optional least-squares patch-GAN loss on reconstructions (weight 0: off). The discriminator is called
    twice per step, so its gradients are averaged over ranks by hand instead of through DDP; its initial weights
    come from ``seed``, the same on every rank."""

    def __init__(self, weight: float, start: int, num_channels: int, patch_size: tuple[int, ...], lr: float,
                 dist: Distributed, amp: bool, seed: int):
        from monai.losses import PatchAdversarialLoss

        self.weight, self.start, self.dist = weight, start, dist
        self.net = None
        if weight > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.net = build_discriminator(num_channels, patch_size).to(dist.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr) if self.net is not None else None
        self.loss = PatchAdversarialLoss(criterion="least_squares")
        self.amp = MixedPrecision(dist.device, amp)

    def active(self, iteration: int) -> bool:
        return self.net is not None and iteration >= self.start

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return self.weight * self.loss(self.net(fake)[-1], target_is_real=True, for_discriminator=False)

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        with self.amp.autocast():
            loss = 0.5 * (self.loss(self.net(fake.detach())[-1], target_is_real=False, for_discriminator=True)
                          + self.loss(self.net(real)[-1], target_is_real=True, for_discriminator=True))
        params = list(self.net.parameters())
        self.amp.step(self.weight * loss, self.optimizer, params,
                      before_unscale=functools.partial(self.dist.average_gradients, params))

    def register(self, modules: dict, optimizers: dict, amps: dict) -> None:
        if self.net is not None:
            modules["discriminator"], optimizers["optimizer_discriminator"] = self.net, self.optimizer
            amps["amp_discriminator"] = self.amp


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, extra: torch.Tensor | float,
                        perceptual: Perceptual | None, adversarial: _Adversarial | None, seed: int
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """The autoencoder stages' total loss and its terms.

    Total = L1 + ``extra`` (the commitment loss in stage 1, 0 in stage 2) + the weighted perceptual loss (when
    ``perceptual`` is given) + the weighted generator patch-GAN loss (when ``adversarial`` is given).

    Returns:
        (total loss, terms by name: ``reconstruction`` (L1) first, then ``perceptual``/``adversarial`` if used,
        and ``total``).
    """
    l1 = F.l1_loss(reconstruction.float(), target)
    total = l1 + extra
    terms = {"reconstruction": float(l1.detach())}
    if perceptual is not None:
        term = perceptual(reconstruction.float(), target, seed)
        total = total + term
        terms["perceptual"] = float(term.detach())
    if adversarial is not None:
        term = adversarial.generator_loss(reconstruction)
        total = total + term
        terms["adversarial"] = float(term.detach())
    terms["total"] = float(total.detach())
    return total, terms


def train_vqvae(job, data: StageData, preset, resume: bool) -> Path:
    dist = data.dist
    device = dist.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        vqvae = build_vqvae(preset, data.num_channels).to(device)
    net = dist.wrap(vqvae)  # the EMA codebook synchronises itself over ranks (MONAI's ddp_sync)
    optimizer = torch.optim.Adam(vqvae.parameters(), lr=preset.vq_learning_rate)
    amp = MixedPrecision(device, job.amp)
    adversarial = _Adversarial(preset.adversarial_weight, preset.adversarial_start, data.num_channels,
                               preset.vq_patch_size, preset.vq_learning_rate, dist, job.amp, job.seed + 1)
    perceptual, note = perceptual_for(job, preset, device)
    val = torch.from_numpy(data.random_batch(data.val_cases, preset.vq_patch_size, VAL_CROPS,
                                             np.random.default_rng([job.seed, 11])))

    def step(iteration: int, batch, _) -> dict[str, float]:
        x = as_tensor(batch).to(device, non_blocking=True)
        with amp.autocast():
            recon, quantization_loss = net(x)
            loss, terms = reconstruction_loss(recon, x, quantization_loss, perceptual,
                                              adversarial if adversarial.active(iteration) else None,
                                              iteration_seed(job.seed, 0, dist.rank, iteration))
        amp.step(loss, optimizer, vqvae.parameters(), GRAD_CLIP_NORM)
        if adversarial.active(iteration):
            adversarial.discriminator_step(x, recon.float())
        return terms  # logged: the reconstruction error

    @torch.no_grad()
    def validate() -> float:
        vqvae.eval()
        loss = float(np.mean([float(F.l1_loss(vqvae(v[None].to(device))[0], v[None].to(device))) for v in val]))
        vqvae.train()
        return loss

    modules, optimizers, amps = {"vqvae": vqvae}, {"optimizer": optimizer}, {"amp": amp}
    adversarial.register(modules, optimizers, amps)
    iterations = int(job.iterations if job.iterations is not None else preset.vq_iterations)
    config = dict(data.config, stage="vqvae", iterations=iterations, perceptual=note)
    draw = functools.partial(data.random_batch, data.train_cases, preset.vq_patch_size, preset.vq_batch_size)
    return run_stage(job, data, "vqvae", modules, optimizers, step, validate, iterations, preset.val_every,
                     config, resume, draw, amps, notes=(note,))


def frozen_autoencoder(vqvae: torch.nn.Module) -> None:
    """Encoder and codebook frozen (no gradients, no EMA codebook updates); the decoder stays trainable."""
    vqvae.eval()
    for module in (vqvae.encoder, vqvae.quantizer):
        for p in module.parameters():
            p.requires_grad_(False)
    vqvae.decoder.train()


def train_volume(job, data: StageData, preset, resume: bool) -> Path:
    dist = data.dist
    device = dist.device
    vqvae = build_vqvae(preset, data.num_channels).to(device)
    vqvae.load_state_dict(previous_stage(job, data, "vqvae-volume")["vqvae"])
    frozen_autoencoder(vqvae)
    decoder = dist.wrap(vqvae.decoder)  # only the decoder trains (what VQVAE.decode runs)
    models = LDMModels(vqvae, None, preset.vq_patch_size, preset.compression, halo=preset.encode_halo)
    optimizer = torch.optim.Adam(vqvae.decoder.parameters(), lr=preset.volume_learning_rate)
    amp = MixedPrecision(device, job.amp)
    adversarial = _Adversarial(preset.adversarial_weight, 0, data.num_channels, preset.volume_size,
                               preset.volume_learning_rate, dist, job.amp, job.seed + 2)
    perceptual, note = perceptual_for(job, preset, device)
    val = torch.from_numpy(data.random_batch(data.val_cases, preset.volume_size, max(1, VAL_CROPS // 4),
                                             np.random.default_rng([job.seed, 12])))

    def step(iteration: int, batch, _) -> dict[str, float]:
        x = as_tensor(batch).to(device, non_blocking=True)
        with torch.no_grad():
            latent = encode(models, x)
        with amp.autocast():
            recon = decoder(latent)
            loss, terms = reconstruction_loss(recon, x, 0.0, perceptual,
                                              adversarial if adversarial.active(iteration) else None,
                                              iteration_seed(job.seed, 1, dist.rank, iteration))
        amp.step(loss, optimizer, vqvae.decoder.parameters(), GRAD_CLIP_NORM)
        if adversarial.active(iteration):
            adversarial.discriminator_step(x, recon.float())
        return terms

    @torch.no_grad()
    def validate() -> float:
        vqvae.decoder.eval()
        loss = float(np.mean([float(F.l1_loss(decode_volume(models, v[None].to(device)), v[None].to(device)))
                              for v in val]))
        vqvae.decoder.train()
        return loss

    modules, optimizers, amps = {"vqvae": vqvae}, {"optimizer": optimizer}, {"amp": amp}
    adversarial.register(modules, optimizers, amps)
    iterations = int(job.iterations if job.iterations is not None else preset.volume_iterations)
    config = dict(data.config, stage="vqvae-volume", iterations=iterations, perceptual=note)
    draw = functools.partial(data.random_batch, data.train_cases, preset.volume_size, preset.volume_batch_size)
    return run_stage(job, data, "vqvae-volume", modules, optimizers, step, validate, iterations, preset.val_every,
                     config, resume, draw, amps, notes=(note,))
