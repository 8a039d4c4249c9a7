"""Transplant trainers (CarveMix / copy-paste family): ``nnUNetTrainerSynthNTransplant`` pastes real tumours of
the training fold into each training sample with probability N/100.

The tumours are the training fold's template bank (its validation cases never give one), resized to the plan's
size class, flipped and turned by the lesion pipeline, intensity-matched to the target site and blended in with
a feathered edge by the ``transplant`` backend (:mod:`nnunet_synth.generators.transplant`). A fold without real
tumours cannot transplant; the error names the analytic trainer to use instead.
"""

import torch

from nnunet_synth.trainers.schedules import DEBUG_SCHEDULE, set_schedule
from nnunet_synth.trainers.synth import nnUNetTrainerSynth


class nnUNetTrainerSynthTransplant(nnUNetTrainerSynth):
    """Base of the transplant trainers: backend ``transplant`` on template masks (probability 0.2)."""

    synth_backend = "transplant"
    synth_shapes = {"deformation": "template"}


class nnUNetTrainerSynth2Transplant(nnUNetTrainerSynthTransplant):
    synth_probability = 0.02


class nnUNetTrainerSynth5Transplant(nnUNetTrainerSynthTransplant):
    synth_probability = 0.05


class nnUNetTrainerSynth10Transplant(nnUNetTrainerSynthTransplant):
    synth_probability = 0.10


class nnUNetTrainerSynth20Transplant(nnUNetTrainerSynthTransplant):
    synth_probability = 0.20


class nnUNetTrainerSynth30Transplant(nnUNetTrainerSynthTransplant):
    synth_probability = 0.30


class nnUNetTrainerSynth40Transplant(nnUNetTrainerSynthTransplant):
    synth_probability = 0.40


class nnUNetTrainerSynth50Transplant(nnUNetTrainerSynthTransplant):
    synth_probability = 0.50


class nnUNetTrainerSynth60Transplant(nnUNetTrainerSynthTransplant):
    synth_probability = 0.60


class nnUNetTrainerSynth20Transplant_Debug(nnUNetTrainerSynth20Transplant):
    """nnUNetTrainerSynth20Transplant, one epoch of two training and one validation iteration (tests)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, DEBUG_SCHEDULE)
