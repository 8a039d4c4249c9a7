"""``NNUNET_SYNTH_SCHEDULE``: the short schedule and its optional fourth field for nnU-Net's final validation.

The trainer here is a stand-in with the attributes the override touches; the real ``nnUNetv2_train`` path runs
in tests/test_study_trainers.py (skip, without mirroring and in full).
"""

from __future__ import annotations

import pytest

from nnunet_synth.trainers.schedules import SCHEDULE_ENV, apply_schedule_override, parse_schedule


class FakeTrainer:
    """What apply_schedule_override reads and writes of an nnUNetTrainer."""

    def __init__(self):
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1000, 250, 50
        self.inference_allowed_mirroring_axes = (0, 1, 2)
        self.log: list[str] = []
        self.validated_with: list[tuple] = []

    def print_to_log_file(self, *args, **kwargs) -> None:
        self.log.append(" ".join(str(a) for a in args))

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.validated_with.append((self.inference_allowed_mirroring_axes, save_probabilities))


@pytest.mark.parametrize("value,expected", [
    ("1,2,1", ((1, 2, 1), "full")),
    ("3, 4, 2, skip", ((3, 4, 2), "skip")),
    ("1,1,1,nomirror", ((1, 1, 1), "nomirror")),
    ("1,1,1,full", ((1, 1, 1), "full")),
])
def test_parse_schedule(value, expected):
    assert parse_schedule(value) == expected


@pytest.mark.parametrize("value", ["1,2", "1,2,0", "1,2,1,fast", "a,b,c", "1,2,1,skip,5"])
def test_parse_schedule_refuses_malformed_values(value):
    with pytest.raises(ValueError, match=r"NNUNET_SYNTH_SCHEDULE must be 'epochs,iterations,val_iterations'.*"
                                         r"full\|nomirror\|skip"):
        parse_schedule(value)


@pytest.mark.parametrize("validation", ["skip", "nomirror", "full"])
def test_final_validation_is_skipped_shortened_or_kept_and_logged(monkeypatch, validation):
    monkeypatch.setenv(SCHEDULE_ENV, f"2,3,1,{validation}")
    trainer = FakeTrainer()
    apply_schedule_override(trainer)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (2, 3, 1)
    trainer.perform_actual_validation(True)
    expected = {"skip": [], "nomirror": [(None, True)], "full": [((0, 1, 2), True)]}[validation]
    assert trainer.validated_with == expected
    assert trainer.inference_allowed_mirroring_axes == (0, 1, 2)  # restored for the checkpoints and inference
    log = "\n".join(trainer.log)
    assert "schedule overridden by NNUNET_SYNTH_SCHEDULE: 2 epochs x 3 iterations" in log
    assert {"skip": "final validation skipped", "nomirror": "final validation without test-time mirroring",
            "full": "nnU-Net's full final validation"}[validation] in log


def test_no_variable_no_change(monkeypatch):
    monkeypatch.delenv(SCHEDULE_ENV, raising=False)
    trainer = FakeTrainer()
    apply_schedule_override(trainer)
    assert trainer.num_epochs == 1000 and trainer.log == []
    trainer.perform_actual_validation()
    assert trainer.validated_with == [((0, 1, 2), False)]
