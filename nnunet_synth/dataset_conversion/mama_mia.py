"""MAMA-MIA breast DCE-MRI with expert tumour segmentations.

Layout as downloaded from Synapse (syn60868042)::

    images/DUKE_001/duke_001_0000.nii.gz        pre-contrast
    images/DUKE_001/duke_001_0001.nii.gz        first post-contrast, then _0002, ... (2-5 post phases per patient)
    segmentations/expert/duke_001.nii.gz        tumour = 1
    patient_info_files/duke_001.json            (clinical/imaging metadata; not needed here)
    train_test_splits.csv                       columns train_split, test_split (patient IDs)

Patient IDs are matched case-insensitively (folders are upper case, files lower case). Channels are pre-contrast
and first post-contrast (``--post-phase first``), or one case per post-contrast phase, each pre + that phase
(``--post-phase all``, case ``<id>_post<k>``; the SynBT paper drew a random post phase per training sample).
``--spacing 1`` resamples to 1 mm isotropic (linear for images, nearest for labels). ``--split official`` writes
the official train/test split as one nnU-Net fold in ``splits_final.json`` (nnU-Net's planner copies it into
nnUNet_preprocessed); with ``--post-phase all`` a patient-grouped 5-fold split is written otherwise, so phases of one
patient never straddle train and validation. ``--single-breast`` (the breast 2D paper's single-breast views) writes
each breast as its own case, ``<case>_L`` and ``<case>_R``, cut at the body's midline (see
:mod:`~nnunet_synth.dataset_conversion.single_breast`), with the patient-grouped split too.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from pathlib import Path

from nnunet_synth.dataset_conversion.common import (
    CaseTask,
    ConversionError,
    DatasetSpec,
    Geometry,
    OutputCase,
    align_to_reference,
    check_alignable,
    check_same_geometry,
    grouped_folds,
    image_from_array,
    label_array,
    list_images,
    read_header,
    read_image,
    remap_labels,
    resample_to_spacing,
    resumable,
    write_dataset,
)
from nnunet_synth.dataset_conversion.single_breast import single_breast_ids, split_breasts

REFERENCE = ("Garrucho et al., A large-scale multicenter breast cancer DCE-MRI benchmark dataset with expert "
             "segmentations, Sci. Data (2025), https://doi.org/10.7303/syn60868042")
_PHASE_RE = re.compile(r"^(?P<id>.+)_(?P<k>\d{4})$")


def read_official_split(csv_path: Path) -> tuple[list[str], list[str]]:
    """Lower-case patient IDs of the ``train_split`` and ``test_split`` columns.

    Raises:
        ConversionError: File missing, columns missing, or a patient in both columns.
    """
    if not csv_path.is_file():
        raise ConversionError(f"split file not found: {csv_path}")
    with open(csv_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {c.strip().lower(): c for c in (rows[0].keys() if rows else [])}
    if "train_split" not in columns or "test_split" not in columns:
        raise ConversionError(f"{csv_path}: expected columns train_split and test_split, found {list(columns)}")
    train = [r[columns["train_split"]].strip().lower() for r in rows if (r[columns["train_split"]] or "").strip()]
    test = [r[columns["test_split"]].strip().lower() for r in rows if (r[columns["test_split"]] or "").strip()]
    both = sorted(set(train) & set(test))
    if both:
        raise ConversionError(f"{csv_path}: patients in both train_split and test_split: {both[:10]}")
    return train, test


@resumable
def convert(input_dir: str | os.PathLike, dataset_id: int, *, name: str | None = None, overwrite: bool = False,
            raw_dir: str | os.PathLike | None = None, exclude: list[str] | None = None, post_phase: str = "first",
            spacing: list[float] | None = None, split: str = "none", split_csv: str | os.PathLike | None = None,
            progress: bool = True, num_processes: int = 1, single_breast: bool = False) -> Path:
    """Convert MAMA-MIA.

    Args:
        input_dir: Folder holding ``images/``, ``segmentations/expert/`` and ``train_test_splits.csv``.
        dataset_id: nnU-Net dataset ID.
        name: Dataset name (default MAMAMIA).
        overwrite: Replace an existing dataset folder of the same name.
        raw_dir: Output root instead of ``nnUNet_raw``.
        exclude: Patient IDs to leave out (any case).
        post_phase: ``first`` (one case per patient) or ``all`` (one case per post-contrast phase).
        spacing: Resample to this spacing in mm (one value: isotropic; three: x, y, z).
        split: ``official`` writes the official split; ``none`` leaves splitting to nnU-Net (except with
            ``post_phase="all"`` or ``single_breast``, which get a patient-grouped 5-fold split).
        split_csv: Split file if not ``INPUT/train_test_splits.csv``.
        progress: Show progress bars.
        num_processes: Worker processes converting cases (1: in this process).
        single_breast: One case per breast (``<case>_L``, ``<case>_R``), cut at the body's midline.

    Returns:
        The written dataset folder.
    """
    if post_phase not in ("first", "all"):
        raise ConversionError(f"--post-phase must be first or all, got {post_phase!r}")
    if split not in ("none", "official"):
        raise ConversionError(f"--split must be none or official, got {split!r}")
    if spacing is not None and (len(spacing) not in (1, 3) or min(spacing) <= 0):
        raise ConversionError(f"--spacing takes one or three positive values, got {spacing}")
    root = Path(input_dir)
    image_root, seg_root = root / "images", root / "segmentations" / "expert"
    if not image_root.is_dir():
        raise ConversionError(f"{root}: no images/ folder")
    folders = {p.name.lower(): p for p in sorted(image_root.iterdir()) if p.is_dir()}
    segs = {k.lower(): v for k, v in list_images(seg_root).items()}
    excluded = {e.lower() for e in (exclude or ())}
    unknown = excluded - set(folders) - set(segs)
    if unknown:
        raise ConversionError(f"--exclude names unknown patient(s): {sorted(unknown)}")
    patients = sorted((set(folders) | set(segs)) - excluded)

    phase_files: dict[str, dict[int, Path]] = {}
    for pid in patients:
        if pid not in folders:
            raise ConversionError(f"case {pid}: image folder missing: {image_root / pid.upper()}")
        if pid not in segs:
            raise ConversionError(f"case {pid}: expert segmentation missing: {seg_root / (pid + '.nii.gz')}")
        files = {}
        for stem, path in list_images(folders[pid]).items():
            m = _PHASE_RE.match(stem)
            if m and m.group("id").lower() == pid:
                files[int(m.group("k"))] = path
        if 0 not in files or 1 not in files:
            raise ConversionError(f"case {pid}: needs a pre-contrast ({pid}_0000.nii.gz) and a first post-contrast "
                                  f"({pid}_0001.nii.gz) image in {folders[pid]}; found phases {sorted(files)}")
        phase_files[pid] = files

    cases: dict[str, list[str]] = {}
    tasks = []
    for pid in patients:
        posts = [1] if post_phase == "first" else sorted(k for k in phase_files[pid] if k > 0)
        ids = [pid] if post_phase == "first" else [f"{pid}_post{k}" for k in posts]
        cases[pid] = single_breast_ids(ids) if single_breast else ids
        tasks.append(_make_task(pid, ids, [phase_files[pid][0]] + [phase_files[pid][k] for k in posts],
                                segs[pid], spacing, single_breast))

    splits = None
    if split == "official":
        train, test = read_official_split(Path(split_csv) if split_csv else root / "train_test_splits.csv")
        listed = set(train) | set(test)
        not_listed = sorted(set(patients) - listed)
        if not_listed:
            raise ConversionError(f"patients not in the official split file: {not_listed[:10]}")
        missing = sorted(listed - set(patients) - excluded)
        if missing:
            raise ConversionError(f"patients of the official split without images/segmentation: {missing[:10]} "
                                  "(pass --exclude to leave them out deliberately)")
        splits = [{"train": sorted(c for p in train if p in cases for c in cases[p]),
                   "val": sorted(c for p in test if p in cases for c in cases[p])}]
    elif post_phase == "all" or single_breast:
        splits = grouped_folds(cases)

    channels = {0: "DCE_pre", 1: "DCE_post1" if post_phase == "first" else "DCE_post"}
    spec = DatasetSpec(dataset_id, name or "MAMAMIA", channels, {"background": 0, "tumor": 1}, cohort="mama_mia",
                       description=f"MAMA-MIA breast DCE-MRI, pre-contrast + {post_phase} post-contrast phase(s)"
                       + (f", resampled to {spacing} mm" if spacing else "")
                       + (", one case per breast" if single_breast else ""),
                       reference=REFERENCE, licence="CC BY-NC 4.0",
                       extra={"organ": None, "tumour": "tumor", "post_phase": post_phase,
                              "single_breast": single_breast,
                              "split": split if split == "official" else ("patient_5fold" if splits else "nnunet")})
    return write_dataset(spec, tasks, overwrite=overwrite, raw_dir=raw_dir, splits=splits, progress=progress,
                         num_processes=num_processes)


def _make_task(pid: str, ids: list[str], image_paths: list[Path], seg_path: Path,
               spacing: list[float] | None, single_breast: bool = False) -> CaseTask:
    def check() -> None:
        g_ref, _ = read_header(image_paths[0], case=pid)
        for p in image_paths:
            g, comps = read_header(p, case=pid)
            if g.ndim != 3 or comps != 1:
                raise ConversionError(f"case {pid}: expected a single-channel 3D image, got {g.ndim}D with "
                                      f"{comps} component(s): {p}")
            check_same_geometry(g_ref, g, case=pid, what=f"phase {p.name}", files=(image_paths[0], p))
        check_alignable(read_header(seg_path, case=pid)[0], g_ref, case=pid, what="segmentation",
                        files=(image_paths[0], seg_path))

    def load() -> list[OutputCase]:
        images = [read_image(p, case=pid) for p in image_paths]
        for p, im in zip(image_paths[1:], images[1:], strict=True):
            # Phases share one grid up to header rounding; one grid makes the resampled channels identical too.
            check_same_geometry(Geometry.of(images[0]), Geometry.of(im), case=pid, what=f"phase {p.name}",
                                files=(image_paths[0], p))
            im.CopyInformation(images[0])
        seg = align_to_reference(read_image(seg_path, case=pid), images[0], case=pid, what="segmentation",
                                 files=(image_paths[0], seg_path))
        arr = remap_labels(label_array(seg, case=pid, file=seg_path), {0: 0, 1: 1}, case=pid, file=seg_path)
        label = image_from_array(arr, images[0])
        if spacing is not None:
            images = [resample_to_spacing(im, spacing, is_label=False) for im in images]
            label = resample_to_spacing(label, spacing, is_label=True)
        sources = (*image_paths, seg_path)
        out = [OutputCase(cid, [images[0], images[1 + k]], label, sources) for k, cid in enumerate(ids)]
        return [half for case in out for half in split_breasts(case)] if single_breast else out

    return CaseTask(pid, load, check)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Cohort options."""
    parser.add_argument("--post-phase", choices=("first", "all"), default="first",
                        help="first post-contrast phase only, or one case per post-contrast phase")
    parser.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                        help="resample to this spacing (one value: isotropic, e.g. --spacing 1)")
    parser.add_argument("--split", choices=("none", "official"), default="none",
                        help="write the official train/test split as splits_final.json")
    parser.add_argument("--split-csv", default=None, help="split file (default INPUT/train_test_splits.csv)")
    parser.add_argument("--single-breast", action="store_true",
                        help="one case per breast (<case>_L, <case>_R), cut at the body's left-right midline; folds "
                             "grouped by patient")


def run(args: argparse.Namespace) -> Path:
    """Entry from the command line."""
    return convert(args.input, args.dataset_id, name=args.name, overwrite=args.overwrite, raw_dir=args.raw_dir,
                   exclude=args.exclude, post_phase=args.post_phase, spacing=args.spacing, split=args.split,
                   split_csv=args.split_csv, progress=not args.quiet,
                   num_processes=args.num_processes, single_breast=args.single_breast)
