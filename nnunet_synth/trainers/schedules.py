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


def set_schedule(trainer: nnUNetTrainer, schedule: tuple[int, int, int]) -> None:
    """Applies an (epochs, iterations, validation iterations) schedule to a trainer after its __init__."""
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = schedule


SCHEDULE_ENV = "NNUNET_SYNTH_SCHEDULE"


def apply_schedule_override(trainer: nnUNetTrainer) -> None:
    """Smoke tests of named trainers: ``NNUNET_SYNTH_SCHEDULE=epochs,iterations,val_iterations`` shortens
    the schedule of any nnunet_synth trainer without a separate debug class for each (and says so in the log).
    """
    value = os.environ.get(SCHEDULE_ENV)
    if not value:
        return
    try:
        schedule = tuple(int(v) for v in value.split(","))
        if len(schedule) != 3 or min(schedule) < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{SCHEDULE_ENV} must be 'epochs,iterations,val_iterations' (positive), got {value!r}") \
            from None
    set_schedule(trainer, schedule)
    trainer.print_to_log_file(f"schedule overridden by {SCHEDULE_ENV}: {schedule[0]} epochs x {schedule[1]} "
                              f"iterations, {schedule[2]} validation iterations")


class nnUNetTrainer_Debug(nnUNetTrainer):
    """Vanilla nnU-Net, one epoch of two training and one validation iteration."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, DEBUG_SCHEDULE)


class nnUNetTrainer_Demo(nnUNetTrainer):
    """Vanilla nnU-Net on the demo's short schedule (the baseline to compare the Synth demo with)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, DEMO_SCHEDULE)
