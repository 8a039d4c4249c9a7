"""Short training schedules for tests, the demo and benchmarks on CPU.

nnU-Net's own ``nnUNetTrainer_1epoch`` still runs 250 iterations per epoch, minutes on a CPU; these keep
nnU-Net's training loop whole with a handful of iterations.
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

# (epochs, training iterations per epoch, validation iterations per epoch)
DEBUG_SCHEDULE = (1, 2, 1)
DEMO_SCHEDULE = (30, 10, 2)


SCHEDULE_LOG = "training schedule: {} epochs x {} iterations, {} validation iterations"


def set_schedule(trainer: nnUNetTrainer, schedule: tuple[int, int, int]) -> None:
    """Applies an (epochs, iterations, validation iterations) schedule to a trainer after its __init__ and logs
    it (:data:`SCHEDULE_LOG`; the demo reads the number of epochs from that line)."""
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = schedule
    trainer.print_to_log_file(SCHEDULE_LOG.format(*schedule))


SCHEDULE_ENV = "NNUNET_SYNTH_SCHEDULE"
# the optional fourth field: what becomes of nnU-Net's final validation (perform_actual_validation) after training
FINAL_VALIDATION = {
    "full": "nnU-Net's full final validation (sliding window with test-time mirroring)",
    "nomirror": "final validation without test-time mirroring (up to 8x faster in 3D)",
    "skip": "no final validation (no validation/ folder, no summary.json)",
}


def parse_schedule(value: str) -> tuple[tuple[int, int, int], str]:
    """``epochs,iterations,val_iterations[,full|nomirror|skip]`` as (schedule, final validation mode).

    Raises:
        ValueError: a malformed value; the message shows the expected form.
    """
    fields = [v.strip() for v in value.split(",")]
    try:
        if len(fields) not in (3, 4):
            raise ValueError
        schedule = tuple(int(v) for v in fields[:3])
        validation = fields[3] if len(fields) == 4 else "full"
        if min(schedule) < 1 or validation not in FINAL_VALIDATION:
            raise ValueError
    except ValueError:
        raise ValueError(f"{SCHEDULE_ENV} must be 'epochs,iterations,val_iterations' (positive) with an optional "
                         f"fourth field {'|'.join(FINAL_VALIDATION)} for the final validation, got {value!r}") \
            from None
    return schedule, validation


def apply_schedule_override(trainer: nnUNetTrainer) -> None:
    """Smoke tests of named trainers: ``NNUNET_SYNTH_SCHEDULE=epochs,iterations,val_iterations[,validation]``
    shortens the schedule of any nnunet_synth trainer without a separate debug class for each, and with the
    fourth field (:data:`FINAL_VALIDATION`: ``full``, ``nomirror``, ``skip``) the final validation that nnU-Net
    runs after training (and with ``--val``); the log says both.
    """
    value = os.environ.get(SCHEDULE_ENV)
    if not value:
        return
    schedule, validation = parse_schedule(value)
    set_schedule(trainer, schedule)
    trainer.print_to_log_file(f"schedule overridden by {SCHEDULE_ENV}: {schedule[0]} epochs x {schedule[1]} "
                              f"iterations, {schedule[2]} validation iterations; {FINAL_VALIDATION[validation]}")
    if validation != "full":
        _override_final_validation(trainer, validation)


def _override_final_validation(trainer: nnUNetTrainer, validation: str) -> None:
    """Replaces this trainer's ``perform_actual_validation`` (only this instance): ``skip`` logs and returns,
    ``nomirror`` runs nnU-Net's own with ``inference_allowed_mirroring_axes`` set to None (its predictor then
    mirrors nothing) and restores the axes, which the checkpoints, saved before, keep for inference."""
    nnunet_validation = trainer.perform_actual_validation

    def perform_actual_validation(save_probabilities: bool = False) -> None:
        if validation == "skip":
            trainer.print_to_log_file(f"final validation skipped ({SCHEDULE_ENV})")
            return
        trainer.print_to_log_file(f"final validation without test-time mirroring ({SCHEDULE_ENV})")
        axes = trainer.inference_allowed_mirroring_axes
        trainer.inference_allowed_mirroring_axes = None
        try:
            nnunet_validation(save_probabilities)
        finally:
            trainer.inference_allowed_mirroring_axes = axes

    trainer.perform_actual_validation = perform_actual_validation


class nnUNetTrainer_Debug(nnUNetTrainer):
    """Vanilla nnU-Net, one epoch of two training and one validation iteration (``NNUNET_SYNTH_SCHEDULE`` applies,
    as to the synth trainers)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, DEBUG_SCHEDULE)
        apply_schedule_override(self)


class nnUNetTrainer_Demo(nnUNetTrainer):
    """Vanilla nnU-Net on the demo's short schedule (the baseline to compare the Synth demo with)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, DEMO_SCHEDULE)
