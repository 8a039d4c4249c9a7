"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov and Michaeli, CVPR 2024) on diffusers' DDPMScheduler.

Inversion draws every noisy latent of the trajectory independently from the forward marginals,
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_t``, and extracts for each reverse step the noise map that
takes ``x_t`` exactly to ``x_{t-1}`` under the model: ``w_t = x_{t-1} - mu_t(x_t)`` (= ``sigma_t z_t`` of the
paper; stored as the increment so that the last step, whose DDPM variance is zero, is exact too). Sampling
from ``x_{t_start}`` with the same increments and the source prompt gives back ``x_0``; another prompt
changes the image where the model's prediction changes. ``strength`` is the share of the trajectory that is
run again (0.75-0.85 in the breast 2D paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Trajectory:
    """An inverted latent: the timesteps of its reverse steps, the start latent and one increment per step."""

    timesteps: list[int]
    start: torch.Tensor
    increments: list[torch.Tensor]


def edit_timesteps(scheduler, steps: int, strength: float) -> list[int]:
    """The last ``round(strength * steps)`` of the scheduler's ``steps`` inference timesteps (descending)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    return timesteps[len(timesteps) - max(1, round(strength * len(timesteps))):]


def _alpha_bar(scheduler, t: int) -> torch.Tensor:
    return scheduler.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)


def predict(unet: torch.nn.Module, x: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor | None,
            guidance: float) -> torch.Tensor:
    """The UNet's output at ``t`` with classifier-free guidance (``uncond`` None or guidance 1: conditional only)."""
    step = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    if uncond is None or guidance == 1.0:
        return unet(x, step, encoder_hidden_states=cond).sample
    out = unet(torch.cat([x, x]), torch.cat([step, step]), encoder_hidden_states=torch.cat([uncond, cond])).sample
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


def posterior_mean(scheduler, model_output: torch.Tensor, t: int, prev_t: int, x_t: torch.Tensor) -> torch.Tensor:
    """Mean of the DDPM reverse step ``t -> prev_t`` (eq. 7 of Ho et al.) with the scheduler's alphas and
    prediction type (epsilon, v_prediction or sample); no clipping, so inversion and sampling agree."""
    abar_t, abar_prev = _alpha_bar(scheduler, t), _alpha_bar(scheduler, prev_t)
    abar_t, abar_prev = abar_t.to(x_t.device, x_t.dtype), abar_prev.to(x_t.device, x_t.dtype)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x_t - (1 - abar_t).sqrt() * model_output) / abar_t.sqrt()
    elif kind == "v_prediction":
        x0 = abar_t.sqrt() * x_t - (1 - abar_t).sqrt() * model_output
    elif kind == "sample":
        x0 = model_output
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} of the base model's scheduler")
    beta = 1 - abar_t / abar_prev
    return (abar_prev.sqrt() * beta / (1 - abar_t)) * x0 + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)) * x_t


def _previous(timesteps: list[int], index: int) -> int:
    return timesteps[index + 1] if index + 1 < len(timesteps) else -1


@torch.no_grad()
def invert(unet: torch.nn.Module, scheduler, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
           guidance: float, timesteps: list[int], generator: torch.Generator) -> Trajectory:
    """Edit-friendly inversion of latents ``x0`` along ``timesteps`` (descending) with the source prompt."""
    noisy = []
    for t in timesteps:  # independent draws from q(x_t | x_0): the edit-friendly noise space
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device, x0.dtype)
        noisy.append(scheduler.add_noise(x0, eps, torch.tensor([t], device=x0.device)))
    increments = []
    for i, t in enumerate(timesteps):
        target = noisy[i + 1] if i + 1 < len(timesteps) else x0
        mean = posterior_mean(scheduler, predict(unet, noisy[i], t, cond, uncond, guidance), t,
                              _previous(timesteps, i), noisy[i])
        increments.append(target - mean)
    return Trajectory(list(timesteps), noisy[0], increments)


@torch.no_grad()
def regenerate(unet: torch.nn.Module, scheduler, trajectory: Trajectory, cond: torch.Tensor,
               uncond: torch.Tensor | None, guidance: float, start: torch.Tensor | None = None) -> torch.Tensor:
    """Runs the reverse chain of ``trajectory`` with its increments under another (or the same) prompt.

    Args:
        start: start latent instead of the inverted one (the same shape).
    """
    x = trajectory.start if start is None else start
    for i, (t, increment) in enumerate(zip(trajectory.timesteps, trajectory.increments)):
        out = predict(unet, x, t, cond, uncond, guidance)
        x = posterior_mean(scheduler, out, t, _previous(trajectory.timesteps, i), x) + increment
    return x
