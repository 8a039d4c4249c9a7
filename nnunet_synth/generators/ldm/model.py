"""Presets of the ``ldm`` backend and the MONAI networks they build (breast SynBT paper, section 3.1).

``paper``: VQ-VAE on 64^3 sub-patches, compression 4 (two stride-2 levels), 32 channels in the first level
doubling per level, a codebook of 8192 codes of dimension 8, lr 1e-4 and batch 8 (stage 1); decoder
fine-tuned on whole 128 x 192 x 192 volumes with lr 1e-5 and batch 1 for 100,000 steps (stage 2); a latent
diffusion U-Net trained for 500,000 steps with lr 1e-4 on a 1000-step schedule, sampled with 10 DDIM steps.
The paper gives no stage-1 step count (its discriminator starts at step 200,000), no diffusion U-Net widths
(it uses DiffTumor's U-Net) and no diffusion batch size: those entries are this package's choices.
Sizes are in nnU-Net's axis order (z, y, x).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from nnunet_synth.generators.ddpm.model import NUM_TRAIN_TIMESTEPS, build_sampling_scheduler, build_training_scheduler

__all__ = ["NUM_TRAIN_TIMESTEPS", "PRESETS", "LDMPreset", "build_sampling_scheduler", "build_training_scheduler",
           "build_unet", "build_vqvae", "get_preset", "preset_from_dict"]

DEFAULT_SAMPLING_STEPS = 10  # DDIM steps at inference in the paper


@dataclass(frozen=True)
class LDMPreset:
    """Network, patch and optimiser settings of the three training stages.

    Attributes:
        vq_channels: VQ-VAE channels per level (one down/upsampling layer each).
        compression: spatial downsampling factor of the VQ-VAE (a power of two, at most 2**levels).
        num_res_layers: residual layers per VQ-VAE level.
        num_embeddings: codebook size.
        embedding_dim: dimension of a code (latent channels).
        vq_patch_size: stage-1 sub-patch and stage-2 encoding tile (z, y, x), divisible by ``compression``.
        vq_batch_size, vq_learning_rate, vq_iterations: stage 1 (whole VQ-VAE on sub-patches).
        volume_size: stage-2 and diffusion volume (z, y, x), a multiple of ``vq_patch_size``.
        volume_batch_size, volume_learning_rate, volume_iterations: stage 2 (decoder only, whole volumes).
        adversarial_weight: weight of a patch-GAN loss in stages 1 and 2 (0: off).
        adversarial_start: stage-1 iteration at which the discriminator starts (stage 2: from its start).
        unet_channels, attention_levels, num_head_channels, num_res_blocks, norm_num_groups: latent U-Net.
        diffusion_batch_size, diffusion_learning_rate, diffusion_iterations: stage 3.
        blend_margin: voxels around the lesion over which the decoded volume fades into the original.
        val_every: iterations between validations (and checkpoints), every stage.
        encode_halo: voxels of neighbouring context the encoder sees around each tile when a volume is encoded
            (stage 2, diffusion, sampling); cropped from the latent, a multiple of ``compression``. 0: the paper's
            plain tiles.
        perceptual_weight: weight of the perceptual loss in stages 1 and 2 (the paper's 0.001); used only where
            ``--perceptual-network`` gives local ResNet-50 weights.
    """

    vq_channels: tuple[int, ...]
    compression: int
    num_res_layers: int
    num_embeddings: int
    embedding_dim: int
    vq_patch_size: tuple[int, int, int]
    vq_batch_size: int
    vq_learning_rate: float
    vq_iterations: int
    volume_size: tuple[int, int, int]
    volume_batch_size: int
    volume_learning_rate: float
    volume_iterations: int
    adversarial_weight: float
    adversarial_start: int
    unet_channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_head_channels: tuple[int, ...]
    num_res_blocks: int
    norm_num_groups: int
    diffusion_batch_size: int
    diffusion_learning_rate: float
    diffusion_iterations: int
    blend_margin: int
    val_every: int
    encode_halo: int
    perceptual_weight: float = 0.0
    description: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def latent_volume(self) -> tuple[int, ...]:
        return tuple(s // self.compression for s in self.volume_size)

    def check(self) -> None:
        """Raises ValueError for sizes that do not tile or downsample evenly."""
        levels = len(self.vq_channels)
        if self.compression < 1 or self.compression & (self.compression - 1) or self.compression > 2 ** levels:
            raise ValueError(f"compression must be a power of two up to 2**{levels}, got {self.compression}")
        if any(p % self.compression for p in self.vq_patch_size):
            raise ValueError(f"vq_patch_size {self.vq_patch_size} is not divisible by {self.compression}")
        if any(v % p for v, p in zip(self.volume_size, self.vq_patch_size)):
            raise ValueError(f"volume_size {self.volume_size} is not a multiple of vq_patch_size {self.vq_patch_size}")
        factor = 2 ** (len(self.unet_channels) - 1)
        if self.encode_halo % self.compression:
            raise ValueError(f"encode_halo {self.encode_halo} is not a multiple of the compression {self.compression}")
        if any(s % factor for s in self.latent_volume):
            raise ValueError(f"latent volume {self.latent_volume} is not divisible by {factor} (U-Net levels)")


PRESETS: dict[str, LDMPreset] = {
    "paper": LDMPreset(vq_channels=(32, 64), compression=4, num_res_layers=2, num_embeddings=8192, embedding_dim=8,
                       vq_patch_size=(64, 64, 64), vq_batch_size=8, vq_learning_rate=1e-4, vq_iterations=300_000,
                       volume_size=(128, 192, 192), volume_batch_size=1, volume_learning_rate=1e-5,
                       volume_iterations=100_000, adversarial_weight=0.01, adversarial_start=200_000,
                       unet_channels=(64, 128, 256, 512), attention_levels=(False, False, True, True),
                       num_head_channels=(0, 0, 32, 32), num_res_blocks=2, norm_num_groups=32,
                       diffusion_batch_size=2, diffusion_learning_rate=1e-4, diffusion_iterations=500_000,
                       blend_margin=4, val_every=2000, encode_halo=0, perceptual_weight=0.001,
                       description="breast SynBT paper, section 3.1"),
    "tiny": LDMPreset(vq_channels=(8, 16), compression=2, num_res_layers=1, num_embeddings=64, embedding_dim=4,
                      vq_patch_size=(8, 16, 16), vq_batch_size=4, vq_learning_rate=2e-3, vq_iterations=40,
                      volume_size=(16, 32, 32), volume_batch_size=1, volume_learning_rate=5e-4, volume_iterations=20,
                      adversarial_weight=0.0, adversarial_start=0, unet_channels=(16, 32),
                      attention_levels=(False, True), num_head_channels=(0, 32), num_res_blocks=1, norm_num_groups=8,
                      diffusion_batch_size=2, diffusion_learning_rate=2e-3, diffusion_iterations=40, blend_margin=2,
                      val_every=10, encode_halo=4, perceptual_weight=0.001,
                      description="CPU tests and smoke runs only"),
}


def get_preset(name: str) -> LDMPreset:
    """The preset called ``name``; a clear error lists the others."""
    if name not in PRESETS:
        raise KeyError(f"unknown ldm preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_from_dict(values: dict) -> LDMPreset:
    """Rebuilds a preset stored in a checkpoint (lists back to tuples)."""
    return LDMPreset(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def build_vqvae(preset: LDMPreset, num_channels: int) -> torch.nn.Module:
    """MONAI's 3D ``VQVAE`` with ``log2(compression)`` stride-2 levels (the others keep the resolution)."""
    from monai.networks.nets import VQVAE

    preset.check()
    strides = [2 if 2 ** i < preset.compression else 1 for i in range(len(preset.vq_channels))]
    down = tuple((s, 4, 1, 1) if s == 2 else (1, 3, 1, 1) for s in strides)
    up = tuple((s, 4, 1, 1, 0) if s == 2 else (1, 3, 1, 1, 0) for s in reversed(strides))
    return VQVAE(spatial_dims=3, in_channels=num_channels, out_channels=num_channels, channels=preset.vq_channels,
                 num_res_layers=preset.num_res_layers, num_res_channels=preset.vq_channels,
                 downsample_parameters=down, upsample_parameters=up, num_embeddings=preset.num_embeddings,
                 embedding_dim=preset.embedding_dim)


def build_unet(preset: LDMPreset) -> torch.nn.Module:
    """MONAI's 3D ``DiffusionModelUNet`` on the latent grid.

    Input: noisy latent, latent of the tumour-removed volume and the downsampled mask (``2 * dim + 1``
    channels); output: the noise of the latent.
    """
    from monai.networks.nets import DiffusionModelUNet

    preset.check()
    return DiffusionModelUNet(spatial_dims=3, in_channels=2 * preset.embedding_dim + 1,
                              out_channels=preset.embedding_dim, channels=preset.unet_channels,
                              attention_levels=preset.attention_levels, num_head_channels=preset.num_head_channels,
                              num_res_blocks=preset.num_res_blocks, norm_num_groups=preset.norm_num_groups)


def build_discriminator(num_channels: int, patch_size: tuple[int, ...], channels: int = 32) -> torch.nn.Module:
    """MONAI's 3D ``PatchDiscriminator`` for the optional adversarial loss: 3 strided layers (as MONAI's
    tutorials) for patches of at least 32 voxels a side, fewer for smaller ones."""
    from monai.networks.nets import PatchDiscriminator

    layers = max(1, min(3, int(math.log2(min(patch_size))) - 2))
    return PatchDiscriminator(spatial_dims=3, num_layers_d=layers, channels=channels, in_channels=num_channels,
                              out_channels=1)
