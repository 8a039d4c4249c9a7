"""Report files of an evaluation: ``summary.json``, ``report.md`` and PNG plots.

The Markdown tables follow the layout of the papers' tables: one row per run, one column pair
(Dice, 95% CI) per tumour-size group, values in percent.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from nnunet_synth.files import process_tag, remove_stale, replace_report  # noqa: E402

from .lesions import AREA_GROUP_TITLES, AREA_GROUPS, DIAMETER_GROUP_TITLES, DIAMETER_GROUPS  # noqa: E402
from .metrics import METRICS  # noqa: E402

SUMMARY_FILE = "summary.json"
MARKDOWN_FILE = "report.md"

METRIC_TITLES: dict[str, str] = {
    "dice": "Dice (%)",
    "hd95": "HD95 (mm)",
    "hd": "HD (mm)",
    "assd": "ASSD (mm)",
    "surface_dice": "Surface Dice (%)",
    "precision": "Precision (%)",
    "recall": "Recall (%)",
}
PERCENT_METRICS = frozenset({"dice", "surface_dice", "precision", "recall"})
GROUP_TITLES: dict[str, str] = {**DIAMETER_GROUP_TITLES, **AREA_GROUP_TITLES, "all": "All Sizes"}
GROUPING_ORDER: dict[str, tuple[str, ...]] = {"diameter": DIAMETER_GROUPS, "area": AREA_GROUPS}


def to_jsonable(obj: object) -> object:
    """Converts numpy types to Python ones and NaN/inf to None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _scale(metric: str) -> float:
    return 100.0 if metric in PERCENT_METRICS else 1.0


def _num(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value * scale:.{digits}f}"


def _ci(low: float | None, high: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "–"
    return f"[{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def _p(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _group_table(summary: dict, grouping: str, kind: str = "tumour") -> list[str]:
    groups = [*GROUPING_ORDER[grouping], "all"]
    sizes = {g: len(summary["groups"][grouping][g]) for g in groups}
    header = ["Run"]
    for g in groups:
        header += [f"{GROUP_TITLES[g]} (n={sizes[g]}): Dice", "95% CI"]
    rows = []
    for run in summary["runs"]:
        row = [f"`{run}`"]
        for g in groups:
            d = summary["metrics"][run][kind][grouping][g]["dice"]
            row += [_num(d["mean"], 100), _ci(d["ci_low"], d["ci_high"], 100)]
        rows.append(row)
    return _table(header, rows, [":--"] + ["--:", ":-:"] * len(groups))


def _all_metrics_table(summary: dict, kind: str) -> list[str]:
    tol = summary["config"]["tolerance_mm"]
    header = ["Run"] + [
        METRIC_TITLES[m].replace("Surface Dice", f"Surface Dice @ {tol:g} mm") for m in METRICS
    ]
    if kind == "tumour":
        header += ["Lesion recall (%)", "Lesion precision (%)"]
    rows = []
    for run in summary["runs"]:
        row = [f"`{run}`"]
        for m in METRICS:
            d = summary["metrics"][run][kind]["diameter"]["all"][m]
            digits = 1 if m in PERCENT_METRICS else 2
            row.append(f"{_num(d['mean'], _scale(m), digits)} {_ci(d['ci_low'], d['ci_high'], _scale(m), digits)}")
        if kind == "tumour":
            det = summary["lesion_detection"][run]["all"]
            row.append(f"{_num(det['recall'], 100)} ({det['n_detected']}/{det['n_lesions']})")
            row.append(
                f"{_num(det['precision'], 100)} ({det['n_matched_components']}/{det['n_predicted_components']})"
            )
        rows.append(row)
    return _table(header, rows, [":--"] + ["--:"] * (len(header) - 1))


def _empty_table(summary: dict, kind: str) -> list[str]:
    rows = []
    for run in summary["runs"]:
        e = summary["empty_cases"][run][kind]
        rows.append([f"`{run}`", str(e["prediction_empty"]), str(e["reference_empty"]), str(e["both_empty"])])
    header = ["Run", "Reference only (missed)", "Prediction only (false positive)", "Both empty"]
    return _table(header, rows, [":--", "--:", "--:", "--:"])


def _lesion_table(summary: dict) -> list[str]:
    groups = [*DIAMETER_GROUPS, "all"]
    header = ["Run"] + [f"{GROUP_TITLES[g]}: lesion recall (%)" for g in groups] + ["Lesion precision (%)"]
    rows = []
    for run in summary["runs"]:
        det = summary["lesion_detection"][run]
        row = [f"`{run}`"]
        for g in groups:
            d = det[g]
            ci = _ci(d["ci_low"], d["ci_high"], 100)
            row.append(f"{_num(d['recall'], 100)} ({d['n_detected']}/{d['n_lesions']}) {ci}")
        a = det["all"]
        row.append(
            f"{_num(a['precision'], 100)} ({a['n_matched_components']}/{a['n_predicted_components']}) "
            f"{_ci(a['precision_ci_low'], a['precision_ci_high'], 100)}"
        )
        rows.append(row)
    return _table(header, rows, [":--"] + ["--:"] * (len(header) - 1))


def _comparison_tables(summary: dict, kind: str = "tumour") -> list[str]:
    lines: list[str] = []
    rows = []
    for comp in summary["comparisons"]:
        for grouping in summary["groups"]:
            for g in [*GROUPING_ORDER[grouping], "all"]:
                if grouping != "diameter" and g == "all":
                    continue
                c = comp[kind][grouping][g]["dice"]
                rows.append([
                    f"`{comp['candidate']}` vs `{comp['baseline']}`", GROUP_TITLES[g], str(c["n"]),
                    f"{_num(c['mean_difference'], 100)} {_ci(c['ci_low'], c['ci_high'], 100)}",
                    f"{c['n_improved']} / {c['n_worse']} / {c['n_tied']}", _p(c["ttest_p"]), _p(c["wilcoxon_p"]),
                ])
    header = ["Comparison", "Group", "n", "Mean ΔDice (pp) [95% CI]", "Improved / worse / tied",
              "Paired t-test p (one-tailed)", "Wilcoxon p (one-tailed)"]
    lines += _table(header, rows, [":--", ":--", "--:", "--:", ":-:", "--:", "--:"])
    lines += ["", "All cases, every metric (Δ = candidate − baseline; improved means higher Dice-like metrics, "
              "lower distances):", ""]
    rows = []
    for comp in summary["comparisons"]:
        for m in METRICS:
            c = comp[kind]["diameter"]["all"][m]
            digits = 1 if m in PERCENT_METRICS else 2
            rows.append([
                f"`{comp['candidate']}` vs `{comp['baseline']}`", METRIC_TITLES[m].replace("(%)", "(pp)"), str(c["n"]),
                f"{_num(c['mean_difference'], _scale(m), digits)} {_ci(c['ci_low'], c['ci_high'], _scale(m), digits)}",
                f"{c['n_improved']} / {c['n_worse']} / {c['n_tied']}", _p(c["ttest_p"]), _p(c["wilcoxon_p"]),
            ])
    header = ["Comparison", "Metric", "n", "Mean Δ [95% CI]", "Improved / worse / tied",
              "Paired t-test p (one-tailed)", "Wilcoxon p (one-tailed)"]
    lines += _table(header, rows, [":--", ":--", "--:", "--:", ":-:", "--:", "--:"])
    return lines


def _slice_table(summary: dict) -> list[str]:
    groups = [*AREA_GROUPS, "all"]
    first = summary["slice_area"][summary["runs"][0]]
    header = ["Run"]
    for g in groups:
        header += [f"{GROUP_TITLES[g]} (slices={first[g]['n_slices']}): Dice", "95% CI"]
    rows = []
    for run in summary["runs"]:
        row = [f"`{run}`"]
        for g in groups:
            d = summary["slice_area"][run][g]
            row += [_num(d["mean"], 100), _ci(d["ci_low"], d["ci_high"], 100)]
        rows.append(row)
    return _table(header, rows, [":--"] + ["--:", ":-:"] * len(groups))


def markdown_report(summary: dict) -> str:
    """The Markdown report of a summary (see :func:`.evaluate.evaluate_folders`)."""
    cfg = summary["config"]
    runs = summary["runs"]
    boot = (
        f"95% CIs: percentile bootstrap over cases, {cfg['n_bootstrap']} resamples, seed {cfg['seed']}"
        if cfg["n_bootstrap"] else "no bootstrap intervals"
    ).replace("95%", f"{cfg['confidence'] * 100:g}%")
    lines = [
        "# Segmentation evaluation",
        "",
        f"- Reference: `{cfg['reference_folder']}` ({summary['n_cases']} cases, "
        f"{len(summary['cases_without_tumour'])} without tumour)",
        "- Runs: " + ", ".join(
            f"`{r}`" + (" (baseline)" if i == 0 and len(runs) > 1 else "") for i, r in enumerate(runs)
        ),
        f"- Tumour label {cfg['tumour_label']}"
        + (f", organ label {cfg['organ_label']}" if cfg["organ_label"] is not None else "")
        + f"; surface Dice tolerance {cfg['tolerance_mm']:g} mm; {boot}",
        "- Tumour size: largest 3D diameter of the reference tumour (its largest lesion); "
        "means leave out undefined values (Dice when both masks are empty, distances when either is empty)",
        "",
        "## Dice (%) by tumour size",
        "",
        *_group_table(summary, "diameter"),
    ]
    if "area" in summary["groups"]:
        lines += ["", "## Dice (%) by tumour area (2D, pixels)", "", *_group_table(summary, "area")]
    if "slice_area" in summary:
        lines += ["", "## Per-slice Dice (%) by tumour area in the slice (pixels)", "", *_slice_table(summary)]
    lines += ["", "## All metrics, all cases (mean [95% CI])", "", *_all_metrics_table(summary, "tumour")]
    lines += ["", "## Lesion detection (lesions grouped by their own largest diameter)", "", *_lesion_table(summary)]
    if summary["comparisons"]:
        lines += ["", "## Paired comparison with the baseline", "", *_comparison_tables(summary)]
    lines += ["", "## Empty masks (tumour label)", "", *_empty_table(summary, "tumour")]
    if cfg["organ_label"] is not None:
        lines += ["", f"## Organ (label {cfg['organ_label']}), all cases (mean [95% CI])", "",
                  *_all_metrics_table(summary, "organ"), "", *_empty_table(summary, "organ")]
    figures = summary.get("report_files", {}).get("figures", [])
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{os.path.splitext(f)[0]}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def plot_group_boxplots(summary: dict, grouping: str, path: str) -> None:
    """Box plots of per-case Dice (%) per group (x axis) and run (colour); the dot is the mean.

    Args:
        summary: the evaluation summary.
        grouping: ``"diameter"`` or ``"area"``.
        path: PNG file to write.
    """
    runs = summary["runs"]
    groups = [*GROUPING_ORDER[grouping], "all"]
    dice = {c["case"]: {r: c["runs"][r]["tumour"]["dice"] for r in runs} for c in summary["cases"]}
    colours = plt.get_cmap("tab10").colors
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(runs) / 2)), 4.5), dpi=100)
    for j, run in enumerate(runs):
        data, positions = [], []
        for i, g in enumerate(groups):
            values = np.array([dice[c][run] for c in summary["groups"][grouping][g]], dtype=np.float64) * 100
            values = values[np.isfinite(values)]
            if values.size:
                data.append(values)
                positions.append(i - 0.4 + width * (j + 0.5))
        if not data:
            continue
        ax.boxplot(
            data, positions=positions, widths=width * 0.85, patch_artist=True, showmeans=True,
            boxprops={"facecolor": colours[j % len(colours)], "alpha": 0.6},
            medianprops={"color": "black"},
            meanprops={"marker": "o", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 4},
            flierprops={"markersize": 3},
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{GROUP_TITLES[g]}\n(n={len(summary['groups'][grouping][g])})" for g in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(-2, 102)
    ax.set_ylabel("Dice (%)")
    ax.set_title("Dice by tumour " + ("size (largest diameter)" if grouping == "diameter" else "area (pixels)"))
    ax.legend(handles=[Patch(facecolor=colours[j % len(colours)], alpha=0.6, label=r) for j, r in enumerate(runs)],
              loc="lower right", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_difference_histogram(summary: dict, comparison: dict, path: str) -> None:
    """Histogram of per-case Dice differences (candidate − baseline, percentage points).

    Args:
        summary: the evaluation summary.
        comparison: one entry of ``summary["comparisons"]``.
        path: PNG file to write.
    """
    base, cand = comparison["baseline"], comparison["candidate"]
    diffs = np.array(list(comparison["differences"]["tumour"]["dice"].values()), dtype=np.float64) * 100
    diffs = diffs[np.isfinite(diffs)]
    stats = comparison["tumour"]["diameter"]["all"]["dice"]
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=100)
    if diffs.size:
        ax.hist(diffs, bins=max(5, min(30, int(np.sqrt(diffs.size)) * 2)), color="tab:blue", alpha=0.7,
                edgecolor="black")
        ax.axvline(float(diffs.mean()), color="tab:red", label=f"mean {diffs.mean():+.1f} pp")
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(f"Dice({cand}) − Dice({base}) (percentage points)")
    ax.set_ylabel("cases")
    ax.set_title(
        f"n={stats['n']}: improved {stats['n_improved']}, worse {stats['n_worse']}, tied {stats['n_tied']}; "
        f"t-test p {_p(stats['ttest_p'])}, Wilcoxon p {_p(stats['wilcoxon_p'])}",
        fontsize="medium",
    )
    if diffs.size:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(summary: dict, output_folder: str) -> dict[str, object]:
    """Writes ``summary.json``, ``report.md`` and the PNGs into a folder, replacing an older report as a whole.

    The PNGs are ``dice_by_size.png`` (and ``dice_by_area.png`` for 2D data), and one
    ``dice_difference_<candidate>_vs_<baseline>.png`` per comparison. Their names are recorded in
    ``summary["report_files"]``. Every file is written in a hidden folder first and moved in when all are
    complete (:func:`nnunet_synth.files.replace_report`): a run that dies never leaves old and new files mixed.

    Args:
        summary: the evaluation summary (modified: gets ``report_files``).
        output_folder: created if missing.

    Returns:
        ``summary["report_files"]``.
    """
    final = Path(output_folder)
    final.mkdir(parents=True, exist_ok=True)
    remove_stale(final, ".report.*")  # what a killed run left
    output_folder = str(final / f".report{process_tag()}")
    os.makedirs(output_folder)
    try:
        return _write_report_files(summary, output_folder, final)
    finally:
        shutil.rmtree(output_folder, ignore_errors=True)  # a failed run leaves nothing; a finished one moved it all


def _write_report_files(summary: dict, output_folder: str, final: Path) -> dict[str, object]:
    figures = []
    for grouping, name in (("diameter", "dice_by_size.png"), ("area", "dice_by_area.png")):
        if grouping in summary["groups"]:
            plot_group_boxplots(summary, grouping, os.path.join(output_folder, name))
            figures.append(name)
    for comp in summary["comparisons"]:
        name = f"dice_difference_{_safe(comp['candidate'])}_vs_{_safe(comp['baseline'])}.png"
        plot_difference_histogram(summary, comp, os.path.join(output_folder, name))
        figures.append(name)
    summary["report_files"] = {"summary": SUMMARY_FILE, "markdown": MARKDOWN_FILE, "figures": figures}
    with open(os.path.join(output_folder, MARKDOWN_FILE), "w", encoding="utf-8") as f:
        f.write(markdown_report(summary))
    with open(os.path.join(output_folder, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(to_jsonable(summary), f, indent=1, allow_nan=False)
    replace_report(Path(output_folder), final, [SUMMARY_FILE, MARKDOWN_FILE, *figures], SUMMARY_FILE)
    return summary["report_files"]
