"""Trainers that mix pre-generated bank cases into nnU-Net's training data (learned backends).

``nnUNetTrainerSynthNDDPM`` trains on the real training cases of its fold plus the DDPM bank cases made for
that fold from those cases; nnU-Net's loader draws a bank case with total probability N/100
(``sampling_probabilities``). Validation is nnU-Net's own, on real cases only. No on-the-fly synthesis runs:
these trainers derive from ``nnUNetTrainer``, not from the analytic ``nnUNetTrainerSynth``.

On a 2d configuration a bank case is a whole volume with its synthetic tumour in one slice (or a few), while
nnU-Net's loader samples one slice of a drawn case: the bank case is therefore served as its synthetic slices
only (:class:`SyntheticSlices`), so N/100 is the share of synthetic slices the network sees, as in the breast 2D
paper, and the epoch log states that share.

With ``bank_cases: K`` in the synth plan (or a trainer's ``bank_cases``) the trainer mixes exactly K bank cases,
the fold's first K by bank index, into the real cases and draws every case alike (the liver-MRI paper's
synthetic-count study: 0, 50, 100, ... synthetic cases added to the real ones, the larger sets holding the
smaller), so the bank share is K / (real + K) instead of N/100.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_synth.bank import (
    BankError,
    RealAndBankDataset,
    bank_identifiers,
    check_bank,
    is_bank_identifier,
    parse_bank_identifier,
)
from nnunet_synth.generators.paths import bank_dir, generate_command
from nnunet_synth.trainers.loaders import build_dataloaders
from nnunet_synth.trainers.schedules import DEBUG_SCHEDULE, apply_schedule_override, set_schedule


def synthetic_slices(properties: dict, identifier: str = "bank case") -> list[int]:
    """The slices (first spatial axis) of a bank case that hold its synthetic tumour, from its properties:
    ``synth.synthetic_slices`` (recorded since), else the 2d bank's ``synth.slice``.

    Raises:
        BankError: the properties record neither (not a bank case, or one of a 3D bank made before).
    """
    synth = properties.get("synth") or {}
    slices = synth.get("synthetic_slices")
    if slices is None and synth.get("slice") is not None:
        slices = [synth["slice"]]
    if not slices:
        raise BankError(f"{identifier} records no synthetic slice in its properties ('synth' -> "
                        f"'synthetic_slices'); make its bank again with nnUNetv2_synth_generate")
    return sorted({int(z) for z in slices})


def _take_slices(array, slices: list[int], axis: int) -> np.ndarray:
    """``array[..., slices, ...]`` along ``axis`` as numpy, reading one slice at a time (blosc2 arrays read only
    the chunks they need, and do not take index lists)."""
    lead = (slice(None),) * axis
    return np.concatenate([np.asarray(array[(*lead, slice(z, z + 1))]) for z in slices], axis=axis)


class SyntheticSlices:
    """A bank dataset whose cases are their synthetic slices only (2d configurations).

    ``load_case`` returns a bank case cut to the slices holding its synthetic tumour (see :func:`synthetic_slices`)
    with its ``class_locations`` kept to those slices and renumbered, so nnU-Net's 2D loader, which samples one
    slice of a drawn case (a foreground one when it oversamples), always samples a synthetic slice. It offers what
    :class:`~nnunet_synth.bank.RealAndBankDataset` and ``nnUNetDataLoader`` use (``identifiers``, ``load_case``,
    ``__getitem__``).

    Args:
        bank: nnU-Net dataset of the bank cases.
    """

    def __init__(self, bank):
        self.bank = bank
        self.identifiers = list(bank.identifiers)

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.bank.load_case(identifier)
        slices = synthetic_slices(properties, identifier)
        if slices[-1] >= data.shape[1]:
            raise BankError(f"{identifier}: synthetic slice {slices[-1]} is outside its {data.shape[1]} slices")
        renumber = {z: i for i, z in enumerate(slices)}
        locations = {}
        for key, where in properties["class_locations"].items():
            where = np.asarray(where)
            if where.ndim == 2 and len(where):  # rows (channel, z, y, x), as nnU-Net's preprocessor samples them
                where = where[np.isin(where[:, 1], slices)].copy()
                where[:, 1] = [renumber[int(z)] for z in where[:, 1]]
            locations[key] = where
        properties = {**properties, "class_locations": locations}
        return (_take_slices(data, slices, 1), _take_slices(seg, slices, 1),
                None if seg_prev is None else _take_slices(seg_prev, slices, 0), properties)

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)


class nnUNetTrainerSynthBank(nnUNetTrainer):
    """nnU-Net training on real + bank cases, the bank drawn with total probability ``synth_probability``.

    On a 2d configuration the bank's samples are its synthetic slices (:class:`SyntheticSlices`), so
    ``synth_probability`` is the share of synthetic slices. With ``bank_cases`` (the class attribute, else the
    synth plan's ``bank_cases``) exactly that many bank cases are mixed in and every case is drawn alike. With
    ``synth_shapes`` (e.g. ``{"size_class": "tiny"}``, the size and boundary studies) the bank is the one made with
    those shape settings (``nnUNetv2_synth_generate ... --size-class tiny``), in its own folder
    (``nnUNetSynthBank_<backend>_<configuration>_tiny``).

    Raises (at the start of training) a RuntimeError naming ``nnUNetv2_synth_generate`` (with the shape flags) when
    the bank of ``synth_backend`` and ``synth_shapes`` for this configuration, plans and fold is missing or holds no
    case of this fold's training cases (or fewer than ``bank_cases``), and a :class:`~nnunet_synth.bank.BankError`
    when it is incomplete (unless the synth plan sets ``allow_partial_bank``) or was made with other shape or
    synth-plan settings than the current ones.
    """

    synth_probability: float = 0.2
    synth_backend: str = "ddpm"
    bank_cases: int | None = None  # None: the synth plan's bank_cases (None there too: the share synth_probability)
    # shape overrides of the bank (size_preset, size_class, deformation); {}: the bank of the synth plan's shapes
    synth_shapes: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.bank_sampling_probabilities = None
        self._bank_seen = [0, 0]  # (samples, bank samples) this epoch
        apply_schedule_override(self)

    @property
    def bank_folder(self) -> Path:
        """The folder of this trainer's bank (backend, configuration, plans and shape settings)."""
        return bank_dir(self.plans_manager.dataset_name, self.synth_backend, self.configuration_name,
                        self.plans_manager.plans_name, self.synth_shapes)

    def bank_command(self) -> str:
        """The ``nnUNetv2_synth_generate`` command that makes this trainer's bank (``-n N`` to fill in)."""
        return generate_command(self.plans_manager.dataset_name, self.synth_backend, self.configuration_name,
                                self.fold, self.plans_manager.plans_name, self.synth_shapes)

    @property
    def samples_synthetic_slices(self) -> bool:
        """Whether bank cases are served as their synthetic slices: on 2d configurations."""
        return len(self.configuration_manager.patch_size) == 2

    def bank_case_count(self) -> int | None:
        """The number of bank cases to mix in: the trainer's ``bank_cases``, else the synth plan's (None: all the
        fold's bank cases, drawn with the share ``synth_probability``)."""
        if self.bank_cases is not None:
            return int(self.bank_cases)
        from nnunet_synth.planning import load_synth_plan

        return load_synth_plan(self.plans_manager.dataset_name, self.configuration_name,
                               self.plans_manager.plans_name).bank_cases

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        folder = self.bank_folder
        count = self.bank_case_count()
        if count == 0:  # the count study's baseline: the real cases alone
            self.synth_probability = 0.0
            self.print_to_log_file(f"bank_cases is 0: training on the {len(dataset_tr.identifiers)} real cases only")
            return dataset_tr, dataset_val
        ids = bank_identifiers(folder, self.fold, dataset_tr.identifiers)
        command = self.bank_command()
        if not ids:
            state = "does not exist" if not folder.is_dir() else "holds no case of this fold's training cases"
            shapes = f" of shapes {self.synth_shapes}" if self.synth_shapes else ""
            others = sorted(p.name for p in folder.parent.glob(f"nnUNetSynthBank_{self.synth_backend}_*")
                            if p.is_dir() and p != folder)
            # a bank made with other shape settings sits in another folder: say so, it is not this trainer's
            found = f" (other {self.synth_backend} banks here: {', '.join(others)})" if others else ""
            raise RuntimeError(f"{self.__class__.__name__} trains on the {self.synth_backend} bank{shapes} {folder}, "
                               f"which {state}{found}. Make it with: {command}")
        self.print_to_log_file(check_bank(self.plans_manager.dataset_name, self.synth_backend,
                                          self.configuration_name, self.fold, self.plans_manager.plans_name,
                                          self.synth_shapes))
        if count is not None:
            if len(ids) < count:
                raise RuntimeError(f"{self.__class__.__name__} mixes bank_cases={count} bank cases in, but the "
                                   f"{self.synth_backend} bank {folder} holds {len(ids)} of this fold's training "
                                   f"cases. Make more with: {command.replace(' -n N', f' -n {count}')}")
            # the first by index: the cases a smaller count uses are among a larger one's (the paper's nested sets)
            ids = sorted(ids, key=lambda i: parse_bank_identifier(i)[2])[:count]
            # every case drawn alike, as in a training set enlarged by `count` synthetic cases
            self.synth_probability = count / (count + len(dataset_tr.identifiers))
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        bank = self.dataset_class(str(folder), ids)
        if self.samples_synthetic_slices:
            bank = SyntheticSlices(bank)
        mixed = RealAndBankDataset(dataset_tr, bank)
        self.bank_sampling_probabilities = mixed.sampling_probabilities(self.synth_probability)
        sampled = "each served as its synthetic slice(s); " if self.samples_synthetic_slices else ""
        how = f"bank_cases={count}, all cases drawn alike: " if count is not None else ""
        shapes = f"bank shapes {self.synth_shapes}; " if self.synth_shapes else ""
        self.print_to_log_file(f"training on {len(dataset_tr.identifiers)} real and {len(ids)} bank cases "
                               f"({folder}); {shapes}{sampled}{how}bank sampling probability "
                               f"{self.synth_probability:.4g}")
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

    def bank_share_line(self, seen: int, bank: int) -> str:
        """The epoch log's line on the bank samples among ``seen`` training samples (2d: synthetic slices)."""
        share = f"{bank / max(1, seen):.1%}; target {self.synth_probability:.1%}"
        if self.samples_synthetic_slices:
            return (f"bank cases this epoch: {bank}/{seen} samples, each a synthetic slice: synthetic-slice share "
                    f"{share}")
        return f"bank cases this epoch: {bank}/{seen} samples ({share})"

    def on_epoch_end(self) -> None:
        seen, bank = self._bank_seen
        self._bank_seen = [0, 0]
        self.print_to_log_file(self.bank_share_line(seen, bank))
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
