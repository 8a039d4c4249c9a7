"""The Stable Diffusion 1.x parts the backend uses, loaded from a local folder, with LoRA on the UNet.

Nothing is downloaded: the base model is a folder in diffusers' ``save_pretrained`` layout (``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``). The VAE and the text encoder stay frozen; only
LoRA adapters on the UNet's attention projections train. Slices go from nnU-Net's normalised space to [0, 1]
(per-channel range of the training slices), are padded to a square and resized to the model's resolution,
and enter the VAE in [-1, 1] with one to three channels spread over RGB; the way back inverts each step.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_synth.extras import require_extra

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
LAYOUT_HELP = ("a local Stable Diffusion 1.x folder in diffusers' save_pretrained layout with the subfolders "
               "unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (e.g. StableDiffusionPipeline."
               "from_pretrained('CompVis/stable-diffusion-v1-4').save_pretrained(PATH) on a machine with internet)")


class BaseModelError(RuntimeError):
    """A base model folder that is missing, incomplete or not the one a checkpoint was trained on."""


def check_base_model(path: str | Path | None) -> Path:
    """Resolves a base model folder and checks its layout.

    Raises:
        BaseModelError: no path given, or the folder lacks a part; the message names the layout needed.
    """
    if path is None:
        raise BaseModelError(f"the sd_inversion backend needs --base-model PATH: {LAYOUT_HELP}. Nothing is "
                             f"downloaded at run time")
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise BaseModelError(f"base model folder {folder} does not exist; it must be {LAYOUT_HELP}")
    missing = [p for p in REQUIRED_PARTS if not (folder / p).is_dir()]
    if missing:
        raise BaseModelError(f"base model folder {folder} lacks {', '.join(f'{m}/' for m in missing)}; it must be "
                             f"{LAYOUT_HELP}")
    return folder


def base_model_fingerprint(folder: Path) -> str:
    """SHA-256 of the configuration files of the UNet, VAE, text encoder and scheduler (not of the weights)."""
    digest = hashlib.sha256()
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                       ("scheduler", "scheduler_config.json")):
        file = Path(folder) / part / name
        if not file.is_file():
            raise BaseModelError(f"base model folder {folder}: {part}/{name} is missing; it must be {LAYOUT_HELP}")
        config = json.loads(file.read_text(encoding="utf-8"))
        config = {k: v for k, v in config.items() if not k.startswith("_")}  # versions and paths vary
        digest.update(json.dumps(config, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass
class StableDiffusionParts:
    """UNet (with LoRA), frozen VAE and text encoder, tokenizer and the DDPM scheduler of a base model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    folder: Path

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The resolution the base model was trained at (512 for Stable Diffusion 1.x)."""
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0]) * self.vae_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(tokens.to(self.text_encoder.device))[0]

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of RGB images in [-1, 1]: the posterior mean, or a sample with ``generator``."""
        with torch.no_grad():
            posterior = self.vae.encode(images).latent_dist
            latents = posterior.mean if generator is None else posterior.sample(generator)
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """RGB images in [-1, 1] (clipped) of latents."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)


def load_parts(base_model: str | Path, device: str | torch.device = "cpu", lora_rank: int | None = None,
               seed: int = 0) -> StableDiffusionParts:
    """Loads the parts of a local base model; with ``lora_rank`` adds trainable LoRA adapters to the UNet.

    The safety checker is never loaded (medical images; the prompts avoid the words it flags).

    Raises:
        MissingExtraError: diffusers, peft or transformers is not installed (the ``[sd]`` extra).
    """
    require_extra("sd")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = check_base_model(base_model)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise BaseModelError(f"base model folder {folder} cannot be loaded ({type(e).__name__}: {e}); it must be "
                             f"{LAYOUT_HELP}") from e
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device).eval()
    if lora_rank is not None:
        add_lora(unet, lora_rank, seed)
    return StableDiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, folder)


def add_lora(unet: torch.nn.Module, rank: int, seed: int = 0) -> None:
    """Adds LoRA adapters of ``rank`` (alpha = rank) to the UNet's attention projections; only they train."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=list(LORA_TARGETS)))


def lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of the UNet (CPU copies): all a checkpoint stores of the model."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads LoRA weights saved by :func:`lora_state`; raises ValueError when keys do not fit."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    expected = set(lora_state(unet))
    missing = sorted(expected - set(state))
    if unexpected or missing:
        raise ValueError(f"LoRA weights do not fit this UNet: missing {missing[:3]}, unexpected {unexpected[:3]}")


def to_unit(image: np.ndarray, intensity_range: list[list[float]]) -> np.ndarray:
    """nnU-Net-normalised (C, Y, X) to [0, 1] by the per-channel (low, high) range, clipped."""
    lo = np.array([r[0] for r in intensity_range], dtype=np.float32)[:, None, None]
    hi = np.array([r[1] for r in intensity_range], dtype=np.float32)[:, None, None]
    return np.clip((image - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def from_unit(image: np.ndarray, intensity_range: list[list[float]]) -> np.ndarray:
    """Inverse of :func:`to_unit` (inside the range)."""
    lo = np.array([r[0] for r in intensity_range], dtype=np.float32)[:, None, None]
    hi = np.array([r[1] for r in intensity_range], dtype=np.float32)[:, None, None]
    return (image * (hi - lo) + lo).astype(np.float32)


def to_model(unit: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, C, Y, X) in [0, 1] to (B, 3, R, R) in [-1, 1]: channels over RGB, zero-padded to a square, resized."""
    channels = unit.shape[1]
    if channels == 1:
        rgb = unit.expand(-1, 3, -1, -1)
    elif channels == 2:
        rgb = torch.cat([unit, unit.mean(1, keepdim=True)], 1)
    elif channels == 3:
        rgb = unit
    else:
        raise ValueError(f"the sd_inversion backend takes 1 to 3 image channels, got {channels}")
    side = max(rgb.shape[-2:])
    rgb = F.pad(rgb, (0, side - rgb.shape[-1], 0, side - rgb.shape[-2]))
    rgb = F.interpolate(rgb, size=(resolution, resolution), mode="bilinear", align_corners=False,
                        antialias=side > resolution)
    return rgb * 2 - 1


def from_model(rgb: torch.Tensor, shape: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`to_model`: (B, 3, R, R) in [-1, 1] to (B, C, *shape) in [0, 1]."""
    side = max(shape)
    unit = F.interpolate((rgb + 1) / 2, size=(side, side), mode="bilinear", align_corners=False,
                         antialias=rgb.shape[-1] > side)[..., :shape[0], :shape[1]]
    unit = unit.mean(1, keepdim=True) if channels == 1 else unit[:, :channels]
    return unit.clamp(0, 1)
