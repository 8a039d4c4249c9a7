"""A random post-contrast phase per training sample, the first for validation (breast SynBT paper, section 3.1).

The MAMA-MIA conversion with ``--post-phase all`` (:mod:`nnunet_synth.dataset_conversion.mama_mia`) writes one case
per post-contrast phase, ``<patient>_post<k>`` (pre-contrast + phase k; with ``--single-breast``
``<patient>_post<k>_L`` and ``_R``, each breast then counting as a patient here), with patient-grouped folds. The
``...RandomPhase`` trainers keep nnU-Net's split (``do_split``, ``splits_final.json``) and its dataset classes and
change two things:

- training: one entry per patient (:class:`RandomPhaseDataset`); each load draws one of the patient's training phase
  cases uniformly, from a generator seeded per data-loader worker, so every sample pairs the pre-contrast channel with
  a random post-contrast phase, whatever the number of phases a patient has (2 to 5 in MAMA-MIA);
- validation: only the ``_post1`` cases (``do_split``), so nnU-Net's validation during training and its final
  validation and metrics are on the first post-contrast phase, as the paper validates and tests.

They are named variants rather than automatic for datasets whose ``dataset.json`` says ``post_phase: all``: nnU-Net's
own trainers cannot be changed, and a dataset may be trained both ways (all phases as separate cases is the plain
trainers' behaviour). A dataset without ``_post<k>`` cases is refused with a message naming the conversion option.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_synth.dataset_conversion.single_breast import SIDES
from nnunet_synth.injection import worker_index
from nnunet_synth.trainers.ldm import nnUNetTrainerSynth20LDMOnline
from nnunet_synth.trainers.ratios import nnUNetTrainerSynth20
from nnunet_synth.trainers.schedules import apply_schedule_override

PHASE_CASE = re.compile(rf"^(?P<patient>.+)_post(?P<phase>[0-9]+)(?P<side>_(?:{'|'.join(SIDES)}))?$")
FIRST_PHASE = 1
PHASE_SEED = 20250  # base seed of the phase draws (with the fold and the worker)


class RandomPhaseError(ValueError):
    """A dataset or split that does not fit the random-phase trainers."""


def phase_of(identifier: str) -> tuple[str, int] | None:
    """(patient, phase) of a ``<patient>_post<k>`` case identifier (``<patient>_post<k>_<side>``: the patient's breast
    ``<patient>_<side>``); None for any other identifier."""
    match = PHASE_CASE.match(identifier)
    return None if match is None else (match["patient"] + (match["side"] or ""), int(match["phase"]))


def group_phases(identifiers: list[str], what: str) -> dict[str, list[str]]:
    """The phase cases of each patient, by phase.

    Args:
        identifiers: case identifiers, all ``<patient>_post<k>``.
        what: names the cases in errors (dataset and fold).

    Raises:
        RandomPhaseError: no identifiers, or some that are not ``<patient>_post<k>`` (named).
    """
    other = [i for i in identifiers if phase_of(i) is None]
    if not identifiers or other:
        found = "none" if not identifiers else (f"{len(other)} of {len(identifiers)} are not, e.g. "
                                                f"{', '.join(sorted(other)[:5])}")
        raise RandomPhaseError(f"a random post-contrast phase per sample needs one case per phase named "
                               f"<patient>_post<k> in {what}; {found}. Convert MAMA-MIA with "
                               f"nnUNetv2_synth_convert mama_mia ... --post-phase all")
    groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for identifier in identifiers:
        patient, phase = phase_of(identifier)
        groups[patient].append((phase, identifier))
    return {patient: [i for _, i in sorted(cases)] for patient, cases in sorted(groups.items())}


class RandomPhaseDataset:
    """nnU-Net's training dataset of phase cases seen as one entry per patient: ``load_case(patient)`` loads one of
    the patient's phase cases drawn uniformly at random, from ``default_rng([seed, worker_index()])`` (reseeded in
    each data-loader worker process, as the Synth transforms are). It offers what ``nnUNetDataLoader`` uses
    (``identifiers``, ``load_case``, ``__getitem__``), as :class:`nnunet_synth.label_noise.NoisyLabelDataset` does.

    Args:
        dataset: nnU-Net dataset of the training phase cases.
        seed: base seed of the draws.
        what: names the cases in errors.
    """

    def __init__(self, dataset, seed: int, what: str = "the training cases"):
        self.dataset = dataset
        self.phases = group_phases(list(dataset.identifiers), what)
        self.identifiers = list(self.phases)
        self.seed = int(seed)
        self._rng: np.random.Generator | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rng": None, "_pid": None}

    def draw(self, patient: str) -> str:
        """One of ``patient``'s phase cases, uniformly at random."""
        if self._rng is None or self._pid != os.getpid():
            self._rng, self._pid = np.random.default_rng([self.seed, worker_index()]), os.getpid()
        cases = self.phases[patient]
        return cases[int(self._rng.integers(len(cases)))]

    def load_case(self, patient: str):
        return self.dataset.load_case(self.draw(patient))

    def __getitem__(self, patient: str):
        return self.load_case(patient)


class RandomPhaseMixin:
    """Put before an nnU-Net trainer class: training draws a random post-contrast phase per sample, validation holds
    the first post-contrast phase only (see the module docstring)."""

    def do_split(self):
        tr_keys, val_keys = super().do_split()
        what = f"{self.plans_manager.dataset_name} (fold {self.fold})"
        train = group_phases(list(tr_keys), f"the training cases of {what}")
        val = group_phases(list(val_keys), f"the validation cases of {what}")
        if self.fold != "all":  # fold 'all' validates on its training cases by nnU-Net's definition
            shared = sorted(set(train) & set(val))
            if shared:
                raise RandomPhaseError(f"patients {', '.join(shared[:5])} have phases both in training and in "
                                       f"validation of {what}: the split must group the phases of a patient (the "
                                       f"--post-phase all conversion writes such a splits_final.json)")
        first = [case for cases in val.values() for case in cases if phase_of(case)[1] == FIRST_PHASE]
        missing = [patient for patient, cases in val.items() if not set(cases) & set(first)]
        if missing:
            raise RandomPhaseError(f"validation patients without a first post-contrast phase case "
                                   f"(<patient>_post{FIRST_PHASE}) in {what}: {', '.join(missing[:5])}")
        return list(tr_keys), first

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        fold = self.fold if isinstance(self.fold, int) else 0
        dataset_tr = RandomPhaseDataset(dataset_tr, PHASE_SEED + 1000 * fold,
                                        f"the training cases of {self.plans_manager.dataset_name} (fold {self.fold})")
        cases = sum(len(c) for c in dataset_tr.phases.values())
        self.print_to_log_file(f"random post-contrast phase per training sample: {len(dataset_tr.identifiers)} "
                               f"training patients ({cases} phase cases), each drawn with one of its phases at random; "
                               f"validation on the {len(dataset_val.identifiers)} first-phase (_post{FIRST_PHASE}) "
                               f"cases")
        return dataset_tr, dataset_val


class nnUNetTrainerRandomPhase(RandomPhaseMixin, nnUNetTrainer):
    """nnU-Net's trainer with a random post-contrast phase per training sample and first-phase validation."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule_override(self)


class nnUNetTrainerSynth20RandomPhase(RandomPhaseMixin, nnUNetTrainerSynth20):
    """``nnUNetTrainerSynth20`` (analytic tumours) with a random post-contrast phase per training sample."""


class nnUNetTrainerSynth20LDMOnlineRandomPhase(RandomPhaseMixin, nnUNetTrainerSynth20LDMOnline):
    """The SynBT paper's setting: LDM tumours inpainted on the GPU during training (20% of the samples), a random
    post-contrast phase per training sample, validation on the first post-contrast phase."""
