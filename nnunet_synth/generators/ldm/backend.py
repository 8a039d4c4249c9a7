"""The ``ldm`` backend: a trained patch-to-volume VQ-VAE + latent diffusion model inpaints a tumour (SynBT).

The checkpoint is the diffusion stage's (it holds the autoencoder too), named by the synth plan's
``backend_params`` like the ddpm backend's: ``checkpoint`` (a path, or ``best``/``final``/``latest`` of
``nnUNet_results/DatasetNNN/nnUNetSynthGenerator_ldm__<config>/fold_<fold>/``; default ``best``), ``fold``
(default 0), ``sampling_steps`` (DDIM steps, default 10 as in the paper) and ``device``. The generator works
in a window of the model's volume size around the lesion; the decoded window is blended into the image over
``blend_margin`` voxels around the lesion, and every voxel farther away stays bit-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nnunet_synth.generators import register_backend
from nnunet_synth.generators.base import Lesion, TumourGenerator
from nnunet_synth.generators.checkpoints import GeneratorCheckpointError, load_checkpoint
from nnunet_synth.generators.ldm.sampling import LDMModels, inpaint_volume
from nnunet_synth.generators.paths import resolve_checkpoint

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan

BACKEND = "ldm"


def load_models(path: Path, expected: dict | None = None, device: str | torch.device = "cpu", hint: str = ""
                ) -> tuple[LDMModels, dict]:
    """Networks and config of a diffusion-stage ``ldm`` checkpoint, checked against ``expected`` config entries.

    Raises:
        GeneratorCheckpointError: missing/corrupt file, another backend or stage, a config mismatch, or
            weights that do not fit the checkpoint's own preset; the message names the file.
    """
    from nnunet_synth.generators.ldm.model import build_unet, build_vqvae, preset_from_dict

    state = load_checkpoint(path, BACKEND, expected, hint=hint)
    if state.get("stage") != "diffusion":
        raise GeneratorCheckpointError(f"generator checkpoint {path} is from the ldm stage {state.get('stage')!r}; "
                                       f"the generator needs the diffusion stage's checkpoint")
    config = state["config"]
    preset = preset_from_dict(config["preset_params"])
    vqvae, unet = build_vqvae(preset, config["num_channels"]), build_unet(preset)
    try:
        vqvae.load_state_dict(state["vqvae"])
        unet.load_state_dict(state["unet"])
    except RuntimeError as e:
        raise GeneratorCheckpointError(f"generator checkpoint {path}: weights do not fit its own preset "
                                       f"{config['preset']!r}: {e}") from e
    models = LDMModels(vqvae.to(device).eval(), unet.to(device).eval(), tuple(preset.vq_patch_size),
                       preset.compression, float(config["scale_factor"]), int(config["blend_margin"]),
                       preset.encode_halo)
    return models, config


@register_backend("ldm")
class LDMGenerator(TumourGenerator):
    """Latent-diffusion inpainting in a window of the model's volume size around the lesion."""

    training_module = "nnunet_synth.generators.ldm.training"

    def __init__(self, synth_plan: SynthPlan):
        super().__init__(synth_plan)
        from nnunet_synth.generators.ldm.model import DEFAULT_SAMPLING_STEPS

        params = synth_plan.backend_params
        self.checkpoint, self.fold = resolve_checkpoint(synth_plan.dataset_name, BACKEND, synth_plan.configuration,
                                                        params, synth_plan.plans_identifier)
        self.sampling_steps = int(params.get("sampling_steps") or DEFAULT_SAMPLING_STEPS)
        self.device = torch.device(params.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.num_channels = len(synth_plan.channels)
        self._models: LDMModels | None = None
        self.config = self._load()

    def _load(self) -> dict:
        from nnunet_synth.generators.ldm.model import build_sampling_scheduler
        from nnunet_synth.generators.paths import train_command

        plan = self.synth_plan
        command = train_command(plan.dataset_name, BACKEND, plan.configuration, self.fold, plan.plans_identifier)
        self._models, config = load_models(self.checkpoint, {
            "dataset_name": plan.dataset_name, "configuration": plan.configuration,
            "num_channels": self.num_channels, "spacing": plan.spacing}, self.device,
            hint=f"train it with: {command}")
        self._scheduler = build_sampling_scheduler(self.sampling_steps)
        return config

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_models"] = state["_scheduler"] = None
        return state

    @property
    def volume_size(self) -> tuple[int, ...]:
        return tuple(self.config["volume_size"])

    @property
    def max_lesion_shape(self) -> tuple[int, ...]:
        """Largest lesion box (voxels) that leaves the blend margin and an eighth of the volume as context."""
        margin = int(self.config["blend_margin"])
        return tuple(p - 2 * max(margin + 1, p // 8) for p in self.volume_size)

    def synthesize(self, image: np.ndarray, lesion: Lesion, spacing: tuple[float, ...],
                   rng: np.random.Generator) -> None:
        if self._models is None:
            self.config = self._load()
        if image.shape[0] != self.num_channels or image.ndim != 4:
            raise ValueError(f"the ldm generator {self.checkpoint} takes (C={self.num_channels}, z, y, x) images, "
                             f"got shape {image.shape}")
        if not np.allclose(spacing, self.config["spacing"], rtol=1e-3):
            raise ValueError(f"the ldm generator {self.checkpoint} was trained at spacing {self.config['spacing']}; "
                             f"this image has spacing {tuple(spacing)}")
        size = np.array(lesion.mask.shape)
        if np.any(size > np.array(self.max_lesion_shape)):
            raise ValueError(f"lesion bounding box {tuple(size)} does not fit the ldm model's volume "
                             f"{self.volume_size} (largest lesion {self.max_lesion_shape})")
        volume, shape = np.array(self.volume_size), np.array(image.shape[1:])
        start = np.array([s.start for s in lesion.bbox])
        lower = np.clip(start + size // 2 - volume // 2, 0, np.maximum(shape - volume, 0))
        window = tuple(slice(int(lo), int(min(lo + v, n))) for lo, v, n in zip(lower, volume, shape))
        crop = np.zeros((image.shape[0], *volume), dtype=np.float32)
        inner = tuple(slice(0, w.stop - w.start) for w in window)
        crop[(slice(None), *inner)] = image[(slice(None), *window)]
        mask = np.zeros((1, 1, *volume), dtype=np.float32)
        mask[(0, 0, *(slice(int(a - lo), int(a - lo + n)) for a, lo, n in zip(start, lower, size)))] = lesion.mask
        generator = torch.Generator(device=self.device).manual_seed(int(rng.integers(2 ** 62)))
        blended, weight = inpaint_volume(self._models, self._scheduler, torch.from_numpy(crop)[None].to(self.device),
                                         torch.from_numpy(mask).to(self.device), generator)
        blended, weight = blended[0].cpu().numpy(), weight[0, 0].cpu().numpy()
        touched = weight[inner] > 0  # only voxels near the lesion are written: the rest stays bit-identical
        for c, (lo, hi) in enumerate(self.config["intensity_range"]):
            region = image[c][window]
            region[touched] = np.clip(blended[c][inner][touched], lo, hi)
