"""Medical Segmentation Decathlon: Task07_Pancreas (``msd_pancreas``) and Task03_Liver (``msd_liver``).

Layout as downloaded (http://medicaldecathlon.com)::

    Task07_Pancreas/
        dataset.json            MSD's own: "labels": {"0": "background", "1": "pancreas", "2": "cancer"}
        imagesTr/pancreas_001.nii.gz ...     (macOS "._pancreas_001.nii.gz" files are skipped)
        labelsTr/pancreas_001.nii.gz ...
        imagesTs/ ...           (no labels; not converted)

Labels: organ 1, tumour 2, kept as they are. Case identifiers are MSD's file names (``pancreas_001``, ``liver_0``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from nnunet_synth.dataset_conversion.common import (
    CaseTask,
    ConversionError,
    DatasetSpec,
    OutputCase,
    align_to_reference,
    check_alignable,
    image_from_array,
    label_array,
    list_images,
    read_header,
    read_image,
    remap_labels,
    resumable,
    select_cases,
    write_dataset,
)

#: cohort -> (organ name, MSD task folder, default dataset name)
TASKS = {
    "msd_pancreas": ("pancreas", "Task07_Pancreas", "MSDPancreas"),
    "msd_liver": ("liver", "Task03_Liver", "MSDLiver"),
}
REFERENCE = "Antonelli et al., The Medical Segmentation Decathlon, Nat. Commun. 13, 4128 (2022)"


def _msd_training_list(root: Path) -> list[str] | None:
    """Case names listed in MSD's dataset.json ``training`` entries, or None without a dataset.json."""
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"cannot parse {path}: {err}") from err
    return [Path(entry["image"]).name.removesuffix(".nii.gz") for entry in meta.get("training", [])]


def _check_msd_labels(root: Path, organ: str, cohort: str) -> None:
    """Refuse a Decathlon task whose label 1 is not the expected organ (e.g. Task03 given to msd_pancreas)."""
    path = root / "dataset.json"
    if path.is_file():
        labels = json.loads(path.read_text(encoding="utf-8")).get("labels", {})
        if labels and organ not in str(labels.get("1", "")).lower():
            raise ConversionError(f"{path}: label 1 is {labels.get('1')!r}, expected {organ!r} for {cohort}; "
                                  "is this the right Decathlon task?")


@resumable
def convert(cohort: str, input_dir: str | os.PathLike, dataset_id: int, *, name: str | None = None,
            overwrite: bool = False, raw_dir: str | os.PathLike | None = None, exclude: list[str] | None = None,
            progress: bool = True, num_processes: int = 1) -> Path:
    """Convert an MSD pancreas or liver task.

    Args:
        cohort: ``msd_pancreas`` or ``msd_liver``.
        input_dir: The TaskXX folder (or a folder containing it).
        dataset_id: nnU-Net dataset ID.
        name: Dataset name (default MSDPancreas / MSDLiver).
        overwrite: Replace an existing dataset folder of the same name.
        raw_dir: Output root instead of ``nnUNet_raw``.
        exclude: Case names to leave out.
        progress: Show progress bars.
        num_processes: Worker processes converting cases (1: in this process).

    Returns:
        The written dataset folder.
    """
    organ, task_folder, default_name = TASKS[cohort]
    root = Path(input_dir)
    if not (root / "imagesTr").is_dir() and (root / task_folder / "imagesTr").is_dir():
        root = root / task_folder
    if not (root / "imagesTr").is_dir():
        raise ConversionError(f"{root}: no imagesTr/ folder; point -i at the {task_folder} folder")
    _check_msd_labels(root, organ, cohort)
    images, labels = list_images(root / "imagesTr"), list_images(root / "labelsTr")
    names = sorted(set(images) | set(labels) | set(_msd_training_list(root) or ()))
    for case in select_cases(names, exclude):
        if case not in images:
            raise ConversionError(f"case {case}: image missing: {root / 'imagesTr' / (case + '.nii.gz')}")
        if case not in labels:
            raise ConversionError(f"case {case}: label missing: {root / 'labelsTr' / (case + '.nii.gz')}")

    def make_task(case: str) -> CaseTask:
        img_path, lab_path = images[case], labels[case]

        def check() -> None:
            g_img, n_img = read_header(img_path, case=case)
            if g_img.ndim != 3 or n_img != 1:
                raise ConversionError(f"case {case}: expected a single-channel 3D CT, got {g_img.ndim}D with "
                                      f"{n_img} component(s): {img_path}")
            check_alignable(read_header(lab_path, case=case)[0], g_img, case=case, what="label",
                            files=(img_path, lab_path))

        def load() -> list[OutputCase]:
            image = read_image(img_path, case=case)
            label = align_to_reference(read_image(lab_path, case=case), image, case=case, what="label",
                                       files=(img_path, lab_path))
            arr = remap_labels(label_array(label, case=case, file=lab_path), {0: 0, 1: 1, 2: 2}, case=case,
                               file=lab_path)
            return [OutputCase(case, [image], image_from_array(arr, image), (img_path, lab_path))]

        return CaseTask(case, load, check)

    spec = DatasetSpec(dataset_id, name or default_name, {0: "CT"}, {"background": 0, organ: 1, "tumor": 2},
                       cohort=cohort, description=f"MSD {task_folder}: {organ} and {organ} tumour, CT",
                       reference=REFERENCE, licence="CC-BY-SA 4.0", extra={"organ": organ, "tumour": "tumor"})
    tasks = [make_task(c) for c in select_cases(names, exclude)]
    return write_dataset(spec, tasks, overwrite=overwrite, raw_dir=raw_dir, progress=progress,
                         num_processes=num_processes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No cohort-specific options."""


def run(args: argparse.Namespace) -> Path:
    """Entry from the command line."""
    return convert(args.cohort, args.input, args.dataset_id, name=args.name, overwrite=args.overwrite,
                   raw_dir=args.raw_dir, exclude=args.exclude, progress=not args.quiet,
                   num_processes=args.num_processes)
