"""Synthetic-to-real transfer: real tumours hidden behind nnU-Net's ignore label, synth plans measured on the
training fold's hidden masks, no synthetic lesion on an ignore voxel, and ``benchmarks/transfer.py`` end to end on
a tiny phantom (a two-iteration schedule)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json
from scipy.spatial.distance import cdist

from nnunet_synth.dataset_conversion.cli import main as convert_main
from nnunet_synth.dataset_conversion.hidden_tumours import hide_tumours
from nnunet_synth.phantom import write_phantom_dataset
from tests.conftest import TINY, run

REPO = Path(__file__).resolve().parents[1]
HIDDEN_ID = 945  # the benchmark's hidden-tumour copy of the CT phantom (901)


def brute_force_hidden(label: np.ndarray, spacing: tuple[float, ...], tumour: int, margin_mm: float) -> np.ndarray:
    """Voxels within ``margin_mm`` of a tumour voxel, by the distance to every tumour voxel (no distance map)."""
    grid = np.indices(label.shape).reshape(label.ndim, -1).T * np.asarray(spacing)
    near = cdist(grid, np.argwhere(label == tumour) * np.asarray(spacing)).min(axis=1) <= margin_mm
    return near.reshape(label.shape)


def label_volume(seed: int) -> np.ndarray:
    """Organ (1) with two tumours (2) of different sizes, one at the organ's edge."""
    label = np.zeros((10, 24, 24), dtype=np.uint8)
    label[2:9, 4:20, 4:20] = 1
    zz, yy, xx = np.indices(label.shape)
    label[(zz - 5) ** 2 / 4 + (yy - 9) ** 2 / 9 + (xx - 9) ** 2 / 9 <= 1] = 2
    label[(zz - 4) ** 2 + (yy - 16 - seed % 2) ** 2 + (xx - 17) ** 2 <= 2] = 2
    return label


@pytest.mark.parametrize("margin_mm", [0.0, 2.0, 4.5])
def test_hidden_voxels_are_the_tumour_dilated_by_the_margin_in_mm(margin_mm):
    label, spacing = label_volume(0), (3.0, 1.5, 1.5)
    hidden = hide_tumours(label, spacing, tumour_label=2, ignore_label=3, margin_mm=margin_mm)
    expected = brute_force_hidden(label, spacing, 2, margin_mm)
    assert np.array_equal(hidden == 3, expected)
    assert np.array_equal(hidden[~expected], label[~expected])
    assert not (hidden == 2).any() and hidden.dtype == label.dtype


def test_conversion_hides_the_tumours_and_keeps_the_original_labels(tmp_path, monkeypatch, capsys):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    spacing, margin = (1.5, 1.5, 3.0), 3.0  # SimpleITK's x, y, z
    originals = {}
    for i, case in enumerate(["a1", "b2"]):
        label = label_volume(i)
        for array, path in ((np.random.default_rng(i).normal(size=label.shape).astype(np.float32),
                             tmp_path / "in" / "images" / f"{case}.nii.gz"), (label, tmp_path / "in" / "masks" /
                                                                               f"{case}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(spacing)
            image.SetOrigin((-40.0, 12.5, 7.0))
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(path))
        originals[case] = label
    rc = convert_main(["generic", "-i", str(tmp_path / "in"), "-d", "946", "--label-pattern", "masks/{case}.nii.gz",
                       "--labels", "background=0", "organ=1", "tumour=2", "--hide-tumours", str(margin), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    folder = tmp_path / "nnUNet_raw" / "Dataset946_Generic"
    meta = load_json(str(folder / "dataset.json"))
    assert meta["labels"] == {"background": 0, "organ": 1, "tumour": 2, "ignore": 3}
    assert meta["nnunet_synth"]["hidden_tumours"] == {"margin_mm": margin, "tumour_label": 2, "ignore_label": 3,
                                                      "tumour_masks": "labelsTr_tumours"}
    for case, label in originals.items():
        hidden_image = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
        kept_image = sitk.ReadImage(str(folder / "labelsTr_tumours" / f"{case}.nii.gz"))
        hidden = sitk.GetArrayFromImage(hidden_image)
        near = brute_force_hidden(label, spacing[::-1], 2, margin)
        assert np.array_equal(hidden == 3, near) and np.array_equal(hidden[~near], label[~near])
        assert np.array_equal(sitk.GetArrayFromImage(kept_image), label)
        assert kept_image.GetSpacing() == hidden_image.GetSpacing() == spacing
        assert kept_image.GetOrigin() == hidden_image.GetOrigin() == (-40.0, 12.5, 7.0)
    assert [p.name for p in (tmp_path / "nnUNet_raw").iterdir()] == ["Dataset946_Generic"]  # nothing half-written


def test_phantom_hides_the_training_tumours_and_keeps_the_test_labels(tmp_path):
    folder = write_phantom_dataset(947, num_train=2, num_test=1, config=TINY, raw_dir=tmp_path, hide_tumours_mm=2.0)
    assert folder.name == "Dataset947_PhantomCTHidden"
    assert load_json(str(folder / "dataset.json"))["labels"]["ignore"] == 3
    for path in (folder / "labelsTr").iterdir():
        hidden = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        kept = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr_tumours" / path.name)))
        assert (kept == 2).any() and not (hidden == 2).any() and (hidden == 3).sum() > (kept == 2).sum()
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(next((folder / "labelsTs").iterdir())))) == 2).any()


@pytest.fixture(scope="module")
def transfer_run(phantom_ct, tmp_path_factory) -> dict:
    """``benchmarks/transfer.py`` on the CT phantom: real-label model and the analytic backend, two iterations."""
    out = tmp_path_factory.mktemp("transfer")
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
    run([sys.executable, str(REPO / "benchmarks" / "transfer.py"), "-d", str(phantom_ct), "-o", str(out),
         "--hidden-id", str(HIDDEN_ID), "--contenders", "analytic", "--epochs", "1", "--iterations", "2",
         "--val-iterations", "1", "--margin-mm", "3"], env=env, timeout=1800)
    return json.loads((out / "transfer.json").read_text(encoding="utf-8"))


def test_benchmark_trains_predicts_and_scores_real_tumours(transfer_run, phantom_ct):
    from nnunet_synth.generators.splits import split_cases

    results = transfer_run
    _, val, _ = split_cases(phantom_ct, "3d_fullres", 0)
    assert results["validation_cases"] == val and results["hidden"].startswith(f"Dataset{HIDDEN_ID}_")
    rows = {r["run"]: r for r in results["rows"]}
    assert list(rows) == ["real-labels", "analytic"]
    upper = rows["real-labels"]
    assert upper["n_cases"] == len(val)
    # the upper bound's own ratio is 1, or undefined where two iterations left it predicting no tumour at all
    assert upper["ratio"] == pytest.approx(1.0) if upper["dice"] > 0 else math.isnan(upper["ratio"])
    for row in rows.values():
        assert 0.0 <= row["dice"] <= 1.0 and row["recall"]["all"]["n_lesions"] > 0
    out = Path(results["settings"]["output"])
    for run_name in rows:
        assert sorted(p.name for p in (out / "predictions" / run_name).glob("*.nii.gz")) == \
            [f"{c}.nii.gz" for c in val]
    table = (out / "transfer.md").read_text(encoding="utf-8")
    assert "| real-labels |" in table and "| analytic |" in table and "ratio to real labels" in table
    assert (out / "evaluation" / "report.md").is_file()
    log = (Path(os.environ["nnUNet_results"]) / results["hidden"] /
           "nnUNetTrainerSynth50_Transfer__nnUNetPlans__3d_fullres" / "fold_0")
    assert "real tumours hidden" in "".join(p.read_text(encoding="utf-8") for p in log.glob("training_log_*.txt"))


def test_the_hidden_copy_has_no_tumour_label_and_its_plan_measures_the_training_folds_kept_masks(
        transfer_run, phantom_ct):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_synth.generators.splits import split_cases
    from nnunet_synth.planning import count_tumours, load_synth_plan, preprocessed_dir

    train, val, folder = split_cases(phantom_ct, "3d_fullres", 0)
    source = infer_dataset_class(str(folder))(str(folder))
    hidden_folder = preprocessed_dir(HIDDEN_ID) / folder.name
    hidden = infer_dataset_class(str(hidden_folder))(str(hidden_folder))
    plan = load_synth_plan(HIDDEN_ID, "3d_fullres", create=False)
    spacing = plan.spacing
    counts = {}
    for case in train + val:
        _, seg, _, _ = source.load_case(case)
        _, hidden_seg, _, _ = hidden.load_case(case)
        assert not (np.asarray(hidden_seg) == 2).any() and (np.asarray(hidden_seg) == 3).any()
        counts[case] = len(count_tumours(np.asarray(seg[0]) == 2, spacing))
    assert plan.statistics_fold == 0 and plan.ignore_label == 3
    assert plan.tumour_sizes.count == sum(counts[c] for c in train)
    assert plan.tumour_sizes.cases == sum(counts[c] > 0 for c in train)
    assert sum(counts[c] for c in val) > 0  # the validation tumours exist and were left out
    assert len(plan.texture.tumours) == plan.tumour_sizes.count


def test_no_synthetic_lesion_touches_an_ignore_voxel(transfer_run, phantom_ct):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_synth.generators.lesions import insert_tumours
    from nnunet_synth.generators.splits import split_cases
    from nnunet_synth.planning import load_synth_plan

    plan = load_synth_plan(HIDDEN_ID, "3d_fullres", create=False)
    train, _, folder = split_cases(HIDDEN_ID, "3d_fullres", 0)
    ds = infer_dataset_class(str(folder))(str(folder))
    inserted = 0
    for i, case in enumerate(train):
        data, seg, _, _ = ds.load_case(case)
        data, seg = np.asarray(data), np.asarray(seg)
        ignore = seg[0] == plan.ignore_label
        assert ignore.any()
        for seed in range(4):
            image, new_seg, lesions = insert_tumours(data, seg, None, plan, np.random.default_rng(100 * i + seed))
            inserted += len(lesions)
            assert not ((new_seg[0] == plan.tumour_label) & ignore).any()
            assert np.array_equal(new_seg[0][ignore], seg[0][ignore])
            assert np.array_equal(image[:, ignore], data[:, ignore])
    assert inserted >= len(train)


def test_a_trainer_of_another_fold_refuses_the_plan_of_fold_0(transfer_run):
    import torch

    from nnunet_synth.planning import preprocessed_dir
    from nnunet_synth.synth_plan import SynthPlanError
    from nnunet_synth.trainers.transfer import nnUNetTrainerSynth50_Transfer

    base = preprocessed_dir(HIDDEN_ID)
    plans = {**load_json(str(base / "nnUNetPlans.json")), "continue_training": False}  # as nnUNetv2_train passes
    trainer = nnUNetTrainerSynth50_Transfer(plans, "3d_fullres", 1, load_json(str(base / "dataset.json")),
                                            torch.device("cpu"))
    with pytest.raises(SynthPlanError, match=r"fold 0's training cases.*nnUNetv2_synth_plan .* -f 1"):
        trainer.initialize()
