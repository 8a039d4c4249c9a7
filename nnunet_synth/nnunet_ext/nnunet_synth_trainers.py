# Shim for nnU-Net's trainer discovery (nnUNet_extTrainer): absolute re-exports only, no code of its own.
# nnU-Net imports this file under its bare name, so relative imports and class definitions do not belong here.
from nnunet_synth.trainers import (  # noqa: F401
    nnUNetTrainer_Debug,
    nnUNetTrainer_Demo,
    nnUNetTrainerSynth,
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
