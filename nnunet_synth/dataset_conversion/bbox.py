"""Pseudo-masks from boxes: the liver-MRI paper's teacher step that turns lesion boxes into tumour masks.

The paper trained a 3D nnU-Net on ATLAS with each tumour's bounding box as an extra input channel and the real mask
as target (the box guides the network to the lesion, the mask teaches the outline), then ran it on LLD-MMRI, which
has boxes only, to get tumour pseudo-masks plus a liver mask predicted at the same time. Two commands do this with a
plain nnU-Net in between::

    nnUNetv2_synth_bbox_dataset -i 505 -d 515                  # ATLAS + box channel -> Dataset515_ATLASBoxes
    nnUNetv2_plan_and_preprocess -d 515 -c 3d_fullres --verify_dataset_integrity
    nnUNetv2_train 515 3d_fullres 0
    nnUNetv2_synth_bbox_pseudolabel -d 515 -f 0 -i 506 -o 516  # LLD-MMRI boxes -> Dataset516_LLDMMRIPseudo

Box convention (both commands): one axis-aligned box per connected tumour component (26-connectivity in 3D), in
voxel indices (z, y, x) of the SimpleITK array, maxima inclusive (as ``lesion_boxes.json`` of the LLD-MMRI
converter), enlarged by ``margin_vox`` voxels per side and clipped to the volume. The box channel is 1 inside any
box and 0 elsewhere, declared ``noNorm`` in dataset.json so nnU-Net leaves it binary (NoNormalization).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_synth.cli import HelpFormatter, add_deprecated_alias, add_num_processes_argument, exit_on_user_error
from nnunet_synth.dataset_conversion.common import (
    CaseTask,
    ConversionError,
    DatasetSpec,
    Geometry,
    OutputCase,
    check_same_geometry,
    find_raw_dataset,
    image_from_array,
    label_array,
    read_header,
    read_image,
    remap_labels,
    resumable,
    select_cases,
    write_dataset,
    write_json,
)
from nnunet_synth.dataset_conversion.merge import canonical_label, dataset_cases
from nnunet_synth.ext_path import synth_trainers_discoverable

#: dataset.json channel name of the box channel: nnU-Net maps "noNorm" to NoNormalization, keeping the map binary.
BOX_CHANNEL_NORMALIZATION = "noNorm"
BOX_CHANNEL_NAME = "tumour boxes"
SOURCE_FILE = "bbox_source.json"
REPORT_FILE = "pseudolabel_report.json"
LESION_BOXES_FILE = "lesion_boxes.json"
BOX_CONVENTION = ("one axis-aligned box per connected tumour component (full connectivity: 26-neighbourhood in 3D), "
                  "voxel indices (z, y, x) of the SimpleITK array, maxima inclusive, enlarged by margin_vox voxels "
                  "per side and clipped to the volume; the box channel is 1 inside any box, 0 elsewhere")


# ----------------------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in array index order (z, y, x), both corners inclusive."""

    lo: tuple[int, ...]
    hi: tuple[int, ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        """Index expression selecting the box in an array."""
        return tuple(slice(a, b + 1) for a, b in zip(self.lo, self.hi))

    @property
    def voxels(self) -> int:
        """Number of voxels inside the box."""
        return int(np.prod([b - a + 1 for a, b in zip(self.lo, self.hi)]))

    def to_json(self) -> dict[str, list[int]]:
        """The ``lesion_boxes.json`` form: ``box_zyx_min`` / ``box_zyx_max`` (inclusive)."""
        return {"box_zyx_min": list(self.lo), "box_zyx_max": list(self.hi)}


def parse_margin(margin: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Per-axis box margin in voxels from one value (all axes) or one value per axis (z, y, x).

    Raises:
        ConversionError: Wrong number of values or a negative margin.
    """
    values = [int(margin)] if np.isscalar(margin) else [int(m) for m in margin]
    if len(values) == 1:
        values *= ndim
    if len(values) != ndim or min(values) < 0:
        raise ConversionError(f"box margin must be one value or {ndim} values (z, y, x), each >= 0; got {margin}")
    return tuple(values)


def component_boxes(mask: np.ndarray, margin: int | Sequence[int] = 0) -> list[Box]:
    """Bounding box of every connected component of a binary mask.

    Args:
        mask: Binary array (z, y, x) or any dimensionality.
        margin: Voxels added on each side (one value or one per axis), to mimic loose annotation boxes.

    Returns:
        One box per component, ordered by component label (first voxel in C order), clipped to the array.
    """
    mask = np.asarray(mask, dtype=bool)
    pad = np.asarray(parse_margin(margin, mask.ndim))
    # Full connectivity: a lesion touching itself only diagonally is still one lesion with one box.
    labelled, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    upper = np.asarray(mask.shape) - 1
    boxes = []
    for found in ndimage.find_objects(labelled):
        if found is None:
            continue
        lo = np.maximum(np.array([s.start for s in found]) - pad, 0)
        hi = np.minimum(np.array([s.stop - 1 for s in found]) + pad, upper)
        boxes.append(Box(tuple(int(v) for v in lo), tuple(int(v) for v in hi)))
    return boxes


def render_boxes(boxes: Sequence[Box], shape: Sequence[int]) -> np.ndarray:
    """Binary uint8 map that is 1 inside any of ``boxes``."""
    out = np.zeros(tuple(shape), dtype=np.uint8)
    for box in boxes:
        out[box.slices] = 1
    return out


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def _load_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{folder / 'dataset.json'}: cannot read: {err}") from err


def _labels_of(meta: dict, where: str) -> dict[str, int]:
    """Label name -> value of a dataset.json; region-based labels cannot be boxed."""
    labels = {}
    for name, value in meta.get("labels", {}).items():
        if isinstance(value, (list, tuple)):
            raise ConversionError(f"{where}: region-based label {name}={value} is not supported")
        labels[str(name)] = int(value)
    if 0 not in labels.values():
        raise ConversionError(f"{where}: dataset.json declares no background = 0: {labels}")
    return labels


def _channel_names(meta: dict) -> list[str]:
    channels = meta.get("channel_names", meta.get("modality"))
    if not channels:
        raise ConversionError("dataset.json has no channel_names")
    return [str(v) for _, v in sorted(channels.items(), key=lambda kv: int(kv[0]))]


def _tumour_label(labels: dict[str, int], given: int | None, where: str, option: str) -> int:
    """The tumour label value: the one given (checked) or the single label whose name is a tumour word."""
    if given is not None:
        if given == 0 or given not in labels.values():
            raise ConversionError(f"{where}: {option} {given} is not a foreground label of {labels}")
        return int(given)
    found = [v for k, v in labels.items() if v != 0 and canonical_label(k) == "tumor"]
    if len(found) != 1:
        raise ConversionError(f"{where}: cannot tell the tumour label from the names {labels} (need exactly one "
                              f"named tumour/tumor/lesion/...); pass {option}")
    return found[0]


def _case_files(folder: Path, meta: dict, exclude: Sequence[str] | None) -> dict[str, tuple[list[Path], Path]]:
    """Case identifier -> (image per channel, label) of a raw dataset, refusing missing labels and surplus channels."""
    n_channels = len(_channel_names(meta))
    ending = meta.get("file_ending")
    if not ending:
        raise ConversionError(f"{folder / 'dataset.json'} has no file_ending")
    if "dataset" not in meta:
        for image in sorted((folder / "imagesTr").glob(f"*_[0-9][0-9][0-9][0-9]{ending}")):
            cid = image.name[: -len(ending) - 5]
            if not image.name.startswith(".") and not (folder / "labelsTr" / f"{cid}{ending}").is_file():
                raise ConversionError(f"case {cid} of {folder.name}: label missing: "
                                      f"{folder / 'labelsTr' / f'{cid}{ending}'} (image {image})")
    cases = dataset_cases(folder, meta)
    if "dataset" not in meta:
        for cid in cases:
            on_disk = sorted(p for p in (folder / "imagesTr").glob(f"{cid}_[0-9][0-9][0-9][0-9]{ending}"))
            if len(on_disk) != n_channels:
                raise ConversionError(f"case {cid} of {folder.name}: {len(on_disk)} channel file(s) in imagesTr, "
                                      f"dataset.json declares {n_channels}: {[p.name for p in on_disk]}")
    names = select_cases(sorted(cases), exclude)
    if not names:
        raise ConversionError(f"{folder}: no training cases")
    return {c: cases[c] for c in names}


def _check_case_headers(case: str, images: Sequence[Path], label: Path | None) -> Geometry:
    """Every channel a single-component volume, all channels and the label on one grid; returns that grid."""
    reference = None
    for c, path in enumerate(images):
        geom, comps = read_header(path, case=case)
        if comps != 1:
            raise ConversionError(f"case {case}: channel {c} has {comps} components per voxel, expected 1: {path}")
        if reference is None:
            reference = geom
        else:
            check_same_geometry(reference, geom, case=case, what=f"channel {c}", files=(images[0], path))
    if label is not None:
        geom, comps = read_header(label, case=case)
        if comps != 1:
            raise ConversionError(f"case {case}: label has {comps} components per voxel, expected 1: {label}")
        check_same_geometry(reference, geom, case=case, what="label", files=(images[0], label))
    return reference


def _read_label(case: str, label: Path, allowed: Sequence[int]) -> np.ndarray:
    """Label voxels, refusing values the dataset does not declare."""
    arr = label_array(read_image(label, case=case), case=case, file=label)
    unexpected = sorted(int(v) for v in np.unique(arr) if int(v) not in set(allowed))
    if unexpected:
        raise ConversionError(f"case {case}: unexpected label values {unexpected} (dataset.json declares "
                              f"{sorted(allowed)}) in {label}")
    return arr


# ----------------------------------------------------------------------------------------------------------------
# nnUNetv2_synth_bbox_dataset
# ----------------------------------------------------------------------------------------------------------------


@resumable
def make_bbox_dataset(source: int | str | os.PathLike, dataset_id: int, *, name: str | None = None,
                      tumour_label: int | None = None, organ_label: int | None = None,
                      margin_vox: int | Sequence[int] = 0, overwrite: bool = False,
                      raw_dir: str | os.PathLike | None = None, exclude: Sequence[str] | None = None,
                      progress: bool = True, num_processes: int = 1) -> Path:
    """Write a copy of a labelled dataset with the tumour boxes as an extra, last input channel.

    Args:
        source: The labelled raw dataset (ID, ``DatasetNNN_Name`` or folder), e.g. the ATLAS conversion.
        dataset_id: ID of the new dataset.
        name: Name of the new dataset (default: the source's name + ``Boxes``).
        tumour_label: Tumour label value of the source (default: the label named tumour/tumor/lesion/...).
        organ_label: Keep only this organ label besides the tumour (others become background, values are
            renumbered in source order); default: keep every label as it is.
        margin_vox: Voxels added to each side of every box (one value or z, y, x), to mimic loose boxes.
        overwrite: Replace an existing dataset folder of the same name.
        raw_dir: Root of input IDs/names and of the output instead of ``nnUNet_raw``.
        exclude: Case identifiers to leave out.
        progress: Show progress bars.
        num_processes: Worker processes converting cases (1: in this process).

    Returns:
        The written dataset folder.

    Raises:
        ConversionError: Missing files, mismatched geometry, unexpected label values, wrong channel counts (naming
            case and file), an existing dataset without ``overwrite`` or an ID clash.
    """
    folder = find_raw_dataset(str(source) if isinstance(source, int) else source, raw_dir)
    meta = _load_meta(folder)
    where = folder.name
    if "box_channel" in (meta.get("nnunet_synth") or {}):
        raise ConversionError(f"{where} already has a box channel (made by nnUNetv2_synth_bbox_dataset); give the "
                              "dataset it was made from")
    labels = _labels_of(meta, where)
    tumour = _tumour_label(labels, tumour_label, where, "--tumour-label")
    if organ_label is not None:
        if organ_label in (0, tumour) or organ_label not in labels.values():
            raise ConversionError(f"{where}: --organ-label {organ_label} is not a foreground non-tumour label of "
                                  f"{labels}")
        kept = sorted({0, organ_label, tumour})
        mapping = {v: (kept.index(v) if v in kept else 0) for v in labels.values()}
    else:
        mapping = {v: v for v in labels.values()}
    names_by_value = {v: k for k, v in labels.items()}
    out_labels = {names_by_value[v]: mapping[v] for v in sorted(labels.values()) if v == 0 or mapping[v]}
    organs = [k for k, v in out_labels.items() if v not in (0, mapping[tumour])]
    channels = _channel_names(meta)
    cases = _case_files(folder, meta, exclude)
    first_images = next(iter(cases.values()))[0]
    ndim = read_header(first_images[0], case=next(iter(cases)))[0].ndim
    margin = parse_margin(margin_vox, ndim)
    records: dict[str, object] = {}  # filled by write_dataset from the cases' records

    def make_task(cid: str, images: list[Path], label: Path) -> CaseTask:
        def check() -> None:
            _check_case_headers(cid, images, label)
            _read_label(cid, label, list(labels.values()))

        def load() -> list[OutputCase]:
            imgs = [read_image(p, case=cid) for p in images]
            arr = _read_label(cid, label, list(labels.values()))
            boxes = component_boxes(arr == tumour, margin)
            record = [{"index": i, **b.to_json(), "voxels": b.voxels} for i, b in enumerate(boxes)]
            box_channel = image_from_array(render_boxes(boxes, arr.shape), imgs[0])
            out = remap_labels(arr, mapping, case=cid, file=label)
            return [OutputCase(cid, [*imgs, box_channel], image_from_array(out, imgs[0]), (*images, label), record)]

        return CaseTask(cid, load, check)

    box_channel = len(channels)
    info = {"source_dataset": folder.name, "source_path": str(folder), "box_channel": box_channel,
            "box_channel_name": BOX_CHANNEL_NAME, "box_channel_normalization": BOX_CHANNEL_NORMALIZATION,
            "box_convention": BOX_CONVENTION, "margin_vox": list(margin), "source_tumour_label": tumour,
            "tumour_label": mapping[tumour], "label_mapping": {str(k): v for k, v in mapping.items()}}

    def finalize(tmp: Path, written: list[str]) -> None:
        write_json(tmp / SOURCE_FILE, {**info, "cases": {c: records[c] for c in written}})

    spec = DatasetSpec(dataset_id, name or f"{folder.name.split('_', 1)[-1]}Boxes",
                       {**dict(enumerate(channels)), box_channel: BOX_CHANNEL_NORMALIZATION}, out_labels,
                       cohort="bbox", reference=str(meta.get("reference", "")),
                       licence=str(meta.get("licence", meta.get("license", "see the source dataset"))),
                       description=f"{folder.name} with the tumour boxes as input channel {box_channel} "
                       f"({BOX_CHANNEL_NAME}, {BOX_CHANNEL_NORMALIZATION}); see {SOURCE_FILE}", ndim=ndim,
                       extra={"organ": organs[0] if len(organs) == 1 else organs,
                              "tumour": names_by_value[tumour], **{k: v for k, v in info.items()
                                                                   if k not in ("source_path", "label_mapping")},
                              "boxes_file": SOURCE_FILE})
    return write_dataset(spec, [make_task(c, *cases[c]) for c in cases], overwrite=overwrite, raw_dir=raw_dir,
                         finalize=finalize, progress=progress, num_processes=num_processes, records=records)


# ----------------------------------------------------------------------------------------------------------------
# nnUNetv2_synth_bbox_pseudolabel
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BoxModel:
    """A trained box-guided nnU-Net: where it is and what it expects."""

    folder: Path
    folds: list[int | str]
    checkpoint: str
    channels: list[str]
    labels: dict[str, int]
    tumour: int
    organ: int | None

    @property
    def image_channels(self) -> int:
        """Input channels besides the box channel."""
        return len(self.channels) - 1


def resolve_model(model_folder: str | os.PathLike | None = None, dataset: str | None = None,
                  trainer: str = "nnUNetTrainer", configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                  folds: Sequence[int | str] | None = None, checkpoint: str = "checkpoint_final.pth",
                  tumour_label: int | None = None) -> BoxModel:
    """Locate a trained box-guided model and read its channels and labels.

    Args:
        model_folder: ``nnUNet_results/DatasetNNN/TRAINER__PLANS__CONFIG``; or None to build it from the rest.
        dataset: The bbox dataset the model was trained on (ID or name), when ``model_folder`` is None.
        trainer: Trainer class name.
        configuration: nnU-Net configuration.
        plans: Plans identifier.
        folds: Folds to ensemble; None means every fold with a checkpoint.
        checkpoint: Checkpoint file name in each ``fold_X``.
        tumour_label: Tumour label of the model (default: from its dataset.json).

    Raises:
        ConversionError: Missing model files or checkpoints, a model without a box channel.
    """
    if model_folder is None:
        if dataset is None:
            raise ConversionError("give the model as -m MODEL_FOLDER or as -d DATASET -tr TRAINER -c CONFIGURATION")
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        try:
            model_folder = get_output_folder(dataset, trainer, plans, configuration)
        except (RuntimeError, ValueError, TypeError) as err:  # nnU-Net raises RuntimeError for unknown datasets
            raise ConversionError(f"model dataset {dataset!r}: {err}") from err
    folder = Path(model_folder).expanduser()
    for needed in ("dataset.json", "plans.json"):
        if not (folder / needed).is_file():
            raise ConversionError(f"model folder {folder}: {needed} missing (not a trained nnU-Net model folder; "
                                  "expected nnUNet_results/DatasetNNN/TRAINER__PLANS__CONFIGURATION)")
    if folds is None:
        found = sorted((p for p in folder.glob("fold_*") if (p / checkpoint).is_file()), key=lambda p: p.name)
        folds = [p.name.removeprefix("fold_") for p in found]
        if not folds:
            raise ConversionError(f"model folder {folder}: no fold_*/{checkpoint} (train first, or pass -chk)")
    fold_list: list[int | str] = [f if str(f) == "all" else int(f) for f in folds]
    for f in fold_list:
        if not (folder / f"fold_{f}" / checkpoint).is_file():
            raise ConversionError(f"model folder {folder}: checkpoint missing: {folder / f'fold_{f}' / checkpoint}")
    meta = _load_meta(folder)
    channels = _channel_names(meta)
    info = meta.get("nnunet_synth") or {}
    if "box_channel" in info and int(info["box_channel"]) != len(channels) - 1:
        raise ConversionError(f"model {folder}: box channel {info['box_channel']} is not the last of {channels}")
    if len(channels) < 2:
        raise ConversionError(f"model {folder} has {len(channels)} input channel(s); a box-guided model needs the "
                              "image channel(s) plus the box channel (train it on nnUNetv2_synth_bbox_dataset output)")
    labels = _labels_of(meta, f"model {folder}")
    if tumour_label is None and "tumour_label" in info:
        tumour_label = int(info["tumour_label"])
    tumour = _tumour_label(labels, tumour_label, f"model {folder}", "--tumour-label")
    organs = [v for v in labels.values() if v not in (0, tumour)]
    return BoxModel(folder, fold_list, checkpoint, channels, labels, tumour, organs[0] if len(organs) == 1 else None)


class _Predictor:
    """nnU-Net's ``nnUNetPredictor``, created on first use so that all input checks run before the model loads."""

    def __init__(self, model: BoxModel, device: str, tta: bool, step_size: float, verbose: bool):
        self.model, self.device, self.tta, self.step_size, self.verbose = model, device, tta, step_size, verbose
        self._predictor = None

    def _quiet(self) -> contextlib.AbstractContextManager:
        # nnU-Net prints several lines per case; our own progress bar over the cases is the report.
        return contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())

    def _initialized(self):
        if self._predictor is None:
            import torch
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            predictor = nnUNetPredictor(tile_step_size=self.step_size, use_gaussian=True, use_mirroring=self.tta,
                                        perform_everything_on_device=self.device == "cuda",
                                        device=torch.device(self.device), verbose=False, verbose_preprocessing=False,
                                        allow_tqdm=False)
            with synth_trainers_discoverable():
                predictor.initialize_from_trained_model_folder(str(self.model.folder), self.model.folds,
                                                               self.model.checkpoint)
            self._predictor = predictor
        return self._predictor

    def predict(self, files: list[Path], box_file: Path, out_truncated: Path) -> tuple[Path, Path]:
        """Segment one case (image channels + box channel) with and without the tumour restricted to the boxes.

        The restriction acts on nnU-Net's class probabilities: outside the boxes the tumour probability is zeroed
        before the argmax, so a voxel the model called tumour there gets its next most likely class (the organ where
        the model sees organ, else background) instead of a fixed replacement.

        Args:
            files: Image channel files followed by ``box_file``.
            box_file: The box channel (1 inside a box).
            out_truncated: Output path without file ending.

        Returns:
            The model's plain segmentation and the box-restricted one, both files with the model's file ending.
        """
        with self._quiet():
            predictor = self._initialized()
            predictor.predict_from_files_sequential([[str(f) for f in files]], [str(out_truncated)],
                                                    save_probabilities=True, overwrite=True)
        ending = predictor.dataset_json["file_ending"]
        # nnU-Net's own reader gives the box channel in the axis order of the exported probabilities.
        reader = predictor.plans_manager.image_reader_writer_class()
        region, properties = reader.read_images([str(box_file)])
        probabilities = np.load(f"{out_truncated}.npz")["probabilities"]
        if probabilities.shape[1:] != region.shape[1:]:
            raise ConversionError(f"prediction {out_truncated}.npz has shape {probabilities.shape[1:]}, the box "
                                  f"channel {region.shape[1:]}: {box_file}")
        probabilities[self.model.tumour][region[0] == 0] = 0
        restricted = Path(f"{out_truncated}_restricted{ending}")
        reader.write_seg(probabilities.argmax(0).astype(np.uint8 if probabilities.shape[0] < 256 else np.uint16),
                         str(restricted), properties)
        for extra in (".npz", ".pkl"):
            Path(f"{out_truncated}{extra}").unlink(missing_ok=True)
        return Path(f"{out_truncated}{ending}"), restricted


def _json_boxes(case: str, record: dict | None, shape: Sequence[int], path: Path) -> list[Box]:
    """Selected lesion boxes of one case of ``lesion_boxes.json``, checked against the volume."""
    if record is None:
        raise ConversionError(f"case {case}: no entry in {path}")
    boxes = []
    for les in record.get("lesions", []):
        if not les.get("selected", True):
            continue
        try:
            lo, hi = np.asarray(les["box_zyx_min"], dtype=int), np.asarray(les["box_zyx_max"], dtype=int)
        except (KeyError, TypeError, ValueError) as err:
            raise ConversionError(f"case {case}: lesion {les.get('index')} lacks box_zyx_min/box_zyx_max in "
                                  f"{path}") from err
        if lo.shape != (len(shape),) or hi.shape != lo.shape or np.any(lo > hi):
            raise ConversionError(f"case {case}: lesion {les.get('index')} box {lo.tolist()}-{hi.tolist()} is not a "
                                  f"{len(shape)}D box with min <= max in {path}")
        if np.any(lo < 0) or np.any(hi >= np.asarray(shape)):
            if not les.get("clipped"):
                raise ConversionError(f"case {case}: lesion {les.get('index')} box {lo.tolist()}-{hi.tolist()} "
                                      f"(inclusive) outside the volume {list(shape)} in {path}")
            lo, hi = np.maximum(lo, 0), np.minimum(hi, np.asarray(shape) - 1)  # the converter clipped it too
        boxes.append(Box(tuple(int(v) for v in lo), tuple(int(v) for v in hi)))
    return boxes


@resumable
def pseudolabel(input_dataset: int | str | os.PathLike, dataset_id: int, model: BoxModel, *, name: str | None = None,
                boxes: str = "auto", box_label: int | None = None, device: str | None = None, tta: bool = True,
                step_size: float = 0.5, overwrite: bool = False, raw_dir: str | os.PathLike | None = None,
                exclude: Sequence[str] | None = None, allow_no_boxes: bool = False, progress: bool = True,
                verbose: bool = False, num_processes: int = 1, num_parts: int = 1, part_id: int = 0) -> Path:
    """Predict tumour pseudo-masks inside the boxes of a box-annotated dataset and write them as a new dataset.

    Args:
        input_dataset: The box-annotated raw dataset (ID, name or folder), e.g. the LLD-MMRI conversion.
        dataset_id: ID of the new dataset.
        model: The trained box-guided model (:func:`resolve_model`); the new dataset takes its labels and the names
            of its image channels (the input's names are kept in dataset.json as ``input_channel_names``).
        name: Name of the new dataset (default: the input's name + ``Pseudo``).
        boxes: Where the boxes come from: ``json`` (``lesion_boxes.json``, selected lesions), ``label`` (the
            tumour label: as is when dataset.json marks it as filled boxes, else one box per component) or ``auto``
            (json when the file exists).
        box_label: Tumour (box) label value of the input (default: the label named tumour/tumor/lesion/...).
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        tta: Mirroring test-time augmentation (nnU-Net's default).
        step_size: Sliding-window step as a fraction of the patch size.
        overwrite: Replace an existing dataset folder of the same name.
        raw_dir: Root of input IDs/names and of the output instead of ``nnUNet_raw``.
        exclude: Case identifiers to leave out.
        allow_no_boxes: Keep cases without any box (their tumour label stays empty) instead of refusing them.
        progress: Show progress bars.
        verbose: Show nnU-Net's own output.
        num_processes: Worker processes, each with its own copy of the model (1: in this process).
        num_parts: Split the input cases into this many parts (array jobs on machines sharing nnUNet_raw).
        part_id: The part this call predicts (0 to ``num_parts - 1``): case i in sorted order belongs to part
            i % num_parts. The part that finishes last writes the dataset; the others return its future folder.

    Returns:
        The written dataset folder.

    Raises:
        ConversionError: Channel count mismatch between model and input, missing boxes, files or geometry problems
            (naming case and file), an existing dataset without ``overwrite`` or an ID clash.
    """
    import torch

    folder = find_raw_dataset(str(input_dataset) if isinstance(input_dataset, int) else input_dataset, raw_dir)
    meta = _load_meta(folder)
    where = folder.name
    info = meta.get("nnunet_synth") or {}
    channels = _channel_names(meta)
    if "box_channel" in info:
        raise ConversionError(f"{where} already has a box channel; give the dataset with images and box labels "
                              "(the box channel is built from its boxes)")
    if len(channels) != model.image_channels:
        raise ConversionError(
            f"channel count mismatch: model {model.folder} takes {len(model.channels)} input channels "
            f"({', '.join(model.channels)}) = {model.image_channels} image channel(s) + the box channel, but "
            f"{where} has {len(channels)} image channel(s) ({', '.join(channels)})")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConversionError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda: no CUDA device is available (use --device cpu)")
    labels = _labels_of(meta, where)
    json_path = folder / LESION_BOXES_FILE
    if boxes == "auto":
        boxes = "json" if json_path.is_file() else "label"
    if boxes == "json":
        if not json_path.is_file():
            raise ConversionError(f"{where}: --boxes json but {json_path} does not exist")
        try:
            box_records = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConversionError(f"{json_path}: not valid JSON: {err}") from err
        tumour_in = None
    elif boxes == "label":
        box_records = {}
        tumour_in = _tumour_label(labels, box_label, where, "--box-label")
    else:
        raise ConversionError(f"--boxes must be auto, json or label, got {boxes!r}")
    label_is_box = bool(info.get("tumour_label_is_box"))
    cases = _case_files(folder, meta, exclude)
    ndim = read_header(next(iter(cases.values()))[0][0], case=next(iter(cases)))[0].ndim
    predictor = _Predictor(model, device, tta, step_size, verbose)
    report: dict[str, object] = {}  # filled by write_dataset from the cases' records

    def case_boxes(cid: str, label: Path) -> tuple[list[Box], np.ndarray]:
        """The boxes of one case and the region they cover (the box channel)."""
        if boxes == "json":
            shape = read_header(label, case=cid)[0].size[::-1]
            found = _json_boxes(cid, box_records.get(cid), shape, json_path)
            region = render_boxes(found, shape)
        else:
            mask = _read_label(cid, label, list(labels.values())) == tumour_in
            found = component_boxes(mask)
            # Filled boxes are used as drawn: overlapping boxes would otherwise merge into their larger hull.
            region = mask.astype(np.uint8) if label_is_box else render_boxes(found, mask.shape)
        if not found and not allow_no_boxes:
            source = json_path if boxes == "json" else label
            raise ConversionError(f"case {cid}: no tumour box (in {source}); leave the case out with --exclude "
                                  "or pass --allow-no-boxes")
        return found, region

    def make_task(cid: str, images: list[Path], label: Path) -> CaseTask:
        def check() -> None:
            geom = _check_case_headers(cid, images, label)
            if geom.ndim != ndim:
                raise ConversionError(f"case {cid}: {geom.ndim}D, other cases are {ndim}D: {images[0]}")
            if boxes == "json":
                _read_label(cid, label, list(labels.values()))  # unused for the boxes, still refused if corrupt
            case_boxes(cid, label)

        def load() -> list[OutputCase]:
            imgs = [read_image(p, case=cid) for p in images]
            found, region = case_boxes(cid, label)
            # a folder per case: cases may run in several worker processes
            with tempfile.TemporaryDirectory(prefix="nnunet_synth_bbox_") as tmp:
                work = Path(tmp)
                box_file = work / f"{cid}_{len(images):04d}{meta['file_ending']}"
                sitk.WriteImage(image_from_array(region, imgs[0]), str(box_file), True)
                plain_file, restricted_file = predictor.predict([*images, box_file], box_file, work / cid)
                arrays = []
                for f in (plain_file, restricted_file):
                    img = read_image(f, case=cid)
                    check_same_geometry(Geometry.of(imgs[0]), Geometry.of(img), case=cid, what="prediction",
                                        files=(images[0], f))
                    arrays.append(label_array(img, case=cid, file=f))
            record = _box_report(arrays[0], arrays[1], region.astype(bool), found, model)
            out = arrays[1].astype(np.uint8 if max(model.labels.values()) < 256 else np.uint16)
            return [OutputCase(cid, imgs, image_from_array(out, imgs[0]), (*images, label), record)]

        return CaseTask(cid, load, check)

    out_name = name or f"{where.split('_', 1)[-1]}Pseudo"
    names_by_value = {v: k for k, v in model.labels.items()}
    organ_names = [k for k, v in model.labels.items() if v not in (0, model.tumour)]
    provenance = {"model": str(model.folder), "folds": model.folds, "checkpoint": model.checkpoint,
                  "input_dataset": where, "box_source": str(json_path) if boxes == "json" else "label",
                  "tumour_label": model.tumour, "organ_label": model.organ, "device": device, "tta": tta}

    def finalize(tmp: Path, written: list[str]) -> None:
        write_json(tmp / REPORT_FILE, {**provenance, "cases": {c: report[c] for c in written}})
        if json_path.is_file():
            shutil.copy2(json_path, tmp / LESION_BOXES_FILE)

    target_name = DatasetSpec(dataset_id, out_name, {}, {}, cohort="").folder_name
    if target_name == where:
        raise ConversionError(f"the output {target_name} would replace the input dataset; choose another -o/--name")
    # The model's channel names (its training dataset's): the images were normalised that way for the pseudo-labels,
    # and nnUNetv2_synth_convert merge with the model's training dataset needs equal channel names.
    spec = DatasetSpec(dataset_id, out_name, dict(enumerate(model.channels[:-1])), dict(model.labels),
                       cohort="bbox_pseudolabel", reference=str(meta.get("reference", "")),
                       licence=str(meta.get("licence", meta.get("license", "see the input dataset"))),
                       description=f"{where} with tumour pseudo-masks predicted inside its boxes by the box-guided "
                       f"model {model.folder.parent.name}/{model.folder.name}; see {REPORT_FILE}", ndim=ndim,
                       extra={"organ": organ_names[0] if len(organ_names) == 1 else organ_names,
                              "tumour": names_by_value[model.tumour], "pseudo_labels": True,
                              "report_file": REPORT_FILE, "input_channel_names": channels, **provenance})
    return write_dataset(spec, [make_task(c, *cases[c]) for c in cases], overwrite=overwrite, raw_dir=raw_dir,
                         finalize=finalize, progress=progress, num_processes=num_processes, num_parts=num_parts,
                         part_id=part_id, records=report)


def _box_report(plain: np.ndarray, restricted: np.ndarray, region: np.ndarray, boxes: Sequence[Box],
                model: BoxModel) -> dict:
    """Per-case numbers of the pseudo-label: how much of each box the tumour fills, what the boxes removed.

    Args:
        plain: The model's segmentation.
        restricted: The segmentation with the tumour restricted to the boxes.
        region: Voxels inside any box (the box channel).
        boxes: The boxes (from the label's components or lesion_boxes.json).
        model: The model (tumour and organ label).
    """
    tumour = restricted == model.tumour
    if np.any(tumour & ~region):
        raise RuntimeError("internal error: pseudo tumour outside the boxes")  # guards the restriction itself
    per_box = []
    for i, box in enumerate(boxes):
        # Voxels of the box region inside this box: touching filled boxes from a label merge into one component.
        voxels = int(region[box.slices].sum())
        filled = int(tumour[box.slices].sum())
        per_box.append({"index": i, **box.to_json(), "voxels": voxels, "tumour_voxels": filled,
                        "fill_fraction": round(filled / voxels, 4) if voxels else None})
    region_voxels = int(region.sum())
    stats = {"boxes": len(boxes), "box_voxels": region_voxels, "tumour_voxels": int(tumour.sum()),
             "fill_fraction": round(float(tumour.sum()) / region_voxels, 4) if region_voxels else None,
             "empty_boxes": sum(1 for b in per_box if b["tumour_voxels"] == 0),
             "tumour_voxels_removed_outside_boxes": int(((plain == model.tumour) & ~region).sum()),
             "per_box": per_box}
    if model.organ is not None:
        stats["organ_voxels"] = int((restricted == model.organ).sum())
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=None, help="name of the new dataset (DatasetNNN_NAME)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder of that name")
    parser.add_argument("--exclude", nargs="+", default=None, metavar="CASE", help="leave these input cases out")
    parser.add_argument("--raw-dir", default=None, help="root of the input and the output instead of $nnUNet_raw")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_num_processes_argument(parser, "worker processes converting cases in parallel (1: in this process)")


def _run(prog: str, func, args: argparse.Namespace) -> int:
    with exit_on_user_error(prog):  # a refusal: one line on stderr, exit status 2
        folder = func(args)
    if folder.is_dir():  # a part that is not the last one leaves the dataset to the others
        print(f"wrote {folder}")
    return 0


def build_bbox_dataset_parser() -> argparse.ArgumentParser:
    """Arguments of ``nnUNetv2_synth_bbox_dataset``."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_synth_bbox_dataset", formatter_class=HelpFormatter,
        description="Copy a labelled dataset (e.g. ATLAS) and append its tumour boxes as the last input channel, "
        "so that nnU-Net learns box -> mask (liver-MRI paper; see docs/conversion.md).")
    parser.add_argument("-i", "--input", required=True, metavar="DATASET",
                        help="labelled source dataset: ID, DatasetNNN_Name or folder")
    parser.add_argument("-d", "--dataset-id", type=int, required=True, metavar="ID",
                        help="ID of the dataset this command creates in nnUNet_raw")
    parser.add_argument("--tumour-label", type=int, default=None, metavar="N",
                        help="tumour label value (default: the label named tumour/tumor/lesion/...)")
    parser.add_argument("--organ-label", type=int, default=None, metavar="N",
                        help="keep only this organ label besides the tumour (default: keep all labels)")
    parser.add_argument("--margin-vox", type=int, nargs="+", default=[0], metavar="K",
                        help="voxels added to each side of every box (one value or z y x), to mimic loose boxes")
    _common_arguments(parser)
    return parser


def bbox_dataset_main(argv: Sequence[str] | None = None) -> int:
    """Console entry ``nnUNetv2_synth_bbox_dataset``; exits with status 2 and one message when refused."""
    args = build_bbox_dataset_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return _run("nnUNetv2_synth_bbox_dataset", lambda a: make_bbox_dataset(
        a.input, a.dataset_id, name=a.name, tumour_label=a.tumour_label, organ_label=a.organ_label,
        margin_vox=a.margin_vox, overwrite=a.overwrite, raw_dir=a.raw_dir, exclude=a.exclude,
        progress=not a.quiet, num_processes=a.num_processes), args)


def build_bbox_pseudolabel_parser() -> argparse.ArgumentParser:
    """Arguments of ``nnUNetv2_synth_bbox_pseudolabel``."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_synth_bbox_pseudolabel", formatter_class=HelpFormatter,
        description="Run a box-guided nnU-Net (trained on nnUNetv2_synth_bbox_dataset output) on a box-annotated "
        "dataset (e.g. LLD-MMRI) and write a dataset with tumour pseudo-masks inside the boxes (liver-MRI paper).")
    model = parser.add_argument_group("model (-m, or -d with -tr/-c/-p)")
    model.add_argument("-m", "--model", default=None, metavar="FOLDER",
                       help="trained model folder nnUNet_results/DatasetNNN/TRAINER__PLANS__CONFIGURATION")
    model.add_argument("-d", "--model-dataset", default=None, metavar="DATASET",
                       help="the bbox dataset the model was trained on (ID or name)")
    model.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="trainer class of the model")
    model.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration")
    model.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    model.add_argument("-f", "--folds", nargs="+", default=None, metavar="FOLD",
                       help="fold(s) to ensemble (default: every fold with a checkpoint)")
    model.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    model.add_argument("--tumour-label", type=int, default=None, metavar="N",
                       help="tumour label of the model (default: from its dataset.json)")
    parser.add_argument("-i", "--input", required=True, metavar="DATASET",
                        help="box-annotated dataset with images and box labels (ID, DatasetNNN_Name or folder)")
    # not required=True: the deprecated -o also sets it (checked after parsing)
    add_deprecated_alias(parser, parser.add_argument("--output-id", type=int, default=None, metavar="ID",
                                                     help="ID of the dataset this command creates in nnUNet_raw "
                                                     "(required)"), "-o")
    parser.add_argument("--boxes", choices=("auto", "json", "label"), default="auto",
                        help=f"box source: {LESION_BOXES_FILE} beside dataset.json, the tumour label, or json when "
                        "that file exists")
    parser.add_argument("--box-label", type=int, default=None, metavar="N",
                        help="tumour (box) label of the input (default: the label named tumour/tumor/lesion/...)")
    parser.add_argument("--allow-no-boxes", action="store_true",
                        help="keep cases without boxes (empty tumour) instead of refusing them")
    add_deprecated_alias(parser, parser.add_argument("-device", choices=("cpu", "cuda"), default=None,
                                                     help="inference device (default: cuda when available)"),
                         "--device")
    parser.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    parser.add_argument("--step-size", type=float, default=0.5, help="sliding-window step (fraction of the patch)")
    parser.add_argument("--verbose", action="store_true", help="show nnU-Net's own output")
    parser.add_argument("-num_parts", type=int, default=1, metavar="P",
                        help="split the cases into P parts (array jobs sharing nnUNet_raw); the part that finishes "
                        "last writes the dataset")
    parser.add_argument("-part_id", type=int, default=0, metavar="I",
                        help="which part this process predicts (0 to P-1): case i in sorted order is part i %% P")
    _common_arguments(parser)
    return parser


def bbox_pseudolabel_main(argv: Sequence[str] | None = None) -> int:
    """Console entry ``nnUNetv2_synth_bbox_pseudolabel``; exits with status 2 and one message when refused."""
    parser = build_bbox_pseudolabel_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if (args.model is None) == (args.model_dataset is None):
        parser.error("give the model either as -m MODEL_FOLDER or as -d DATASET (with -tr/-c/-p)")
    if args.output_id is None:
        parser.error("the following arguments are required: --output-id")

    def run(a: argparse.Namespace) -> Path:
        model = resolve_model(a.model, a.model_dataset, a.trainer, a.configuration, a.plans, a.folds, a.checkpoint,
                              a.tumour_label)
        return pseudolabel(a.input, a.output_id, model, name=a.name, boxes=a.boxes, box_label=a.box_label,
                           device=a.device, tta=not a.disable_tta, step_size=a.step_size, overwrite=a.overwrite,
                           raw_dir=a.raw_dir, exclude=a.exclude, allow_no_boxes=a.allow_no_boxes,
                           progress=not a.quiet, verbose=a.verbose, num_processes=a.num_processes,
                           num_parts=a.num_parts, part_id=a.part_id)

    return _run("nnUNetv2_synth_bbox_pseudolabel", run, args)
