"""The ``sd_inversion`` backend: a LoRA-fine-tuned Stable Diffusion 1.x inserts a tumour of a requested size
class into one 2D slice by edit-friendly DDPM inversion (breast 2D paper).

Synth plan ``backend_params``: ``checkpoint`` (a path, or ``final``/``latest`` of the default training folder
``nnUNet_results/DatasetNNN/nnUNetSynthGenerator_sd_inversion__2d/fold_<fold>/``, see
:mod:`nnunet_synth.generators.paths`; default ``final``), ``fold`` (default 0), ``base_model`` (default: the
folder recorded in the checkpoint; its configuration must match the recorded fingerprint), ``device`` and the
:class:`~nnunet_synth.generators.sd_inversion.insertion.InsertionSettings` (``sampling_steps``, ``strength``,
``guidance``, ``source_guidance``, ``mask_sigma_px``, ``noise_mean``, ``noise_std``).

Lesions come from the lesion pipeline like every backend's: on the 2d configuration with the ``slice_area``
size preset (the size class is the plan's ``shapes.size_class``, e.g. ``nnUNetv2_synth_generate --size-class``),
on 3D configurations as 3D lesions inpainted slice by slice.

Unlike the 3D backends, the image may change beyond the lesion mask: inside the smoothed mask (the mask's
Gaussian smoothing, see :func:`~nnunet_synth.generators.sd_inversion.insertion.smoothed_mask`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from nnunet_synth.generators import register_backend
from nnunet_synth.generators.base import Lesion, TumourGenerator
from nnunet_synth.generators.paths import resolve_checkpoint
from nnunet_synth.generators.sd_inversion.captions import NO_TUMOUR, caption, caption_of_mask

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan

BACKEND = "sd_inversion"
# the generator is fine-tuned on the 2d configuration; 3D configurations of the dataset use it slice by slice
GENERATOR_CONFIGURATION = "2d"
DEFAULT_CHECKPOINT = "final"


@register_backend(BACKEND)
class SDInversionGenerator(TumourGenerator):
    """Tumour insertion into 2D slices with a LoRA-fine-tuned Stable Diffusion and DDPM inversion.

    The base model and LoRA weights load when the backend is built (so a missing or mismatched checkpoint or
    base model fails at once) and again lazily after unpickling.
    """

    training_module = "nnunet_synth.generators.sd_inversion.training"

    def __init__(self, synth_plan: SynthPlan):
        super().__init__(synth_plan)
        from nnunet_synth.generators.sd_inversion.insertion import InsertionSettings

        params = dict(synth_plan.backend_params)
        self.checkpoint, self.fold = resolve_checkpoint(synth_plan.dataset_name, BACKEND, GENERATOR_CONFIGURATION,
                                                        params, synth_plan.plans_identifier, DEFAULT_CHECKPOINT)
        self.settings = InsertionSettings.from_params(params)
        self.sampling_steps = self.settings.sampling_steps
        self.base_model = params.get("base_model")
        self.device = torch.device(params.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.num_channels = len(synth_plan.channels)
        self._parts = None
        self.config = self._load()

    def _load(self) -> dict:
        from nnunet_synth.generators.checkpoints import GeneratorCheckpointError, load_checkpoint
        from nnunet_synth.generators.paths import train_command
        from nnunet_synth.generators.sd_inversion.components import (
            BaseModelError,
            base_model_fingerprint,
            check_base_model,
            load_lora_state,
            load_parts,
        )

        plan = self.synth_plan
        command = train_command(plan.dataset_name, BACKEND, GENERATOR_CONFIGURATION, self.fold,
                                plan.plans_identifier)
        hint = f"train it with: {command} --base-model PATH"
        state = load_checkpoint(self.checkpoint, BACKEND, {
            "dataset_name": plan.dataset_name, "configuration": GENERATOR_CONFIGURATION,
            "num_channels": self.num_channels}, hint=hint)
        config = state["config"]
        try:
            folder = check_base_model(self.base_model or config["base_model"])
        except BaseModelError as e:
            raise GeneratorCheckpointError(f"generator checkpoint {self.checkpoint} was trained on the base model "
                                           f"{config['base_model']}: {e}") from e
        if base_model_fingerprint(folder) != config["base_model_fingerprint"]:
            raise GeneratorCheckpointError(f"generator checkpoint {self.checkpoint} was trained on the base model "
                                           f"{config['base_model']}; {folder} has other model configurations")
        parts = load_parts(folder, self.device, lora_rank=config["lora_rank"])
        try:
            load_lora_state(parts.unet, state["lora"])
        except ValueError as e:
            raise GeneratorCheckpointError(f"generator checkpoint {self.checkpoint}: {e}") from e
        parts.unet.eval()
        self._parts = parts
        return config

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_parts"] = None
        return state

    def _insert(self, image: np.ndarray, mask: np.ndarray, source_prompt: str, rng: np.random.Generator
                ) -> np.ndarray:
        from nnunet_synth.generators.sd_inversion.insertion import insert_tumour

        if self._parts is None:
            self.config = self._load()
        if image.ndim != 3 or image.shape[0] != self.num_channels:
            raise ValueError(f"the sd_inversion generator {self.checkpoint} takes 2D slices (C={self.num_channels}, "
                             f"y, x), got shape {image.shape}")
        return insert_tumour(self._parts, image, mask, self.config["intensity_range"], self.config["resolution"],
                             source_prompt, self.target_prompt(mask), self.settings, rng)

    def target_prompt(self, mask: np.ndarray) -> str:
        """The size caption of a 2D lesion mask, its area counted as the generator's training captions counted
        theirs: on the image the model sees (checkpoints without ``caption_resolution``: slice pixels)."""
        return caption_of_mask(mask, resolution=self.config.get("caption_resolution"))

    def synthesize(self, image: np.ndarray, lesion: Lesion, spacing: tuple[float, ...],
                   rng: np.random.Generator) -> None:
        """Writes a tumour into a 2D slice (C, y, x), or slice by slice along the first axis into a volume
        (C, z, y, x), each slice prompted with the size class of its own lesion area; the source prompt says
        "no tumor"."""
        mask = np.zeros(image.shape[1:], dtype=bool)
        mask[lesion.bbox] = lesion.mask
        if mask.ndim == 2:
            image[...] = self._insert(image, mask, caption(NO_TUMOUR), rng)
            return
        for z in np.flatnonzero(mask.any(axis=(1, 2))):
            image[:, z] = self._insert(image[:, z], mask[z], caption(NO_TUMOUR), rng)
