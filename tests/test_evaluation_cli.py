"""End to end: ``nnUNetv2_synth_evaluate`` on tiny NIfTI and PNG folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_synth.evaluation.cases import guess_tumour_label
from nnunet_synth.evaluation.cli import evaluate_entry
from nnunet_synth.evaluation.evaluate import EvaluationConfig, evaluate_folders

SPACING_ZYX = (2.5, 0.8, 0.8)
SHAPE = (32, 100, 100)
CENTRE = (40.0, 40.0, 40.0)
#: case -> reference lesions (centre mm, radius mm): 2 small, 3 medium (one with two lesions), 1 large, 1 empty
LESIONS = {
    "case_00": [(CENTRE, 6.0)],
    "case_01": [(CENTRE, 8.0)],
    "case_02": [(CENTRE, 15.0)],
    "case_03": [(CENTRE, 20.0)],
    "case_04": [(CENTRE, 30.0)],
    "case_05": [((40.0, 20.0, 20.0), 5.0), ((40.0, 52.0, 52.0), 12.0)],
    "case_06": [],
}
EXPECTED_GROUPS = {
    "<=2cm": ["case_00", "case_01"],
    "2-5cm": ["case_02", "case_03", "case_05"],
    ">5cm": ["case_04"],
    "all": sorted(LESIONS),
}


def _ellipsoid(centre_mm, radii_mm) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING_ZYX, strict=True)], indexing="ij",
                        sparse=True)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre_mm, radii_mm, strict=True)) <= 1


def _write_nifti(seg: np.ndarray, path: str) -> None:
    img = sitk.GetImageFromArray(seg.astype(np.uint8))
    img.SetSpacing(SPACING_ZYX[::-1])  # SimpleITK takes x, y, z
    sitk.WriteImage(img, path)


def make_dataset(root: str) -> None:
    """labelsTs (organ 1, tumour 2) and two prediction folders: ``pred_base`` under-segments every tumour,
    misses case_00 and adds a false positive to case_06; ``pred_new`` is closer on every case."""
    organ = _ellipsoid(CENTRE, (39.0, 39.0, 39.0))
    runs = {"labelsTs": None, "pred_base": 2.5, "pred_new": 1.0}
    for folder in runs:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for case, lesions in LESIONS.items():
        for folder, shrink in runs.items():
            seg = organ.astype(np.uint8)
            for centre, r in lesions:
                if folder == "pred_base" and case == "case_00":
                    continue
                radii = (r, r, r) if shrink is None else (r - shrink, r - shrink / 2, r)
                seg[_ellipsoid(centre, radii)] = 2
            if folder == "pred_base" and case == "case_06":
                seg[_ellipsoid((40.0, 30.0, 50.0), (4.0, 4.0, 4.0))] = 2
            _write_nifti(seg, os.path.join(root, folder, f"{case}.nii.gz"))
    with open(os.path.join(root, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump({"labels": {"background": 0, "liver": 1, "liver tumour": 2}, "file_ending": ".nii.gz"}, f)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("eval3d"))
    make_dataset(root)
    return root


def _read(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _no_nan(token: str):
    raise AssertionError(f"summary.json holds the non-JSON constant {token}")


def _command() -> list[str]:
    exe = shutil.which("nnUNetv2_synth_evaluate")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from nnunet_synth.evaluation.cli import evaluate_entry; "
            "sys.exit(evaluate_entry())"]


@pytest.fixture(scope="module")
def cli_run(dataset) -> tuple[str, dict, subprocess.CompletedProcess]:
    out = os.path.join(dataset, "report")
    cmd = _command() + [
        "-ref", os.path.join(dataset, "labelsTs"),
        "-pred", os.path.join(dataset, "pred_base"), os.path.join(dataset, "pred_new"),
        "-l", "2", "--organ-label", "1", "--tolerance-mm", "5", "--bootstrap", "2000", "-np", "2", "-o", out,
    ]
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.loads(f.read(), parse_constant=_no_nan)
    return out, summary, proc


def test_cli_case_metrics_match_numpy(dataset, cli_run):
    _, summary, _ = cli_run
    assert summary["n_cases"] == 7 and summary["runs"] == ["pred_base", "pred_new"]
    assert summary["config"]["tumour_label"] == 2 and summary["config"]["organ_label"] == 1
    for case in summary["cases"]:
        assert case["spacing"] == pytest.approx(list(SPACING_ZYX))
        ref = _read(os.path.join(dataset, "labelsTs", case["case"] + ".nii.gz"))
        for run in summary["runs"]:
            pred = _read(os.path.join(dataset, run, case["case"] + ".nii.gz"))
            for kind, label in (("tumour", 2), ("organ", 1)):
                r, p = ref == label, pred == label
                m = case["runs"][run][kind]
                denom = r.sum() + p.sum()
                if denom == 0:
                    assert m["dice"] is None  # both empty: NaN in memory, null in JSON
                else:
                    assert m["dice"] == pytest.approx(2 * np.sum(r & p) / denom, rel=1e-6)
                assert m["tp"] == np.sum(r & p) and m["fp"] == np.sum(~r & p) and m["fn"] == np.sum(r & ~p)
                if r.any() and p.any():
                    assert 0 <= m["hd95"] <= m["hd"]
                else:
                    assert m["hd"] is None and m["hd95"] is None and m["assd"] is None


def test_cli_groups_empty_cases_and_lesions(cli_run):
    _, summary, _ = cli_run
    assert summary["groups"]["diameter"] == EXPECTED_GROUPS
    assert summary["cases_without_tumour"] == ["case_06"]
    assert "area" not in summary["groups"]  # 3D data
    assert summary["empty_cases"]["pred_base"]["tumour"] == {
        "both_present": 5, "prediction_empty": 1, "reference_empty": 1, "both_empty": 0}
    assert summary["empty_cases"]["pred_new"]["tumour"] == {
        "both_present": 6, "prediction_empty": 0, "reference_empty": 0, "both_empty": 1}
    base, new = summary["lesion_detection"]["pred_base"], summary["lesion_detection"]["pred_new"]
    assert (base["all"]["n_lesions"], base["all"]["n_detected"]) == (7, 6)
    assert (base["<=2cm"]["n_lesions"], base["<=2cm"]["n_detected"]) == (3, 2)  # case_05's 5 mm lesion is small
    assert (base["all"]["n_predicted_components"], base["all"]["n_matched_components"]) == (7, 6)
    assert (new["all"]["n_detected"], new["all"]["precision"]) == (7, 1.0)


def test_cli_aggregates_and_paired_tests(cli_run):
    _, summary, _ = cli_run
    by_case = {c["case"]: c for c in summary["cases"]}
    for run in summary["runs"]:
        for group, members in summary["groups"]["diameter"].items():
            values = [by_case[c]["runs"][run]["tumour"]["dice"] for c in members]
            values = np.array([np.nan if v is None else v for v in values], dtype=float)
            d = summary["metrics"][run]["tumour"]["diameter"][group]["dice"]
            assert d["mean"] == pytest.approx(np.nanmean(values))
            assert d["n"] == np.isfinite(values).sum()
            if d["n"] >= 2:
                assert d["ci_low"] <= d["mean"] <= d["ci_high"]
            else:
                assert d["ci_low"] is None
    comp = summary["comparisons"][0]
    assert (comp["baseline"], comp["candidate"]) == ("pred_base", "pred_new")
    dice = comp["tumour"]["diameter"]["all"]["dice"]
    assert (dice["n"], dice["n_improved"], dice["n_worse"], dice["n_tied"]) == (6, 6, 0, 0)
    assert dice["wilcoxon_p"] == pytest.approx(1 / 64)  # exact one-tailed: all 6 pairs improved
    assert dice["mean_difference"] > 0 and dice["ttest_p"] < 0.1
    assert comp["tumour"]["diameter"]["all"]["assd"]["alternative"] == "less"
    diffs = comp["differences"]["tumour"]["dice"]
    assert diffs["case_06"] is None  # new run: both empty (NaN), so no paired difference
    assert by_case["case_00"]["runs"]["pred_base"]["tumour"]["dice"] == 0.0  # missed tumour
    assert diffs["case_00"] == pytest.approx(by_case["case_00"]["runs"]["pred_new"]["tumour"]["dice"])
    assert sum(v > 0 for v in diffs.values() if v is not None) == dice["n_improved"]


def test_cli_report_files(cli_run):
    out, summary, _ = cli_run
    figures = summary["report_files"]["figures"]
    assert figures == ["dice_by_size.png", "dice_difference_pred_new_vs_pred_base.png"]
    for name in figures:
        img = matplotlib.image.imread(os.path.join(out, name))
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
        assert np.ptp(img[..., :3]) > 0.5  # something was drawn
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        md = f.read()
    assert "| Run | ≤ 2 cm (n=2): Dice | 95% CI | > 2 cm, ≤ 5 cm (n=3): Dice | 95% CI | > 5 cm (n=1): Dice" in md
    for run in summary["runs"]:
        cells = [f"`{run}`"]
        for group in ("<=2cm", "2-5cm", ">5cm", "all"):
            d = summary["metrics"][run]["tumour"]["diameter"][group]["dice"]
            cells.append(f"{100 * d['mean']:.1f}")
            cells.append("–" if d["ci_low"] is None else f"[{100 * d['ci_low']:.1f}, {100 * d['ci_high']:.1f}]")
        assert "| " + " | ".join(cells) + " |" in md
    assert "## Paired comparison with the baseline" in md
    assert "![dice_by_size](dice_by_size.png)" in md


def test_missing_prediction_names_the_case(dataset, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(os.path.join(dataset, "pred_new"), partial)
    os.remove(partial / "case_03.nii.gz")
    with pytest.raises(SystemExit) as exc:
        evaluate_entry(["-ref", os.path.join(dataset, "labelsTs"), "-pred", str(partial), "-l", "2",
                        "-o", str(tmp_path / "out"), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "case_03.nii.gz" in err and str(partial) in err and "case_02" not in err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_shape_mismatch_names_the_case(dataset, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(os.path.join(dataset, "pred_new"), bad)
    _write_nifti(np.zeros((4, 5, 6), np.uint8), str(bad / "case_01.nii.gz"))
    with pytest.raises(SystemExit):
        evaluate_entry(["-ref", os.path.join(dataset, "labelsTs"), "-pred", str(bad), "-l", "2",
                        "-o", str(tmp_path / "out"), "--quiet", "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert "case_01" in err and "shape" in err


def test_slice_bins_in_process(dataset, tmp_path):
    config = EvaluationConfig(tumour_label=2, n_bootstrap=200, slice_bins=True)
    summary = evaluate_folders(os.path.join(dataset, "labelsTs"), [os.path.join(dataset, "pred_new")],
                               str(tmp_path), config=config, progress=False)
    sums: dict[str, list[float]] = {}
    for case in LESIONS:
        ref = _read(os.path.join(dataset, "labelsTs", f"{case}.nii.gz")) == 2
        pred = _read(os.path.join(dataset, "pred_new", f"{case}.nii.gz")) == 2
        for z in np.flatnonzero(ref.any(axis=(1, 2))):
            area = int(ref[z].sum())
            group = next(g for g, lo in zip(("very large", "large", "medium", "small", "tiny"),
                                            (1600, 700, 400, 200, 1), strict=True) if area >= lo)
            sums.setdefault(group, []).append(2 * np.sum(ref[z] & pred[z]) / (ref[z].sum() + pred[z].sum()))
    got = summary["slice_area"]["pred_new"]
    assert set(sums) >= {"tiny", "small", "medium", "large", "very large"}
    for group, values in sums.items():
        assert got[group]["n_slices"] == len(values)
        assert got[group]["mean"] == pytest.approx(np.mean(values), rel=1e-6)
    assert got["all"]["n_slices"] == sum(len(v) for v in sums.values())
    assert summary["comparisons"] == []
    assert summary["report_files"]["figures"] == ["dice_by_size.png"]  # one run: no difference histogram


def _write_png(seg: np.ndarray, path: str) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(seg.astype(np.uint8)), path)


def test_png_2d_area_groups(tmp_path):
    """2D data (PNG, read with nnU-Net's NaturalImage2DIO): area bins per case, 2D distances."""
    radii = {"img_tiny": 6, "img_small": 9, "img_medium": 12, "img_large": 18, "img_vlarge": 26}
    yy, xx = np.mgrid[:64, :64]
    for folder in ("ref", "pred"):
        os.makedirs(tmp_path / folder)
        for case, r in radii.items():
            disk = (yy - 32) ** 2 + (xx - 32) ** 2 <= (r if folder == "ref" else r - 1) ** 2
            _write_png(disk.astype(np.uint8), str(tmp_path / folder / f"{case}.png"))
    assert evaluate_entry(["-ref", str(tmp_path / "ref"), "-pred", str(tmp_path / "pred"), "-o",
                           str(tmp_path / "out"), "--bootstrap", "500", "--quiet"]) == 0
    with open(tmp_path / "out" / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["config"]["tumour_label"] == 1  # no dataset.json: label 1
    assert summary["config"]["file_ending"] == ".png"
    groups = summary["groups"]["area"]
    assert [groups[g] for g in ("tiny", "small", "medium", "large", "very large")] == [
        ["img_tiny"], ["img_small"], ["img_medium"], ["img_large"], ["img_vlarge"]]
    for case in summary["cases"]:
        assert case["is_2d"] and case["spacing"] == [1.0, 1.0]
        r = radii[case["case"]]
        area = int(((yy - 32) ** 2 + (xx - 32) ** 2 <= r**2).sum())
        assert case["reference"]["area_pixels"] == area
        m = case["runs"]["pred"]["tumour"]
        assert m["hd"] == pytest.approx(1.0, abs=0.5)  # one pixel of erosion on a unit grid
        assert m["recall"] < 1.0 and m["precision"] == 1.0
    assert "dice_by_area.png" in summary["report_files"]["figures"]
    assert os.path.isfile(tmp_path / "out" / "dice_by_area.png")


def test_guess_tumour_label(tmp_path):
    ref = tmp_path / "labelsTs"
    ref.mkdir()
    assert guess_tumour_label(str(ref), [])[0] == 1
    with open(tmp_path / "dataset.json", "w", encoding="utf-8") as f:
        json.dump({"labels": {"background": 0, "pancreas": 1, "pancreatic tumor": 2}}, f)
    assert guess_tumour_label(str(ref), [])[0] == 2
    with open(tmp_path / "dataset.json", "w", encoding="utf-8") as f:
        json.dump({"labels": {"background": 0, "kidney": 1, "cyst": 2}}, f)
    with pytest.raises(ValueError, match="-l"):
        guess_tumour_label(str(ref), [])
