"""Does it transfer? Networks trained with synthetic tumours only, scored on real tumours of held-out cases.

Protocol (one fold of nnU-Net's own split, every step a real nnU-Net or nnunet_synth command):

1. The source dataset has real tumour labels. A copy hides them: every tumour voxel, dilated by a margin, becomes
   nnU-Net's ignore label (:mod:`~nnunet_synth.dataset_conversion.hidden_tumours`), so the loss never sees a real
   tumour. Both datasets share one plans file (``nnUNetv2_move_plans_between_datasets``) and one split.
2. ``real-labels``: ``nnUNetTrainer_Transfer`` on the source, the upper bound. One ``Synth50..._Transfer``
   trainer per contender on the hidden copy, whose synth plan measures the hidden masks of the fold's training
   cases only; optionally ``no-synthesis`` (vanilla on the hidden copy: the floor, Dice about 0).
3. ``nnUNetv2_predict`` on the fold's validation cases; ``nnUNetv2_synth_evaluate`` against their real labels
   (size groups, bootstrap CIs, paired tests against the upper bound).
4. One table: tumour Dice, lesion recall by size and the ratio of each mean Dice to the upper bound's, with a
   case-bootstrap CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_synth.dataset_conversion.common import ConversionError, find_raw_dataset, nnunet_raw_dir
from nnunet_synth.dataset_conversion.hidden_tumours import (
    derive_hidden_dataset,
    hidden_tumours_record,
)

UPPER = "real-labels"
FLOOR = "no-synthesis"
VANILLA_TRAINER = "nnUNetTrainer_Transfer"
#: contender -> trainer on the hidden-tumour dataset
CONTENDERS = {
    "analytic": "nnUNetTrainerSynth50_Transfer",
    "analytic-paper": "nnUNetTrainerSynth50PaperTexture_Transfer",
    "transplant": "nnUNetTrainerSynth50Transplant_Transfer",
}


class TransferError(RuntimeError):
    """A benchmark step that cannot run; the message names the step and what to do."""


@dataclass
class TransferSettings:
    """What one benchmark run does.

    Attributes:
        dataset: the source dataset with real tumour labels (ID or name) in nnUNet_raw.
        output: folder for predictions, the evaluation and the table.
        hidden_id: ID of the hidden-tumour copy (default: the first ID above the source's that no dataset uses).
        contenders: keys of :data:`CONTENDERS`.
        floor: also train vanilla nnU-Net on the hidden copy.
        configuration: nnU-Net configuration.
        fold: the fold trained and scored.
        plans: plans identifier shared by both datasets.
        margin_mm: dilation of the hidden region around each real tumour.
        schedule: (epochs, iterations per epoch, validation iterations per epoch) of every training.
        device: ``cpu`` or ``cuda``.
        num_processes: processes of planning, preprocessing and prediction.
        tta: test-time mirroring in prediction.
        gpu_memory_target: with ``target_spacing``, plans made by ``nnUNetv2_plan_experiment`` (CPU plans).
        target_spacing: target spacing of those plans.
        features_scale: scale of the planned network's features per stage (e.g. 0.5 on a CPU).
        patch_size: patch size replacing the planned one.
        retrain: train again where a final checkpoint exists.
    """

    dataset: str
    output: Path
    hidden_id: int | None = None
    contenders: Sequence[str] = ("analytic", "transplant")
    floor: bool = False
    configuration: str = "3d_fullres"
    fold: int = 0
    plans: str = "nnUNetPlans"
    margin_mm: float = 5.0
    schedule: tuple[int, int, int] = (10, 50, 4)
    device: str = "cpu"
    num_processes: int = 2
    tta: bool = False
    gpu_memory_target: float | None = None
    target_spacing: Sequence[float] | None = None
    features_scale: float = 1.0
    patch_size: Sequence[int] | None = None
    retrain: bool = False
    runs: list[tuple[str, str, str]] = field(default_factory=list)  # (run, dataset name, trainer), filled in


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _run(command: list[str], step: str, log: Path, env: dict | None = None) -> None:
    """Runs one command, appending its output to ``log``; a failure names the step and shows the output's end."""
    print(f"[transfer] {step}: {' '.join(command)}", flush=True)
    start = time.time()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n### {step}\n$ {' '.join(command)}\n")
        f.flush()
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env or _env())
    if result.returncode:
        tail = "".join(Path(log).read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:])
        raise TransferError(f"{step} failed (exit {result.returncode}; full output in {log}):\n{tail}")
    print(f"[transfer] {step}: done in {time.time() - start:.0f} s", flush=True)


def _planning_env() -> dict[str, str]:
    # nnU-Net 2.8.1 planning fails with nnUNet_n_proc_DA=0 (torch.set_num_threads(0))
    return {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}


def _preprocessed() -> Path:
    from nnunetv2.paths import nnUNet_preprocessed

    return Path(nnUNet_preprocessed.require())


def _free_id(after: int) -> int:
    roots = [nnunet_raw_dir(), _preprocessed()] + [Path(p) for p in [os.environ.get("nnUNet_results")] if p]
    used = {int(p.name[7:10]) for r in roots if r.is_dir() for p in r.iterdir() if p.name[:7] == "Dataset"
            and p.name[7:10].isdigit()}
    free = [i for i in (*range(after + 1, 1000), *range(1, after)) if i not in used]
    if not free:
        raise TransferError("no free dataset ID for the hidden-tumour copy; pass --hidden-id")
    return free[0]


def hidden_copy(settings: TransferSettings, log: Path) -> tuple[Path, Path]:
    """The source dataset and its hidden-tumour copy in nnUNet_raw (made, or reused where it matches)."""
    source = find_raw_dataset(settings.dataset)
    if hidden_tumours_record(load_json(str(source / "dataset.json"))):
        raise TransferError(f"{source.name} hides its tumours; give the dataset with the real labels")
    if settings.hidden_id is None:
        existing = [p for p in nnunet_raw_dir().iterdir() if p.is_dir() and p.name.endswith("Hidden")
                    and (hidden_tumours_record(load_json(str(p / "dataset.json"))) or {}).get("source") == source.name]
        settings.hidden_id = int(existing[0].name[7:10]) if existing else _free_id(int(source.name[7:10]))
    raw = nnunet_raw_dir()
    matches = list(raw.glob(f"Dataset{settings.hidden_id:03d}_*"))
    if matches:
        record = hidden_tumours_record(load_json(str(matches[0] / "dataset.json"))) or {}
        if record.get("source") != source.name or record.get("margin_mm") != settings.margin_mm:
            raise TransferError(f"{matches[0].name} is not {source.name} with tumours hidden by {settings.margin_mm} "
                                f"mm; choose another --hidden-id")
        return source, matches[0]
    print(f"[transfer] hiding the tumours of {source.name} (margin {settings.margin_mm} mm) as dataset "
          f"{settings.hidden_id}", flush=True)
    try:
        return source, derive_hidden_dataset(source, settings.hidden_id, settings.margin_mm)
    except ConversionError as e:
        raise TransferError(str(e)) from None


def prepare_plans(settings: TransferSettings, source: Path, hidden: Path, log: Path) -> None:
    """One plans file for both datasets (made for the source, moved to the copy), both preprocessed, one split."""
    from nnunet_synth.generators.splits import split_cases

    pre, conf, plans, np_ = _preprocessed(), settings.configuration, settings.plans, str(settings.num_processes)
    src_plans = pre / source.name / f"{plans}.json"
    if not src_plans.is_file():
        if settings.target_spacing is None and settings.gpu_memory_target is None:
            if plans != "nnUNetPlans":
                raise TransferError(f"{src_plans} does not exist: plan it, or give --target-spacing / "
                                    f"--gpu-memory-target to let the benchmark make it")
            _run(["nnUNetv2_plan_and_preprocess", "-d", source.name[7:10], "-c", conf, "-np", np_, "-npfp", np_,
                  "--verify_dataset_integrity"], "plan and preprocess the source", log, _planning_env())
        else:
            if not (pre / source.name / "dataset_fingerprint.json").is_file():
                _run(["nnUNetv2_extract_fingerprint", "-d", source.name[7:10], "-np", np_,
                      "--verify_dataset_integrity"], "fingerprint of the source", log, _planning_env())
            command = ["nnUNetv2_plan_experiment", "-d", source.name[7:10], "-overwrite_plans_name", plans]
            if settings.gpu_memory_target is not None:
                command += ["-gpu_memory_target", str(settings.gpu_memory_target)]
            if settings.target_spacing is not None:
                command += ["-overwrite_target_spacing", *map(str, settings.target_spacing)]
            _run(command, "plan the source", log, _planning_env())
        _adapt_plans(src_plans, settings)
    conf_plans = load_json(str(src_plans))["configurations"]
    if conf not in conf_plans:
        raise TransferError(f"{src_plans} has no configuration {conf!r} (it has {sorted(conf_plans)})")
    data_identifier = conf_plans[conf]["data_identifier"]
    if not (pre / source.name / data_identifier).is_dir():
        _run(["nnUNetv2_preprocess", "-d", source.name[7:10], "-plans_name", plans, "-c", conf, "-np", np_],
             "preprocess the source", log, _planning_env())
    hidden_pre = pre / hidden.name
    if not (hidden_pre / f"{plans}.json").is_file():
        if not (hidden_pre / "dataset_fingerprint.json").is_file():
            _run(["nnUNetv2_extract_fingerprint", "-d", hidden.name[7:10], "-np", np_],
                 "fingerprint of the hidden copy", log, _planning_env())
        _run(["nnUNetv2_move_plans_between_datasets", "-s", source.name[7:10], "-t", hidden.name[7:10], "-sp", plans,
              "-tp", plans], "the source's plans for the hidden copy", log, _planning_env())
        # as nnU-Net's planner does: nnUNetv2_preprocess reads dataset.json from the preprocessed folder
        shutil.copyfile(hidden / "dataset.json", hidden_pre / "dataset.json")
    if not (hidden_pre / data_identifier).is_dir():
        _run(["nnUNetv2_preprocess", "-d", hidden.name[7:10], "-plans_name", plans, "-c", conf, "-np", np_],
             "preprocess the hidden copy", log, _planning_env())
    split_cases(source.name, conf, settings.fold, plans)  # writes the source's splits_final.json when absent
    splits = pre / source.name / "splits_final.json"
    if not (hidden_pre / "splits_final.json").is_file():
        shutil.copyfile(splits, hidden_pre / "splits_final.json")
    elif load_json(str(hidden_pre / "splits_final.json")) != load_json(str(splits)):
        raise TransferError(f"{hidden_pre / 'splits_final.json'} differs from {splits}: the two datasets must be "
                            f"split alike; remove the hidden copy's file")


def _adapt_plans(path: Path, settings: TransferSettings) -> None:
    """Scales the planned network's features and sets the patch size (the benchmark's own plans file only)."""
    if settings.features_scale == 1.0 and settings.patch_size is None:
        return
    plans = load_json(str(path))
    conf = plans["configurations"][settings.configuration]
    arch = conf["architecture"]["arch_kwargs"]
    if settings.features_scale != 1.0:
        arch["features_per_stage"] = [max(4, round(f * settings.features_scale)) for f in arch["features_per_stage"]]
    if settings.patch_size is not None:
        import numpy as np

        strides = np.prod(np.asarray(arch["strides"]), axis=0)
        patch = [int(p) for p in settings.patch_size]
        if len(patch) != len(strides) or any(p % s for p, s in zip(patch, strides)):
            raise TransferError(f"--patch-size {patch} must have {len(strides)} values divisible by the network's "
                                f"total strides {strides.tolist()}")
        conf["patch_size"] = patch
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(plans, indent=4), encoding="utf-8")
    os.replace(tmp, path)


def train_and_predict(settings: TransferSettings, run: str, dataset: str, trainer: str, inputs: Path,
                      log: Path) -> Path:
    """``nnUNetv2_train`` (unless its final checkpoint exists) and ``nnUNetv2_predict`` of the validation cases."""
    from nnunet_synth.ext_path import EXT_TRAINER_DIR

    results = Path(os.environ["nnUNet_results"])
    fold_dir = results / dataset / f"{trainer}__{settings.plans}__{settings.configuration}" / \
        f"fold_{settings.fold}"
    env = _env(nnUNet_extTrainer=str(EXT_TRAINER_DIR),
               NNUNET_SYNTH_SCHEDULE=",".join(map(str, settings.schedule)) + ",skip")
    if settings.device == "cpu":
        env.setdefault("nnUNet_n_proc_DA", "1")
    if settings.retrain or not (fold_dir / "checkpoint_final.pth").is_file():
        _run(["nnUNetv2_train", dataset[7:10], settings.configuration, str(settings.fold), "-tr", trainer,
              "-p", settings.plans, "-device", settings.device], f"train {run}", log, env)
    out = settings.output / "predictions" / run
    shutil.rmtree(out, ignore_errors=True)
    command = ["nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", dataset[7:10], "-c",
               settings.configuration, "-f", str(settings.fold), "-tr", trainer, "-p", settings.plans,
               "-device", settings.device, "-npp", "1", "-nps", "1"]
    _run(command + ([] if settings.tta else ["--disable_tta"]), f"predict {run}", log, env)
    return out


def _validation_inputs(settings: TransferSettings, source: Path) -> tuple[Path, Path, list[str]]:
    """Links to the validation cases' images and real labels (``nnUNetv2_predict`` and the evaluation read them)."""
    from nnunet_synth.generators.splits import split_cases

    _, val, _ = split_cases(source.name, settings.configuration, settings.fold, settings.plans)
    dataset_json = load_json(str(source / "dataset.json"))
    ending = dataset_json["file_ending"]
    images, labels = settings.output / "inputs" / "images", settings.output / "inputs" / "labels"
    for folder in (images, labels):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for case in val:
        for c in range(len(dataset_json["channel_names"])):
            name = f"{case}_{c:04d}{ending}"
            (images / name).symlink_to((source / "imagesTr" / name).resolve())
        (labels / f"{case}{ending}").symlink_to((source / "labelsTr" / f"{case}{ending}").resolve())
    shutil.copyfile(source / "dataset.json", labels / "dataset.json")
    return images, labels, val


def run_transfer(settings: TransferSettings) -> dict:
    """Runs the whole benchmark and writes ``transfer.json`` and ``transfer.md`` (plus the evaluation's report and
    plots in ``evaluation/``).

    Returns:
        The results: settings, per-run table rows and the evaluation summary's path.
    """
    unknown = [c for c in settings.contenders if c not in CONTENDERS]
    if unknown:
        raise TransferError(f"unknown contender(s) {unknown}; choose from {sorted(CONTENDERS)}")
    settings.output = Path(settings.output)
    settings.output.mkdir(parents=True, exist_ok=True)
    log = settings.output / "transfer.log"
    start = time.time()
    source, hidden = hidden_copy(settings, log)
    prepare_plans(settings, source, hidden, log)
    _run(["nnUNetv2_synth_plan", "-d", hidden.name[7:10], "-c", settings.configuration,
          "-p", settings.plans, "-f", str(settings.fold)], "synth plan of the hidden copy (training fold's tumours)",
         log, _planning_env())
    settings.runs = [(UPPER, source.name, VANILLA_TRAINER)]
    settings.runs += [(c, hidden.name, CONTENDERS[c]) for c in settings.contenders]
    if settings.floor:
        settings.runs.append((FLOOR, hidden.name, VANILLA_TRAINER))
    images, labels, val = _validation_inputs(settings, source)
    predictions, timings = [], {}
    for run, dataset, trainer in settings.runs:
        t0 = time.time()
        predictions.append(train_and_predict(settings, run, dataset, trainer, images, log))
        timings[run] = time.time() - t0
    tumour_label = hidden_tumours_record(load_json(str(hidden / "dataset.json")))["tumour_label"]
    evaluation = settings.output / "evaluation"
    _run(["nnUNetv2_synth_evaluate", "-ref", str(labels), "-pred", *map(str, predictions), "-o", str(evaluation),
          "--names", *[r for r, _, _ in settings.runs], "-l", str(tumour_label), "-np", "1", "--quiet"],
         "evaluate against the real tumours", log)
    summary = load_json(str(evaluation / "summary.json"))
    rows = table_rows(summary)
    results = {"settings": {**asdict(settings), "output": str(settings.output)}, "source": source.name,
               "hidden": hidden.name, "validation_cases": val, "rows": rows, "seconds": timings,
               "total_seconds": time.time() - start, "evaluation": str(evaluation / "summary.json")}
    (settings.output / "transfer.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (settings.output / "transfer.md").write_text(format_table(results), encoding="utf-8")
    return results


def table_rows(summary: dict) -> list[dict]:
    """Per run: tumour Dice (mean, CI), lesion recall by size, and the mean Dice's ratio to the first run's (the
    upper bound) with a case-bootstrap CI (cases resampled together, as the evaluation's pooled ratios)."""
    from nnunet_synth.evaluation.statistics import bootstrap_ratio_ci

    config = summary["config"]
    runs, cases = summary["runs"], summary["cases"]
    upper = [c["runs"][runs[0]]["tumour"]["dice"] for c in cases]
    rows = []
    for run in runs:
        dice = summary["metrics"][run]["tumour"]["diameter"]["all"]["dice"]
        values = [c["runs"][run]["tumour"]["dice"] for c in cases]
        low, high = bootstrap_ratio_ci(values, upper, config["n_bootstrap"], config["confidence"], config["seed"])
        detection = summary["lesion_detection"][run]
        rows.append({"run": run, "dice": dice["mean"], "dice_ci": [dice["ci_low"], dice["ci_high"]],
                     "ratio": sum(values) / sum(upper) if sum(upper) else float("nan"), "ratio_ci": [low, high],
                     "recall": {g: {k: d[k] for k in ("recall", "n_lesions", "n_detected")}
                                for g, d in detection.items()},
                     "n_cases": dice["n"]})
    return rows


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def format_table(results: dict) -> str:
    """The benchmark's Markdown table (the same is printed)."""
    rows = results["rows"]
    groups = [g for g in rows[0]["recall"] if g != "all"] + ["all"]
    s = results["settings"]
    lines = [f"# Transfer: {results['source']} (real labels) vs {results['hidden']} (tumours hidden, margin "
             f"{s['margin_mm']} mm, synthetic tumours only)", "",
             f"Fold {s['fold']}, {len(results['validation_cases'])} validation cases, {s['configuration']} "
             f"({s['plans']}), schedule {s['schedule'][0]} epochs x {s['schedule'][1]} iterations on "
             f"{s['device']}, total {results['total_seconds'] / 60:.0f} min.", "",
             "| run | tumour Dice (95% CI) | ratio to real labels (95% CI) | "
             + " | ".join(f"recall {g}" for g in groups) + " |",
             "|---|---|---|" + "---|" * len(groups)]
    for r in rows:
        recall = [f"{_num(r['recall'][g]['recall'], 2)} ({r['recall'][g]['n_detected']}/{r['recall'][g]['n_lesions']})"
                  for g in groups]
        lines.append(f"| {r['run']} | {_num(r['dice'])} ({_num(r['dice_ci'][0])}-{_num(r['dice_ci'][1])}) | "
                     f"{_num(r['ratio'], 2)} ({_num(r['ratio_ci'][0], 2)}-{_num(r['ratio_ci'][1], 2)}) | "
                     + " | ".join(recall) + " |")
    lines += ["", f"Report and plots of the evaluation: {Path(results['evaluation']).parent / 'report.md'}", ""]
    return "\n".join(lines)
