"""Real tumours hidden behind nnU-Net's ignore label: the synthetic-to-real transfer setting.

A dataset with hidden tumours has every real tumour voxel, dilated by a margin in mm, set to nnU-Net's ignore
label (the highest label, named ``ignore`` in dataset.json, as nnU-Net requires), so the loss never sees a real
tumour or its border. The original label maps are kept in ``labelsTr_tumours/`` for evaluation and for the
synth plan, which takes tumour statistics (sizes, contrast, texture) from the hidden masks of the training fold
only. dataset.json records the setting under ``nnunet_synth.hidden_tumours``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json
from scipy.ndimage import distance_transform_edt
from tqdm import tqdm

from nnunet_synth.dataset_conversion.common import (
    ConversionError,
    check_dataset_id_free,
    dataset_folder_name,
    find_raw_dataset,
    image_from_array,
    label_array,
    move_into_place,
    nnunet_raw_dir,
    partial_folder,
    read_image,
    write_json,
)

TUMOUR_MASKS = "labelsTr_tumours"
IGNORE = "ignore"
RECORD = "hidden_tumours"


def hide_tumours(label: np.ndarray, spacing: tuple[float, ...], tumour_label: int, ignore_label: int,
                 margin_mm: float) -> np.ndarray:
    """A label map whose tumour voxels, dilated by ``margin_mm``, carry ``ignore_label``.

    Args:
        label: label map (any dimensionality).
        spacing: voxel spacing in mm, in the array's axis order.
        tumour_label: value of the tumour label.
        ignore_label: value written on the hidden voxels.
        margin_mm: dilation of the tumours (Euclidean, in mm); 0 hides the tumour voxels only.

    Returns:
        A new array of the input's dtype.
    """
    hidden = label.copy()
    tumour = label == tumour_label
    if tumour.any():
        hidden[distance_transform_edt(~tumour, sampling=spacing) <= margin_mm] = ignore_label
    return hidden


def hidden_tumours_record(dataset_json: dict) -> dict | None:
    """The hidden-tumour setting a dataset.json records (margin, tumour and ignore label), or None."""
    return (dataset_json.get("nnunet_synth") or {}).get(RECORD)


def hide_tumours_in_folder(folder: Path, margin_mm: float, tumour_label: int | None = None,
                           progress: bool = True) -> dict:
    """Hides the tumours of a raw dataset folder that is still being written (not yet moved into place).

    Moves each ``labelsTr`` file to ``labelsTr_tumours/``, writes its hidden version in its place, adds the
    ``ignore`` label to dataset.json and records the setting there.

    Args:
        folder: a raw nnU-Net dataset folder (dataset.json, labelsTr).
        margin_mm: dilation of the hidden region around each tumour, in mm.
        tumour_label: the tumour label value (default: guessed from the label names).
        progress: show a progress bar.

    Returns:
        The record written to dataset.json.

    Raises:
        ConversionError: a dataset that already has an ignore label, an unidentifiable tumour label, a negative
            margin or an unreadable label file (named).
    """
    from nnunet_synth.planning import guess_tumour_label
    from nnunet_synth.synth_plan import SynthPlanError

    folder = Path(folder)
    dataset_json = load_json(str(folder / "dataset.json"))
    labels = dataset_json["labels"]
    if margin_mm < 0:
        raise ConversionError(f"--hide-tumours margin must be >= 0 mm, got {margin_mm}")
    if IGNORE in labels:
        raise ConversionError(f"{folder.name} already has an ignore label ({labels[IGNORE]}); its tumours cannot be "
                              f"hidden behind another one")
    try:
        tumour = guess_tumour_label(labels, tumour_label)
    except SynthPlanError as e:
        raise ConversionError(str(e)) from None
    ignore = max(int(v) for v in labels.values()) + 1  # nnU-Net: the ignore label is the highest one
    ending = dataset_json.get("file_ending", ".nii.gz")
    kept = folder / TUMOUR_MASKS
    kept.mkdir()
    files = sorted((folder / "labelsTr").glob(f"*{ending}"))
    name = folder.name.lstrip(".").split(".partial-")[0]  # also while being written
    for path in tqdm(files, desc=f"{name}: hiding tumours", unit="case", disable=not progress):
        case = path.name[: -len(ending)]
        image = read_image(path, case=case)
        hidden = hide_tumours(label_array(image, case=case, file=path), tuple(image.GetSpacing())[::-1], tumour,
                              ignore, margin_mm).astype(np.uint8 if ignore < 256 else np.uint16)
        path.rename(kept / path.name)
        sitk.WriteImage(image_from_array(hidden, image), str(path), True)
    record = {"margin_mm": float(margin_mm), "tumour_label": tumour, "ignore_label": ignore,
              "tumour_masks": TUMOUR_MASKS}
    dataset_json["labels"] = {**labels, IGNORE: ignore}
    dataset_json.setdefault("nnunet_synth", {})[RECORD] = record
    write_json(folder / "dataset.json", dataset_json)
    return record


def _link_images(src: str, dst: str) -> None:
    """Hard-links image files (the copy's images are the source's, never written: no second copy on disk) and
    copies the rest (dataset.json and the labels are rewritten in the copy)."""
    if Path(src).parent.name.startswith("images"):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def derive_hidden_dataset(source: str | int | os.PathLike, dataset_id: int, margin_mm: float,
                          tumour_label: int | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """A copy of a raw dataset with its tumours hidden, as ``DatasetNNN_<name>Hidden`` (written atomically).

    Args:
        source: the raw dataset with real tumour labels (ID, DatasetNNN_Name or folder).
        dataset_id: ID of the new dataset.
        margin_mm: dilation of the hidden region around each tumour, in mm.
        tumour_label: the tumour label value (default: guessed from the label names).
        overwrite: replace an existing dataset of the same name.
        progress: show a progress bar.

    Returns:
        The new dataset folder.

    Raises:
        ConversionError: the source hides its tumours already, the ID is taken by another dataset, or the
            target exists without ``overwrite``.
    """
    src = find_raw_dataset(source)
    if hidden_tumours_record(load_json(str(src / "dataset.json"))):
        raise ConversionError(f"{src.name} already hides its tumours; give the dataset with the real labels")
    raw = nnunet_raw_dir()
    name = dataset_folder_name(dataset_id, f"{src.name.split('_', 1)[1]}Hidden")
    check_dataset_id_free(dataset_id, name, raw)
    target = raw / name
    if target.exists() and not overwrite:
        raise ConversionError(f"{target} already exists; pass --overwrite to replace it")
    tmp = partial_folder(raw, name)
    try:
        shutil.copytree(src, tmp, copy_function=_link_images, dirs_exist_ok=True)
        hide_tumours_in_folder(tmp, margin_mm, tumour_label, progress)
        dataset_json = load_json(str(tmp / "dataset.json"))
        dataset_json["name"] = name
        dataset_json["nnunet_synth"][RECORD]["source"] = src.name
        write_json(tmp / "dataset.json", dataset_json)
        move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert_hiding_tumours(convert: Callable[[argparse.Namespace], Path], args: argparse.Namespace) -> Path:
    """Runs a cohort's conversion (``nnUNetv2_synth_convert COHORT ... --hide-tumours MM``) into a private
    folder beside the target, hides the tumours there and only then moves the dataset into place.

    Args:
        convert: the cohort's ``run(args)``.
        args: its parsed arguments, with ``hide_tumours`` (margin in mm), ``tumour_label``, ``raw_dir``,
            ``overwrite``, ``dataset_id`` and ``quiet``.

    Returns:
        The dataset folder in nnUNet_raw.
    """
    raw = nnunet_raw_dir(args.raw_dir)
    taken = [p for p in raw.glob(f"Dataset{int(args.dataset_id):03d}_*") if p.is_dir()] if raw.is_dir() else []
    if taken and not args.overwrite:
        raise ConversionError(f"{taken[0]} already exists; pass --overwrite to replace it")
    raw.mkdir(parents=True, exist_ok=True)
    staging = partial_folder(raw, f"Dataset{int(args.dataset_id):03d}-hiding-tumours")
    try:
        folder = convert(argparse.Namespace(**{**vars(args), "raw_dir": str(staging)}))
        hide_tumours_in_folder(folder, args.hide_tumours, args.tumour_label, not args.quiet)
        check_dataset_id_free(args.dataset_id, folder.name, raw)
        target = raw / folder.name
        move_into_place(folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class HiddenTumourLabels:
    """The real labels of a dataset with hidden tumours, in the preprocessed grid of one configuration.

    nnU-Net's preprocessed segmentations carry the ignore label where the tumours are; the kept masks are
    preprocessed here exactly as nnU-Net preprocesses labels (crop, transpose, resample), giving the
    segmentation each case would have with its tumours visible.
    """

    def __init__(self, preprocessed: Path, plans_identifier: str, configuration: str, dataset_json: dict):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        self.record = hidden_tumours_record(dataset_json)
        self.raw = find_raw_dataset(Path(preprocessed).name)
        self.dataset_json = load_json(str(self.raw / "dataset.json"))
        self.plans_manager = PlansManager(str(Path(preprocessed) / f"{plans_identifier}.json"))
        self.configuration = self.plans_manager.get_configuration(configuration)
        self.files = get_filenames_of_train_images_and_targets(str(self.raw), self.dataset_json)
        self.ending = self.dataset_json["file_ending"]

    @classmethod
    def of(cls, preprocessed: Path, plans_identifier: str, configuration: str) -> HiddenTumourLabels | None:
        """The real labels of a dataset that hides its tumours; None for an ordinary dataset (or a folder without
        dataset.json, which nnU-Net's preprocessing always writes: nothing hidden can be known of it)."""
        path = Path(preprocessed) / "dataset.json"
        dataset_json = load_json(str(path)) if path.is_file() else {}
        return cls(preprocessed, plans_identifier, configuration, dataset_json) \
            if hidden_tumours_record(dataset_json) else None

    def segmentation(self, identifier: str, stored: np.ndarray) -> np.ndarray:
        """The real (1, *spatial) segmentation of a case whose stored, hidden one is ``stored``.

        Raises:
            ConversionError: the kept mask is missing or does not fit the preprocessed case.
        """
        mask = self.raw / self.record["tumour_masks"] / f"{identifier}{self.ending}"
        if not mask.is_file():
            raise ConversionError(f"case {identifier}: kept tumour mask {mask} is missing")
        preprocessor = self.configuration.preprocessor_class(verbose=False)
        _, seg, _ = preprocessor.run_case(self.files[identifier]["images"], str(mask), self.plans_manager,
                                          self.configuration, self.dataset_json)
        if seg.shape != tuple(stored.shape):
            raise ConversionError(f"case {identifier}: kept tumour mask {mask} preprocesses to {seg.shape}, the "
                                  f"preprocessed case is {tuple(stored.shape)}; re-run nnUNetv2_preprocess")
        return seg.astype(stored.dtype)
