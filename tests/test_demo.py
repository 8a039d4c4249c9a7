"""The demo's training progress line (``epoch N/30, elapsed, about ... left``) from nnU-Net's own log lines, and its
default output folder being one git ignores. The whole demo runs in tests/test_nnunet_cli.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nnunet_synth.demo import EpochProgress, run_demo
from nnunet_synth.trainers.schedules import DEMO_SCHEDULE, SCHEDULE_LOG

ROOT = Path(__file__).resolve().parents[1]


def test_epoch_progress_counts_epochs_of_the_logged_schedule():
    progress = EpochProgress(start=0.0)
    assert progress(f"2026-12-01 10:00:00.000000: {SCHEDULE_LOG.format(*DEMO_SCHEDULE)}\n", now=1.0) is None
    assert progress("2026-12-01 10:00:05.000000: train_loss -0.5\n", now=5.0) is None
    assert progress("2026-12-01 10:00:10.000000: Epoch 0\n", now=10.0) == "epoch 1/30, 10 s elapsed"
    assert progress("2026-12-01 10:00:10.500000: Epoch time: 12.3 s\n", now=10.5) is None
    # two epochs of 12 s each: 28 epochs (2..29) still to run
    assert progress("2026-12-01 10:00:34.000000: Epoch 2\n", now=34.0) == \
        "epoch 3/30, 34 s elapsed, about 5 min 36 s left"


def test_epoch_progress_without_a_logged_schedule():
    progress = EpochProgress(start=0.0)
    assert progress("x: Epoch 0\n", now=3.0) == "epoch 1/?, 3 s elapsed"
    assert progress("x: Epoch 1\n", now=70.0) == "epoch 2/?, 1 min 10 s elapsed"


def test_default_demo_folder_is_ignored_by_git():
    folder = run_demo.__defaults__[0]
    result = subprocess.run(["git", "check-ignore", "-q", f"{folder}/anything"], cwd=ROOT, capture_output=True)
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    assert result.returncode == 0, f"{folder}/ is not in .gitignore"
