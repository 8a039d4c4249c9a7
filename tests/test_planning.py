"""The synth plan: label guessing, clear errors, statistics from nnU-Net's preprocessed data."""

import json
import subprocess

import numpy as np
import pytest

from nnunet_synth.planning import (
    SYNTH_PLANS_FILE,
    SynthPlanError,
    guess_labels,
    load_synth_plan,
    plan_synth,
    preprocessed_dir,
)


@pytest.mark.parametrize("labels, expected", [
    ({"background": 0, "liver": 1, "tumour": 2}, (1, 2)),
    ({"background": 0, "pancreas": 1, "cancer": 2}, (1, 2)),
    ({"background": 0, "Lesion": 3, "Kidney": 1, "cyst": 2}, (1, 3)),
    ({"background": 0, "breast": 2, "mass": 1}, (2, 1)),
])
def test_labels_are_guessed_from_names(labels, expected):
    assert guess_labels(labels) == expected


def test_unidentifiable_organ_lists_labels_and_flag():
    with pytest.raises(SynthPlanError) as err:
        guess_labels({"background": 0, "thing": 1, "tumor": 2})
    assert "1='thing'" in str(err.value) and "--organ-label" in str(err.value)


def test_given_labels_win_and_are_checked():
    assert guess_labels({"background": 0, "thing": 1, "tumor": 2}, organ_label=1) == (1, 2)
    with pytest.raises(SynthPlanError, match="--tumour-label 7 is not a foreground label"):
        guess_labels({"background": 0, "liver": 1, "tumor": 2}, tumour_label=7)


def test_region_datasets_are_refused():
    with pytest.raises(SynthPlanError, match="region"):
        guess_labels({"background": 0, "whole tumour": [1, 2, 3], "core": [2, 3]})


def test_plan_of_ct_phantom_has_hypodense_contrast_and_sizes(phantom_ct):
    path = plan_synth(phantom_ct)
    assert path.name == SYNTH_PLANS_FILE and path.parent == preprocessed_dir(phantom_ct)
    plan = load_synth_plan(phantom_ct, "3d_fullres", create=False)
    assert (plan.organ_label, plan.tumour_label) == (1, 2)
    sizes = plan.tumour_sizes
    assert sizes.count >= 4 and plan.shapes.size_preset == "quartile"
    d = sizes.equivalent_diameter_mm
    assert d["min"] <= d["q25"] <= d["median"] <= d["q75"] <= d["max"]
    assert 5 < d["median"] < 25  # the phantom's tumour radii are 4-8 mm
    (channel,) = plan.channels
    lo, hi = channel.contrast_range
    # phantom tumour 20 HU vs organ 90 HU, CT-normalised by the foreground std (tens of HU)
    assert lo <= hi < 0 and "real tumours" in channel.contrast_source
    assert channel.clip is not None and channel.clip[0] < lo


def test_healthy_ct_dataset_gets_the_ct_default(phantom_healthy):
    plan = load_synth_plan(phantom_healthy, "3d_fullres")  # created on demand, as a trainer does
    assert plan.tumour_sizes.count == 0 and plan.shapes.size_preset == "labelfree"
    (channel,) = plan.channels
    assert channel.contrast_source.startswith("CT default")
    lo, hi = channel.contrast_range
    assert lo < hi < 0


def test_mri_plan_has_one_contrast_per_channel_with_the_right_sign(phantom_mri):
    plan = load_synth_plan(phantom_mri, "3d_fullres")
    t1, t2 = plan.channels
    assert max(t1.contrast_range) < 0 < min(t2.contrast_range)  # T1 dark, T2 bright tumours
    assert t1.clip is None and t1.normalization == "ZScoreNormalization"


def test_plan_command_error_names_labels_and_flag(phantom_ct):
    result = subprocess.run(["nnUNetv2_synth_plan", "-d", str(phantom_ct), "--organ-label", "5"],
                            capture_output=True, encoding="utf-8", errors="replace")
    assert result.returncode == 2
    assert "--organ-label 5 is not a foreground label" in result.stderr and "1='organ'" in result.stderr


def test_plan_command_writes_json_and_keeps_manual_edits(phantom_ct):
    path = preprocessed_dir(phantom_ct) / SYNTH_PLANS_FILE
    plan_synth(phantom_ct)
    edited = json.loads(path.read_text(encoding="utf-8"))
    edited["placement"]["margin_mm"] = 4.5
    path.write_text(json.dumps(edited), encoding="utf-8")
    subprocess.run(["nnUNetv2_synth_plan", "-d", str(phantom_ct)], check=True, capture_output=True)
    assert json.loads(path.read_text(encoding="utf-8"))["placement"]["margin_mm"] == 4.5
    assert np.isfinite(json.loads(path.read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["spacing"]).all()


def test_missing_preprocessing_is_a_clear_error(nnunet_dirs):
    from nnunet_synth.phantom import write_phantom_dataset

    from .conftest import TINY

    write_phantom_dataset(909, 2, 0, config=TINY)
    with pytest.raises(SynthPlanError, match="nnUNetv2_plan_and_preprocess -d 909"):
        plan_synth(909)
