"""Trainers of the synthetic-to-real transfer benchmark (``benchmarks/transfer.py``).

Each runs :data:`TRANSFER_SCHEDULE` unless ``NNUNET_SYNTH_SCHEDULE`` says otherwise (the benchmark sets it from
its flags). ``nnUNetTrainer_Transfer`` is vanilla nnU-Net: on the dataset with real labels it is the upper bound,
on the hidden-tumour dataset the floor. The ``Synth50..._Transfer`` trainers put a synthetic tumour into half of
the training samples: on a dataset whose real tumours are hidden behind the ignore label they are the only
tumours the network sees, so half the samples teach tumour and half teach tumour-free tissue.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_synth.trainers.ratios import nnUNetTrainerSynth50
from nnunet_synth.trainers.schedules import apply_schedule_override, set_schedule
from nnunet_synth.trainers.transplant import nnUNetTrainerSynth50Transplant

# (epochs, training iterations per epoch, validation iterations per epoch): 500 iterations, about 15 minutes of
# a 32 x 64 x 64 patch on two CPU cores with the benchmark's CPU plans (see docs/evaluation.md)
TRANSFER_SCHEDULE = (10, 50, 4)


def _transfer_schedule(trainer: nnUNetTrainer) -> None:
    set_schedule(trainer, TRANSFER_SCHEDULE)
    apply_schedule_override(trainer)  # the benchmark's flags win


class nnUNetTrainer_Transfer(nnUNetTrainer):
    """Vanilla nnU-Net on the transfer schedule (the upper bound on real labels, the floor on hidden ones)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _transfer_schedule(self)


class nnUNetTrainerSynth50_Transfer(nnUNetTrainerSynth50):
    """Analytic backend with the texture learned from the training fold's (hidden) real tumours."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _transfer_schedule(self)


class nnUNetTrainerSynth50PaperTexture_Transfer(nnUNetTrainerSynth50_Transfer):
    """Analytic backend with the label-free liver paper's texture (no statistics of real tumour texture)."""

    synth_backend_params = {"texture": "paper"}


class nnUNetTrainerSynth50Transplant_Transfer(nnUNetTrainerSynth50Transplant):
    """Transplant backend: the training fold's (hidden) real tumours pasted into other sites."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _transfer_schedule(self)
