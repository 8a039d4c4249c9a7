"""The liver-MRI paper's ATLAS + LLD-MMRI balance: cohort-balanced trainers draw each source dataset of a merged
dataset alike through nnU-Net's loader, and banks spread their sources evenly over the cohorts, healthy controls
first. Runs on a private copy of the CT phantom whose fold-0 training cases come from two cohorts of sizes 1 and 3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nnunet_synth.bank import generate_bank, parse_bank_identifier, source_cases
from nnunet_synth.dataset_conversion.merge import SOURCES_FILE
from nnunet_synth.generators.paths import bank_dir
from nnunet_synth.generators.splits import split_cases
from nnunet_synth.planning import load_synth_plan, preprocessed_dir
from nnunet_synth.trainers import nnUNetTrainerCohortBalanced, nnUNetTrainerSynth20DDPMCohortBalanced
from nnunet_synth.trainers.cohorts import balance_cohorts

from .conftest import cpu_trainer

SMALL, LARGE = "Dataset601_Atlas", "Dataset602_LLDMMRI"
BANK_CASES = 8


class AnalyticBankCohortBalanced(nnUNetTrainerSynth20DDPMCohortBalanced):
    """The DDPM cohort-balanced bank trainer reading a cheap analytic bank (the bank format is the same)."""

    synth_backend = "analytic"


@pytest.fixture(scope="module")
def merged(phantom_ct, tmp_path_factory):
    """The CT phantom's preprocessed folder copied into private nnU-Net folders, with a ``merge_sources.json`` that
    puts one fold-0 training case in cohort SMALL and three in LARGE (the validation cases in SMALL)."""
    root = tmp_path_factory.mktemp("cohorts")
    source = preprocessed_dir(phantom_ct)
    train, val, _ = split_cases(phantom_ct, "3d_fullres", 0)
    assert len(train) == 4
    load_synth_plan(phantom_ct, "3d_fullres")  # made where a trainer would make it, then copied with the data
    shutil.copytree(source, root / "nnUNet_preprocessed" / source.name, ignore=shutil.ignore_patterns("nnUNetSynth*"))
    shutil.copy(source / "nnUNetSynthPlans.json", root / "nnUNet_preprocessed" / source.name)
    (root / "nnUNet_raw" / source.name).mkdir(parents=True)
    (root / "nnUNet_results").mkdir()
    cohorts = {train[0]: SMALL, **{c: LARGE for c in train[1:]}, **{c: SMALL for c in val}}
    (root / "nnUNet_raw" / source.name / SOURCES_FILE).write_text(json.dumps(cohorts), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(name, str(root / name))
        mp.setenv("nnUNet_n_proc_DA", "0")  # single-process loaders (never around planning: none runs here)
        yield SimpleNamespace(dataset=phantom_ct, name=source.name, train=train, cohorts=cohorts, root=root)


def test_balance_keeps_each_groups_mass_and_splits_it_over_its_cohorts():
    cohorts = ["a", "b", "b", "b", "a", "b"]
    p = balance_cohorts(cohorts, np.array([0.2, 0.2, 0.2, 0.2, 0.1, 0.1]), [0, 0, 0, 0, 1, 1])
    assert p == pytest.approx([0.4, 0.4 / 3, 0.4 / 3, 0.4 / 3, 0.1, 0.1])
    assert balance_cohorts(["a", "b", "b"]) == pytest.approx([0.5, 0.25, 0.25])


def test_real_cases_of_two_cohorts_are_drawn_half_and_half_through_nnunets_loader(merged):
    trainer = cpu_trainer(nnUNetTrainerCohortBalanced, merged.dataset)
    train_loader, _ = trainer.get_dataloaders()
    loader = train_loader.data_loader
    assert sorted(loader.indices) == sorted(merged.train)
    np.random.seed(0)  # nnU-Net's loader draws with the global numpy generator
    keys = np.concatenate([loader.get_indices() for _ in range(2000)])
    n, small = len(keys), sum(merged.cohorts[k] == SMALL for k in keys)
    # one case of four: uniform drawing gives it 1/4; balanced, its cohort gets 1/2 (binomial error, 4 SD)
    assert abs(small - n / 2) < 4 * np.sqrt(n / 4), (small, n)
    assert f"{SMALL}: 1 training cases, drawn with probability 0.500" in _log(trainer)


def test_bank_sources_split_evenly_over_the_cohorts_and_the_bank_keeps_its_share(merged):
    written = generate_bank(merged.dataset, "analytic", BANK_CASES, progress=False)
    assert len(written) == BANK_CASES
    sources = [parse_bank_identifier(i)[0] for i in written]
    # half the bank on the one SMALL case, half on the three LARGE cases (cycling would give SMALL 2 of 8)
    assert sorted(merged.cohorts[s] for s in sources).count(SMALL) == BANK_CASES // 2
    assert {s for s in sources if merged.cohorts[s] == LARGE} == set(merged.train[1:])
    manifest = json.loads((bank_dir(merged.dataset, "analytic", "3d_fullres") / "manifest" / "fold_0.json")
                          .read_text(encoding="utf-8"))
    assert manifest["sources"] == {"healthy_first": [], "cohorts": [SMALL, LARGE]}

    trainer = cpu_trainer(AnalyticBankCohortBalanced, merged.dataset)
    train_loader, _ = trainer.get_dataloaders()
    loader = train_loader.data_loader
    p = np.asarray(loader.sampling_probabilities)
    ids = list(loader.indices)
    is_bank = np.array([parse_bank_identifier(i) is not None for i in ids])
    cohort = np.array([trainer.cohort_of(i) for i in ids])
    assert is_bank.sum() == BANK_CASES and p[is_bank].sum() == pytest.approx(0.2)
    for c in (SMALL, LARGE):  # each cohort half of the real mass and half of the bank's
        assert p[~is_bank & (cohort == c)].sum() == pytest.approx(0.4)
        assert p[is_bank & (cohort == c)].sum() == pytest.approx(0.1)


def test_healthy_controls_are_the_bank_sources_first(merged):
    train = merged.train
    assert source_cases(5, train) == [train[1], train[2], train[3], train[0]]  # without either: cycling, as before
    assert [source_cases(k, train, healthy=[train[2]])[0] for k in range(6)] == [train[2]] * 6
    assert source_cases(0, train, healthy=[train[2], "not_a_training_case"])[:2] == [train[2], train[0]]
    with_cohorts = [source_cases(k, train, cohorts=merged.cohorts)[0] for k in range(4)]
    assert [merged.cohorts[s] for s in with_cohorts] == [SMALL, LARGE, SMALL, LARGE]

    # through nnUNetv2_synth_generate's code: the plan's healthy controls are every source (fold 1 of the copy)
    plan_file = merged.root / "nnUNet_preprocessed" / merged.name / "nnUNetSynthPlans.json"
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    train1, _, _ = split_cases(merged.dataset, "3d_fullres", 1)
    plan_file.write_text(json.dumps({**plan, "healthy_cases": [train1[-1]]}), encoding="utf-8")
    try:
        written = generate_bank(merged.dataset, "analytic", 3, fold=1, progress=False)
    finally:
        plan_file.write_text(json.dumps(plan), encoding="utf-8")
    assert [parse_bank_identifier(i)[0] for i in written] == [train1[-1]] * 3


def test_without_cohorts_the_trainer_names_the_missing_file(merged, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))  # no merge_sources.json in the raw or preprocessed folder
    with pytest.raises(RuntimeError, match=f"nnUNetTrainerCohortBalanced balances .* has no {SOURCES_FILE}"):
        cpu_trainer(nnUNetTrainerCohortBalanced, merged.dataset).get_dataloaders()


def _log(trainer) -> str:
    return Path(trainer.log_file).read_text(encoding="utf-8")
