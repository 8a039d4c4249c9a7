"""An invalid synth plan, dataset or environment stops commands and trainers before any work: one stderr line
``<command>: error: <message>`` naming the file and the key, exit status 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_synth.planning import load_synth_plan, preprocessed_dir
from nnunet_synth.synth_plan import SynthPlanError, synth_plan_file
from nnunet_synth.trainers import nnUNetTrainerSynth20


@pytest.fixture()
def plan_file(phantom_ct) -> Path:
    """The CT phantom's synth plan file, restored after the test (the phantom is shared by the whole session)."""
    load_synth_plan(phantom_ct, "3d_fullres")  # made with defaults where no other test made it yet
    path = synth_plan_file(preprocessed_dir(phantom_ct))
    good = path.read_bytes()
    yield path
    path.write_bytes(good)


def edit(path: Path, key: str, value) -> None:
    """Sets a dataset-level key (``a.b`` for a nested one) of the synth plans file."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    *parents, last = key.split(".")
    node = raw
    for parent in parents:
        node = node[parent]
    node[last] = value
    path.write_text(json.dumps(raw), encoding="utf-8")


def command(args: list[str], env: dict | None = None) -> tuple[int, list[str]]:
    """Exit status and the non-empty stderr lines of a console command."""
    result = subprocess.run(args, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                            env=env if env is not None else os.environ.copy())
    return result.returncode, [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_error_line(rc: int, lines: list[str], prog: str, *parts: str) -> None:
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: ") and all(part in lines[0] for part in parts), lines[0]


@pytest.mark.parametrize("key, value, allowed", [
    ("organ_label", 7, "foreground label of dataset.json"),
    ("tumour_label", 9, "foreground label of dataset.json"),
    ("placement.min_inside", 1.5, "(0, 1]"),
    ("placement.margin_mm", -5, ">= 0"),
    ("shapes.size_preset", "huge", "labelfree"),
    ("shapes.deformation", "wobbly", "elastic"),
    ("backend", "magic", "analytic"),
])
def test_invalid_key_stops_the_command_naming_file_and_key(phantom_ct, plan_file, tmp_path, key, value, allowed,
                                                           monkeypatch, capsys):
    edit(plan_file, key, value)
    args = ["nnUNetv2_synth_preview", "-d", str(phantom_ct), "-n", "1", "-o", str(tmp_path / "png")]
    if key == "organ_label":  # once through the installed console script, as a user runs it
        rc, lines = command(args)
    else:  # the same entry point in this process (a subprocess costs seconds of imports)
        from nnunet_synth.cli import preview_entry

        monkeypatch.setattr(sys, "argv", args)
        with pytest.raises(SystemExit) as exit_info:
            preview_entry()
        rc, lines = exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert_one_error_line(rc, lines, "nnUNetv2_synth_preview", str(plan_file), f"'{key}'", repr(value), allowed)
    assert not (tmp_path / "png").exists()


@pytest.mark.parametrize("content", ["{not json", ""], ids=["invalid_json", "empty_file"])
def test_unreadable_file_is_one_line_and_overwrite_repairs_it(phantom_ct, plan_file, content):
    plan_file.write_text(content, encoding="utf-8")
    rc, lines = command(["nnUNetv2_synth_plan", "-d", str(phantom_ct)])
    assert_one_error_line(rc, lines, "nnUNetv2_synth_plan", str(plan_file), "not valid JSON", "--overwrite")
    assert plan_file.read_text(encoding="utf-8") == content, "a failed command leaves the file alone"
    if content:  # one repair is enough: the empty file takes the same path
        rc, _ = command(["nnUNetv2_synth_plan", "-d", str(phantom_ct), "--overwrite"])
        assert rc == 0
        plan = load_synth_plan(phantom_ct, "3d_fullres", create=False)
        assert (plan.organ_label, plan.tumour_label) == (1, 2)


def test_unknown_dataset_configuration_and_missing_folder_variable(phantom_ct):
    generate = ["nnUNetv2_synth_generate", "-g", "analytic", "-n", "1"]
    rc, lines = command(generate + ["-d", "998"])
    assert_one_error_line(rc, lines, "nnUNetv2_synth_generate", "Could not find a dataset with the ID 998")
    rc, lines = command(generate + ["-d", str(phantom_ct), "-c", "3d_nonexistent"])
    assert_one_error_line(rc, lines, "nnUNetv2_synth_generate", "3d_nonexistent not found in plans")
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_preprocessed"}
    rc, lines = command(generate + ["-d", str(phantom_ct)], env)
    assert_one_error_line(rc, lines, "nnUNetv2_synth_generate", "nnUNet_preprocessed is not defined")


class nnUNetTrainerSynth20PlanCheck(nnUNetTrainerSynth20):  # noqa: N801 - nnU-Net's trainer naming
    """A trainer of its own name, so that its output folder is no other test's."""


class nnUNetTrainerSynth20BadShapes(nnUNetTrainerSynth20PlanCheck):  # noqa: N801
    synth_shapes = {"size_class": "enormous"}


def _trainer(cls, dataset: int):
    base = preprocessed_dir(dataset)
    plans = load_json(base / "nnUNetPlans.json")
    plans["continue_training"] = False  # nnU-Net 2.8's trainer pops this flag of its run_training
    return cls(plans, "3d_fullres", 0, load_json(base / "dataset.json"), torch.device("cpu"))


def test_trainer_initialize_refuses_an_invalid_plan_before_training(phantom_ct, plan_file):
    edit(plan_file, "placement.min_inside", 1.5)
    trainer = _trainer(nnUNetTrainerSynth20PlanCheck, phantom_ct)
    with pytest.raises(SynthPlanError, match=r"placement\.min_inside"):
        trainer.initialize()
    assert not trainer.was_initialized and trainer.synth_plan is None


def test_trainer_overrides_are_validated_too(phantom_ct, plan_file):
    trainer = _trainer(nnUNetTrainerSynth20BadShapes, phantom_ct)
    with pytest.raises(SynthPlanError, match=r"nnUNetTrainerSynth20BadShapes.*'shapes\.size_class' = 'enormous'"):
        trainer.initialize()
    assert not trainer.was_initialized
