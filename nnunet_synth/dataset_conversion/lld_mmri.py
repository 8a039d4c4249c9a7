"""LLD-MMRI 2023 multi-phase liver MRI with 3D lesion boxes.

Layout as distributed by the challenge (https://github.com/LMMMEng/LLD-MMRI2023)::

    images/<patient>/<studyUID>/<seriesUID>.nii.gz      one volume per phase (8 phases)
    labels/Annotation.json

``Annotation.json`` holds ``{"Annotation_info": {<patient>: [<series entry>, ...]}}``; a series entry has
``studyUID``, ``seriesUID``, ``phase`` (``C+A``, ``C+V``, ``C+Delay``, ``C-pre``, ``T2WI``, ``DWI``, ``In Phase``,
``Out Phase``) and ``annotation.lesion`` = ``{<index>: {"category": int, "bbox": {"3D_box": {x_min, y_min, z_min,
x_max, y_max, z_max}}}}``. Box coordinates are voxel indices of the SimpleITK array (z, y, x) of that series,
maxima inclusive.

Each selected phase of each patient becomes its own single-channel case ``<patient>_<phase>``. There are no
delineations: the tumour label (2) holds the filled boxes of the selected lesions and the liver label (1) is declared
but empty, so the label set matches ATLAS for the box-guided pseudo-labelling that turns boxes into masks. Every
box (also of lesions left out by ``--categories``) is listed in ``lesion_boxes.json`` beside dataset.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from nnunet_synth.dataset_conversion.common import (
    CaseTask,
    ConversionError,
    DatasetSpec,
    OutputCase,
    image_from_array,
    read_header,
    read_image,
    resumable,
    sanitize_identifier,
    write_dataset,
    write_json,
)

#: LLD-MMRI lesion categories (challenge README).
CATEGORIES = {
    0: "Hepatic_hemangioma", 1: "Intrahepatic_cholangiocarcinoma", 2: "Hepatic_abscess", 3: "Hepatic_metastasis",
    4: "Hepatic_cyst", 5: "FOCAL_NODULAR_HYPERPLASIA", 6: "Hepatocellular_carcinoma",
}
CATEGORY_ALIASES = {"hemangioma": 0, "icc": 1, "abscess": 2, "metastasis": 3, "cyst": 4, "fnh": 5, "hcc": 6}
#: phase name in Annotation.json -> tag in case identifiers
PHASES = {"C+A": "arterial", "C+V": "venous", "C+Delay": "delay", "C-pre": "pre", "T2WI": "t2", "DWI": "dwi",
          "In Phase": "inphase", "Out Phase": "outphase"}
DEFAULT_PHASES = ("C+A", "C+V", "C+Delay")
REFERENCE = "LLD-MMRI 2023 challenge, https://github.com/LMMMEng/LLD-MMRI2023"
_BOX_KEYS = ("z_min", "y_min", "x_min", "z_max", "y_max", "x_max")


def parse_categories(items: list[str] | None) -> set[int]:
    """Category selection from names (``hcc``), full names or numbers; ``all`` or nothing means 0..6.

    Raises:
        ConversionError: An unknown category.
    """
    if not items or "all" in [i.lower() for i in items]:
        return set(CATEGORIES)
    out = set()
    full = {v.lower(): k for k, v in CATEGORIES.items()}
    for item in items:
        key = item.lower()
        if key.lstrip("-").isdigit() and int(key) in CATEGORIES:
            out.add(int(key))
        elif key in CATEGORY_ALIASES or key in full:
            out.add(CATEGORY_ALIASES.get(key, full.get(key)))
        else:
            raise ConversionError(f"unknown lesion category {item!r}; use all, {', '.join(CATEGORY_ALIASES)} "
                                  "or 0-6")
    return out


def _lesions(entry: dict, where: str) -> list[tuple[str, int, list[int]]]:
    """(index, category, [z0, y0, x0, z1, y1, x1]) of every lesion of one series entry."""
    lesions = (entry.get("annotation") or {}).get("lesion") or {}
    items = lesions.items() if isinstance(lesions, dict) else enumerate(lesions)
    out = []
    for idx, les in items:
        try:
            box = les["bbox"]["3D_box"]
            coords = [int(round(float(box[k]))) for k in _BOX_KEYS]
            category = int(les["category"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConversionError(f"{where}: lesion {idx} lacks category or bbox.3D_box "
                                  f"{'/'.join(_BOX_KEYS)}: {err!r}") from err
        out.append((str(idx), category, coords))
    return out


@resumable
def convert(input_dir: str | os.PathLike, dataset_id: int, *, name: str | None = None, overwrite: bool = False,
            raw_dir: str | os.PathLike | None = None, exclude: list[str] | None = None,
            phases: list[str] | tuple[str, ...] = DEFAULT_PHASES, categories: list[str] | None = None,
            annotation: str | os.PathLike | None = None, clip_boxes: bool = False, progress: bool = True,
            num_processes: int = 1) -> Path:
    """Convert LLD-MMRI with boxes as tumour labels.

    Args:
        input_dir: Folder holding ``images/`` and ``labels/Annotation.json``.
        dataset_id: nnU-Net dataset ID.
        name: Dataset name (default LLDMMRI).
        overwrite: Replace an existing dataset folder of the same name.
        raw_dir: Output root instead of ``nnUNet_raw``.
        exclude: Patients (``MR12345``) or cases (``MR12345_arterial``) to leave out.
        phases: Phases converted, each a separate case.
        categories: Lesion categories kept (see :func:`parse_categories`); patients without a kept lesion are
            skipped, boxes of other lesions are left out of the label.
        annotation: Path of Annotation.json if not ``labels/Annotation.json``.
        clip_boxes: Clip boxes reaching outside the volume instead of refusing the case.
        progress: Show progress bars.
        num_processes: Worker processes converting cases (1: in this process).

    Returns:
        The written dataset folder.
    """
    root = Path(input_dir)
    ann_path = Path(annotation) if annotation else root / "labels" / "Annotation.json"
    if not ann_path.is_file():
        raise ConversionError(f"annotation file not found: {ann_path}")
    try:
        info = json.loads(ann_path.read_text(encoding="utf-8"))["Annotation_info"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConversionError(f"{ann_path}: not an LLD-MMRI annotation file (no Annotation_info): {err!r}") from err
    unknown_phases = [p for p in phases if p not in PHASES]
    if unknown_phases:
        raise ConversionError(f"unknown phase(s) {unknown_phases}; choose from {list(PHASES)}")
    keep = parse_categories(categories)
    excluded = set(exclude or ())
    used_exclusions: set[str] = set()
    tasks, boxes_record = [], {}

    for patient in sorted(info):
        entries = info[patient] or []
        lesion_lists = [_lesions(e, f"{ann_path} patient {patient}") for e in entries]
        if not any(cat in keep for les in lesion_lists for _, cat, _ in les):
            continue
        if patient in excluded:
            used_exclusions.add(patient)
            continue
        for entry, lesions in zip(entries, lesion_lists, strict=True):
            phase = entry.get("phase")
            if phase not in phases:
                continue
            case = f"{sanitize_identifier(patient)}_{PHASES[phase]}"
            if case in excluded:
                used_exclusions.add(case)
                continue
            if case in boxes_record:
                raise ConversionError(f"case {case}: patient {patient} has two {phase} series in {ann_path}")
            try:
                img_path = root / "images" / patient / entry["studyUID"] / f"{entry['seriesUID']}.nii.gz"
            except KeyError as err:
                raise ConversionError(f"{ann_path}: patient {patient} phase {phase} lacks {err}") from err
            record = {"source": str(img_path.relative_to(root)), "patient": patient, "phase": phase, "lesions": [
                {"index": idx, "category": cat, "category_name": CATEGORIES.get(cat, "unknown"),
                 "selected": cat in keep, "box_zyx_min": box[:3], "box_zyx_max": box[3:]}
                for idx, cat, box in lesions]}
            boxes_record[case] = record
            tasks.append(_make_task(case, img_path, record, clip_boxes))
    unknown = excluded - used_exclusions
    if unknown:
        raise ConversionError(f"--exclude names unknown patient(s)/case(s): {sorted(unknown)}")

    def finalize(folder: Path, written: list[str]) -> None:
        write_json(folder / "lesion_boxes.json", {c: boxes_record[c] for c in written})

    spec = DatasetSpec(dataset_id, name or "LLDMMRI", {0: "MRI"}, {"background": 0, "liver": 1, "tumor": 2},
                       cohort="lld_mmri", reference=REFERENCE, licence="research use only (LLD-MMRI terms)",
                       description="LLD-MMRI 2023, phases " + ", ".join(phases) + "; tumour label = filled 3D "
                       "lesion boxes, liver label empty (box annotations only)",
                       extra={"organ": "liver", "tumour": "tumor", "tumour_label_is_box": True,
                              "lesion_categories": sorted(keep), "boxes_file": "lesion_boxes.json"})
    return write_dataset(spec, tasks, overwrite=overwrite, raw_dir=raw_dir, finalize=finalize, progress=progress,
                         num_processes=num_processes)


def _make_task(case: str, img_path: Path, record: dict, clip_boxes: bool) -> CaseTask:
    def boxes(shape_zyx: tuple[int, ...]) -> list[tuple[slice, ...]]:
        out = []
        for les in record["lesions"]:
            lo, hi = np.asarray(les["box_zyx_min"]), np.asarray(les["box_zyx_max"])
            if np.any(lo > hi):
                raise ConversionError(f"case {case}: lesion {les['index']} box min {lo.tolist()} > max "
                                      f"{hi.tolist()} (z, y, x) for {img_path}")
            if np.any(lo < 0) or np.any(hi >= shape_zyx):
                if not clip_boxes:
                    raise ConversionError(f"case {case}: lesion {les['index']} box {lo.tolist()}-{hi.tolist()} "
                                          f"(z, y, x, inclusive) outside the volume {list(shape_zyx)}: {img_path} "
                                          "(pass --clip-boxes to clip)")
                lo, hi = np.maximum(lo, 0), np.minimum(hi, np.asarray(shape_zyx) - 1)
                les["clipped"] = True
            if les["selected"] and np.all(lo <= hi):
                out.append(tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True)))
        return out

    def check() -> None:
        geom, comps = read_header(img_path, case=case)
        if geom.ndim != 3 or comps != 1:
            raise ConversionError(f"case {case}: expected a single-channel 3D MRI: {img_path}")
        boxes(geom.size[::-1])

    def load() -> list[OutputCase]:
        image = read_image(img_path, case=case)
        label = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
        for box in boxes(label.shape):
            label[box] = 2
        return [OutputCase(case, [image], image_from_array(label, image), (img_path,))]

    return CaseTask(case, load, check)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Cohort options."""
    parser.add_argument("--phases", nargs="+", default=list(DEFAULT_PHASES), choices=list(PHASES),
                        help="phases converted, each a separate case")
    parser.add_argument("--categories", nargs="+", default=["all"], metavar="CAT",
                        help="lesion categories kept: all, " + ", ".join(CATEGORY_ALIASES) + " or numbers 0-6 "
                        "(e.g. --categories hcc)")
    parser.add_argument("--annotation", default=None, help="Annotation.json (default: INPUT/labels/Annotation.json)")
    parser.add_argument("--clip-boxes", action="store_true", help="clip boxes that reach outside the volume")


def run(args: argparse.Namespace) -> Path:
    """Entry from the command line."""
    return convert(args.input, args.dataset_id, name=args.name, overwrite=args.overwrite, raw_dir=args.raw_dir,
                   exclude=args.exclude, phases=args.phases, categories=args.categories, annotation=args.annotation,
                   clip_boxes=args.clip_boxes, progress=not args.quiet,
                   num_processes=args.num_processes)
