"""Trainers that mix the ``sd_inversion`` bank into nnU-Net's training (breast 2D paper).

``nnUNetTrainerSynthNSD`` trains on the real training cases of its fold plus the sd_inversion bank cases made
for that fold and configuration (``nnUNetv2_synth_generate -g sd_inversion -c 2d``, or a 3D configuration,
where the 2d-trained generator inpaints 3D lesions slice by slice), the bank drawn with total probability
N/100. ``nnUNetTrainerSynth20SDRealFinetune`` follows the paper's two stages:
mixed data first, real data only for the last 20% of the epochs.
"""

from __future__ import annotations

import numpy as np
import torch

from nnunet_synth.bank import is_bank_identifier
from nnunet_synth.trainers.bank import nnUNetTrainerSynthBank
from nnunet_synth.trainers.schedules import DEBUG_SCHEDULE, set_schedule


class nnUNetTrainerSynthBankSD(nnUNetTrainerSynthBank):
    """Bank mixing with the sd_inversion bank of the trainer's configuration (2d: one slice per bank case; 3D:
    lesions inpainted slice by slice)."""

    synth_backend = "sd_inversion"


class nnUNetTrainerSynth2SD(nnUNetTrainerSynthBankSD):
    synth_probability = 0.02


class nnUNetTrainerSynth5SD(nnUNetTrainerSynthBankSD):
    synth_probability = 0.05


class nnUNetTrainerSynth10SD(nnUNetTrainerSynthBankSD):
    synth_probability = 0.10


class nnUNetTrainerSynth20SD(nnUNetTrainerSynthBankSD):
    synth_probability = 0.20


class nnUNetTrainerSynth30SD(nnUNetTrainerSynthBankSD):
    synth_probability = 0.30


class nnUNetTrainerSynth40SD(nnUNetTrainerSynthBankSD):
    synth_probability = 0.40


class nnUNetTrainerSynth50SD(nnUNetTrainerSynthBankSD):
    synth_probability = 0.50


class nnUNetTrainerSynth60SD(nnUNetTrainerSynthBankSD):
    synth_probability = 0.60


class nnUNetTrainerSynth20SDRealFinetune(nnUNetTrainerSynth20SD):
    """20% sd_inversion bank for the first 80% of the epochs, then real cases only (the paper's fine-tuning).

    The loader's sampling probabilities live in shared memory, so the data-loader workers draw real cases
    only from the switch on (batches they prefetched before excepted); a resumed run switches again.
    """

    real_finetune_fraction = 0.2

    def get_tr_and_val_datasets(self):
        mixed, val = super().get_tr_and_val_datasets()
        is_bank = np.array([is_bank_identifier(i) for i in mixed.identifiers])
        self.real_only_probabilities = np.where(is_bank, 0.0, 1.0 / max(1, int((~is_bank).sum())))
        self.bank_sampling_probabilities = torch.from_numpy(
            np.asarray(self.bank_sampling_probabilities, dtype=np.float64)).share_memory_()
        return mixed, val

    def first_real_only_epoch(self) -> int:
        return round((1 - self.real_finetune_fraction) * self.num_epochs)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        probabilities = self.bank_sampling_probabilities
        if self.current_epoch >= self.first_real_only_epoch() and self.synth_probability > 0 \
                and probabilities is not None:
            probabilities.copy_(torch.from_numpy(self.real_only_probabilities))
            self.synth_probability = 0.0
            self.print_to_log_file(f"real-only fine-tuning from epoch {self.current_epoch}: no more bank cases")


class nnUNetTrainerSynth20SD_Debug(nnUNetTrainerSynth20SD):
    """nnUNetTrainerSynth20SD, one epoch of two training and one validation iteration (tests)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, DEBUG_SCHEDULE)
