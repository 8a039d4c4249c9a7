"""Generator checkpoint selection by one-class SVM (``nnUNetv2_synth_quality --select-checkpoint``, the liver-MRI
paper's model selection): every checkpoint of a tiny DDPM training is scored on the validation images of the fold,
the winner is recorded beside the checkpoints, and the ddpm backend then loads it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_synth.evaluation.quality import main as quality_main
from nnunet_synth.generator_training import main as train_main
from nnunet_synth.generators import get_backend
from nnunet_synth.generators.checkpoints import (
    SELECTION_FILE,
    GeneratorCheckpointError,
    save_checkpoint,
    selectable_checkpoints,
)
from nnunet_synth.generators.paths import generator_output_dir
from nnunet_synth.generators.splits import split_cases
from nnunet_synth.planning import load_synth_plan

from .conftest import cpu_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERTURBATIONS = {20: 0.0, 30: 3.0}  # periodic checkpoint iteration -> weight noise (x each tensor's SD)


@pytest.fixture(scope="module")
def trained(phantom_ct, one_torch_thread, tmp_path_factory) -> tuple[Path, Path]:
    """In a results folder of this module's own: a tiny DDPM of fold 0 (two iterations) with two periodic
    checkpoints (copies of its final weights: iteration 20 exact, iteration 30 perturbed), and a fold-0 nnU-Net model
    folder (randomly initialised network, saved by nnU-Net's own trainer) whose encoder scores them."""
    results = tmp_path_factory.mktemp("selection_results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_results", str(results))
        train_main(["-d", str(phantom_ct), "-g", "ddpm", "--preset", "tiny", "--iterations", "2", "-device", "cpu"])
        folder = generator_output_dir(phantom_ct, "ddpm", "3d_fullres", 0)
        state = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        for iteration, scale in PERTURBATIONS.items():
            noise = torch.Generator().manual_seed(iteration)
            model = {k: v + scale * v.float().std().nan_to_num() * torch.randn(v.shape, generator=noise)
                     if v.is_floating_point() and v.numel() > 1 else v for k, v in state["model"].items()}
            save_checkpoint({**state, "model": model, "iteration": iteration},
                            folder / f"checkpoint_iter{iteration:07d}.pth")

        torch.manual_seed(0)
        trainer = cpu_trainer(nnUNetTrainer, phantom_ct)
        model_folder = Path(trainer.output_folder_base)
        save_json(trainer.plans_manager.plans, str(model_folder / "plans.json"))
        save_json(trainer.dataset_json, str(model_folder / "dataset.json"))
        trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
        yield folder, model_folder


def test_select_checkpoint_needs_a_model(phantom_ct, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality_main(["-d", str(phantom_ct), "-g", "ddpm", "-o", str(tmp_path), "--select-checkpoint"])
    assert exit_info.value.code == 2 and "--select-checkpoint needs -m" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        quality_main(["-d", str(phantom_ct), "-g", "analytic", "-o", str(tmp_path), "-m", str(tmp_path), "-f", "0",
                      "--select-checkpoint"])
    assert exit_info.value.code == 2 and "'analytic' would not use the selection" in capsys.readouterr().err


def test_every_checkpoint_is_scored_the_best_recorded_and_loaded_by_the_backend(phantom_ct, trained, tmp_path,
                                                                               capsys):
    folder, model_folder = trained
    out = tmp_path / "selection"
    assert quality_main(["-d", str(phantom_ct), "-g", "ddpm", "-o", str(out), "-m", str(model_folder), "-f", "0",
                         "-device", "cpu", "--select-checkpoint", "--sampling-steps", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((folder / SELECTION_FILE).read_text(encoding="utf-8"))

    # every checkpoint of the folder scored, periodic ones by iteration, then best and final
    expected = [p.name for p in selectable_checkpoints(folder)]
    assert {f"checkpoint_iter{i:07d}.pth" for i in PERTURBATIONS} <= set(expected)
    assert expected[-2:] == ["checkpoint_best.pth", "checkpoint_final.pth"]
    scores = {s["checkpoint"]: s["score"] for s in record["scores"]}
    assert list(scores) == expected and all(math.isfinite(v) and v >= 0 for v in scores.values())
    # the winner is the lowest score; each checkpoint's own weights made its tumours: an exact copy of the final
    # weights scores as the final checkpoint does, a perturbed one differently
    assert record["checkpoint"] == min(scores, key=scores.get) and record["score"] == min(scores.values())
    assert scores["checkpoint_iter0000020.pth"] == pytest.approx(scores["checkpoint_final.pth"], abs=1e-9)
    assert scores["checkpoint_iter0000030.pth"] != pytest.approx(scores["checkpoint_final.pth"], abs=1e-9)
    # scored on the fold's validation images (neither segmenter nor generator trained on them)
    _, val, _ = split_cases(phantom_ct, "3d_fullres", 0)
    assert set(record["validation_cases"]) <= set(val) and record["num_tumours"] >= 1
    assert all(set(s["per_image"]) <= set(val) for s in record["scores"])
    assert f"selected {record['checkpoint']} of {len(expected)} ddpm checkpoints" in printed
    report = json.loads((out / "checkpoint_selection.json").read_text(encoding="utf-8"))
    assert report["checkpoint"] == record["checkpoint"]
    assert f"{record['checkpoint']} (selected)" in (out / "checkpoint_selection.md").read_text(encoding="utf-8")

    # the backend (and so bank generation) loads the recorded selection where the plan names no checkpoint
    plan = load_synth_plan(phantom_ct, "3d_fullres").replace(
        backend="ddpm", backend_params={"device": "cpu", "sampling_steps": 2})
    generator = get_backend("ddpm")(plan)
    assert generator.checkpoint == folder / record["checkpoint"]
    assert f"{folder / record['checkpoint']} (selected by one-class SVM score" in capsys.readouterr().err
    explicit = plan.replace(backend_params={"device": "cpu", "checkpoint": "final"})
    assert get_backend("ddpm")(explicit).checkpoint == folder / "checkpoint_final.pth"
    state = torch.load(folder / record["checkpoint"], map_location="cpu", weights_only=False)["model"]
    loaded = generator._model.state_dict()  # noqa: SLF001 - the weights the backend inpaints with
    assert all(np.array_equal(loaded[k].numpy(), v.numpy()) for k, v in state.items())

    # a recorded checkpoint that is gone is a clear error, not a silent fallback
    (folder / record["checkpoint"]).unlink()
    with pytest.raises(GeneratorCheckpointError, match=f"selects .*{record['checkpoint']}, which no longer exists"):
        get_backend("ddpm")(plan)
