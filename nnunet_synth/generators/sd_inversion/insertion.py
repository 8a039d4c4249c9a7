"""Tumour insertion into one 2D slice by edit-friendly DDPM inversion (breast 2D paper, section 2.2).

The target mask is smoothed with a Gaussian kernel; inside the smoothed mask the [0, 1] slice is replaced by
Gaussian noise (mean 0.3, std 0.3) with the smoothed mask as weight; that image is encoded, inverted with the
prompt of the source slice and regenerated from ``strength`` of the trajectory with the prompt of the
requested size class and classifier-free guidance ``guidance``; the decoded result is blended into the
original slice with the smoothed mask as weight. Pixels outside the smoothed mask stay bit-identical.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from nnunet_synth.generators.sd_inversion.components import (
    StableDiffusionParts,
    from_model,
    from_unit,
    to_model,
    to_unit,
)
from nnunet_synth.generators.sd_inversion.inversion import edit_timesteps, invert, regenerate

SMOOTH_CUTOFF = 1e-3  # smoothed-mask weights below this are zero: the region that may change ends there


@dataclass
class InsertionSettings:
    """Parameters of an insertion (the synth plan's ``backend_params`` of the same names override them).

    Attributes:
        sampling_steps: DDPM inference steps of the whole trajectory (Huberman et al. use 100).
        strength: share of the trajectory run again, 0.75-0.85 in the paper.
        guidance: classifier-free guidance of the target prompt; the paper keeps it at 5 or lower.
        source_guidance: guidance of the source prompt during inversion (Huberman et al.'s default 3.5).
        mask_sigma_px: standard deviation of the Gaussian that smooths the mask, in slice pixels.
        noise_mean: mean of the noise put into the mask on the [0, 1] image.
        noise_std: its standard deviation.
    """

    sampling_steps: int = 100
    strength: float = 0.8
    guidance: float = 5.0
    source_guidance: float = 3.5
    mask_sigma_px: float = 1.5
    noise_mean: float = 0.3
    noise_std: float = 0.3

    @classmethod
    def from_params(cls, params: dict) -> InsertionSettings:
        known = asdict(cls())
        return cls(**{k: type(v)(params[k]) for k, v in known.items() if params.get(k) is not None})


def smoothed_mask(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian-smoothed float mask in [0, 1]; weights below ``SMOOTH_CUTOFF`` set to 0."""
    soft = gaussian_filter(mask.astype(np.float32), sigma_px) if sigma_px > 0 else mask.astype(np.float32)
    soft = np.clip(soft, 0.0, 1.0)
    soft[soft < SMOOTH_CUTOFF] = 0.0
    return soft


def _latents(parts: StableDiffusionParts, unit: np.ndarray, resolution: int) -> torch.Tensor:
    device = parts.unet.device
    pixels = to_model(torch.from_numpy(unit)[None].to(device), resolution)
    return parts.encode_images(pixels.to(parts.vae.dtype))


def insert_tumour(parts: StableDiffusionParts, image: np.ndarray, mask: np.ndarray, intensity_range: list[list[float]],
                  resolution: int, source_prompt: str, target_prompt: str, settings: InsertionSettings,
                  rng: np.random.Generator) -> np.ndarray:
    """A slice with a tumour generated inside ``mask``.

    Args:
        parts: base model with the trained LoRA.
        image: float32 (C, Y, X) slice in nnU-Net's normalised space.
        mask: bool (Y, X) target tumour mask.
        intensity_range: per-channel (low, high) mapped to [0, 1].
        resolution: model resolution the slice is resized to.
        source_prompt: caption of the slice as it is (for the inversion).
        target_prompt: caption of the requested size class.
        settings: insertion parameters.
        rng: random generator (noise in the mask, inversion noise).

    Returns:
        New float32 (C, Y, X) slice; equal to ``image`` wherever the smoothed mask is 0.
    """
    soft = smoothed_mask(mask, settings.mask_sigma_px)
    unit = to_unit(image, intensity_range)
    noise = np.clip(rng.normal(settings.noise_mean, settings.noise_std, unit.shape), 0, 1).astype(np.float32)
    noised = unit * (1 - soft) + noise * soft
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    latents = _latents(parts, noised, resolution)
    prompts = parts.encode_prompts([source_prompt, target_prompt, ""])
    source, target, empty = prompts[0:1], prompts[1:2], prompts[2:3]
    timesteps = edit_timesteps(parts.scheduler, settings.sampling_steps, settings.strength)
    trajectory = invert(parts.unet, parts.scheduler, latents, source, empty, settings.source_guidance, timesteps,
                        generator)
    edited = regenerate(parts.unet, parts.scheduler, trajectory, target, empty, settings.guidance)
    generated = from_model(parts.decode_latents(edited).float(), image.shape[1:], image.shape[0])[0].cpu().numpy()
    blended = image * (1 - soft) + from_unit(generated, intensity_range) * soft
    return np.where(soft[None] > 0, blended, image).astype(np.float32)
