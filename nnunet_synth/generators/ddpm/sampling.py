"""Masked diffusion of the liver-MRI paper: noise only inside the mask, known region restored every step.

Forward (training, eq. 1): ``x_t = (1 - m) x_0 + m (sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps)``.
Reverse (sampling, eq. 2 with DDIM): ``x_{t-1} = (1 - m) x_0 + m step(x_t)``.
"""

from __future__ import annotations

import torch


def masked_noisy_sample(scheduler, x0: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
                        timesteps: torch.Tensor) -> torch.Tensor:
    """Eq. 1: the image noised to ``timesteps`` inside ``mask`` only.

    Args:
        scheduler: MONAI DDPM/DDIM scheduler (its ``add_noise`` gives the unmasked forward process).
        x0: clean images (B, C, *spatial).
        mask: (B, 1, *spatial) in {0, 1}.
        noise: standard normal noise shaped like ``x0``.
        timesteps: (B,) int64.
    """
    return torch.lerp(x0, scheduler.add_noise(x0, noise, timesteps), mask)


def masked_noise_loss(prediction: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 3: mean squared error of the predicted noise over the masked voxels (and channels) only."""
    weight = mask.expand_as(noise)
    return ((prediction - noise) ** 2 * weight).sum() / weight.sum().clamp(min=1.0)


@torch.no_grad()
def inpaint(model: torch.nn.Module, scheduler, image: torch.Tensor, mask: torch.Tensor,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM inpainting: starts from noise inside the mask and restores the known region after every step.

    Args:
        model: noise predictor taking ``cat([x_t, mask])`` and timesteps.
        scheduler: MONAI ``DDIMScheduler`` whose ``set_timesteps`` has been called.
        image: known image (B, C, *spatial); its values inside the mask are ignored.
        mask: (B, 1, *spatial) in {0, 1}, 1 where the tumour is generated.
        generator: torch generator on the image's device for the initial noise.

    Returns:
        The inpainted image; outside the mask it equals ``image`` exactly.
    """
    keep = mask.expand_as(image) < 0.5
    noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
    x = torch.where(keep, image, noise)
    for t in scheduler.timesteps:
        timesteps = torch.full((image.shape[0],), int(t), device=image.device, dtype=torch.long)
        eps = model(torch.cat([x, mask], dim=1), timesteps=timesteps)
        x, _ = scheduler.step(eps, int(t), x)
        x = torch.where(keep, image, x)  # eq. 2: known region restored from x_0
    return x
