"""Ratio variants: ``nnUNetTrainerSynthN`` gives each training sample probability N/100 of a synthetic tumour.

The ratios are those of the breast-MRI ratio table (Luna et al., MICCAI); the bare name uses the analytic
backend, later backends add a suffix (``...DDPM``) so two backends never share a results folder.
"""

import torch

from nnunet_synth.trainers.schedules import DEBUG_SCHEDULE, DEMO_SCHEDULE, set_schedule
from nnunet_synth.trainers.synth import nnUNetTrainerSynth


class nnUNetTrainerSynth2(nnUNetTrainerSynth):
    synth_probability = 0.02


class nnUNetTrainerSynth5(nnUNetTrainerSynth):
    synth_probability = 0.05


class nnUNetTrainerSynth10(nnUNetTrainerSynth):
    synth_probability = 0.10


class nnUNetTrainerSynth20(nnUNetTrainerSynth):
    synth_probability = 0.20


class nnUNetTrainerSynth30(nnUNetTrainerSynth):
    synth_probability = 0.30


class nnUNetTrainerSynth40(nnUNetTrainerSynth):
    synth_probability = 0.40


class nnUNetTrainerSynth50(nnUNetTrainerSynth):
    synth_probability = 0.50


class nnUNetTrainerSynth60(nnUNetTrainerSynth):
    synth_probability = 0.60


class nnUNetTrainerSynth20_Debug(nnUNetTrainerSynth20):
    """nnUNetTrainerSynth20, one epoch of two training and one validation iteration (tests)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, DEBUG_SCHEDULE)


class nnUNetTrainerSynth20_Demo(nnUNetTrainerSynth20):
    """nnUNetTrainerSynth20 on the demo's short CPU schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, DEMO_SCHEDULE)
