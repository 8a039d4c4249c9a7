"""The ``sd_inversion`` backend: a LoRA-fine-tuned Stable Diffusion 1.x inserts a tumour of a requested size
class into one 2D slice by edit-friendly DDPM inversion (breast 2D paper).

Synth plan ``backend_params``: ``checkpoint`` (a path, or ``final``/``latest`` of the default training folder
``nnUNet_results/DatasetNNN/nnUNetSynthGenerator_sd_inversion__2d/fold_<fold>/``; default ``final``),
``fold`` (default 0), ``base_model`` (default: the folder recorded in the checkpoint; its configuration must
match the recorded fingerprint), ``size_class`` (tiny, small, medium, large, very_large or any), ``device``
and the :class:`~nnunet_synth.generators.sd_inversion.insertion.InsertionSettings` (``sampling_steps``,
``strength``, ``guidance``, ``source_guidance``, ``mask_sigma_px``, ``noise_mean``, ``noise_std``).

Unlike the 3D backends, the image may change beyond the lesion mask: inside the smoothed mask (the mask's
Gaussian smoothing, see :func:`~nnunet_synth.generators.sd_inversion.insertion.smoothed_mask`).
"""

from __future__ import annotations

import numpy as np
import torch

from nnunet_synth.generators import register_backend
from nnunet_synth.generators.base import Lesion, TumourGenerator
from nnunet_synth.generators.sd_inversion.captions import NO_TUMOUR, caption, caption_of_mask, size_class_of_area
from nnunet_synth.generators.sizes import SLICE_AREA_BINS_PX

BACKEND = "sd_inversion"
# the generator is fine-tuned on the 2d configuration; 3D configurations of the dataset use it slice by slice
GENERATOR_CONFIGURATION = "2d"
DEFAULT_CHECKPOINT = "final"
MAX_LESION_DRAWS = 50


@register_backend(BACKEND)
class SDInversionGenerator(TumourGenerator):
    """Tumour insertion into 2D slices with a LoRA-fine-tuned Stable Diffusion and DDPM inversion.

    The base model and LoRA weights load when the backend is built (so a missing or mismatched checkpoint or
    base model fails at once) and again lazily after unpickling.
    """

    def __init__(self, synth_plan: dict):
        super().__init__(synth_plan)
        from nnunet_synth.generators.ddpm.backend import resolve_checkpoint
        from nnunet_synth.generators.sd_inversion.insertion import InsertionSettings

        params = dict(synth_plan.get("backend_params", {}))
        params["checkpoint"] = params.get("checkpoint") or DEFAULT_CHECKPOINT
        self.checkpoint, self.fold = resolve_checkpoint(
            {**synth_plan, "configuration": GENERATOR_CONFIGURATION, "backend_params": params}, BACKEND)
        self.settings = InsertionSettings.from_params(params)
        self.sampling_steps = self.settings.sampling_steps
        self.size_class = str(params.get("size_class") or "any")
        if self.size_class not in (*SLICE_AREA_BINS_PX, "any"):
            raise ValueError(f"size class {self.size_class!r} is not one of {[*SLICE_AREA_BINS_PX, 'any']}")
        self.base_model = params.get("base_model")
        self.device = torch.device(params.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.num_channels = len(synth_plan["intensity"]["channels"])
        self._parts = None
        self.config = self._load()

    def _load(self) -> dict:
        from nnunet_synth.generator_training import train_command
        from nnunet_synth.generators.checkpoints import GeneratorCheckpointError, load_checkpoint
        from nnunet_synth.generators.sd_inversion.components import (
            BaseModelError,
            base_model_fingerprint,
            check_base_model,
            load_lora_state,
            load_parts,
        )

        plan = self.synth_plan
        command = train_command(plan["dataset_name"], BACKEND, GENERATOR_CONFIGURATION, self.fold)
        hint = f"train it with: {command} --base-model PATH"
        state = load_checkpoint(self.checkpoint, BACKEND, {
            "dataset_name": plan["dataset_name"], "configuration": GENERATOR_CONFIGURATION,
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
                             source_prompt, caption_of_mask(mask), self.settings, rng)

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

    def insert_lesion(self, data: np.ndarray, seg: np.ndarray, plan: dict, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray, dict] | None:
        """Bank hook: one lesion of the requested size class in one slice of a preprocessed case (C, Z, Y, X).

        On a 3D configuration the lesion is 3D instead, from the synth plan's size preset, placed like every
        backend's and inpainted slice by slice (:meth:`synthesize`). On the 2d configuration, the slice is drawn
        among those holding the organ label; the lesion is drawn with the ``slice_area``
        preset and redrawn until its pixel area as placed falls in the requested class; its caption is the
        prompt.

        Returns:
            New (data, seg, lesion info), or None when no lesion fits; the inputs are not modified.
        """
        from nnunet_synth.generators.placement import PlacementRules, central_window, place_lesion
        from nnunet_synth.generators.shapes import lesion_mask
        from nnunet_synth.generators.sizes import lesion_requests

        seg0 = np.asarray(seg[0])
        if seg0.ndim != 3 or np.asarray(data).ndim != 4:
            raise ValueError(f"sd_inversion inserts into preprocessed (C, Z, Y, X) cases, got data "
                             f"{np.asarray(data).shape}")
        if plan["configuration"] != GENERATOR_CONFIGURATION:
            from nnunet_synth.bank import place_and_synthesize

            return place_and_synthesize(data, seg, plan, self, rng)
        if plan.get("organ_label") is None:
            return None
        spacing = tuple(float(s) for s in plan["spacing"][-2:])
        organ = seg0 == plan["organ_label"]
        slices = np.flatnonzero(organ.any(axis=(1, 2)))
        if not len(slices):
            return None
        shapes = {"size_preset": "slice_area", "size_class": self.size_class}
        rules = PlacementRules(**plan["placement"])
        for _ in range(MAX_LESION_DRAWS):
            z = int(rng.choice(slices))
            request = lesion_requests({"shapes": shapes}, spacing, rng)[0]
            mask = lesion_mask(request.radii_mm, spacing, rng, plan["shapes"].get("deformation", "elastic"))
            if size_class_of_area(int(mask.sum())) != request.size_class:
                continue
            tumour = seg0[z] == plan["tumour_label"]
            allowed = organ[z] & ~tumour & (seg0[z] >= 0)
            lesion = place_lesion(mask, allowed, organ[z], tumour, spacing, rng, rules,
                                  central_window(organ[z].shape, None))
            if lesion is None or size_class_of_area(lesion.num_voxels) != request.size_class:
                continue  # placement may trim the mask to the organ: its class must still be the requested one
            new_data = np.array(data, dtype=np.float32, copy=True)
            full = np.zeros(organ[z].shape, dtype=bool)
            full[lesion.bbox] = lesion.mask
            new_data[:, z] = self._insert(new_data[:, z], full, caption_of_mask(tumour), rng)
            new_seg = np.array(seg, copy=True)
            new_seg[0, z][full] = plan["tumour_label"]
            return new_data, new_seg, {"size_class": request.size_class, "slice": z, "area_px": int(full.sum()),
                                       "prompt": caption_of_mask(full), "voxels": int(full.sum()),
                                       "bbox": [[z, z + 1], *[[int(s.start), int(s.stop)] for s in lesion.bbox]]}
        return None
