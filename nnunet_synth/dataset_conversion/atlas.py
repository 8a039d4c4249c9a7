"""ATLAS 2023 (A Tumour and Liver Automatic Segmentation) contrast-enhanced liver MRI.

Layout as downloaded (https://atlas-challenge.u-bourgogne.fr, training set)::

    imagesTr/im0.nii.gz, im1.nii.gz, ...
    labelsTr/lb0.nii.gz, lb1.nii.gz, ...      (liver 1, tumour 2)

``-i`` is the folder that holds ``imagesTr`` (a parent such as ``atlas-train-dataset-1.0.1/train`` is searched).
Case identifiers are ``atlas_NNN`` (zero-padded so they sort numerically).
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
    OutputCase,
    align_to_reference,
    check_alignable,
    image_from_array,
    label_array,
    read_header,
    read_image,
    remap_labels,
    resumable,
    select_cases,
    write_dataset,
)

REFERENCE = ("Quinton et al., A Tumour and Liver Automatic Segmentation (ATLAS) Dataset on Contrast-Enhanced "
             "Magnetic Resonance Imaging for Hepatocellular Carcinoma, Data 8(5), 79 (2023)")
_IM_RE = re.compile(r"^im(\d+)\.nii(\.gz)?$")
_LB_RE = re.compile(r"^lb(\d+)\.nii(\.gz)?$")


def _root(path: Path) -> Path:
    if (path / "imagesTr").is_dir():
        return path
    found = sorted(p.parent for p in path.rglob("imagesTr") if p.is_dir())
    if len(found) != 1:
        raise ConversionError(f"{path}: expected one imagesTr/ folder below it, found {len(found)}")
    return found[0]


@resumable
def convert(input_dir: str | os.PathLike, dataset_id: int, *, name: str | None = None, overwrite: bool = False,
            raw_dir: str | os.PathLike | None = None, exclude: list[str] | None = None,
            progress: bool = True, num_processes: int = 1) -> Path:
    """Convert ATLAS.

    Args:
        input_dir: Folder holding ``imagesTr/`` and ``labelsTr/`` (or a parent of it).
        dataset_id: nnU-Net dataset ID.
        name: Dataset name (default ATLAS).
        overwrite: Replace an existing dataset folder of the same name.
        raw_dir: Output root instead of ``nnUNet_raw``.
        exclude: Case numbers (``7``) or names (``im7``, ``atlas_007``) to leave out.
        progress: Show progress bars.
        num_processes: Worker processes converting cases (1: in this process).

    Returns:
        The written dataset folder.
    """
    root = _root(Path(input_dir))
    images = {int(m.group(1)): p for p in sorted((root / "imagesTr").iterdir()) if (m := _IM_RE.match(p.name))}
    labels = {int(m.group(1)): p for p in sorted((root / "labelsTr").glob("*")) if (m := _LB_RE.match(p.name))}
    numbers = sorted(set(images) | set(labels))
    excl = [re.sub(r"^(im|lb|atlas_)", "", e) for e in (exclude or ())]
    excl = [int(e) if e.isdigit() else e for e in excl]  # a non-number is reported as unknown below
    selected = select_cases(numbers, excl)
    for num in selected:
        if num not in images:
            raise ConversionError(f"case atlas_{num:03d}: image missing: {root / 'imagesTr' / f'im{num}.nii.gz'}")
        if num not in labels:
            raise ConversionError(f"case atlas_{num:03d}: label missing: {root / 'labelsTr' / f'lb{num}.nii.gz'}")

    def make_task(num: int) -> CaseTask:
        case, img_path, lab_path = f"atlas_{num:03d}", images[num], labels[num]

        def check() -> None:
            g_img, n_img = read_header(img_path, case=case)
            if g_img.ndim != 3 or n_img != 1:
                raise ConversionError(f"case {case}: expected a single-channel 3D MRI, got {g_img.ndim}D with "
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

    spec = DatasetSpec(dataset_id, name or "ATLAS", {0: "T1_CE_MRI"}, {"background": 0, "liver": 1, "tumor": 2},
                       cohort="atlas", description="ATLAS 2023 contrast-enhanced T1 liver MRI, liver and HCC",
                       reference=REFERENCE, licence="see the ATLAS challenge data terms",
                       extra={"organ": "liver", "tumour": "tumor"})
    return write_dataset(spec, [make_task(n) for n in selected], overwrite=overwrite, raw_dir=raw_dir,
                         progress=progress, num_processes=num_processes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No cohort-specific options."""


def run(args: argparse.Namespace) -> Path:
    """Entry from the command line."""
    return convert(args.input, args.dataset_id, name=args.name, overwrite=args.overwrite, raw_dir=args.raw_dir,
                   exclude=args.exclude, progress=not args.quiet, num_processes=args.num_processes)
