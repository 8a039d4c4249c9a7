"""The ``ddpm`` backend: a trained 3D DDPM inpaints a tumour into the lesion mask (liver-MRI paper).

The checkpoint comes from the synth plan's ``backend_params``: ``checkpoint`` (a path, or ``best``/``final``/
``latest`` of the default training folder ``nnUNet_results/DatasetNNN/nnUNetSynthGenerator_ddpm__<config>/
fold_<fold>/``, see :mod:`nnunet_synth.generators.paths`; absent: the checkpoint that
``nnUNetv2_synth_quality --select-checkpoint`` recorded in that folder's ``selected_checkpoint.json``, else
``best``), ``fold`` (default 0),
``sampling_steps`` (DDIM steps, default 250 as in the paper) and ``device`` (default cuda when available).
Loading checks that the checkpoint was trained on this dataset, configuration, channel count and spacing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nnunet_synth.generators import register_backend
from nnunet_synth.generators.base import Lesion, TumourGenerator
from nnunet_synth.generators.paths import resolve_checkpoint

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan


@register_backend("ddpm")
class DDPMGenerator(TumourGenerator):
    """DDIM inpainting with a trained masked DDPM, in a patch of the model's size around the lesion.

    The model is loaded when the backend is built (so a missing or mismatched checkpoint fails at once) and
    again lazily after unpickling in a data-loader worker.
    """

    training_module = "nnunet_synth.generators.ddpm.training"

    def __init__(self, synth_plan: SynthPlan):
        super().__init__(synth_plan)
        from nnunet_synth.generators.ddpm.model import DEFAULT_SAMPLING_STEPS

        params = synth_plan.backend_params
        self.checkpoint, self.fold = resolve_checkpoint(synth_plan.dataset_name, "ddpm", synth_plan.configuration,
                                                        params, synth_plan.plans_identifier)
        if not params.get("checkpoint"):  # none named: the recorded selection, else the default (best)
            self.checkpoint = self._selected_or(self.checkpoint)
        self.sampling_steps = int(params.get("sampling_steps") or DEFAULT_SAMPLING_STEPS)
        self.device = torch.device(params.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.num_channels = len(synth_plan.channels)
        self._model: torch.nn.Module | None = None
        self.config = self._load()

    @staticmethod
    def _selected_or(default: Path) -> Path:
        """The checkpoint ``nnUNetv2_synth_quality --select-checkpoint`` recorded beside ``default`` (in
        ``selected_checkpoint.json``), else ``default``; says on stderr which one is used.

        Raises:
            GeneratorCheckpointError: the recorded checkpoint no longer exists.
        """
        from nnunet_synth.generators.checkpoints import SELECTION_FILE, selected_checkpoint

        chosen = selected_checkpoint(default.parent)
        if chosen is None:
            return default
        print(f"ddpm generator: {chosen} (selected by one-class SVM score, {default.parent / SELECTION_FILE})",
              file=sys.stderr, flush=True)
        return chosen

    def _load(self) -> dict:
        from nnunet_synth.generators.checkpoints import load_checkpoint
        from nnunet_synth.generators.ddpm.model import build_model, build_sampling_scheduler, preset_from_dict
        from nnunet_synth.generators.paths import train_command

        plan = self.synth_plan
        command = train_command(plan.dataset_name, "ddpm", plan.configuration, self.fold, plan.plans_identifier)
        state = load_checkpoint(self.checkpoint, "ddpm", {
            "dataset_name": plan.dataset_name, "configuration": plan.configuration,
            "num_channels": self.num_channels, "spacing": plan.spacing}, hint=f"train it with: {command}")
        config = state["config"]
        model = build_model(preset_from_dict(config["preset_params"]), config["num_channels"])
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            from nnunet_synth.generators.checkpoints import GeneratorCheckpointError

            raise GeneratorCheckpointError(f"generator checkpoint {self.checkpoint}: weights do not fit its own "
                                           f"preset {config['preset']!r}: {e}") from e
        self._model = model.to(self.device).eval()
        self._scheduler = build_sampling_scheduler(self.sampling_steps)
        return config

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_model"] = state["_scheduler"] = None
        return state

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(self.config["patch_size"])

    @property
    def max_lesion_shape(self) -> tuple[int, ...]:
        """Largest lesion bounding box (voxels) that leaves the model an eighth of its patch as context per side."""
        return tuple(p - 2 * max(1, p // 8) for p in self.patch_size)

    def synthesize(self, image: np.ndarray, lesion: Lesion, spacing: tuple[float, ...],
                   rng: np.random.Generator) -> None:
        from nnunet_synth.generators.ddpm.sampling import inpaint

        if self._model is None:
            self.config = self._load()
        if image.shape[0] != self.num_channels or image.ndim != 4:
            raise ValueError(f"the ddpm generator {self.checkpoint} takes (C={self.num_channels}, z, y, x) images, "
                             f"got shape {image.shape}")
        if not np.allclose(spacing, self.config["spacing"], rtol=1e-3):
            raise ValueError(f"the ddpm generator {self.checkpoint} was trained at spacing {self.config['spacing']}; "
                             f"this image has spacing {tuple(spacing)}")
        patch = np.array(self.patch_size)
        start = np.array([s.start for s in lesion.bbox])
        size = np.array(lesion.mask.shape)
        if np.any(size > patch):
            raise ValueError(f"lesion bounding box {tuple(size)} does not fit the ddpm model's patch {tuple(patch)}")
        shape = np.array(image.shape[1:])
        # a patch of the model's size around the lesion, shifted inside the image where the image allows
        lower = np.clip(start + size // 2 - patch // 2, 0, np.maximum(shape - patch, 0))
        window = tuple(slice(int(lo), int(min(lo + p, n))) for lo, p, n in zip(lower, patch, shape))
        crop = np.zeros((image.shape[0], *patch), dtype=np.float32)
        inner = tuple(slice(0, w.stop - w.start) for w in window)
        crop[(slice(None), *inner)] = image[(slice(None), *window)]
        local = tuple(slice(int(a - lo), int(a - lo + n)) for a, lo, n in zip(start, lower, size))
        mask = np.zeros((1, *patch), dtype=np.float32)
        mask[0][local] = lesion.mask
        generator = torch.Generator(device=self.device).manual_seed(int(rng.integers(2 ** 62)))
        out = inpaint(self._model, self._scheduler, torch.from_numpy(crop)[None].to(self.device),
                      torch.from_numpy(mask)[None].to(self.device), generator)[0].cpu().numpy()
        for c, (lo, hi) in enumerate(self.config["intensity_range"]):
            region = image[c][lesion.bbox]
            # only lesion voxels are written: everything else stays bit-identical
            region[lesion.mask] = np.clip(out[c][local][lesion.mask], lo, hi)
