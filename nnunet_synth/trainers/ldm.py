"""Trainers that use the ``ldm`` generator: bank mixing (any device) and GPU inpainting on the fly.

``nnUNetTrainerSynthNLDM`` trains on real + ldm bank cases (made by ``nnUNetv2_synth_generate -g ldm``), the
bank drawn with total probability N/100, exactly like the DDPM bank trainers. ``nnUNetTrainerSynthNLDMOnline``
inpaints a share N/100 of the training samples on the GPU with the trained LDM just before the forward pass (few
DDIM steps; ``sampling_steps`` of the synth plan's ``backend_params`` when its backend is ``ldm``, else 10) and log
each epoch which share of the training-step time generation took. The loader chooses and marks those samples
(:class:`~nnunet_synth.injection.OnlineSynthMarker`: healthy cases first where the synth plan lists them) and keeps
them out of nnU-Net's intensity transforms; ``train_step`` inpaints them and then applies those same transforms to
them on the GPU (:class:`~nnunet_synth.injection.DeviceIntensityAugmentation`), so the generator sees un-augmented
intensities and a synthetic sample is augmented like a real one. On a machine without CUDA the online trainers
refuse to start and name the bank trainers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_synth.injection import (
    MARKED,
    OUTCOME_KEY,
    OUTSIDE_KEY,
    DeviceIntensityAugmentation,
    OnlineSynthMarker,
    OutcomeDataLoader,
    defer_intensity_transforms,
)
from nnunet_synth.synth_plan import SynthPlan
from nnunet_synth.trainers.bank import nnUNetTrainerSynthBank
from nnunet_synth.trainers.loaders import build_dataloaders
from nnunet_synth.trainers.schedules import DEBUG_SCHEDULE, apply_schedule_override, set_schedule


class nnUNetTrainerSynthLDMBank(nnUNetTrainerSynthBank):
    """Real + ldm bank cases, the bank drawn with total probability ``synth_probability``."""

    synth_backend = "ldm"


class nnUNetTrainerSynth2LDM(nnUNetTrainerSynthLDMBank):
    synth_probability = 0.02


class nnUNetTrainerSynth5LDM(nnUNetTrainerSynthLDMBank):
    synth_probability = 0.05


class nnUNetTrainerSynth10LDM(nnUNetTrainerSynthLDMBank):
    synth_probability = 0.10


class nnUNetTrainerSynth20LDM(nnUNetTrainerSynthLDMBank):
    synth_probability = 0.20


class nnUNetTrainerSynth30LDM(nnUNetTrainerSynthLDMBank):
    synth_probability = 0.30


class nnUNetTrainerSynth40LDM(nnUNetTrainerSynthLDMBank):
    synth_probability = 0.40


class nnUNetTrainerSynth50LDM(nnUNetTrainerSynthLDMBank):
    synth_probability = 0.50


class nnUNetTrainerSynth60LDM(nnUNetTrainerSynthLDMBank):
    synth_probability = 0.60


class nnUNetTrainerSynth20LDM_Debug(nnUNetTrainerSynth20LDM):
    """nnUNetTrainerSynth20LDM, one epoch of two training and one validation iteration (tests)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, DEBUG_SCHEDULE)


def _bank_trainer_name(probability: float) -> str:
    return f"nnUNetTrainerSynth{round(100 * probability)}LDM"


class nnUNetTrainerSynthLDMOnline(nnUNetTrainer):
    """nnU-Net training where each training sample gets an LDM-inpainted tumour with probability
    ``synth_probability``, generated on the GPU inside ``train_step`` before nnU-Net's intensity augmentation of that
    sample (see the module docstring).

    Raises:
        RuntimeError: at construction on a device other than an available CUDA GPU (names the bank trainer).
    """

    synth_probability: float = 0.2
    sampling_steps: int = 10

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self._require_cuda(device)
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule_override(self)
        self.synth_plan: SynthPlan | None = None
        self._ldm = None
        self._synth_seen = [0, 0]  # samples, inpainted samples
        self._synth_skipped = 0  # marked samples where no lesion fitted
        self._seconds = [0.0, 0.0]  # generation, whole training step: the generation share of step time
        self.synth_marker: OnlineSynthMarker | None = None
        self.device_augmentation: DeviceIntensityAugmentation | None = None

    @classmethod
    def _require_cuda(cls, device: torch.device) -> None:
        """Refuses devices other than an available CUDA GPU: on-the-fly diffusion on a CPU would stall training."""
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                f"{cls.__name__} inpaints tumours with the LDM on the GPU during training and needs a CUDA "
                f"device (got {device}{'' if torch.cuda.is_available() else ', and no CUDA device is available'}). "
                f"On a CPU-only machine use the bank trainers: nnUNetv2_synth_generate -d DATASET -g ldm -n N, "
                f"then nnUNetv2_train ... -tr {_bank_trainer_name(cls.synth_probability)}")

    def initialize(self) -> None:
        if not self.was_initialized:
            self._load_ldm()
        super().initialize()

    def _load_ldm(self) -> None:
        from nnunet_synth.generators.ldm.backend import load_models
        from nnunet_synth.generators.ldm.model import build_sampling_scheduler
        from nnunet_synth.generators.paths import resolve_checkpoint, train_command
        from nnunet_synth.planning import load_synth_plan
        from nnunet_synth.synth_plan import synth_plan_file

        plans_name = self.plans_manager.plans_name
        plan = load_synth_plan(self.plans_manager.dataset_name, self.configuration_name, plans_name)
        params = dict(plan.backend_params) if plan.backend == "ldm" else {}
        params["fold"] = self.fold  # the generator of this fold: it never saw this fold's validation cases
        plan = plan.replace(backend="ldm", backend_params=params).validated(
            f"{synth_plan_file(self.preprocessed_dataset_folder_base, plans_name)} with backend 'ldm' of "
            f"{self.__class__.__name__}", self.dataset_json)
        checkpoint, _ = resolve_checkpoint(plan.dataset_name, "ldm", plan.configuration, params, plans_name)
        command = train_command(plan.dataset_name, "ldm", plan.configuration, self.fold, plans_name)
        models, config = load_models(checkpoint, {
            "dataset_name": plan.dataset_name, "configuration": plan.configuration,
            "num_channels": len(plan.channels), "spacing": plan.spacing}, self.device,
            hint=f"train it with: {command}")
        steps = int(params.get("sampling_steps") or self.sampling_steps)
        self.synth_plan = plan
        self._templates = None
        if plan.shapes.deformation == "template":  # real tumour masks of this fold's training cases only
            from nnunet_synth.generators.templates import fold_templates

            self._templates, _ = fold_templates(Path(self.preprocessed_dataset_folder_base),
                                                self.configuration_manager, plan, self.do_split()[0],
                                                textures=False)  # the LDM paints; only the shapes are used
        self._ldm = (models, build_sampling_scheduler(steps), config)
        fold = self.fold if isinstance(self.fold, int) else 0
        self._rng = np.random.default_rng([int(plan.seed), fold])
        # the loader's choice of samples, drawn per worker like the Synth trainers' transform (seed per fold)
        self.synth_marker = OnlineSynthMarker(plan, self.synth_probability, int(plan.seed) + 1000 * fold)
        self._noise = torch.Generator(device=self.device).manual_seed(int(plan.seed))
        self.print_to_log_file(f"LDM inpainting on the fly: probability {self.synth_probability} per training "
                               f"sample, {steps} DDIM steps, checkpoint {checkpoint}")

    def get_training_transforms(self, patch_size, *args, **kwargs) -> ComposeTransforms:
        # nnU-Net declares this a staticmethod; as a method it marks the samples to synthesise and defers their
        # intensity augmentation to train_step
        transforms = super().get_training_transforms(patch_size, *args, **kwargs)
        assert isinstance(transforms, ComposeTransforms), type(transforms)
        self.device_augmentation = defer_intensity_transforms(transforms, self.synth_marker)
        return transforms

    def get_dataloaders(self):
        # nnU-Net's loaders; the training loader's batches carry the marks (and, where nnU-Net masks, the masks)
        loaders = build_dataloaders(self, OutcomeDataLoader)
        marker = self.synth_marker
        if marker.healthy:
            healthy_p, other_p = marker.case_probabilities()
            self.print_to_log_file(f"healthy controls first: {len(marker.healthy)} training cases "
                                   f"({marker.healthy_share:.0%} of drawn samples) get an LDM tumour with probability "
                                   f"{healthy_p:.2f}, the others with {other_p:.2f}")
        return loaders

    def synthesize(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """The batch's data and target on the device with the loader's marked samples inpainted and then given
        nnU-Net's intensity augmentation (what ``train_step`` trains on).

        Raises:
            RuntimeError: a batch without the loader's marks (not made by this trainer's training loader).
        """
        from nnunet_synth.generators.ldm.online import inpaint_batch

        if OUTCOME_KEY not in batch:
            raise RuntimeError(f"{self.__class__.__name__}: the training batch has no {OUTCOME_KEY!r} (the samples "
                               f"its loader marked for synthesis); use the trainer's own get_dataloaders")
        models, scheduler, config = self._ldm
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        marked = torch.nonzero(torch.as_tensor(batch[OUTCOME_KEY]) == MARKED).flatten().tolist()
        data, target, inpainted = inpaint_batch(models, scheduler, data, target, self.synth_plan,
                                                self.synth_probability, self._rng, self._noise,
                                                config["intensity_range"], self._templates, samples=marked)
        # every marked sample skipped the loader's intensity transforms, inpainted or not (nothing fitted)
        data = self.device_augmentation(data, marked, len(self.synth_plan.channels), batch.get(OUTSIDE_KEY))
        self._synth_seen[0] += data.shape[0]
        self._synth_seen[1] += len(inpainted)
        self._synth_skipped += len(marked) - len(inpainted)
        return data, target

    def train_step(self, batch: dict) -> dict:
        start = time.perf_counter()
        data, target = self.synthesize(batch)
        generated = self._elapsed(start)
        result = super().train_step({**batch, "data": data, "target": target})
        self._seconds[0] += generated
        self._seconds[1] += self._elapsed(start)
        return result

    def _elapsed(self, start: float) -> float:
        """Seconds since ``start``, after the GPU's queued work (kernels run asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def on_epoch_end(self) -> None:
        (seen, synthetic), skipped = self._synth_seen, self._synth_skipped
        generation, step = self._seconds
        self._synth_seen, self._synth_skipped, self._seconds = [0, 0], 0, [0.0, 0.0]
        self.print_to_log_file(f"LDM tumours this epoch: {synthetic}/{seen} samples ({synthetic / max(1, seen):.1%}; "
                               f"target {self.synth_probability:.0%}), {skipped} skipped (no lesion fitted); "
                               f"generation and their intensity augmentation {generation:.1f} s of "
                               f"{step:.1f} s training-step time ({generation / max(step, 1e-9):.1%})")
        super().on_epoch_end()


class nnUNetTrainerSynth2LDMOnline(nnUNetTrainerSynthLDMOnline):
    synth_probability = 0.02


class nnUNetTrainerSynth5LDMOnline(nnUNetTrainerSynthLDMOnline):
    synth_probability = 0.05


class nnUNetTrainerSynth10LDMOnline(nnUNetTrainerSynthLDMOnline):
    synth_probability = 0.10


class nnUNetTrainerSynth20LDMOnline(nnUNetTrainerSynthLDMOnline):
    synth_probability = 0.20


class nnUNetTrainerSynth30LDMOnline(nnUNetTrainerSynthLDMOnline):
    synth_probability = 0.30


class nnUNetTrainerSynth40LDMOnline(nnUNetTrainerSynthLDMOnline):
    synth_probability = 0.40


class nnUNetTrainerSynth50LDMOnline(nnUNetTrainerSynthLDMOnline):
    synth_probability = 0.50


class nnUNetTrainerSynth60LDMOnline(nnUNetTrainerSynthLDMOnline):
    synth_probability = 0.60
