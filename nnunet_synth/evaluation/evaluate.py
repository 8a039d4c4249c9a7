"""Evaluation of one or more prediction folders against a reference folder.

:func:`evaluate_case` computes everything about one case (all runs); :func:`aggregate` turns the
case records into size-group summaries with bootstrap intervals, lesion detection rates and paired
comparisons of every run against the first (the baseline); :func:`evaluate_folders` does both and
writes the report (``summary.json``, ``report.md``, PNGs) through :mod:`.report`.

Empty cases (see :mod:`.metrics` for the metric values): a case whose reference has no tumour has no
size group; it counts in the ``all`` group, where its Dice is NaN (excluded from the mean) if the
prediction is empty too and 0 if the prediction holds a false-positive tumour. The summary counts per
run and label how many cases had an empty reference, an empty prediction, or both.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from nnunet_synth.dataset_conversion.common import geometry_mismatch

from .cases import (
    detect_file_ending,
    guess_tumour_label,
    match_cases,
    read_segmentation,
    reader_for,
    resample_to_reference,
)
from .lesions import (
    AREA_GROUPS,
    DIAMETER_GROUPS,
    area_group,
    diameter_group,
    label_components,
    lesion_diameters,
    match_lesions,
)
from .metrics import HIGHER_IS_BETTER, METRICS, segmentation_metrics, slice_dice
from .statistics import bootstrap_ratio_ci, describe, paired_comparison

ALL = "all"


@dataclass
class EvaluationConfig:
    """Settings of an evaluation.

    Attributes:
        tumour_label: label value of the tumour in reference and predictions.
        organ_label: label value of the organ, evaluated as well when given.
        tolerance_mm: surface Dice tolerance in mm.
        n_bootstrap: bootstrap resamples for confidence intervals (0: none).
        confidence: confidence level of the intervals.
        seed: seed of the bootstrap Generator.
        lesion_iou: IoU a predicted component must exceed to detect a reference lesion (0: any overlap).
        slice_bins: for 3D data, also report per-slice Dice (slices along the first array axis) in the
            2D area bins; 2D data is always binned by area.
        resample_to_reference: resample a prediction whose voxel grid (spacing, origin, direction) differs
            from its reference onto the reference grid (nearest neighbour) instead of refusing it.
    """

    tumour_label: int = 1
    organ_label: int | None = None
    tolerance_mm: float = 5.0
    n_bootstrap: int = 10000
    confidence: float = 0.95
    seed: int = 0
    lesion_iou: float = 0.0
    slice_bins: bool = False
    resample_to_reference: bool = False


def _empty_status(n_reference: int, n_prediction: int) -> str:
    if n_reference and n_prediction:
        return "both_present"
    if n_reference:
        return "prediction_empty"
    return "reference_empty" if n_prediction else "both_empty"


def evaluate_case(
    case_id: str,
    reference_file: str,
    prediction_files: dict[str, str],
    file_ending: str,
    config: EvaluationConfig,
) -> dict:
    """Evaluates one case against the predictions of every run.

    Args:
        case_id: case identifier.
        reference_file: path of the reference segmentation.
        prediction_files: run name -> path of that run's prediction of the case.
        file_ending: file ending shared by all files (selects nnU-Net's reader).
        config: evaluation settings.

    Returns:
        The case record (JSON-ready apart from NaN): reference properties (tumour size, lesions, size
        groups) and per run the metrics of the tumour (and organ) label and the lesion matching.

    Raises:
        ValueError: naming the case and file, if a prediction differs from the reference in shape or
            spacing, or in origin or direction (naming both grids) unless ``config.resample_to_reference``.
    """
    reader = reader_for(file_ending, reference_file)
    ref = read_segmentation(reference_file, reader)
    tumour_ref = ref.array == config.tumour_label
    ref_labels, n_ref = label_components(tumour_ref)
    diameters = lesion_diameters(ref_labels, n_ref, ref.spacing)
    max_d = float(diameters.max()) if n_ref else float("nan")
    reference: dict = {
        "tumour_voxels": int(tumour_ref.sum()),
        "tumour_volume_mm3": float(tumour_ref.sum() * np.prod(ref.spacing)),
        "max_diameter_mm": max_d,
        "diameter_group": diameter_group(max_d),
        "lesions": [
            {"voxels": int(v), "diameter_mm": float(d), "diameter_group": diameter_group(float(d))}
            for v, d in zip(np.bincount(ref_labels.ravel(), minlength=n_ref + 1)[1:], diameters, strict=True)
        ],
    }
    if ref.is_2d:
        reference["area_pixels"] = int(tumour_ref.sum())
        reference["area_group"] = area_group(int(tumour_ref.sum()))
    slice_idx = None
    if config.slice_bins and not ref.is_2d:
        areas = tumour_ref.sum(axis=(1, 2))
        slice_idx = np.flatnonzero(areas)
        reference["slices"] = {
            "index": slice_idx.tolist(),
            "area_pixels": areas[slice_idx].tolist(),
            "area_group": [area_group(int(a)) for a in areas[slice_idx]],
        }
    record: dict = {
        "case": case_id,
        "reference_file": os.path.abspath(reference_file),
        "shape": list(ref.array.shape),
        "spacing": list(ref.spacing),
        "is_2d": ref.is_2d,
        "reference": reference,
        "runs": {},
    }
    for run, pred_file in prediction_files.items():
        pred = read_segmentation(pred_file, reader)
        resampled = False
        if pred.geometry is not None and ref.geometry is not None and \
                (differs := geometry_mismatch(ref.geometry, pred.geometry)) is not None:
            # voxel-by-voxel metrics on two grids would compare different places of the body
            if not config.resample_to_reference:
                raise ValueError(
                    f"case {case_id}: prediction {pred_file} and reference {reference_file} differ in "
                    f"{'shape' if differs == 'size' else differs} "
                    f"(prediction: {pred.geometry.describe()}; reference: {ref.geometry.describe()}); pass "
                    f"--resample-to-reference to resample predictions onto the reference grid (nearest neighbour)"
                )
            pred, resampled = resample_to_reference(pred, ref), True
        if pred.array.shape != ref.array.shape:
            raise ValueError(
                f"case {case_id}: prediction {pred_file} has shape {pred.array.shape}, "
                f"reference {reference_file} has {ref.array.shape}"
            )
        if not np.allclose(pred.spacing, ref.spacing, rtol=1e-3, atol=1e-5):
            raise ValueError(
                f"case {case_id}: prediction {pred_file} has spacing {pred.spacing}, "
                f"reference {reference_file} has {ref.spacing}"
            )
        tumour_pred = pred.array == config.tumour_label
        tumour = segmentation_metrics(tumour_ref, tumour_pred, ref.spacing, config.tolerance_mm)
        tumour["status"] = _empty_status(tumour["n_reference"], tumour["n_prediction"])
        pred_labels, n_pred = label_components(tumour_pred)
        match = match_lesions(ref_labels, n_ref, pred_labels, n_pred, config.lesion_iou)
        entry: dict = {
            "prediction_file": os.path.abspath(pred_file),
            "resampled_to_reference": resampled,
            "tumour": tumour,
            "lesions": {
                "n_reference": match["n_reference"],
                "n_prediction": match["n_prediction"],
                "n_detected": match["n_detected"],
                "n_matched_predictions": match["n_matched_predictions"],
                "detected": match["detected"].tolist(),
                "best_iou": match["best_iou"].tolist(),
            },
        }
        if config.organ_label is not None:
            organ = segmentation_metrics(
                ref.array == config.organ_label, pred.array == config.organ_label, ref.spacing, config.tolerance_mm
            )
            organ["status"] = _empty_status(organ["n_reference"], organ["n_prediction"])
            entry["organ"] = organ
        if slice_idx is not None:
            entry["slice_dice"] = slice_dice(tumour_ref[slice_idx], tumour_pred[slice_idx]).tolist()
        record["runs"][run] = entry
    return record


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Runs the block with one torch thread (restored afterwards).

    MONAI's tensors here are small (cropped to the masks); several torch threads per process only
    spin, and on a busy machine that costs several times the CPU time. Parallelise over cases instead.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _evaluate_case_star(args: tuple) -> dict:
    with single_torch_thread():
        return evaluate_case(*args)


def _groupings(cases: list[dict]) -> dict[str, dict[str, list[int]]]:
    """grouping name -> group -> indices of the cases in it (``all`` holds every case)."""
    everyone = list(range(len(cases)))
    diam = {g: [i for i, c in enumerate(cases) if c["reference"]["diameter_group"] == g] for g in DIAMETER_GROUPS}
    out = {"diameter": {**diam, ALL: everyone}}
    if cases and all(c["is_2d"] for c in cases):
        area = {g: [i for i, c in enumerate(cases) if c["reference"].get("area_group") == g] for g in AREA_GROUPS}
        out["area"] = {**area, ALL: everyone}
    return out


def _metric_values(cases: list[dict], idx: list[int], run: str, kind: str, metric: str) -> np.ndarray:
    return np.array([cases[i]["runs"][run][kind][metric] for i in idx], dtype=np.float64)


def _status_counts(cases: list[dict], run: str, kind: str) -> dict[str, int]:
    names = ("both_present", "prediction_empty", "reference_empty", "both_empty")
    statuses = [c["runs"][run][kind]["status"] for c in cases]
    return {n: statuses.count(n) for n in names}


def _lesion_detection(cases: list[dict], run: str, config: EvaluationConfig) -> dict:
    """Pooled lesion recall per lesion-size group and pooled lesion precision, with case-bootstrap CIs."""
    out: dict = {}
    for group in (*DIAMETER_GROUPS, ALL):
        num, den = [], []
        for c in cases:
            detected = c["runs"][run]["lesions"]["detected"]
            in_group = [group == ALL or les["diameter_group"] == group for les in c["reference"]["lesions"]]
            num.append(sum(d for d, g in zip(detected, in_group, strict=True) if g))
            den.append(sum(in_group))
        n_les, n_det = int(sum(den)), int(sum(num))
        low, high = bootstrap_ratio_ci(num, den, config.n_bootstrap, config.confidence, config.seed)
        out[group] = {
            "n_lesions": n_les,
            "n_detected": n_det,
            "recall": n_det / n_les if n_les else float("nan"),
            "ci_low": low,
            "ci_high": high,
        }
    num = [c["runs"][run]["lesions"]["n_matched_predictions"] for c in cases]
    den = [c["runs"][run]["lesions"]["n_prediction"] for c in cases]
    low, high = bootstrap_ratio_ci(num, den, config.n_bootstrap, config.confidence, config.seed)
    out[ALL].update(
        n_predicted_components=int(sum(den)),
        n_matched_components=int(sum(num)),
        precision=sum(num) / sum(den) if sum(den) else float("nan"),
        precision_ci_low=low,
        precision_ci_high=high,
    )
    return out


def _slice_area_summary(cases: list[dict], run: str, config: EvaluationConfig) -> dict:
    """Mean per-slice Dice per area group (3D data with slice bins), CIs by resampling cases."""
    out: dict = {}
    for group in (*AREA_GROUPS, ALL):
        sums, counts = [], []
        for c in cases:
            groups = c["reference"]["slices"]["area_group"]
            values = [d for d, g in zip(c["runs"][run]["slice_dice"], groups, strict=True)
                      if (group == ALL or g == group) and np.isfinite(d)]
            sums.append(float(np.sum(values)) if values else 0.0)
            counts.append(len(values))
        n = int(sum(counts))
        low, high = bootstrap_ratio_ci(sums, counts, config.n_bootstrap, config.confidence, config.seed)
        out[group] = {
            "mean": sum(sums) / n if n else float("nan"),
            "ci_low": low,
            "ci_high": high,
            "n_slices": n,
            "n_cases": int(np.count_nonzero(counts)),
        }
    return out


def aggregate(cases: list[dict], runs: Sequence[str], config: EvaluationConfig) -> dict:
    """Size-group summaries, lesion detection and paired comparisons of evaluated cases.

    Args:
        cases: records from :func:`evaluate_case`, one per case, in a fixed order.
        runs: run names; the first is the baseline of the paired comparisons.
        config: evaluation settings.

    Returns:
        dict with ``groups`` (grouping -> group -> case identifiers), ``metrics`` (run -> label kind ->
        grouping -> group -> metric -> :func:`.statistics.describe` result), ``empty_cases`` (run ->
        label kind -> counts), ``lesion_detection`` (run -> group -> pooled rates), ``slice_area``
        (run -> area group -> pooled per-slice Dice; 3D data with slice bins only) and ``comparisons``
        (one per non-baseline run: label kind -> grouping -> group -> metric -> paired test result, and
        ``differences``: label kind -> metric -> case -> candidate minus baseline, NaN where undefined).
    """
    groupings = _groupings(cases)
    kinds = ["tumour"] + (["organ"] if config.organ_label is not None else [])
    boot = {"n_resamples": config.n_bootstrap, "confidence": config.confidence, "seed": config.seed}
    metrics: dict = {}
    empty: dict = {}
    for run in runs:
        metrics[run] = {}
        empty[run] = {}
        for kind in kinds:
            empty[run][kind] = _status_counts(cases, run, kind)
            metrics[run][kind] = {
                grouping: {
                    group: {m: describe(_metric_values(cases, idx, run, kind, m), **boot) for m in METRICS}
                    for group, idx in groups.items()
                }
                for grouping, groups in groupings.items()
            }
    comparisons = []
    for run in runs[1:]:
        comp: dict = {"baseline": runs[0], "candidate": run, "differences": {}}
        everyone = list(range(len(cases)))
        for kind in kinds:
            comp["differences"][kind] = {
                m: dict(zip(
                    [c["case"] for c in cases],
                    (_metric_values(cases, everyone, run, kind, m)
                     - _metric_values(cases, everyone, runs[0], kind, m)).tolist(),
                    strict=True,
                ))
                for m in METRICS
            }
            comp[kind] = {
                grouping: {
                    group: {
                        m: paired_comparison(
                            _metric_values(cases, idx, runs[0], kind, m),
                            _metric_values(cases, idx, run, kind, m),
                            higher_is_better=HIGHER_IS_BETTER[m],
                            **boot,
                        )
                        for m in METRICS
                    }
                    for group, idx in groups.items()
                }
                for grouping, groups in groupings.items()
            }
        comparisons.append(comp)
    out = {
        "groups": {
            grouping: {group: [cases[i]["case"] for i in idx] for group, idx in groups.items()}
            for grouping, groups in groupings.items()
        },
        "cases_without_tumour": [c["case"] for c in cases if c["reference"]["diameter_group"] is None],
        "metrics": metrics,
        "empty_cases": empty,
        "lesion_detection": {run: _lesion_detection(cases, run, config) for run in runs},
        "comparisons": comparisons,
    }
    if cases and all("slices" in c["reference"] for c in cases):
        out["slice_area"] = {run: _slice_area_summary(cases, run, config) for run in runs}
    return out


def unique_run_names(prediction_folders: Sequence[str]) -> list[str]:
    """Run names from folder names, made unique with the parent folder name or a number."""
    names = [os.path.basename(os.path.normpath(f)) for f in prediction_folders]
    for i, name in enumerate(names):
        if names.count(name) > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(os.path.normpath(prediction_folders[i]))))
            names[i] = f"{parent}/{name}"
    for i, name in enumerate(list(names)):
        if names[:i].count(name):
            names[i] = f"{name}_{i + 1}"
    return names


def evaluate_folders(
    reference_folder: str,
    prediction_folders: Sequence[str],
    output_folder: str,
    config: EvaluationConfig | None = None,
    run_names: Sequence[str] | None = None,
    file_ending: str | None = None,
    num_processes: int = 1,
    progress: bool = True,
    label_note: str | None = None,
) -> dict:
    """Evaluates prediction folders against a reference folder and writes the report.

    Args:
        reference_folder: folder of reference segmentations (e.g. ``labelsTs``).
        prediction_folders: one folder per run, holding files named as in the reference folder.
        output_folder: where ``summary.json``, ``report.md`` and the PNGs go (created).
        config: evaluation settings; None guesses the tumour label from dataset.json (see
            :func:`.cases.guess_tumour_label`) and uses the defaults otherwise.
        run_names: display names of the runs (default: the folder names).
        file_ending: file ending of the segmentations (default: the most common one in the reference
            folder).
        num_processes: worker processes for the per-case metrics.
        progress: show a progress bar over cases.
        label_note: how the tumour label was chosen, recorded in the summary.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        FileNotFoundError: if a folder is missing or a prediction folder lacks a reference case.
        ValueError: on mismatched shapes or spacings (naming the case), or bad arguments.
    """
    from .report import write_report  # matplotlib only where a report is written

    prediction_folders = list(prediction_folders)
    if not prediction_folders:
        raise ValueError("give at least one prediction folder")
    if config is None:
        label, label_note = guess_tumour_label(reference_folder, prediction_folders)
        config = EvaluationConfig(tumour_label=label)
    runs = list(run_names) if run_names else unique_run_names(prediction_folders)
    if len(runs) != len(prediction_folders) or len(set(runs)) != len(runs):
        raise ValueError(f"need {len(prediction_folders)} distinct run names, got {runs}")
    file_ending = file_ending or detect_file_ending(reference_folder)
    case_ids, ref_files, pred_files = match_cases(reference_folder, prediction_folders, file_ending)
    os.makedirs(output_folder, exist_ok=True)  # an unwritable output folder fails now, not after the evaluation
    jobs = [
        (c, ref_files[c], {run: files[c] for run, files in zip(runs, pred_files, strict=True)}, file_ending, config)
        for c in case_ids
    ]
    bar = {"total": len(jobs), "desc": "evaluating cases", "unit": "case", "disable": not progress}
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            cases = list(tqdm(pool.imap(_evaluate_case_star, jobs), **bar))
    else:
        with single_torch_thread():
            cases = [evaluate_case(*job) for job in tqdm(jobs, **bar)]
    summary = {
        "config": {
            **asdict(config),
            "reference_folder": os.path.abspath(reference_folder),
            "prediction_folders": [os.path.abspath(f) for f in prediction_folders],
            "file_ending": file_ending,
            "label_note": label_note,
        },
        "runs": runs,
        "baseline": runs[0],
        "n_cases": len(cases),
        **aggregate(cases, runs, config),
        "cases": cases,
    }
    write_report(summary, output_folder)
    return summary
