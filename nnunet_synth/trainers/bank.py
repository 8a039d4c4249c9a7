"""Trainers that mix pre-generated bank cases into nnU-Net's training data (learned backends).

``nnUNetTrainerSynthNDDPM`` trains on the real training cases of its fold plus the DDPM bank cases made for
that fold from those cases; nnU-Net's loader draws a bank case with total probability N/100
(``sampling_probabilities``). Validation is nnU-Net's own, on real cases only. No on-the-fly synthesis runs:
these trainers derive from ``nnUNetTrainer``, not from the analytic ``nnUNetTrainerSynth``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_synth.bank import RealAndBankDataset, bank_identifiers, check_bank, is_bank_identifier
from nnunet_synth.generators.paths import bank_dir, generate_command
from nnunet_synth.trainers.loaders import build_dataloaders
from nnunet_synth.trainers.schedules import DEBUG_SCHEDULE, apply_schedule_override, set_schedule


class nnUNetTrainerSynthBank(nnUNetTrainer):
    """nnU-Net training on real + bank cases, the bank drawn with total probability ``synth_probability``.

    Raises (at the start of training) a RuntimeError naming ``nnUNetv2_synth_generate`` when the bank of
    ``synth_backend`` for this configuration, plans and fold is missing or holds no case of this fold's training
    cases, and a :class:`~nnunet_synth.bank.BankError` when it is incomplete (unless the synth plan sets
    ``allow_partial_bank``) or was made with other synth-plan settings than the current ones.
    """

    synth_probability: float = 0.2
    synth_backend: str = "ddpm"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.bank_sampling_probabilities = None
        self._bank_seen = [0, 0]  # (samples, bank samples) this epoch
        apply_schedule_override(self)

    @property
    def bank_folder(self) -> Path:
        return bank_dir(self.plans_manager.dataset_name, self.synth_backend, self.configuration_name,
                        self.plans_manager.plans_name)

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        folder = self.bank_folder
        ids = bank_identifiers(folder, self.fold, dataset_tr.identifiers)
        if not ids:
            state = "does not exist" if not folder.is_dir() else "holds no case of this fold's training cases"
            command = generate_command(self.plans_manager.dataset_name, self.synth_backend, self.configuration_name,
                                       self.fold, self.plans_manager.plans_name)
            raise RuntimeError(f"{self.__class__.__name__} trains on the {self.synth_backend} bank {folder}, which "
                               f"{state}. Make it with: {command}")
        self.print_to_log_file(check_bank(self.plans_manager.dataset_name, self.synth_backend,
                                          self.configuration_name, self.fold, self.plans_manager.plans_name))
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        bank = self.dataset_class(str(folder), ids)
        mixed = RealAndBankDataset(dataset_tr, bank)
        self.bank_sampling_probabilities = mixed.sampling_probabilities(self.synth_probability)
        self.print_to_log_file(f"training on {len(dataset_tr.identifiers)} real and {len(ids)} bank cases "
                               f"({folder}); bank sampling probability {self.synth_probability}")
        return mixed, dataset_val

    def get_dataloaders(self):
        # nnU-Net's loaders with one change: the training loader gets sampling_probabilities (nnU-Net hard-codes
        # None there), known once get_tr_and_val_datasets has found the bank; validation is unchanged
        return build_dataloaders(self, sampling_probabilities=lambda: self.bank_sampling_probabilities)

    def train_step(self, batch: dict) -> dict:
        keys = batch.get("keys", [])
        self._bank_seen[0] += len(keys)
        self._bank_seen[1] += sum(is_bank_identifier(k) for k in keys)
        return super().train_step(batch)

    def on_epoch_end(self) -> None:
        seen, bank = self._bank_seen
        self._bank_seen = [0, 0]
        self.print_to_log_file(f"bank cases this epoch: {bank}/{seen} samples ({bank / max(1, seen):.1%}; target "
                               f"{self.synth_probability:.0%})")
        super().on_epoch_end()


class nnUNetTrainerSynth2DDPM(nnUNetTrainerSynthBank):
    synth_probability = 0.02


class nnUNetTrainerSynth5DDPM(nnUNetTrainerSynthBank):
    synth_probability = 0.05


class nnUNetTrainerSynth10DDPM(nnUNetTrainerSynthBank):
    synth_probability = 0.10


class nnUNetTrainerSynth20DDPM(nnUNetTrainerSynthBank):
    synth_probability = 0.20


class nnUNetTrainerSynth30DDPM(nnUNetTrainerSynthBank):
    synth_probability = 0.30


class nnUNetTrainerSynth40DDPM(nnUNetTrainerSynthBank):
    synth_probability = 0.40


class nnUNetTrainerSynth50DDPM(nnUNetTrainerSynthBank):
    synth_probability = 0.50


class nnUNetTrainerSynth60DDPM(nnUNetTrainerSynthBank):
    synth_probability = 0.60


class nnUNetTrainerSynth20DDPM_Debug(nnUNetTrainerSynth20DDPM):
    """nnUNetTrainerSynth20DDPM, one epoch of two training and one validation iteration (tests)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, DEBUG_SCHEDULE)
