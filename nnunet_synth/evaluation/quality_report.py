"""The generator-quality report: ``quality.json``, ``quality.md``, ``intensity_stats.png``, ``examples.png``; and the
checkpoint selection's ``checkpoint_selection.json`` and ``checkpoint_selection.md``."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd  # noqa: E402
from scipy.stats import mannwhitneyu  # noqa: E402

from nnunet_synth.files import process_tag, remove_stale, replace_report  # noqa: E402

if TYPE_CHECKING:
    from nnunet_synth.evaluation.quality import LesionCrop

# per-channel measures shown side by side: feature key -> label
MEASURES = {
    "contrast": "contrast to organ shell\n(normalised units)",
    "contrast_shell_std": "contrast / organ-shell SD",
    "edge_gradient": "edge sharpness: mean gradient\nat the boundary (units/mm)",
    "lesion_std": "heterogeneity: SD inside\nthe tumour (normalised units)",
}
COLOURS = {"real": "deepskyblue", "synthetic": "red"}


def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return a[np.isfinite(a)]


def describe(values: Sequence[float]) -> dict:
    """n, mean, SD, quartiles of the finite values (NaN where there are none)."""
    a = _finite(values)
    if a.size == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "q25": math.nan, "median": math.nan, "q75": math.nan}
    q25, median, q75 = np.percentile(a, [25, 50, 75])
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "q25": float(q25),
            "median": float(median), "q75": float(q75)}


def compare(real: Sequence[float], synthetic: Sequence[float]) -> dict:
    """Both descriptions and a two-sided Mann-Whitney U test of real against synthetic values."""
    a, b = _finite(real), _finite(synthetic)
    p = float(mannwhitneyu(a, b, alternative="two-sided").pvalue) if a.size and b.size else math.nan
    return {"real": describe(a), "synthetic": describe(b), "mann_whitney_p": p}


def intensity_statistics(real: Sequence[LesionCrop], synthetic: Sequence[LesionCrop],
                         channel_names: Sequence[str]) -> dict:
    """Per channel and measure of :data:`MEASURES`, real and synthetic side by side; and the tumour sizes."""
    channels = []
    for c, name in enumerate(channel_names):
        channels.append({"name": name, **{m: compare([r.channel_features[c][m] for r in real],
                                                     [s.channel_features[c][m] for s in synthetic])
                                          for m in MEASURES}})
    return {"channels": channels,
            "diameter_mm": compare([r.diameter_mm for r in real], [s.diameter_mm for s in synthetic])}


def _strict(obj):
    """JSON-ready copy: numpy scalars as Python numbers, NaN and infinities as None."""
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _strict(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _crop_records(crops: Sequence[LesionCrop], channel_names: Sequence[str]) -> list[dict]:
    return [{"kind": c.kind, "case": c.case, "centre": list(c.centre), "num_voxels": c.num_voxels,
             "diameter_mm": c.diameter_mm, "p_synthetic": c.p_synthetic, "svm_score": dict(c.svm_score),
             "features": {name: c.channel_features[i] for i, name in enumerate(channel_names)}} for c in crops]


def plot_intensity_stats(stats: dict, real: Sequence[LesionCrop], synthetic: Sequence[LesionCrop], path: Path,
                         title: str) -> None:
    """Box plots with the individual tumours, real next to synthetic, one row per channel, one column per
    measure; the last column of the first row shows the equivalent diameters."""
    names = [ch["name"] for ch in stats["channels"]]
    cols = len(MEASURES) + 1
    fig, axes = plt.subplots(len(names), cols, figsize=(3.1 * cols, 3.0 * len(names) + 0.6), squeeze=False)
    jitter = np.random.default_rng(0)

    def box(ax, groups: list[np.ndarray], label: str) -> None:
        present = [(k, v) for k, v in zip(("real", "synthetic"), groups)]
        ax.boxplot([v if v.size else [np.nan] for _, v in present], widths=0.5, showfliers=False)
        for i, (kind, v) in enumerate(present, start=1):
            ax.scatter(i + jitter.uniform(-0.15, 0.15, v.size), v, s=9, alpha=0.6, color=COLOURS[kind], zorder=3)
        ax.set_xticks([1, 2], [f"real\n(n={groups[0].size})", f"synthetic\n(n={groups[1].size})"], fontsize=8)
        ax.set_title(label, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)

    for c, name in enumerate(names):
        for m, (key, label) in enumerate(MEASURES.items()):
            box(axes[c, m], [_finite([r.channel_features[c][key] for r in real]),
                             _finite([s.channel_features[c][key] for s in synthetic])], label)
        axes[c, 0].set_ylabel(f"channel {name}", fontsize=9)
        if c == 0:
            box(axes[0, -1], [_finite([r.diameter_mm for r in real]), _finite([s.diameter_mm for s in synthetic])],
                "equivalent diameter (mm)")
        else:
            axes[c, -1].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def example_view(crops: Sequence[LesionCrop], spacing: Sequence[float]) -> tuple[int, int]:
    """Pixels (rows, columns) of one field of view for all example crops, the same in mm: the largest stored
    slice's extent (its tumour and the ring of context around it) on both axes."""
    fov_mm = max((n * float(s) for crop in crops for n, s in zip(crop.slice_lesion.shape, spacing[-2:])), default=1.0)
    return tuple(max(1, int(math.ceil(fov_mm / float(s) - 1e-6))) for s in spacing[-2:])


def centred_on_lesion(crop: LesionCrop, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The crop's slice image (NaN beyond the stored crop) and tumour mask, ``size`` pixels centred on the
    tumour's bounding box."""
    mask = crop.slice_lesion
    where = np.nonzero(mask) if mask.any() else [np.array([0, m - 1]) for m in mask.shape]
    box = [[(int(c.min()) + int(c.max()) + 1 - n) // 2, (int(c.min()) + int(c.max()) + 1 - n) // 2 + n]
           for c, n in zip(where, size)]
    image = crop_and_pad_nd(np.asarray(crop.slice_image, dtype=np.float32), box, np.nan)
    return image, crop_and_pad_nd(mask, box, False)


def plot_examples(real: Sequence[LesionCrop], synthetic: Sequence[LesionCrop], channel_names: Sequence[str],
                  spacing: Sequence[float], num: int, seed: int, path: Path, title: str) -> None:
    """A panel of real and synthetic tumours: the slice through each tumour's largest cross-section, one row per
    kind and channel, outlined (real blue, synthetic red).

    Up to ``num`` tumours of each kind are drawn at random and sorted by size, so that a column pairs a real and a
    synthetic tumour of similar size. Every crop shows the same field of view in mm (:func:`example_view`) centred
    on its tumour, and every channel one grey window (1st-99th percentile of all shown pixels).
    """
    rng = np.random.default_rng(seed)
    chosen = {kind: sorted((crops[i] for i in rng.choice(len(crops), min(num, len(crops)), replace=False)),
                           key=lambda crop: crop.num_voxels)
              for kind, crops in (("real", real), ("synthetic", synthetic))}
    size = example_view([crop for crops in chosen.values() for crop in crops], spacing)
    shown = {kind: [centred_on_lesion(crop, size) for crop in crops] for kind, crops in chosen.items()}
    windows = []
    for c in range(len(channel_names)):
        pixels = np.concatenate([image[c].ravel() for views in shown.values() for image, _ in views])
        windows.append(np.nanpercentile(pixels, [1, 99]))
    cols = max(len(v) for v in chosen.values())
    rows = [(kind, c) for kind in chosen for c in range(len(channel_names))]
    aspect = float(spacing[-2]) / float(spacing[-1])
    grey = plt.get_cmap("gray").with_extremes(bad="white")  # white: beyond the stored crop
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols + 0.5, 2.1 * len(rows) + 0.5), squeeze=False)
    for r, (kind, c) in enumerate(rows):
        for j in range(cols):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(chosen[kind]):
                ax.axis("off")
                continue
            crop, (image, lesion) = chosen[kind][j], shown[kind][j]
            ax.imshow(image[c], cmap=grey, vmin=windows[c][0], vmax=windows[c][1], aspect=aspect,
                      interpolation="nearest")
            if lesion.any():
                ax.contour(lesion, levels=[0.5], colors=COLOURS[kind], linewidths=0.8)
            p = "" if math.isnan(crop.p_synthetic) else f"\np(synth) {crop.p_synthetic:.2f}"
            ax.set_title(f"{crop.case}, {crop.num_voxels} vox{p}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{kind}\n{channel_names[c]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v: float, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _p(v: float) -> str:
    if v is None or math.isnan(v):
        return "–"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def markdown(summary: dict) -> str:
    """The short Markdown report (``quality.md``)."""
    r, counts = summary["realism"], summary["counts"]
    fold = summary["fold"]
    cases = (f"{len(summary['cases'])} training cases of fold {fold}" if fold not in (None, "all")
             else f"{len(summary['cases'])} cases")
    s = summary["settings"]
    left_out = []
    if counts["real_too_small"]:
        left_out.append(f"{counts['real_too_small']} real tumours under {s['min_voxels']} voxels")
    if counts.get("synthetic_too_large"):
        left_out.append(f"{counts['synthetic_too_large']} drawn lesions larger than the backend's patch allows "
                        f"(redrawn)")
    if counts["synthetic_not_placed"]:
        left_out.append(f"{counts['synthetic_not_placed']} synthetic tumours that fitted in no patch")
    lines = [
        f"# Generator quality: `{summary['backend']}` on {summary['dataset']} ({summary['configuration']})",
        "",
        f"- {counts['real']} real tumours (connected components of the tumour label, at least {s['min_voxels']} "
        f"voxels) and {counts['synthetic']} synthetic tumours ({summary['num_requested']} requested) in the same "
        f"{cases}" + (f"; left out: {'; '.join(left_out)}" if left_out else ""),
        f"- Crops: tumour bounding box + {s['context_mm']:g} mm; contrast against organ voxels within "
        f"{s['shell_mm']:g} mm of the tumour; intensities in nnU-Net's normalised space",
        "",
        "| Check | Value | Reading |",
        "| :-- | --: | :-- |",
        f"| Realism AUC ({r['classifier']}, {r['n_splits']}-fold CV"
        f"{' grouped by case' if r['grouped_by_case'] else ''}, {r['n_repeats']} repeats) | "
        f"{_fmt(r['auc'])} ± {_fmt(r['auc_std'])} | 0.5: synthetic cannot be told from real; 1: always told apart |",
    ]
    svm = summary["one_class_svm"]
    if svm is not None:
        for pooling in ("global", "lesion"):
            v = svm[pooling]
            lines += [
                f"| One-class SVM, encoder features ({pooling} pooling): mean score real (held out) / synthetic | "
                f"{_fmt(v['real_heldout_mean_score'])} / {_fmt(v['synthetic_mean_score'])} | higher: closer to the "
                f"real tumours (the paper's selection score is the synthetic mean) |",
                f"| Accepted as inliers ({pooling} pooling): synthetic / real (held out) | "
                f"{100 * v['synthetic_inlier_share']:.0f}% / {100 * v['real_heldout_inlier_share']:.0f}% | "
                f"a realistic generator approaches the real share |",
            ]
    lines += ["", "## Intensity per channel (median [IQR])", "",
              "| Channel | Measure | Real | Synthetic | Mann-Whitney p |", "| :-- | :-- | --: | --: | --: |"]
    intensity = summary["intensity"]
    for ch in intensity["channels"]:
        for key, label in MEASURES.items():
            v = ch[key]
            cells = [f"{_fmt(v[k]['median'])} [{_fmt(v[k]['q25'])}, {_fmt(v[k]['q75'])}]"
                     for k in ("real", "synthetic")]
            lines.append(f"| {ch['name']} | {label.replace(chr(10), ' ')} | {cells[0]} | {cells[1]} | "
                         f"{_p(v['mann_whitney_p'])} |")
    d = intensity["diameter_mm"]
    lines.append(f"| all | equivalent diameter (mm) | {_fmt(d['real']['median'], 1)} [{_fmt(d['real']['q25'], 1)}, "
                 f"{_fmt(d['real']['q75'], 1)}] | {_fmt(d['synthetic']['median'], 1)} "
                 f"[{_fmt(d['synthetic']['q25'], 1)}, {_fmt(d['synthetic']['q75'], 1)}] | "
                 f"{_p(d['mann_whitney_p'])} |")
    lines += ["", "## What gives the synthetic tumours away", "",
              f"Features the {r['classifier']} classifier (fitted on all tumours) relies on most:", ""]
    lines += [f"{i}. `{f['feature']}` ({f['importance']:.3f})" for i, f in enumerate(r["top_features"], start=1)]
    lines += ["", "![intensity statistics](intensity_stats.png)", "", "![examples](examples.png)", ""]
    return "\n".join(lines)


def write_report(summary: dict, real: Sequence[LesionCrop], synthetic: Sequence[LesionCrop], out: Path) -> dict:
    """Adds the intensity statistics and per-tumour records to ``summary`` and writes all report files.

    Returns:
        The completed summary (as written to ``quality.json``, NaN as None).
    """
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out, ".report.*")  # what a killed run left
    staged = out / f".report{process_tag()}"  # complete files only replace an older report, all of it at once
    staged.mkdir()
    try:
        return _write_report_files(summary, real, synthetic, out, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _write_report_files(summary: dict, real: Sequence[LesionCrop], synthetic: Sequence[LesionCrop], final: Path,
                        out: Path) -> dict:
    names = summary["channels"]
    summary["intensity"] = intensity_statistics(real, synthetic, names)
    files = {"json": "quality.json", "markdown": "quality.md", "intensity_stats": "intensity_stats.png",
             "examples": "examples.png"}
    summary["files"] = {k: str(final / v) for k, v in files.items()}
    heading = f"{summary['dataset']} ({summary['configuration']}), backend {summary['backend']}"
    plot_intensity_stats(summary["intensity"], real, synthetic, out / files["intensity_stats"],
                         f"{heading}: real (blue) vs synthetic (red) tumours")
    plot_examples(real, synthetic, names, summary["spacing"], summary["settings"]["examples"], summary["seed"],
                  out / files["examples"], f"{heading}: real tumours (blue outline) and synthetic (red); "
                                           f"p(synth): out-of-fold classifier probability")
    summary = _strict(summary)
    summary["tumours"] = _strict(_crop_records([*real, *synthetic], names))
    (out / files["markdown"]).write_text(markdown(summary), encoding="utf-8")
    (out / files["json"]).write_text(json.dumps(summary, indent=1, allow_nan=False), encoding="utf-8")
    replace_report(out, final, list(files.values()), files["json"], old_files=list(files.values()))
    return summary


def selection_markdown(selection: dict) -> str:
    """The Markdown report of a checkpoint selection (``checkpoint_selection.md``)."""
    lines = [
        f"# Checkpoint selection: `{selection['backend']}` on {selection['dataset']} ({selection['configuration']}), "
        f"fold {selection['fold']}",
        "",
        f"- Selected: **{selection['checkpoint']}** (recorded in `{selection['selection_file']}`; bank generation "
        f"and the backend load it where the synth plan names no checkpoint)",
        f"- Score: {selection['criterion']}",
        f"- One-class SVM (nu {selection['nu']:g}) on the encoder features ({selection['pooling']} pooling) of "
        f"`{selection['model_folder']}` ({selection['model_checkpoint']}), fitted on the real tumours of the "
        f"{len(selection['validation_cases'])} validation images; {selection['num_tumours']} tumours scored"
        + (f", {selection['num_tumours_left_out']} left out (larger than a checkpoint's patch)"
           if selection["num_tumours_left_out"] else ""),
        "",
        "| Checkpoint | Iteration | Score (lower is better) | Mean SVM decision, synthetic | Accepted as inliers |",
        "| :-- | --: | --: | --: | --: |",
    ]
    for s in selection["scores"]:
        mark = " (selected)" if s["checkpoint"] == selection["checkpoint"] else ""
        iteration = "–" if s["iteration"] is None else str(s["iteration"])
        lines.append(f"| {s['checkpoint']}{mark} | {iteration} | {_fmt(s['score'], 4)} | "
                     f"{_fmt(s['synthetic_mean_decision'], 4)} | {100 * s['synthetic_inlier_share']:.0f}% |")
    lines += ["", f"Real tumours: mean SVM decision {_fmt(selection['real_mean_decision'], 4)}.", ""]
    return "\n".join(lines)


def write_selection_report(selection: dict, out: Path) -> None:
    """Writes ``checkpoint_selection.json`` and ``checkpoint_selection.md`` into ``out``, each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("checkpoint_selection.json", json.dumps(_strict(selection), indent=1, allow_nan=False)),
                       ("checkpoint_selection.md", selection_markdown(selection))):
        tmp = out / f".{name}{process_tag()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
