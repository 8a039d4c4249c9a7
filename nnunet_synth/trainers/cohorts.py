"""Trainers that draw every cohort of a merged dataset alike (the liver-MRI paper's ATLAS + LLD-MMRI oversampling).

A merged dataset (``nnUNetv2_synth_convert merge``) records each case's source dataset in ``merge_sources.json``
(:func:`~nnunet_synth.dataset_conversion.merge.read_case_cohorts`). nnU-Net draws training cases uniformly, so the
larger cohort (LLD-MMRI's 300 phase cases against ATLAS's 48) dominates; these trainers give nnU-Net's loader
``sampling_probabilities`` (:func:`~nnunet_synth.trainers.loaders.build_dataloaders`) under which every cohort is
drawn with the same total probability, the cases of one cohort alike:

* ``nnUNetTrainerCohortBalanced``: real cases only (the paper's "real data only" ATLAS + LLD-MMRI model);
* ``nnUNetTrainerSynth20DDPMCohortBalanced`` and its boundary-study forms ``...ElasticDDPMCohortBalanced`` and
  ``...SimplexDDPMCohortBalanced``: the DDPM bank trainers (:mod:`nnunet_synth.trainers.bank`) with the balance
  applied to the real cases and to the bank cases separately (a bank case belongs to its source case's cohort), so
  the bank keeps its share (N/100, or ``bank_cases: K`` in the synth plan: the paper's 1000 synthetic tumours, 500
  on each dataset, with ``nnUNetv2_synth_generate ... -n 1000`` spreading the sources over the cohorts) and every
  cohort is drawn with probability 1/n.

The epoch log states each cohort's share of the drawn training samples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_synth.bank import parse_bank_identifier
from nnunet_synth.trainers.bank import nnUNetTrainerSynthBank
from nnunet_synth.trainers.loaders import build_dataloaders


def balance_cohorts(cohorts: Sequence[str], probabilities: np.ndarray | None = None,
                    groups: Sequence | None = None) -> np.ndarray:
    """Sampling probabilities under which every cohort gets the same share of each group's mass.

    Within each group (e.g. real and bank cases) the group's total probability is split equally over the cohorts
    that have mass in it; within one cohort of one group the relative probabilities are kept.

    Args:
        cohorts: the cohort of every case.
        probabilities: the cases' probabilities before balancing (None: uniform).
        groups: the group of every case (None: one group).

    Returns:
        Probabilities in the cases' order, summing to 1.

    Raises:
        ValueError: lengths differ, or no case has a positive probability.
    """
    cohorts = np.asarray(cohorts, dtype=object)
    n = len(cohorts)
    p = np.full(n, 1.0 / max(n, 1)) if probabilities is None else np.asarray(probabilities, dtype=np.float64)
    groups = np.zeros(n, dtype=int) if groups is None else np.asarray(groups)
    if len(p) != n or len(groups) != n:
        raise ValueError(f"{n} cohorts, {len(p)} probabilities and {len(groups)} groups: one each per case")
    if n == 0 or p.sum() <= 0:
        raise ValueError("no case with a positive sampling probability to balance")
    out = np.zeros(n)
    for group in np.unique(groups):
        in_group = groups == group
        mass = p[in_group].sum()
        present = [c for c in sorted(set(cohorts[in_group])) if p[in_group & (cohorts == c)].sum() > 0]
        for cohort in present:
            chosen = in_group & (cohorts == cohort)
            out[chosen] = p[chosen] / p[chosen].sum() * mass / len(present)
    return out / out.sum()


class CohortBalance:
    """What the cohort-balanced trainers share: each training identifier's cohort, the balanced probabilities and
    the epoch log of the cohorts drawn. Mixed in before an ``nnUNetTrainer`` subclass."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.case_cohorts: dict[str, str] = {}
        self._cohorts_seen: Counter = Counter()

    def cohort_of(self, identifier: str) -> str:
        """The cohort of a training identifier; a bank case's is its source case's."""
        parsed = parse_bank_identifier(identifier)
        return self.case_cohorts[identifier if parsed is None else parsed[0]]

    def balanced_probabilities(self, identifiers: Sequence[str], probabilities: np.ndarray | None) -> np.ndarray:
        """Balances ``probabilities`` (None: uniform) of the training ``identifiers`` over the cohorts, real and
        bank cases separately (:func:`balance_cohorts`), and logs the result.

        Raises:
            RuntimeError: the dataset records no cohorts (no ``merge_sources.json``), or not those of every case.
        """
        from nnunet_synth.dataset_conversion.merge import SOURCES_FILE, read_case_cohorts

        name = self.plans_manager.dataset_name
        sources = sorted({i if parse_bank_identifier(i) is None else parse_bank_identifier(i)[0] for i in identifiers})
        try:
            cohorts = read_case_cohorts(name, sources)
        except ValueError as e:
            raise RuntimeError(f"{self.__class__.__name__}: {e}") from e
        if cohorts is None:
            raise RuntimeError(f"{self.__class__.__name__} balances the cohorts of a merged dataset, but {name} has no "
                               f"{SOURCES_FILE} (case -> source dataset) in nnUNet_raw/{name} or "
                               f"nnUNet_preprocessed/{name}: make the dataset with nnUNetv2_synth_convert merge, or "
                               f"write that file")
        self.case_cohorts = cohorts
        names = [self.cohort_of(i) for i in identifiers]
        is_bank = [parse_bank_identifier(i) is not None for i in identifiers]
        balanced = balance_cohorts(names, probabilities, is_bank)
        counts = Counter(names)
        shares = {c: float(balanced[[n == c for n in names]].sum()) for c in sorted(counts)}
        self.print_to_log_file("cohort balance: " + "; ".join(
            f"{c}: {counts[c]} training cases, drawn with probability {shares[c]:.3f}" for c in shares))
        return balanced

    def train_step(self, batch: dict) -> dict:
        self._cohorts_seen.update(self.cohort_of(k) for k in batch.get("keys", []))
        return super().train_step(batch)

    def on_epoch_end(self) -> None:
        seen, self._cohorts_seen = self._cohorts_seen, Counter()
        total = max(1, sum(seen.values()))
        target = 1.0 / max(1, len(set(self.case_cohorts.values())))
        self.print_to_log_file("cohorts drawn this epoch: " + ", ".join(
            f"{c} {seen[c]}/{total} ({seen[c] / total:.1%})" for c in sorted(seen)) + f"; target {target:.1%} each")
        super().on_epoch_end()


class nnUNetTrainerCohortBalanced(CohortBalance, nnUNetTrainer):
    """nnU-Net on the real cases, every cohort of the merged dataset drawn alike."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.cohort_sampling_probabilities = None

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        self.cohort_sampling_probabilities = self.balanced_probabilities(list(dataset_tr.identifiers), None)
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        # nnU-Net's loaders, the training loader given the cohort-balanced sampling_probabilities
        return build_dataloaders(self, sampling_probabilities=lambda: self.cohort_sampling_probabilities)


class nnUNetTrainerSynthBankCohortBalanced(CohortBalance, nnUNetTrainerSynthBank):
    """A bank trainer (:class:`~nnunet_synth.trainers.bank.nnUNetTrainerSynthBank`) whose real and bank cases are
    each drawn cohort by cohort alike; the bank keeps its share."""

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        # the bank trainer's loader reads bank_sampling_probabilities (None: real cases only, drawn uniformly)
        self.bank_sampling_probabilities = self.balanced_probabilities(list(dataset_tr.identifiers),
                                                                       self.bank_sampling_probabilities)
        return dataset_tr, dataset_val


class nnUNetTrainerSynth20DDPMCohortBalanced(nnUNetTrainerSynthBankCohortBalanced):
    synth_probability = 0.20


class nnUNetTrainerSynth20ElasticDDPMCohortBalanced(nnUNetTrainerSynth20DDPMCohortBalanced):
    synth_shapes = {"deformation": "elastic"}


class nnUNetTrainerSynth20SimplexDDPMCohortBalanced(nnUNetTrainerSynth20DDPMCohortBalanced):
    synth_shapes = {"deformation": "simplex"}
