"""A random post-contrast phase per training sample, the first for validation (SynBT, section 3.1; issue 13).

The dataset is nnU-Net's preprocessed CT phantom, its cases copied under ``<patient>_post<k>`` names as the MAMA-MIA
conversion with ``--post-phase all`` names them (each copy's properties say which phase case it is), with a
patient-grouped ``splits_final.json``.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_pickle, write_pickle

from nnunet_synth.trainers import (
    nnUNetTrainerRandomPhase,
    nnUNetTrainerSynth20LDMOnlineRandomPhase,
    nnUNetTrainerSynth20RandomPhase,
)
from nnunet_synth.trainers.phases import RandomPhaseDataset, RandomPhaseError, RandomPhaseMixin, group_phases

from .conftest import cpu_trainer

DATASET = 991
NAME = f"Dataset{DATASET}_PhasePhantom"
# patient -> (phantom case it copies, number of post-contrast phases)
PATIENTS = {"duke_001": (0, 3), "duke_002": (1, 2), "ispy_003": (2, 4), "nact_004": (3, 2), "nact_005": (4, 3)}
TRAIN, VAL = ["duke_001", "duke_002", "ispy_003"], ["nact_004", "nact_005"]


def phases(patient: str) -> list[str]:
    return [f"{patient}_post{k}" for k in range(1, PATIENTS[patient][1] + 1)]


def phase_dataset(preprocessed: Path, source: Path) -> None:
    """``NAME`` in ``preprocessed``: the phantom's plans and cases, one copy per phase; fold 0 grouped by patient,
    fold 1 with a patient in both training and validation, fold 2 with a case that is not a phase case."""
    out = preprocessed / NAME
    (out / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    for name in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copy(source / name, out / name)
    plans = json.loads((source / "nnUNetPlans.json").read_text(encoding="utf-8"))
    (out / "nnUNetPlans.json").write_text(json.dumps({**plans, "dataset_name": NAME}), encoding="utf-8")
    cases = {case: f"phantom_{index:03d}" for patient, (index, _) in PATIENTS.items() for case in phases(patient)}
    cases["other_case"] = "phantom_005"
    for case, phantom in cases.items():
        folder, target = source / "nnUNetPlans_3d_fullres", out / "nnUNetPlans_3d_fullres"
        shutil.copy(folder / f"{phantom}.b2nd", target / f"{case}.b2nd")
        shutil.copy(folder / f"{phantom}_seg.b2nd", target / f"{case}_seg.b2nd")
        write_pickle({**load_pickle(folder / f"{phantom}.pkl"), "phase_case": case}, target / f"{case}.pkl")
    train = [c for p in TRAIN for c in phases(p)]
    val = [c for p in VAL for c in phases(p)]
    splits = [{"train": train, "val": val},
              {"train": train + ["nact_004_post2"], "val": [c for c in val if c != "nact_004_post2"]},
              {"train": train + ["other_case"], "val": val}]
    (out / "splits_final.json").write_text(json.dumps(splits), encoding="utf-8")


@pytest.fixture
def phase_phantom(phantom_ct, nnunet_dirs, raw) -> int:
    phase_dataset(raw.parent / "nnUNet_preprocessed", nnunet_dirs / "nnUNet_preprocessed" / "Dataset901_PhantomCT")
    return DATASET


def test_phase_cases_are_grouped_by_patient_and_other_names_refused():
    assert group_phases(["b_post2", "a_post1", "b_post10", "b_post1"], "x") == \
        {"a": ["a_post1"], "b": ["b_post1", "b_post2", "b_post10"]}
    # the --single-breast conversion's names: each breast is drawn on its own
    assert group_phases(["p_post2_L", "p_post1_R", "p_post1_L"], "x") == {"p_L": ["p_post1_L", "p_post2_L"],
                                                                         "p_R": ["p_post1_R"]}
    with pytest.raises(RandomPhaseError, match=r"<patient>_post<k> in Dataset9_X; none.*--post-phase all"):
        group_phases([], "Dataset9_X")
    with pytest.raises(RandomPhaseError, match=r"2 of 3 are not, e\.g\. case_a, case_b.*--post-phase all"):
        group_phases(["case_b", "p_post1", "case_a"], "Dataset9_X")


def test_random_phase_trainer_draws_phases_evenly_and_validates_on_the_first(phase_phantom, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = cpu_trainer(nnUNetTrainerRandomPhase, phase_phantom)
    tr_keys, val_keys = trainer.do_split()
    assert sorted(val_keys) == ["nact_004_post1", "nact_005_post1"], "validation: the first post-contrast phase"
    assert sorted(tr_keys) == sorted(c for p in TRAIN for c in phases(p))

    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    assert isinstance(dataset_tr, RandomPhaseDataset) and dataset_tr.identifiers == TRAIN
    assert not isinstance(dataset_val, RandomPhaseDataset) and sorted(dataset_val.identifiers) == sorted(val_keys)
    for case in dataset_val.identifiers:
        assert dataset_val.load_case(case)[3]["phase_case"] == case, "validation loads are never redrawn"

    draws = 300
    for patient in TRAIN:
        counts = Counter(dataset_tr.load_case(patient)[3]["phase_case"] for _ in range(draws))
        assert set(counts) == set(phases(patient)), counts
        p = 1 / len(counts)
        assert all(abs(n - draws * p) < 4 * np.sqrt(draws * p * (1 - p)) for n in counts.values()), counts
    again = RandomPhaseDataset(dataset_tr.dataset, dataset_tr.seed)
    fresh = RandomPhaseDataset(dataset_tr.dataset, dataset_tr.seed)
    assert [again.draw("ispy_003") for _ in range(20)] == [fresh.draw("ispy_003") for _ in range(20)], "seeded"

    train_loader, val_loader = trainer.get_dataloaders()  # nnU-Net's loaders over the wrapped dataset
    assert set(next(train_loader)["keys"]) <= set(TRAIN)
    assert set(next(val_loader)["keys"]) <= set(val_keys)


def test_random_phase_trainer_refuses_ungrouped_splits_and_other_cases(phase_phantom):
    with pytest.raises(RandomPhaseError, match=r"patients nact_004 have phases both in training and in validation"):
        cpu_trainer(nnUNetTrainerRandomPhase, phase_phantom, fold=1).do_split()
    with pytest.raises(RandomPhaseError, match=r"1 of 10 are not, e\.g\. other_case.*--post-phase all"):
        cpu_trainer(nnUNetTrainerRandomPhase, phase_phantom, fold=2).do_split()
    # the paper's setting and the analytic variant share the behaviour
    assert all(issubclass(cls, RandomPhaseMixin)
               for cls in (nnUNetTrainerSynth20RandomPhase, nnUNetTrainerSynth20LDMOnlineRandomPhase))
