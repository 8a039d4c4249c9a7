"""BTCV Multi-Atlas Labeling Beyond the Cranial Vault (Abdomen) as healthy controls, one organ kept.

Layout as downloaded from Synapse (syn3193805, ``RawData.zip``)::

    RawData/Training/img/img0001.nii.gz ...
    RawData/Training/label/label0001.nii.gz ...     (13 organs, values 1..13)

``--organ`` keeps one organ (or both kidneys / both adrenal glands) as label 1; every other organ becomes
background. The tumour label 2 is declared but empty, so merges with tumour cohorts keep one label set.
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

#: BTCV label values.
BTCV_LABELS = {
    "spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4, "esophagus": 5, "liver": 6, "stomach": 7,
    "aorta": 8, "inferior_vena_cava": 9, "portal_and_splenic_vein": 10, "pancreas": 11, "right_adrenal_gland": 12,
    "left_adrenal_gland": 13,
}
#: --organ choice -> (BTCV values kept, label name in dataset.json)
ORGANS: dict[str, tuple[tuple[int, ...], str]] = {
    **{k: ((v,), k.replace("_", " ")) for k, v in BTCV_LABELS.items()},
    "kidney": ((2, 3), "kidney"),
    "adrenal_gland": ((12, 13), "adrenal gland"),
}
REFERENCE = ("Landman et al., MICCAI Multi-Atlas Labeling Beyond the Cranial Vault - Workshop and Challenge (2015), "
             "https://doi.org/10.7303/syn3193805")
_IMG_RE = re.compile(r"^img(\d+)\.nii(\.gz)?$")
_LAB_RE = re.compile(r"^label(\d+)\.nii(\.gz)?$")


def _training_folder(root: Path) -> Path:
    for cand in (root / "RawData" / "Training", root / "Training", root):
        if (cand / "img").is_dir() or (cand / "label").is_dir():
            return cand
    raise ConversionError(f"{root}: no img/ and label/ folders (expected RawData/Training/img and .../label)")


@resumable
def convert(input_dir: str | os.PathLike, dataset_id: int, *, organ: str = "pancreas", name: str | None = None,
            overwrite: bool = False, raw_dir: str | os.PathLike | None = None, exclude: list[str] | None = None,
            progress: bool = True, num_processes: int = 1) -> Path:
    """Convert BTCV keeping one organ.

    Args:
        input_dir: Folder holding ``RawData/`` (or ``RawData/Training`` itself).
        dataset_id: nnU-Net dataset ID.
        organ: Organ kept as label 1 (a key of :data:`ORGANS`).
        name: Dataset name (default BTCV<Organ>).
        overwrite: Replace an existing dataset folder of the same name.
        raw_dir: Output root instead of ``nnUNet_raw``.
        exclude: Case numbers or names (``0001``, ``img0001``, ``btcv_0001``) to leave out.
        progress: Show progress bars.
        num_processes: Worker processes converting cases (1: in this process).

    Returns:
        The written dataset folder.
    """
    if organ not in ORGANS:
        raise ConversionError(f"unknown organ {organ!r}; choose one of {sorted(ORGANS)}")
    keep, organ_name = ORGANS[organ]
    folder = _training_folder(Path(input_dir))
    images = {m.group(1): p for p in sorted((folder / "img").glob("*")) if (m := _IMG_RE.match(p.name))}
    labels = {m.group(1): p for p in sorted((folder / "label").glob("*")) if (m := _LAB_RE.match(p.name))}
    numbers = sorted(set(images) | set(labels))
    excl = [re.sub(r"^(img|label|btcv_)", "", e) for e in (exclude or ())]
    selected = select_cases(numbers, excl)
    for num in selected:
        if num not in images:
            raise ConversionError(f"case btcv_{num}: image missing: {folder / 'img' / f'img{num}.nii.gz'}")
        if num not in labels:
            raise ConversionError(f"case btcv_{num}: label missing: {folder / 'label' / f'label{num}.nii.gz'}")
    mapping = {0: 0, **{v: (1 if v in keep else 0) for v in BTCV_LABELS.values()}}

    def make_task(num: str) -> CaseTask:
        case, img_path, lab_path = f"btcv_{num}", images[num], labels[num]

        def check() -> None:
            g_img, n_img = read_header(img_path, case=case)
            if g_img.ndim != 3 or n_img != 1:
                raise ConversionError(f"case {case}: expected a single-channel 3D CT: {img_path}")
            check_alignable(read_header(lab_path, case=case)[0], g_img, case=case, what="label",
                            files=(img_path, lab_path))

        def load() -> list[OutputCase]:
            image = read_image(img_path, case=case)
            label = align_to_reference(read_image(lab_path, case=case), image, case=case, what="label",
                                       files=(img_path, lab_path))
            arr = remap_labels(label_array(label, case=case, file=lab_path), mapping, case=case, file=lab_path)
            return [OutputCase(case, [image], image_from_array(arr, image), (img_path, lab_path))]

        return CaseTask(case, load, check)

    default_name = "BTCV" + "".join(w.capitalize() for w in organ.split("_"))
    spec = DatasetSpec(dataset_id, name or default_name, {0: "CT"}, {"background": 0, organ_name: 1, "tumor": 2},
                       cohort="btcv", description=f"BTCV abdomen CT, {organ_name} only (healthy controls)",
                       reference=REFERENCE, licence="see https://www.synapse.org/#!Synapse:syn3193805",
                       extra={"organ": organ_name, "tumour": "tumor", "healthy": True,
                              "btcv_values": list(keep)})
    return write_dataset(spec, [make_task(n) for n in selected], overwrite=overwrite, raw_dir=raw_dir,
                         progress=progress, num_processes=num_processes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Cohort options."""
    parser.add_argument("--organ", default="pancreas", choices=sorted(ORGANS), help="organ kept as label 1")


def run(args: argparse.Namespace) -> Path:
    """Entry from the command line."""
    return convert(args.input, args.dataset_id, organ=args.organ, name=args.name, overwrite=args.overwrite,
                   raw_dir=args.raw_dir, exclude=args.exclude, progress=not args.quiet,
                   num_processes=args.num_processes)
