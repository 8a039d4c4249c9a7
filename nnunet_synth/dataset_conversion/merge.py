"""Merge tumour datasets with healthy-control datasets into one dataset with one label set.

The pancreas paper's setup (MSD pancreas tumours + NIH Pancreas-CT and BTCV as healthy pancreas)::

    nnUNetv2_synth_convert msd_pancreas -i Task07_Pancreas -d 501
    nnUNetv2_synth_convert pancreas_ct  -i TCIA/ -d 502
    nnUNetv2_synth_convert btcv -i BTCV/ -d 503 --organ pancreas
    nnUNetv2_synth_convert merge -i 501 --healthy 502 503 -d 510 --name PancreasMerged

Inputs are converted raw datasets (ID, ``DatasetNNN_Name`` or folder). Labels are matched by name, with tumour
synonyms (tumour, tumor, cancer, lesion, mass, carcinoma) read as one tumour label; every input must declare the same
set of labels and the same channels. Values are renumbered to the first input's order. Healthy datasets must not
contain tumour voxels. ``healthy_cases.json`` beside dataset.json lists the identifiers of all healthy-control
cases (a JSON list of strings); ``nnUNetv2_synth_plan`` copies it into the synth plan (``healthy_cases``) and the
on-the-fly Synth trainers insert their synthetic tumours into those cases first, as the pancreas paper inserts into
its healthy scans (see :class:`nnunet_synth.injection.SynthTumourTransform`). ``merge_sources.json`` maps every case
to its source dataset: its cohort (:func:`read_case_cohorts`). The cohort-balanced trainers
(:mod:`nnunet_synth.trainers.cohorts`, the liver-MRI paper's ATLAS + LLD-MMRI oversampling) draw every cohort alike,
and ``nnUNetv2_synth_generate`` spreads a bank's source cases evenly over the cohorts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np

from nnunet_synth.dataset_conversion.common import (
    CaseTask,
    ConversionError,
    DatasetSpec,
    OutputCase,
    find_raw_dataset,
    image_from_array,
    label_array,
    read_header,
    read_image,
    remap_labels,
    resumable,
    sanitize_identifier,
    write_dataset,
    write_json,
)
from nnunet_synth.synth_plan import HEALTHY_CASES_FILE

TUMOUR_WORDS = ("tumour", "tumor", "cancer", "lesion", "mass", "carcinoma", "neoplasm")
HEALTHY_FILE = HEALTHY_CASES_FILE  # the synth plan reads it from there
SOURCES_FILE = "merge_sources.json"


def cohorts_file(dataset_name: str) -> Path | None:
    """``merge_sources.json`` of a dataset: in its raw folder (``nnUNet_raw/<name>``, where merge writes it), else in
    its preprocessed folder (copy it there where training runs without the raw data); None where neither holds it."""
    from nnunet_synth.dataset_conversion.common import _nnunet_path

    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        root = _nnunet_path(variable)
        if root and (Path(root) / dataset_name / SOURCES_FILE).is_file():
            return Path(root) / dataset_name / SOURCES_FILE
    return None


def read_case_cohorts(dataset_name: str, cases: list[str] | None = None) -> dict[str, str] | None:
    """The cohort (source dataset) of every case of a merged dataset, from its ``merge_sources.json``
    (:func:`cohorts_file`).

    Args:
        dataset_name: nnU-Net dataset name (``DatasetNNN_Name``).
        cases: identifiers that must all have a cohort (e.g. a fold's training cases).

    Returns:
        Case identifier -> cohort name; None where the dataset has no ``merge_sources.json``.

    Raises:
        ValueError: the file is not a JSON object of strings, or lacks some of ``cases`` (the message names the file
            and the cases).
    """
    path = cohorts_file(dataset_name)
    if path is None:
        return None
    try:
        cohorts = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cohorts, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                for k, v in cohorts.items()):
        raise ValueError(f"{path}: expected a JSON object mapping case identifiers to their source dataset, got "
                         f"{str(cohorts)[:200]}")
    missing = sorted(set(cases or ()) - set(cohorts))
    if missing:
        raise ValueError(f"{path} gives no source dataset for {len(missing)} case(s): "
                         f"{', '.join(missing[:10])}{'...' if len(missing) > 10 else ''}")
    return cohorts


def canonical_label(name: str) -> str:
    """Label name used for matching: lower case, single spaces, every tumour synonym read as ``tumor``."""
    text = re.sub(r"[\s_\-]+", " ", name.strip().lower())
    return "tumor" if any(w in text for w in TUMOUR_WORDS) else text


def dataset_cases(folder: Path, dataset_json: dict) -> dict[str, tuple[list[Path], Path]]:
    """Case identifier -> (image files per channel, label file) of a raw dataset.

    Supports both the imagesTr/labelsTr layout and an explicit ``dataset`` entry in dataset.json.

    Raises:
        ConversionError: A referenced file is missing.
    """
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    if "dataset" in dataset_json:
        cases = {k: ([_resolve(folder, i) for i in v["images"]], _resolve(folder, v["label"]))
                 for k, v in dataset_json["dataset"].items()}
    else:
        labels = sorted(p for p in (folder / "labelsTr").glob(f"*{ending}") if not p.name.startswith("."))
        cases = {}
        for lab in labels:
            cid = lab.name[: -len(ending)]
            cases[cid] = ([folder / "imagesTr" / f"{cid}_{c:04d}{ending}" for c in range(n_channels)], lab)
        stray = {p.name[: -len(ending) - 5] for p in (folder / "imagesTr").glob(f"*{ending}")} - set(cases)
        if stray:
            raise ConversionError(f"{folder}: images without a label: {sorted(stray)[:10]}")
    for cid, (images, label) in cases.items():
        for f in [*images, label]:
            if not f.is_file():
                raise ConversionError(f"case {cid} of {folder.name}: file missing: {f}")
    return cases


def _resolve(folder: Path, path: str) -> Path:
    p = Path(os.path.expandvars(path))
    return p if p.is_absolute() else folder / p


@resumable
def convert(inputs: list[str], dataset_id: int, *, healthy: list[str] | None = None, name: str | None = None,
            overwrite: bool = False, raw_dir: str | os.PathLike | None = None, exclude: list[str] | None = None,
            prefix_source: bool = False, progress: bool = True, num_processes: int = 1) -> Path:
    """Merge datasets.

    Args:
        inputs: Tumour datasets (ID, name or folder); the first one fixes label order and channel names.
        dataset_id: nnU-Net dataset ID of the result.
        healthy: Healthy-control datasets.
        name: Dataset name (default Merged).
        overwrite: Replace an existing dataset folder of the same name.
        raw_dir: Root of input IDs/names and of the output instead of ``nnUNet_raw``.
        exclude: Case identifiers (of any input) to leave out.
        prefix_source: Prefix each case with its source dataset's name (needed when identifiers collide).
        progress: Show progress bars.
        num_processes: Worker processes converting cases (1: in this process).

    Returns:
        The written dataset folder.
    """
    healthy = list(healthy or [])
    sources = [(find_raw_dataset(d, raw_dir), False) for d in inputs] + \
              [(find_raw_dataset(d, raw_dir), True) for d in healthy]
    if len(sources) < 2:
        raise ConversionError("merge needs at least two datasets (-i TUMOUR ... --healthy HEALTHY ...)")
    folders = [f for f, _ in sources]
    if len(set(folders)) != len(folders):
        raise ConversionError(f"a dataset is given twice: {[f.name for f in folders]}")

    metas = [json.loads((f / "dataset.json").read_text(encoding="utf-8")) for f in folders]
    first = metas[0]
    channels = [str(v) for _, v in sorted(first["channel_names"].items(), key=lambda kv: int(kv[0]))]
    out_labels: dict[str, int] = {}
    for label_name, value in sorted(first["labels"].items(), key=lambda kv: _label_value(kv[1], folders[0])):
        canon = canonical_label(label_name)
        if canon in out_labels:
            raise ConversionError(f"{folders[0].name}: two labels read as {canon!r}: {first['labels']}")
        out_labels[canon] = _label_value(value, folders[0])
    if "tumor" not in out_labels:
        raise ConversionError(f"{folders[0].name}: no tumour label among {list(first['labels'])}")

    mappings = []
    for folder, meta in zip(folders, metas, strict=True):
        ch = [str(v) for _, v in sorted(meta["channel_names"].items(), key=lambda kv: int(kv[0]))]
        if [c.lower() for c in ch] != [c.lower() for c in channels]:
            raise ConversionError(f"{folder.name}: channels {ch} differ from {folders[0].name}'s {channels}")
        names = {canonical_label(k): _label_value(v, folder) for k, v in meta["labels"].items()}
        if len(names) != len(meta["labels"]) or set(names) != set(out_labels):
            raise ConversionError(f"{folder.name}: labels {meta['labels']} do not match {folders[0].name}'s "
                                  f"{first['labels']} (matched by name; tumour synonyms count as one)")
        mappings.append({v: out_labels[k] for k, v in names.items()})

    excluded = set(exclude or ())
    tasks, origin, healthy_ids, seen_excl = [], {}, [], set()
    for (folder, is_healthy), meta, mapping in zip(sources, metas, mappings, strict=True):
        for cid, (images, label) in sorted(dataset_cases(folder, meta).items()):
            if cid in excluded:
                seen_excl.add(cid)
                continue
            out_id = sanitize_identifier(f"{folder.name.split('_', 1)[-1]}_{cid}".lower()) if prefix_source else cid
            if out_id in origin:
                raise ConversionError(f"case identifier {out_id!r} occurs in {origin[out_id]} and {folder.name}; "
                                      "pass --prefix-source")
            origin[out_id] = folder.name
            if is_healthy:
                healthy_ids.append(out_id)
            tasks.append(_make_task(out_id, cid, folder.name, images, label, mapping, is_healthy,
                                    out_labels["tumor"]))
    if excluded - seen_excl:
        raise ConversionError(f"--exclude names unknown case(s): {sorted(excluded - seen_excl)}")

    def finalize(folder: Path, written: list[str]) -> None:
        write_json(folder / HEALTHY_FILE, sorted(c for c in healthy_ids if c in written))
        write_json(folder / SOURCES_FILE, {c: origin[c] for c in written})

    organ = [k for k in out_labels if k not in ("background", "tumor")]
    spec = DatasetSpec(dataset_id, name or "Merged", dict(enumerate(channels)), out_labels, cohort="merge",
                       description="merged from " + ", ".join(f.name for f in folders)
                       + f"; healthy controls listed in {HEALTHY_FILE}",
                       licence="see the source datasets",
                       extra={"organ": organ[0] if len(organ) == 1 else organ, "tumour": "tumor",
                              "healthy_cases_file": HEALTHY_FILE, "sources_file": SOURCES_FILE,
                              "tumour_sources": [f.name for f, h in sources if not h],
                              "healthy_sources": [f.name for f, h in sources if h]})
    return write_dataset(spec, tasks, overwrite=overwrite, raw_dir=raw_dir, finalize=finalize, progress=progress,
                         num_processes=num_processes)


def _label_value(value: object, folder: Path) -> int:
    if isinstance(value, (list, tuple)):
        raise ConversionError(f"{folder.name}: region-based labels ({value}) cannot be merged")
    return int(value)


def _make_task(out_id: str, cid: str, source: str, images: list[Path], label: Path, mapping: dict[int, int],
               is_healthy: bool, tumour_value: int) -> CaseTask:
    def check() -> None:
        for f in [*images, label]:
            read_header(f, case=cid)

    def load() -> list[OutputCase]:
        imgs = [read_image(p, case=cid) for p in images]
        lab = read_image(label, case=cid)
        arr = remap_labels(label_array(lab, case=cid, file=label), mapping, case=cid, file=label)
        if is_healthy and np.any(arr == tumour_value):
            raise ConversionError(f"case {cid} of healthy dataset {source} has tumour voxels: {label}")
        return [OutputCase(out_id, imgs, image_from_array(arr, lab), (*images, label))]

    return CaseTask(f"{source}/{cid}", load, check)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Cohort options."""
    parser.add_argument("--healthy", nargs="+", default=None, metavar="DATASET",
                        help="healthy-control dataset(s): ID, DatasetNNN_Name or folder")
    parser.add_argument("--prefix-source", action="store_true",
                        help="prefix case identifiers with the source dataset name")


def run(args: argparse.Namespace) -> Path:
    """Entry from the command line."""
    return convert(args.input, args.dataset_id, healthy=args.healthy, name=args.name, overwrite=args.overwrite,
                   raw_dir=args.raw_dir, exclude=args.exclude, prefix_source=args.prefix_source,
                   progress=not args.quiet, num_processes=args.num_processes)
