"""Presets of the 3D DDPM inpainting model and the MONAI network and schedulers they build.

The ``paper`` preset is Table 1 of the liver-MRI paper (Quinton et al., Artif. Intell. Med. 2026): channels
128/256/512/1024, attention on the last level only, 3 residual blocks, a 128 x 96 x 64 patch at
1.5 x 1.5 x 3 mm, 1000 training steps with a scaled-linear beta schedule, AdamW (lr 5e-5, weight decay
1e-5), batch size 1. Patch sizes here are in nnU-Net's axis order (z, y, x), so the paper's patch is
(64, 96, 128).

The network sees the image channels and the inpainting mask as one more input channel; it predicts the
noise of the image channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

NUM_TRAIN_TIMESTEPS = 1000
# MONAI's generative-model tutorials (which the paper's code builds on) use this scaled-linear range.
BETA_SCHEDULE = {"schedule": "scaled_linear_beta", "beta_start": 0.0005, "beta_end": 0.0195}
DEFAULT_SAMPLING_STEPS = 250  # DDIM steps at inference in the paper


@dataclass(frozen=True)
class DDPMPreset:
    """Network, patch and optimiser settings of one model size.

    Attributes:
        channels: feature channels per U-Net level.
        attention_levels: self-attention per level.
        num_head_channels: channels per attention head, per level (0 where a level has no attention).
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).
        patch_size: training and inpainting patch (z, y, x) in voxels; divisible by 2**(levels - 1).
        batch_size: patches per optimiser step and process.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        iterations: default number of optimiser steps.
        val_every: iterations between validations (and checkpoints).
    """

    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_head_channels: tuple[int, ...]
    num_res_blocks: int
    norm_num_groups: int
    patch_size: tuple[int, int, int]
    batch_size: int
    learning_rate: float
    weight_decay: float
    iterations: int
    val_every: int
    description: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PRESETS: dict[str, DDPMPreset] = {
    "paper": DDPMPreset(channels=(128, 256, 512, 1024), attention_levels=(False, False, False, True),
                        # the paper lists 768 head channels, which MONAI cannot split 1024 channels into;
                        # 256 (4 heads) keeps its parameter count (8.62e8: head size does not change it)
                        num_head_channels=(0, 0, 0, 256), num_res_blocks=3, norm_num_groups=32,
                        patch_size=(64, 96, 128), batch_size=1, learning_rate=5e-5, weight_decay=1e-5,
                        iterations=240_000, val_every=2000,
                        description="liver-MRI paper, Table 1 (~862M parameters, one large GPU)"),
    "medium": DDPMPreset(channels=(64, 128, 256, 512), attention_levels=(False, False, False, True),
                         num_head_channels=(0, 0, 0, 64), num_res_blocks=2, norm_num_groups=32,
                         patch_size=(64, 96, 128), batch_size=1, learning_rate=1e-4, weight_decay=1e-5,
                         iterations=100_000, val_every=1000, description="paper patch, ~1/4 the width"),
    "small": DDPMPreset(channels=(32, 64, 128), attention_levels=(False, False, True), num_head_channels=(0, 0, 32),
                        num_res_blocks=2, norm_num_groups=16, patch_size=(32, 64, 64), batch_size=2,
                        learning_rate=2e-4, weight_decay=1e-5, iterations=50_000, val_every=1000,
                        description="small patch and network, for small tumours or small GPUs"),
    "tiny": DDPMPreset(channels=(8, 16), attention_levels=(False, True), num_head_channels=(0, 16), num_res_blocks=1,
                       norm_num_groups=8, patch_size=(8, 16, 16), batch_size=2, learning_rate=2e-3, weight_decay=0.0,
                       iterations=40, val_every=10, description="CPU tests and smoke runs only"),
}


def get_preset(name: str) -> DDPMPreset:
    """The preset called ``name``; a clear error lists the others."""
    if name not in PRESETS:
        raise KeyError(f"unknown ddpm preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_from_dict(values: dict) -> DDPMPreset:
    """Rebuilds a preset stored in a checkpoint (lists back to tuples)."""
    return DDPMPreset(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def build_model(preset: DDPMPreset, num_channels: int) -> torch.nn.Module:
    """MONAI's 3D ``DiffusionModelUNet``: input = image channels + mask, output = noise of the image channels."""
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(spatial_dims=3, in_channels=num_channels + 1, out_channels=num_channels,
                              channels=preset.channels, attention_levels=preset.attention_levels,
                              num_head_channels=preset.num_head_channels, num_res_blocks=preset.num_res_blocks,
                              norm_num_groups=preset.norm_num_groups)


def build_training_scheduler():
    """DDPM noise schedule of training (1000 steps, scaled-linear betas)."""
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, clip_sample=False, **BETA_SCHEDULE)


def build_sampling_scheduler(num_steps: int):
    """DDIM scheduler on the training schedule with ``num_steps`` reverse steps.

    Samples are not clipped to [-1, 1]: images are in nnU-Net's normalised units, not min-max scaled.
    """
    from monai.networks.schedulers import DDIMScheduler

    if not 1 <= num_steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"sampling steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {num_steps}")
    scheduler = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, clip_sample=False, **BETA_SCHEDULE)
    scheduler.set_timesteps(num_steps)
    return scheduler
