"""Patch-to-volume latents and mask-conditioned latent DDIM inpainting (breast SynBT paper, sections 2.1-2.2).

A volume is encoded tile by tile (tiles of the VQ-VAE's training patch) with the encoder, the tile latents
are put back on their grid, quantised with the codebook and decoded as one volume. The diffusion model
denoises a latent conditioned on ``cat(latent of the tumour-removed volume, down(mask))``; the decoded
volume replaces the original only inside a soft mask around the lesion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LDMModels:
    """A trained ``ldm`` generator: networks and the settings sampling needs.

    Attributes:
        vqvae: MONAI VQVAE (frozen encoder/codebook, volume-tuned decoder).
        unet: latent diffusion U-Net (None for an autoencoder-only bundle).
        tile: encoding tile (z, y, x), the VQ-VAE's training patch.
        compression: spatial downsampling factor of the VQ-VAE.
        scale_factor: latents are multiplied by it before diffusion (unit variance).
        blend_margin: voxels over which the decoded volume fades into the original.
        halo: voxels of context around each tile that the encoder also sees (its latent is cropped away).
    """

    vqvae: torch.nn.Module
    unet: torch.nn.Module | None
    tile: tuple[int, ...]
    compression: int
    scale_factor: float = 1.0
    blend_margin: int = 2
    halo: int = 0


def _pad_to(x: torch.Tensor, multiple: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pads the spatial axes of (B, C, *S) at the end to multiples of ``multiple``; returns the old size."""
    size = tuple(x.shape[2:])
    pad = [(-s) % m for s, m in zip(size, multiple)]
    if any(pad):
        x = F.pad(x, [v for p in reversed(pad) for v in (0, p)])
    return x, size


def encode_volume(vqvae: torch.nn.Module, volume: torch.Tensor, tile: tuple[int, ...], halo: int = 0,
                  compression: int = 1) -> torch.Tensor:
    """Encoder latents of ``volume`` (B, C, *S), tile by tile, reassembled on the latent grid (not quantised).

    Args:
        vqvae: MONAI VQVAE.
        volume: (B, C, *S) with ``S`` a multiple of ``tile``.
        tile: the encoder's input tile (its training patch).
        halo: voxels of the neighbouring tiles (zeros outside the volume) the encoder sees around each tile;
            their latents are cropped away, so the grid is unchanged. A multiple of ``compression``.
        compression: the VQ-VAE's downsampling factor (needed with ``halo``).
    """
    size = volume.shape[2:]
    if any(s % t for s, t in zip(size, tile)):
        raise ValueError(f"volume {tuple(size)} is not a multiple of the encoding tile {tuple(tile)}")
    if halo % compression:
        raise ValueError(f"halo {halo} is not a multiple of the compression {compression}")
    if halo:
        volume = F.pad(volume, [halo] * 6)
    cut = halo // compression
    grid = [s // t for s, t in zip(size, tile)]
    rows = []
    for i in range(grid[0]):
        cols = []
        for j in range(grid[1]):
            tiles = []
            for k in range(grid[2]):
                latent = vqvae.encode(volume[:, :, i * tile[0]:(i + 1) * tile[0] + 2 * halo,
                                             j * tile[1]:(j + 1) * tile[1] + 2 * halo,
                                             k * tile[2]:(k + 1) * tile[2] + 2 * halo])
                tiles.append(latent[:, :, cut:latent.shape[2] - cut, cut:latent.shape[3] - cut,
                                    cut:latent.shape[4] - cut] if cut else latent)
            cols.append(torch.cat(tiles, dim=4))
        rows.append(torch.cat(cols, dim=3))
    return torch.cat(rows, dim=2)


def encode(models: LDMModels, volume: torch.Tensor) -> torch.Tensor:
    """Quantised patch-to-volume latent of ``volume`` (sizes: tile multiples)."""
    return quantize(models.vqvae, encode_volume(models.vqvae, volume, models.tile, models.halo, models.compression))


def quantize(vqvae: torch.nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """Nearest codebook vectors of ``latent`` (the frozen codebook: call with the quantiser in eval mode)."""
    quantized, _ = vqvae.quantize(latent)
    return quantized


def decode_volume(models: LDMModels, volume: torch.Tensor) -> torch.Tensor:
    """Patch-to-volume reconstruction: tile-wise encoding, quantisation, one decoder pass over the volume.

    Any size: the volume is zero-padded to a multiple of the tile and cropped back.
    """
    padded, size = _pad_to(volume, models.tile)
    out = models.vqvae.decode(encode(models, padded))
    return out[(slice(None), slice(None), *(slice(0, s) for s in size))]


def downsample_mask(mask: torch.Tensor, compression: int) -> torch.Tensor:
    """The mask on the latent grid: a latent cell is 1 where any of its voxels is in the mask."""
    return F.max_pool3d(mask.float(), compression) if compression > 1 else mask.float()


def soft_mask(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """1 inside ``mask`` (B, 1, *S), falling linearly to 0 over ``margin`` voxels outside it (chessboard
    distance); exactly 0 farther away."""
    mask = (mask > 0.5).float()
    total, grown = mask.clone(), mask
    for _ in range(margin):
        grown = F.max_pool3d(grown, 3, stride=1, padding=1)
        total = total + grown
    return total / (margin + 1)


@torch.no_grad()
def sample_latent(unet: torch.nn.Module, scheduler, condition: torch.Tensor, latent_channels: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM sampling of a latent (B, latent_channels, *L) given ``condition`` (B, dim + 1, *L)."""
    x = torch.randn((condition.shape[0], latent_channels, *condition.shape[2:]), generator=generator,
                    device=condition.device, dtype=condition.dtype)
    for t in scheduler.timesteps:
        timesteps = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = unet(torch.cat([x, condition], dim=1), timesteps=timesteps)
        x, _ = scheduler.step(eps, int(t), x)
    return x


def condition_of(models: LDMModels, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``cat(scaled latent of the tumour-removed image, down(mask))`` on the latent grid (sizes: tile multiples)."""
    removed = image * (1.0 - mask)
    latent = encode(models, removed) * models.scale_factor
    return torch.cat([latent, downsample_mask(mask, models.compression)], dim=1)


@torch.no_grad()
def inpaint_volume(models: LDMModels, scheduler, image: torch.Tensor, mask: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generates a tumour in ``mask`` and blends it into ``image`` around the lesion only.

    Args:
        models: trained networks (``unet`` required).
        scheduler: MONAI ``DDIMScheduler`` whose ``set_timesteps`` has been called.
        image: (B, C, *S) in nnU-Net's normalised units; any size (padded to tiles internally).
        mask: (B, 1, *S) in {0, 1}, where the tumour goes.
        generator: torch generator on the image's device for the initial noise.

    Returns:
        (blended image, soft mask): the image equals the input exactly where the soft mask is 0.
    """
    if models.unet is None:
        raise ValueError("these LDM models have no diffusion U-Net; train the diffusion stage first")
    padded, size = _pad_to(image, models.tile)
    padded_mask, _ = _pad_to(mask.float(), models.tile)
    condition = condition_of(models, padded, padded_mask)
    latent = sample_latent(models.unet, scheduler, condition, condition.shape[1] - 1, generator)
    decoded = models.vqvae.decode(quantize(models.vqvae, latent / models.scale_factor))
    decoded = decoded[(slice(None), slice(None), *(slice(0, s) for s in size))]
    weight = soft_mask(mask, models.blend_margin)
    blended = torch.where(weight > 0, torch.lerp(image, decoded, weight), image)
    return blended, weight
