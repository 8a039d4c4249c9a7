"""NIH Pancreas-CT (TCIA) as healthy controls: pancreas label only, tumour label declared but empty.

Layout as downloaded with the NBIA Data Retriever (https://doi.org/10.7937/K9/TCIA.2016.tNB1kqBU)::

    Pancreas-CT/PANCREAS_0001/<study>/<series>/1-001.dcm ...
    TCIA_pancreas_labels-02-05-2017/label0001.nii.gz ...     (pancreas = 1)

``-i`` is any folder above both (patient folders and label files are found at any depth), or give the label folder
with ``--labels``. The DICOM series is read with SimpleITK (GDCM sorts the slices by position); the label must lie
on the same voxel grid (an axis permutation/flip of the same grid is put in register exactly), otherwise the case is
refused with both geometries printed. ``--trust-voxel-grid`` copies the image geometry onto a label of equal size
instead, for label files whose header is known to be wrong; check such cases visually.
"""

from __future__ import annotations

import argparse
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
    image_from_array,
    label_array,
    read_header,
    read_image,
    remap_labels,
    resumable,
    select_cases,
    write_dataset,
)
from nnunet_synth.dataset_conversion.dicom import find_series, read_series

_PATIENT_RE = re.compile(r"^PANCREAS_(\d{4})$")
_LABEL_RE = re.compile(r"^label(\d{4})\.nii(\.gz)?$")
REFERENCE = ("Roth et al., Data from Pancreas-CT, The Cancer Imaging Archive (2016), "
             "https://doi.org/10.7937/K9/TCIA.2016.tNB1kqBU")


def _find(root: Path, labels_dir: Path | None) -> tuple[dict[str, Path], dict[str, Path]]:
    """Patient folders and label files by four-digit number."""
    patients = {m.group(1): p for p in sorted(root.rglob("PANCREAS_*")) if p.is_dir()
                and (m := _PATIENT_RE.match(p.name))}
    label_root = labels_dir or root
    labels = {m.group(1): p for p in sorted(label_root.rglob("label*")) if p.is_file()
              and (m := _LABEL_RE.match(p.name))}
    return patients, labels


@resumable
def convert(input_dir: str | os.PathLike, dataset_id: int, *, name: str | None = None, overwrite: bool = False,
            raw_dir: str | os.PathLike | None = None, exclude: list[str] | None = None,
            labels_dir: str | os.PathLike | None = None, trust_voxel_grid: bool = False,
            progress: bool = True, num_processes: int = 1) -> Path:
    """Convert NIH Pancreas-CT.

    Args:
        input_dir: Folder above ``PANCREAS_NNNN/`` folders and ``labelNNNN.nii.gz`` files.
        dataset_id: nnU-Net dataset ID.
        name: Dataset name (default PancreasCT).
        overwrite: Replace an existing dataset folder of the same name.
        raw_dir: Output root instead of ``nnUNet_raw``.
        exclude: Patients to leave out (``PANCREAS_0025`` or ``0025``).
        labels_dir: Folder with the label files, if not below ``input_dir``.
        trust_voxel_grid: Accept a label of the image's size whatever its header says.
        progress: Show progress bars.
        num_processes: Worker processes converting cases (1: in this process).

    Returns:
        The written dataset folder.
    """
    root = Path(input_dir)
    patients, labels = _find(root, Path(labels_dir) if labels_dir else None)
    if not patients and not labels:
        raise ConversionError(f"{root}: no PANCREAS_NNNN folders and no labelNNNN.nii.gz files found")
    numbers = sorted(set(patients) | set(labels))
    exclude_numbers = [e.removeprefix("PANCREAS_") for e in (exclude or ())]
    selected = select_cases(numbers, exclude_numbers)
    for num in selected:
        if num not in patients:
            raise ConversionError(f"case PANCREAS_{num}: DICOM folder PANCREAS_{num} missing for label "
                                  f"{labels[num]} (pass --exclude PANCREAS_{num} to leave it out)")
        if num not in labels:
            raise ConversionError(f"case PANCREAS_{num}: label file label{num}.nii.gz missing for {patients[num]}")

    def make_task(num: str) -> CaseTask:
        case, folder, lab_path = f"PANCREAS_{num}", patients[num], labels[num]
        state: dict = {}

        def one_series():
            found = find_series(folder)
            if len(found) != 1:
                raise ConversionError(f"case {case}: expected one DICOM series in {folder}, found {len(found)}")
            return found[0]

        def check() -> None:
            series = state["series"] = one_series()
            g_lab, n_lab = read_header(lab_path, case=case)
            if g_lab.ndim != 3 or n_lab != 1:
                raise ConversionError(f"case {case}: label is not a 3D single-component image: {lab_path}")
            if len(series.files) not in g_lab.size:
                raise ConversionError(f"case {case}: label has size {g_lab.size} but the DICOM series has "
                                      f"{len(series.files)} slices\n  files: {folder}, {lab_path}")

        def load() -> list[OutputCase]:
            # A worker process loads without having checked (the check ran in the main process).
            image = read_series(state.get("series") or one_series(), case=case)
            label = read_image(lab_path, case=case)
            if trust_voxel_grid and Geometry.of(label).size == Geometry.of(image).size:
                label.CopyInformation(image)
            label = align_to_reference(label, image, case=case, what="label", files=(folder, lab_path))
            arr = remap_labels(label_array(label, case=case, file=lab_path), {0: 0, 1: 1}, case=case,
                               file=lab_path)
            return [OutputCase(f"pancreasct_{num}", [image], image_from_array(arr, image), (folder, lab_path))]

        return CaseTask(case, load, check)

    spec = DatasetSpec(dataset_id, name or "PancreasCT", {0: "CT"}, {"background": 0, "pancreas": 1, "tumor": 2},
                       cohort="pancreas_ct", description="NIH Pancreas-CT, healthy pancreas (no tumours)",
                       reference=REFERENCE, licence="CC BY 3.0",
                       extra={"organ": "pancreas", "tumour": "tumor", "healthy": True})
    return write_dataset(spec, [make_task(n) for n in selected], overwrite=overwrite, raw_dir=raw_dir,
                         progress=progress, num_processes=num_processes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Cohort options."""
    parser.add_argument("--labels", default=None, metavar="DIR",
                        help="folder with labelNNNN.nii.gz (default: searched below -i)")
    parser.add_argument("--trust-voxel-grid", action="store_true",
                        help="copy the image geometry onto a label of equal size (for known-bad label headers)")


def run(args: argparse.Namespace) -> Path:
    """Entry from the command line."""
    return convert(args.input, args.dataset_id, name=args.name, overwrite=args.overwrite, raw_dir=args.raw_dir,
                   exclude=args.exclude, labels_dir=args.labels, trust_voxel_grid=args.trust_voxel_grid,
                   progress=not args.quiet, num_processes=args.num_processes)

