"""nnU-Net trainer classes of nnunet_synth (re-exported for nnU-Net by ``nnunet_synth/nnunet_ext``)."""

from nnunet_synth.trainers.ratios import (
    nnUNetTrainerSynth2,
    nnUNetTrainerSynth5,
    nnUNetTrainerSynth10,
    nnUNetTrainerSynth20,
    nnUNetTrainerSynth20_Debug,
    nnUNetTrainerSynth20_Demo,
    nnUNetTrainerSynth30,
    nnUNetTrainerSynth40,
    nnUNetTrainerSynth50,
    nnUNetTrainerSynth60,
)
from nnunet_synth.trainers.schedules import nnUNetTrainer_Debug, nnUNetTrainer_Demo
from nnunet_synth.trainers.synth import nnUNetTrainerSynth

__all__ = [
    "nnUNetTrainerSynth",
    "nnUNetTrainerSynth2",
    "nnUNetTrainerSynth5",
    "nnUNetTrainerSynth10",
    "nnUNetTrainerSynth20",
    "nnUNetTrainerSynth30",
    "nnUNetTrainerSynth40",
    "nnUNetTrainerSynth50",
    "nnUNetTrainerSynth60",
    "nnUNetTrainerSynth20_Debug",
    "nnUNetTrainerSynth20_Demo",
    "nnUNetTrainer_Debug",
    "nnUNetTrainer_Demo",
]
