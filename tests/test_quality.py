"""Generator quality (``nnUNetv2_synth_quality``): the features on known crops, the classifier and one-class SVM
on known distributions, and the command on the preprocessed phantoms, with a model trained by real nnU-Net."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from nnunet_synth.evaluation.lesion_features import CHANNEL_FEATURES, lesion_features
from nnunet_synth.evaluation.quality import QualityError, QualitySettings, assess_quality, main
from nnunet_synth.evaluation.realism import one_class_svm_scores, realism_auc
from nnunet_synth.generators import available_backends
from nnunet_synth.planning import load_synth_plan, preprocessed_dir

from .conftest import NO_FINAL_VALIDATION, ext_trainer_dir, run

SPACING = (3.0, 1.5, 1.5)
FAST = QualitySettings(n_repeats=2, examples=3)


def _ball(shape=(16, 40, 40), radius_mm=9.0):
    grids = np.meshgrid(*[(np.arange(n) - n // 2) * s for n, s in zip(shape, SPACING)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2


def test_features_measure_contrast_edges_and_texture_per_channel():
    ball = _ball()
    organ = np.ones_like(ball)
    organ[:, :, 30:] = False  # outside the organ: must not enter the shell
    image = np.zeros((2, *ball.shape))
    image[0][ball], image[1][ball], image[1][~ball] = 2.0, -1.0, 0.5
    image[:, ~organ] = 100.0
    ranges = [(-2.0, 3.0), (-2.0, 3.0)]
    sharp = lesion_features(image, ball, organ, SPACING, ranges)
    assert [set(f) for f in sharp] == [set(CHANNEL_FEATURES)] * 2
    assert sharp[0]["contrast"] == pytest.approx(2.0) and sharp[1]["contrast"] == pytest.approx(-1.5)
    assert sharp[0]["shell_mean"] == pytest.approx(0.0) and sharp[0]["lesion_std"] == pytest.approx(0.0)
    assert sharp[0]["glcm_contrast"] == pytest.approx(0.0) and sharp[0]["glcm_homogeneity"] == pytest.approx(1.0)

    blurred = np.stack([gaussian_filter(ch, 1.5 / np.asarray(SPACING)) for ch in image])
    soft = lesion_features(blurred, ball, organ, SPACING, ranges)
    assert soft[0]["edge_gradient"] < 0.7 * sharp[0]["edge_gradient"]

    rng = np.random.default_rng(0)
    textured = image.copy()
    textured[0][ball] += rng.normal(0, 0.5, ball.sum())
    rough = lesion_features(textured, ball, organ, SPACING, ranges)
    assert rough[0]["lesion_std"] == pytest.approx(0.5, rel=0.15)
    assert rough[0]["glcm_contrast"] > 1.0 and rough[0]["interior_gradient"] > 0.1
    assert rough[1] == pytest.approx(sharp[1], nan_ok=True)  # channels are measured independently


def test_classifier_is_at_chance_for_one_distribution_and_separates_a_shifted_one():
    rng = np.random.default_rng(0)
    n = 120
    groups = [f"case_{i % 8}" for i in range(n)]
    y = np.arange(n) % 3 == 0
    x = rng.normal(size=(n, 5))
    same = realism_auc(x, y, groups, [f"f{i}" for i in range(5)], "logistic", n_repeats=3)
    assert 0.3 < same["auc"] < 0.7 and same["grouped_by_case"] and same["n_splits"] == 5
    x[y, 2] += 3.0
    shifted = realism_auc(x, y, groups, [f"f{i}" for i in range(5)], "forest", n_repeats=2)
    assert shifted["auc"] > 0.9 and shifted["top_features"][0]["feature"] == "f2"

    real = rng.normal(size=(60, 4))
    like = one_class_svm_scores(real, rng.normal(size=(40, 4)), groups[:60])
    far = one_class_svm_scores(real, rng.normal(size=(40, 4)) + 6.0, groups[:60])
    assert abs(like["synthetic_inlier_share"] - like["real_heldout_inlier_share"]) < 0.25 and like["auc"] < 0.7
    assert far["synthetic_inlier_share"] == 0.0 and far["auc"] > 0.99
    assert far["synthetic_mean_score"] < like["synthetic_mean_score"]


def test_realism_auc_ranks_a_bad_generator_above_a_closer_one(phantom_ct, tmp_path):
    plan = load_synth_plan(phantom_ct, "3d_fullres")
    # hyperintense and three times too strong where the phantom's tumours are hypodense
    # (the label-free paper's texture, which takes its contrast from the plan's contrast range)
    bad = plan.replace(backend_params={"texture": "paper"}, channels=tuple(
        dataclasses.replace(ch, contrast_range=(-3 * ch.contrast_range[1], -3 * ch.contrast_range[0]), clip=None)
        for ch in plan.channels))
    # the texture the synth plan measured on the phantom's own tumours (the default)
    assert plan.texture is not None
    closer = plan
    results = {name: assess_quality(phantom_ct, "analytic", tmp_path / name, num=24, synth_plan=p, settings=FAST,
                                    progress=False)
               for name, p in (("bad", bad), ("closer", closer))}
    bad_auc, closer_auc = results["bad"]["realism"]["auc"], results["closer"]["realism"]["auc"]
    assert bad_auc > 0.8
    assert closer_auc < bad_auc
    # the statistics show why: the bad generator's tumours are brighter than their organ, the real ones darker
    for name, sign in (("bad", 1), ("closer", -1)):
        contrast = results[name]["intensity"]["channels"][0]["contrast"]
        assert contrast["real"]["median"] < 0 and sign * contrast["synthetic"]["median"] > 0
    assert results["bad"]["counts"]["real"] == results["closer"]["counts"]["real"] >= 4


@pytest.fixture(scope="session")
def trained_model(phantom_ct, tmp_path_factory) -> Path:
    """A fold-0 model of the CT phantom trained by real ``nnUNetv2_train`` into a results folder of this file's own,
    so no other test's model is reused or overwritten."""
    results = tmp_path_factory.mktemp("quality_results")
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_extTrainer=ext_trainer_dir(), nnUNet_n_proc_DA="0",
               **NO_FINAL_VALIDATION)
    run(["nnUNetv2_train", str(phantom_ct), "3d_fullres", "0", "-tr", "nnUNetTrainer_Debug", "-device", "cpu"],
        env=env)
    model = next(results.glob(f"Dataset{phantom_ct}_*")) / "nnUNetTrainer_Debug__nnUNetPlans__3d_fullres"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    return model


@pytest.mark.slow
def test_command_writes_report_and_scores_with_the_encoder_of_a_trained_model(phantom_ct, trained_model, tmp_path):
    out = tmp_path / "quality"
    env = dict(os.environ, nnUNet_extTrainer=ext_trainer_dir())
    result = run(["nnUNetv2_synth_quality", "-d", str(phantom_ct), "-g", "analytic", "-n", "20", "-o", str(out),
                  "-m", str(trained_model), "-f", "0", "-device", "cpu", "--repeats", "2", "--quiet"], env=env)
    summary = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    assert f"realism AUC {summary['realism']['auc']:.3f}" in result.stdout

    # only the training cases of fold 0, as nnU-Net split them
    splits = json.loads((preprocessed_dir(phantom_ct) / "splits_final.json").read_text(encoding="utf-8"))
    assert summary["cases"] == sorted(splits[0]["train"])
    tumours = summary["tumours"]
    assert {t["case"] for t in tumours} <= set(summary["cases"])
    counts = summary["counts"]
    assert counts["real"] == sum(t["kind"] == "real" for t in tumours) >= 2
    assert counts["synthetic"] == sum(t["kind"] == "synthetic" for t in tumours) == 20 - counts["synthetic_not_placed"]
    assert 0.0 <= summary["realism"]["auc"] <= 1.0

    # one-class SVM on the deepest encoder stage: its width, scores per tumour consistent with the means
    plans = json.loads((trained_model / "plans.json").read_text(encoding="utf-8"))
    width = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][-1]
    svm = summary["one_class_svm"]
    assert svm["trainer"] == "nnUNetTrainer_Debug" and svm["fold"] == 0
    for pooling in ("global", "lesion"):
        s = svm[pooling]
        assert s["feature_dim"] == width and s["n_real"] == counts["real"]
        assert 0.0 <= s["synthetic_inlier_share"] <= 1.0 and 0.0 <= s["auc"] <= 1.0
        scores = [t["svm_score"][pooling] for t in tumours if t["kind"] == "synthetic"]
        assert np.mean(scores) == pytest.approx(s["synthetic_mean_score"])
        assert s["synthetic_inlier_share"] == pytest.approx(np.mean(np.asarray(scores) >= 0))

    # per-channel statistics: the phantom's real tumours are darker than the organ around them
    channel = summary["intensity"]["channels"][0]
    assert summary["channels"] == ["CT"] and channel["name"] == "CT"
    assert channel["contrast"]["real"]["median"] < 0 and channel["contrast"]["real"]["n"] == counts["real"]

    report = (out / "quality.md").read_text(encoding="utf-8")
    assert f"{summary['realism']['auc']:.3f}" in report and "One-class SVM" in report and "| CT |" in report
    for name in ("intensity_stats.png", "examples.png"):
        png = matplotlib.image.imread(out / name)
        assert png.ndim == 3 and png.shape[2] in (3, 4) and min(png.shape[:2]) > 150


@pytest.mark.parametrize("backend, message", [("no_such_backend", "; available: "),
                                              ("future_backend", "is not implemented yet. Available backends: ")])
def test_unbuilt_backend_is_a_clean_error(phantom_ct, tmp_path, capsys, monkeypatch, backend, message):
    from nnunet_synth import generators

    # a backend of the design that this version does not build (whichever that is now)
    monkeypatch.setitem(generators._NOT_BUILT, "future_backend", "is not implemented yet")
    with pytest.raises(SystemExit) as exit_info:
        main(["-d", str(phantom_ct), "-g", backend, "-o", str(tmp_path / "out"), "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nnUNetv2_synth_quality: error:" in err and repr(backend) in err
    assert message + ", ".join(available_backends()) in err and "analytic" in available_backends()
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_learned_backend_without_its_checkpoint_is_a_clean_error(phantom_ct, tmp_path):
    missing = {"checkpoint": str(tmp_path / "missing.pth")}
    plan = load_synth_plan(phantom_ct, "3d_fullres").replace(backend_params=missing)
    with pytest.raises(QualityError, match="missing.pth does not exist; train it with: nnUNetv2_synth_train_generator"):
        assess_quality(phantom_ct, "ddpm", tmp_path / "out", synth_plan=plan, progress=False)
    assert not (tmp_path / "out").exists()


def test_model_without_fold_is_a_usage_error(phantom_ct, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["-d", str(phantom_ct), "-g", "analytic", "-o", str(tmp_path), "-m", str(tmp_path)])
    assert exit_info.value.code == 2 and "-m needs -f FOLD" in capsys.readouterr().err


def test_dataset_without_real_tumours_is_a_clear_error(phantom_healthy, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["-d", str(phantom_healthy), "-g", "analytic", "-o", str(tmp_path / "out"), "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert preprocessed_dir(phantom_healthy).name in err and "no real tumours to compare" in err
    assert not (tmp_path / "out").exists()
