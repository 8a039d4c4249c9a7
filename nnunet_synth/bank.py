"""The synthetic bank: pre-generated cases in nnU-Net's preprocessed format (``nnUNetv2_synth_generate``).

Each bank case is a training-fold case of the segmenter with one lesion inserted by a generator backend
(mask from the shapes engine, position from placement, content from the backend), written with nnU-Net's
own dataset class into ``nnUNet_preprocessed/DatasetNNN/nnUNetSynthBank_<backend>_<configuration>/``
(:func:`nnunet_synth.generators.paths.bank_dir`; another plans identifier than ``nnUNetPlans`` is in the name, and
so are the shape settings of a bank made with ``--size-preset``/``--size-class``/``--deformation``, e.g.
``nnUNetSynthBank_ldm_3d_fullres_tiny``).
Identifiers are ``<source case>__synth_f<fold>_<index>``: the fold and source are in the name, so a
trainer takes only bank cases made for its fold from its own training cases. Sources are the synth plan's healthy
controls first, spread evenly over the cohorts of a merged dataset (:func:`source_cases`). Case ``index`` depends
only on (seed, fold, index), so parts (``-num_parts P -part_id I``, e.g. SLURM array tasks on different machines)
write disjoint, reproducible cases, and a rerun skips finished ones. A case becomes visible only when
complete: its files are written in a temporary subfolder and renamed, the data file last.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np

from nnunet_synth.files import creation_lock, nifti_truncation, process_tag, remove_stale
from nnunet_synth.generators.paths import (
    DEFAULT_PLANS_IDENTIFIER,
    bank_dir,
    bank_suffix,
    generate_command,
    shape_flags,
)

BANK_PATTERN = re.compile(r"^(?P<source>.+)__synth_f(?P<fold>all|\d+)_(?P<index>\d+)$")
MANIFEST_DIR = "manifest"  # a subfolder, so the bank folder itself holds nothing but case files
TMP_DIR = ".tmp"
SOURCE_TRIES = 4  # training cases tried, in turn, for one bank case before it is skipped
# manifest entries a later part or rerun must share with the bank it adds to
MANIFEST_KEYS = ("backend", "configuration", "seed", "checkpoint", "sampling_steps", "shapes", "settings", "sources")
# synth-plan keys that are no bank setting: how the generator is found and run (the manifest records its checkpoint
# and sampling steps), the seed (recorded on its own: --seed may override it), the partial-bank permission and the
# number of bank cases a trainer mixes in and the healthy controls on-the-fly trainers prefer (how a bank is used,
# not how it is made)
NOT_SETTINGS = ("backend_params", "seed", "allow_partial_bank", "bank_cases", "healthy_cases")


class BankError(RuntimeError):
    """A bank that must not be used or extended (incomplete, or made with other settings); the message names the
    bank and the command that makes it usable."""


def bank_identifier(source: str, fold: int | str, index: int) -> str:
    return f"{source}__synth_f{fold}_{index:05d}"


def parse_bank_identifier(identifier: str) -> tuple[str, str, int] | None:
    """(source case, fold, index) of a bank identifier; None for a real case."""
    match = BANK_PATTERN.match(identifier)
    return None if match is None else (match["source"], match["fold"], int(match["index"]))


def is_bank_identifier(identifier: str) -> bool:
    return BANK_PATTERN.match(str(identifier)) is not None


def bank_identifiers(folder: Path, fold: int | str, sources: list[str] | None = None) -> list[str]:
    """Finished bank cases of ``fold`` in ``folder``, optionally only those made from ``sources``."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy

    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = set(nnUNetDatasetBlosc2.get_identifiers(str(folder))) | set(nnUNetDatasetNumpy.get_identifiers(str(folder)))
    allowed = None if sources is None else set(sources)
    out = []
    for identifier in found:
        parsed = parse_bank_identifier(identifier)
        if parsed and parsed[1] == str(fold) and (allowed is None or parsed[0] in allowed):
            out.append(identifier)
    return sorted(out)


def bank_disk_use(folder: Path, fold: int | str) -> tuple[int, int]:
    """(finished bank cases of ``fold``, their bytes on disk): image, segmentation and properties files.

    Each bank case stores a whole copy of its source case with the lesion in it (nnU-Net's loader reads a case as
    one file), so a bank costs about its number of cases times the size of a preprocessed case.
    """
    folder = Path(folder)
    identifiers = bank_identifiers(folder, fold)
    names = set(identifiers)
    size = 0
    for file in folder.iterdir():
        # <identifier>.b2nd / _seg.b2nd / .pkl (blosc2) or .npz / .npy / _seg.npy (numpy)
        stem = file.name.split(".", 1)[0].removesuffix("_seg")
        if file.is_file() and stem in names:
            size += file.stat().st_size
    return len(identifiers), size


class RealAndBankDataset:
    """The trainer's training dataset: real cases from nnU-Net's folder plus bank cases from the bank folder.

    nnU-Net's dataset classes read every identifier from one folder; this one dispatches ``load_case`` to
    the real or the bank dataset by identifier. It offers what ``nnUNetDataLoader`` uses (``identifiers``,
    ``load_case``, ``__getitem__``).

    Args:
        real: nnU-Net dataset of the real training cases.
        bank: nnU-Net dataset of the bank cases (same dataset class, bank folder).
    """

    def __init__(self, real, bank):
        overlap = set(real.identifiers) & set(bank.identifiers)
        if overlap:
            raise ValueError(f"identifiers in both the real and the bank dataset: {sorted(overlap)[:5]}")
        self.real, self.bank = real, bank
        self._bank_ids = frozenset(bank.identifiers)
        self.identifiers = sorted([*real.identifiers, *bank.identifiers])

    def load_case(self, identifier: str):
        return (self.bank if identifier in self._bank_ids else self.real).load_case(identifier)

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)

    def sampling_probabilities(self, bank_share: float) -> np.ndarray:
        """Per-identifier probabilities (in ``identifiers`` order): the bank together gets ``bank_share``."""
        if not 0.0 <= bank_share <= 1.0:
            raise ValueError(f"bank share must be in [0, 1], got {bank_share}")
        is_bank = np.array([i in self._bank_ids for i in self.identifiers])
        n_bank, n_real = int(is_bank.sum()), int((~is_bank).sum())
        if n_bank == 0 or n_real == 0:
            raise ValueError(f"need real and bank cases, got {n_real} real and {n_bank} bank cases")
        return np.where(is_bank, bank_share / n_bank, (1.0 - bank_share) / n_real)


def class_locations(seg: np.ndarray, label_manager) -> dict:
    """Foreground voxel samples for nnU-Net's oversampling, exactly as its DefaultPreprocessor computes them."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    collect = label_manager.foreground_regions if label_manager.has_regions else list(label_manager.foreground_labels)
    if label_manager.has_ignore_label:
        collect.append([-1] + label_manager.all_labels)
    return DefaultPreprocessor._sample_foreground_locations(seg, collect)  # noqa: SLF001 - nnU-Net's own sampler


def _save_case_atomic(dataset_class, data: np.ndarray, seg: np.ndarray, properties: dict, folder: Path,
                      identifier: str, patch_size: tuple[int, ...]) -> None:
    """Writes a case with nnU-Net's ``save_case`` into a temporary subfolder, then renames the data file last."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    tmp = folder / TMP_DIR / f"{identifier}{process_tag()}"
    tmp.mkdir(parents=True, exist_ok=True)
    if issubclass(dataset_class, nnUNetDatasetBlosc2):
        # the chunking nnU-Net's preprocessor uses for this patch size (random patch reads stay fast)
        blocks, chunks = comp_blosc2_params(data.shape, patch_size, data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch_size, seg.itemsize)
        dataset_class.save_case(data, seg, properties, str(tmp / identifier), chunks=chunks, blocks=blocks,
                                chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        data_file = f"{identifier}.b2nd"
    else:
        dataset_class.save_case(data, seg, properties, str(tmp / identifier))
        data_file = f"{identifier}.npz"
    files = sorted(p.name for p in tmp.iterdir())
    for name in [f for f in files if f != data_file] + [data_file]:
        os.replace(tmp / name, folder / name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (folder / TMP_DIR).rmdir()
    except OSError:
        pass  # another part is writing a case right now


def normalised_to_raw_affine(raw: np.ndarray, normalised: np.ndarray, scheme: str,
                             intensity_properties: dict | None = None, mask: np.ndarray | None = None,
                             max_voxels: int = 1 << 20) -> tuple[float, float]:
    """(scale, offset) with ``raw = scale * normalised + offset``: the inverse of nnU-Net's normalisation of a channel.

    ``normalised`` is ``raw`` (one channel) after nnU-Net's normalisation ``scheme``, on the same grid. Every
    built-in scheme is affine on the voxels it does not clip or leave alone: all voxels for NoNormalization,
    RescaleTo01Normalization, RGBTo01Normalization and ZScoreNormalization, only ``mask`` (nnU-Net's ``seg >= 0``)
    with use_mask_for_norm, and for CTNormalization the voxels within the clipping bounds of
    ``intensity_properties`` (the plans' foreground percentiles 0.5 and 99.5). The map is fitted there by least
    squares in float64 (on at most ``max_voxels`` evenly spread voxels), so it is exact up to nnU-Net's float32
    rounding and needs no knowledge of the statistics a scheme computed per case. Where those voxels hold a
    single raw value the slope cannot be fitted: CT then takes the plans' std and mean, RGBTo01 255 and 0, any
    other scheme a slope of 1. A map that is not affine (a custom scheme) gives a warning.
    """
    raw = np.asarray(raw)
    normalised = np.asarray(normalised)
    if raw.shape != normalised.shape:
        raise ValueError(f"raw {raw.shape} and normalised {normalised.shape} channels differ in shape")
    valid = np.isfinite(raw) & np.isfinite(normalised)
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool)
    if scheme == "CTNormalization":
        if not intensity_properties:
            raise ValueError("CTNormalization needs the plans' foreground intensity properties")
        raw32 = raw.astype(np.float32, copy=False)  # nnU-Net clips the float32 image
        valid &= (raw32 >= intensity_properties["percentile_00_5"]) & (raw32 <= intensity_properties["percentile_99_5"])
    index = np.flatnonzero(valid)
    if index.size > max_voxels:
        index = index[:: index.size // max_voxels + 1]
    x = raw.reshape(-1)[index].astype(np.float64)
    y = normalised.reshape(-1)[index].astype(np.float64)
    slope = 0.0
    if x.size > 1:
        dx = x - x.mean()
        var = float(np.mean(dx * dx))
        slope = float(np.mean(dx * (y - y.mean()))) / var if var > 0 else 0.0
    if slope != 0.0 and np.isfinite(slope):
        scale, offset = 1.0 / slope, float(x.mean() - y.mean() / slope)
        residual = np.abs(x - (scale * y + offset))
        if residual.size and residual.max() > 1e-3 * max(float(np.ptp(x)), 1e-6):
            warnings.warn(f"{scheme} does not map raw to normalised intensities affinely (largest deviation "
                          f"{residual.max():.3g} raw units); the raw export of the lesion is approximate",
                          stacklevel=2)
        return scale, offset
    if scheme == "CTNormalization":
        return max(float(intensity_properties["std"]), 1e-8), float(intensity_properties["mean"])
    if scheme == "RGBTo01Normalization":
        return 255.0, 0.0
    value = (float(x[0]), float(y[0])) if x.size else (0.0, 0.0)
    return 1.0, value[0] - value[1]


def raw_lesion_region(mask: np.ndarray, spacing: list[float] | tuple[float, ...],
                      grid_spacing: list[float] | tuple[float, ...] | None = None, edge_mm: float = 2.0) -> np.ndarray:
    """``mask`` (on a grid of ``spacing``) dilated by a box of ``edge_mm``, and of at least one voxel of
    ``grid_spacing`` (the grid the lesion was made on), per axis (never along axes of one voxel): the voxels a
    resampled lesion and its blurred edge reach."""
    mask = np.asarray(mask, dtype=bool)
    grid_spacing = spacing if grid_spacing is None else grid_spacing
    radius = [0 if n == 1 else max(1, int(np.ceil(max(edge_mm, g) / s - 1e-6)))
              for n, s, g in zip(mask.shape, spacing, grid_spacing)]
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    lo, hi = [], []
    for axis, r in enumerate(radius):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(max(int(hit[0]) - r, 0))
        hi.append(min(int(hit[-1]) + r + 1, mask.shape[axis]))
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    from scipy.ndimage import maximum_filter

    out[box] = maximum_filter(mask[box].astype(np.uint8), size=[2 * r + 1 for r in radius], mode="constant") > 0
    return out


def export_raw(data: np.ndarray, source_data: np.ndarray, synthetic: np.ndarray, properties: dict, plans_manager,
               configuration_manager, dataset_json: dict, out_dir: Path, identifier: str, tumour_label: int,
               raw_folder: Path | None = None) -> list[Path]:
    """Writes a bank case as an nnU-Net raw case in the raw units of its source case.

    ``imagesTr/<id>_<channel>`` is the source case's raw image (``properties["synth"]["source"]`` in
    ``nnUNet_raw/<dataset>/imagesTr``, found as nnU-Net finds it), bit for bit outside the lesion region; inside
    it, the raw value plus the synthetic change ``data - source_data``, mapped per channel from nnU-Net's
    normalised units to raw units (the slope of :func:`normalised_to_raw_affine`, fitted on the raw source image
    normalised as nnU-Net's preprocessor does, so it holds for every normalisation scheme) and resampled to the
    raw grid with nnU-Net's data resampling (uncropped, untransposed). The lesion region is the synthetic mask
    and every changed voxel, resampled to the raw grid and dilated by :func:`raw_lesion_region`. Each file keeps
    the pixel type and geometry (spacing, origin, direction) of its raw source file; integer images get the
    lesion values rounded and clipped to the type's range. ``labelsTr/<id>`` is the source raw label with the
    synthetic voxels set to ``tumour_label``; ``synthetic_masksTr/<id>`` is 1 on the synthetic voxels (the mask
    resampled to the raw grid). All files are written in a temporary folder in ``out_dir`` and moved into place
    once every one is complete.

    Args:
        data: the bank case (C, *spatial), preprocessed.
        source_data: its source case as preprocessed (same shape).
        synthetic: bool (*spatial), the synthetic lesion voxels.
        properties: the bank case's properties (the source case's plus ``synth``).
        raw_folder: the raw dataset folder (default: ``nnUNet_raw/<dataset name>``).

    Raises:
        FileNotFoundError: the raw dataset folder or a raw source file is missing (named with its case).
        ValueError: a dataset not read with SimpleITK, or a raw source case that does not fit its preprocessed case.
    """
    import SimpleITK as sitk
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    if "sitk_stuff" not in properties:
        raise ValueError("--export-raw needs a dataset read with SimpleITK (properties lack 'sitk_stuff')")
    source = properties["synth"]["source"]
    raw_folder = Path(os.fspath(nnUNet_raw)) / plans_manager.dataset_name if raw_folder is None else Path(raw_folder)
    where = f"source case {source} of bank case {identifier}"
    if not raw_folder.is_dir() or ("dataset" not in dataset_json and not (raw_folder / "imagesTr").is_dir()):
        raise FileNotFoundError(f"--export-raw: raw dataset folder {raw_folder} (with imagesTr) of the {where} "
                                f"not found")
    ending = dataset_json.get("file_ending", ".nii.gz")
    files = get_filenames_of_train_images_and_targets(str(raw_folder), copy.deepcopy(dataset_json)).get(source)
    channels = data.shape[0]
    if files is None or len(files["images"]) != channels:
        found = [] if files is None else [Path(f).name for f in files["images"]]
        raise FileNotFoundError(f"--export-raw: raw image files of the {where} not found in {raw_folder}: expected "
                                f"{channels} ({source}_0000{ending} ...), found {found}")
    for path in [*files["images"], files["label"]]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--export-raw: raw source file {path} of the {where} not found")
        truncated = nifti_truncation(path)  # SimpleITK would read the missing voxels as zeros
        if truncated is not None:
            raise ValueError(f"--export-raw: raw source file {path} of the {where} is truncated: {truncated}")
    images = [sitk.ReadImage(str(p)) for p in files["images"]]
    label_image = sitk.ReadImage(str(files["label"]))
    arrays = [sitk.GetArrayFromImage(i) for i in images]
    label_array = sitk.GetArrayFromImage(label_image)
    forward, back = list(plans_manager.transpose_forward), list(plans_manager.transpose_backward)
    shape_t = tuple(int(n) for n in properties["shape_before_cropping"])

    def to_nnunet(array: np.ndarray, path: str) -> np.ndarray:
        """nnU-Net's array layout (SimpleITKIO: a 2D image gets a leading axis), transposed as preprocessed."""
        out = (array[None] if array.ndim == 2 else array).transpose(forward)
        if out.shape != shape_t:
            raise ValueError(f"--export-raw: raw source file {path} of the {where} has shape {array.shape}, but the "
                             f"case was preprocessed from {shape_t} (transposed): was the raw dataset changed after "
                             f"nnUNetv2_plan_and_preprocess?")
        return out

    raw_t = np.stack([to_nnunet(a, p) for a, p in zip(arrays, files["images"])]).astype(np.float32)
    seg_t = to_nnunet(label_array, files["label"])[None].astype(np.int32)
    # nnU-Net's own crop and normalisation of the raw source case: the raw-to-normalised map of each channel
    cropped, seg_cropped, bbox = crop_to_nonzero(raw_t, seg_t)
    if [list(map(int, b)) for b in bbox] != [list(map(int, b)) for b in properties["bbox_used_for_cropping"]]:
        raise ValueError(f"--export-raw: the raw {where} crops to {bbox}, its preprocessed case to "
                         f"{properties['bbox_used_for_cropping']}: was the raw dataset changed after "
                         f"nnUNetv2_plan_and_preprocess?")
    intensity = plans_manager.foreground_intensity_properties_per_channel
    normalised = configuration_manager.preprocessor_class(verbose=False)._normalize(  # noqa: SLF001 - nnU-Net's own
        cropped.copy(), seg_cropped, configuration_manager, intensity)
    scales = [normalised_to_raw_affine(cropped[c], normalised[c], scheme, intensity.get(str(c)),
                                       seg_cropped[0] >= 0 if configuration_manager.use_mask_for_norm[c] else None)[0]
              for c, scheme in enumerate(configuration_manager.normalization_schemes)]

    data = np.asarray(data, dtype=np.float32)
    source_data = np.asarray(source_data, dtype=np.float32)
    synthetic = np.asarray(synthetic, dtype=bool)
    if data.shape != source_data.shape or data.shape[1:] != synthetic.shape:
        raise ValueError(f"bank case {data.shape}, source case {source_data.shape} and synthetic mask "
                         f"{synthetic.shape} differ in shape")
    change = (data - source_data) * np.asarray(scales, dtype=np.float32).reshape(-1, *[1] * synthetic.ndim)
    masks = np.stack([synthetic, synthetic | (data != source_data).any(0)]).astype(np.uint8)
    # back to the raw grid: resampled, uncropped, untransposed
    spacing_t = [properties["spacing"][i] for i in forward]
    shape = properties["shape_after_cropping_and_before_resampling"]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) \
        else [spacing_t[0], *configuration_manager.spacing]
    region = (slice(None), *(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"]))
    full_change = np.zeros((channels, *shape_t), dtype=np.float32)
    full_change[region] = configuration_manager.resampling_fn_data(change, shape, current, spacing_t)
    full_masks = np.zeros((2, *shape_t), dtype=np.uint8)
    full_masks[region] = configuration_manager.resampling_fn_seg(masks, shape, current, spacing_t)
    lesion_t = raw_lesion_region(full_masks[1] > 0, spacing_t, current)

    def to_raw(array: np.ndarray, like: np.ndarray) -> np.ndarray:
        return array.transpose(back).reshape(like.shape)

    lesion = to_raw(lesion_t, label_array)
    synthetic_raw = to_raw(full_masks[0] > 0, label_array)
    out_dir = Path(out_dir)
    tmp = out_dir / TMP_DIR / f"{identifier}{process_tag()}"
    moves = []  # (temporary file, final file), in the order they are moved into place: images last
    try:
        tmp.mkdir(parents=True, exist_ok=True)

        def write(array: np.ndarray, reference, folder: str, name: str) -> None:
            itk = sitk.GetImageFromArray(array)
            itk.CopyInformation(reference)  # geometry of the raw source file
            (tmp / folder).mkdir(exist_ok=True)
            sitk.WriteImage(itk, str(tmp / folder / name), True)
            moves.append((tmp / folder / name, out_dir / folder / name))

        write(synthetic_raw.astype(np.uint8), label_image, "synthetic_masksTr", f"{identifier}{ending}")
        labels = label_array.copy()
        labels[synthetic_raw] = tumour_label
        write(labels, label_image, "labelsTr", f"{identifier}{ending}")
        for c, (raw, image) in enumerate(zip(arrays, images)):
            values = raw[lesion].astype(np.float64) + to_raw(full_change[c], raw)[lesion]
            if np.issubdtype(raw.dtype, np.integer):
                info = np.iinfo(raw.dtype)
                values = np.clip(np.rint(values), info.min, info.max)
            out = raw.copy()
            out[lesion] = values.astype(raw.dtype)
            write(out, image, "imagesTr", f"{identifier}_{c:04d}{ending}")
        for _, final in moves:
            final.parent.mkdir(parents=True, exist_ok=True)
        for path, final in moves:
            os.replace(path, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            (out_dir / TMP_DIR).rmdir()
        except OSError:
            pass  # another part is exporting a case right now
    return [final for _, final in moves]


def source_cases(index: int, train_cases: list[str], healthy: list[str] | tuple[str, ...] = (),
                 cohorts: dict[str, str] | None = None, tries: int = SOURCE_TRIES) -> list[str]:
    """The training cases bank case ``index`` tries as its source, in turn (the first that takes a lesion is used).

    It depends only on ``index`` and the arguments, so a bank case is the same whichever part or rerun makes it:

    * healthy controls first: where ``healthy`` (the synth plan's ``healthy_cases``) lists training cases, the
      sources are those (the other training cases only after them), as the papers insert into healthy scans;
    * cohorts: with ``cohorts`` (case -> source dataset of a merged dataset), bank case ``k`` takes cohort
      ``k mod n`` of the n cohorts among those sources (sorted by name) and its case ``(k // n) mod size``, so a
      bank's sources are spread evenly over the cohorts (the liver-MRI paper's 500 synthetic tumours on each of
      ATLAS and LLD-MMRI); the cohort's next cases follow, then the other sources;
    * otherwise the ``index``-th source, cycling, then the next ones.

    Args:
        index: bank case index.
        train_cases: the fold's training cases (sorted, as :func:`~nnunet_synth.generators.splits.split_cases`
            gives them).
        healthy: healthy-control case identifiers (any case; those not in ``train_cases`` are ignored).
        cohorts: the cohort of every training case, or None.
        tries: how many cases to return at most.
    """
    listed = set(healthy)
    first = [c for c in train_cases if c in listed] or list(train_cases)
    rest = [c for c in train_cases if c not in set(first)]

    def turn(cases: list[str], k: int) -> list[str]:
        return cases[k % len(cases):] + cases[:k % len(cases)] if cases else []

    ordered = turn(first, index)
    if cohorts is not None:
        names = sorted({cohorts[c] for c in first})
        cohort = names[index % len(names)]
        members = [c for c in first if cohorts[c] == cohort]
        ordered = turn(members, index // len(names)) + [c for c in ordered if cohorts[c] != cohort]
    return (ordered + turn(rest, index))[:min(tries, len(train_cases))]


def _fold_seed(fold: int | str) -> int:
    return fold if isinstance(fold, int) else 1_000_000


def bank_settings(plan) -> dict:
    """The synth-plan settings that shape a bank's lesions (labels, sizes, shapes, placement, contrast, texture),
    as JSON: recorded in the manifest; a bank is extended, and trained on, only with the same."""
    settings = plan.to_dict()
    for key in NOT_SETTINGS:
        settings.pop(key, None)
    return settings


def bank_plan(dataset: str | int, backend: str, configuration: str,
              plans_identifier: str = DEFAULT_PLANS_IDENTIFIER, shapes: dict | None = None, params: dict | None = None):
    """The synth plan a bank of ``backend`` is made with: the dataset's plan with ``backend``, the generation's
    backend parameters and its shape overrides (``--size-preset``, ``--size-class``, ``--deformation``;
    sd_inversion on a 2d configuration: the per-slice area classes).

    Raises:
        ValueError: sd_inversion on a 2d configuration with another size preset than ``slice_area``.
    """
    from nnunet_synth.planning import load_synth_plan

    plan = load_synth_plan(dataset, configuration, plans_identifier)
    params = {**plan.backend_params, **(params or {})}
    shapes = dict(shapes or {})
    if backend == "sd_inversion" and len(plan.spacing) == 2:
        if shapes.get("size_preset", "slice_area") != "slice_area":
            raise ValueError(f"sd_inversion on the 2d configuration draws its masks with the size preset "
                             f"'slice_area' (tumour areas per slice), not {shapes['size_preset']!r}")
        shapes["size_preset"] = "slice_area"  # the breast 2D paper's classes are tumour areas per slice
    return plan.replace(backend=backend, backend_params=params, shapes=shapes).validated(
        f"synth plan of {plan.dataset_name} with -g {backend} and shapes {shapes}")


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def _settings_digest(manifest: dict) -> str:
    """A short digest of everything a part must share with its bank (:data:`MANIFEST_KEYS`)."""
    import hashlib

    return hashlib.sha1(_canonical({k: manifest.get(k) for k in MANIFEST_KEYS}).encode()).hexdigest()[:12]


def _differences(old: dict, new: dict, keys) -> list[str]:
    """One phrase per key of ``keys`` whose value differs (plan settings by their own keys)."""
    out = []
    for key in keys:
        if key in old and _canonical(old[key]) != _canonical(new[key]):
            if key == "settings":
                names = sorted(k for k in {*old[key], *new[key]}
                               if _canonical(old[key].get(k)) != _canonical(new[key].get(k)))
                out.append(f"synth-plan settings {', '.join(names)}")
            else:
                out.append(f"{key} {old[key]!r} then, {new[key]!r} now")
    return out


def _check_manifest(path: Path, manifest: dict, part: str) -> None:
    """Refuses to mix cases made with other settings (seed, checkpoint, sampling steps, the plan's shapes,
    placement or contrast) into one bank, then records the request and ``part`` (``"I/P"``) as started.

    Every part of a bank shares the settings recorded at the top; ``parts`` records for each part its request,
    the digest of the settings it ran with and whether it finished; ``skipped`` the indices no lesion fitted
    (not missing, see :func:`check_bank`).
    """
    from nnunet_synth.planning import write_json_atomic

    with creation_lock(path):  # parts started together update one manifest in turn
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            # keys an older manifest lacks (shapes, settings: recorded since) are not held against it
            diff = _differences(old, manifest, MANIFEST_KEYS)
            if diff:
                raise BankError(f"the bank described by {path} was generated with other settings ({'; '.join(diff)}); "
                                f"delete the bank folder {path.parent.parent} or use the same settings")
            manifest = dict(manifest, num_cases=max(int(old.get("num_cases", 0)), manifest["num_cases"]),
                            parts=old.get("parts", {}), skipped=old.get("skipped", []))
        manifest.setdefault("parts", {})[part] = {"num_cases": manifest["num_cases"],
                                                  "settings_digest": _settings_digest(manifest), "finished": False}
        manifest.setdefault("skipped", [])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(manifest, path)


def _finish_part(path: Path, part: str, num_cases: int, skipped: list[int]) -> None:
    """Records a part as finished, and the indices it skipped."""
    from nnunet_synth.planning import write_json_atomic

    with creation_lock(path):
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest.setdefault("parts", {}).setdefault(part, {}).update(num_cases=num_cases, finished=True)
        manifest["skipped"] = sorted(set(manifest.get("skipped", [])) | set(skipped))
        write_json_atomic(manifest, path)


def check_bank(dataset: str | int, backend: str, configuration: str, fold: int | str,
               plans_identifier: str = DEFAULT_PLANS_IDENTIFIER, shapes: dict | None = None) -> str:
    """Refuses a bank a trainer must not train on; returns a line for the training log.

    A bank is usable when it was made with the shape overrides asked for (``shapes``: those of its folder name),
    its manifest's settings are those of the current synth plan and it holds every case that was requested
    (finished or skipped because no lesion fitted); a stopped generation is accepted only where the synth plan
    sets ``allow_partial_bank``.

    Args:
        dataset: dataset name or ID.
        backend: generator backend name.
        configuration: nnU-Net configuration of the bank's cases.
        fold: the fold whose bank cases are checked.
        plans_identifier: nnU-Net plans identifier.
        shapes: the bank's shape overrides (``size_preset``, ``size_class``, ``deformation``); None: the bank of
            the synth plan's shapes.

    Raises:
        BankError: no manifest, other shape overrides than asked for (a bank made before folders carried them),
            other settings than the current plan, or an incomplete bank; naming found and requested cases and the
            command that completes or remakes it.
    """
    folder = bank_dir(dataset, backend, configuration, plans_identifier, shapes)
    path = folder / MANIFEST_DIR / f"fold_{fold}.json"
    command = generate_command(dataset, backend, configuration, fold, plans_identifier, shapes)
    if not path.is_file():
        raise BankError(f"the {backend} bank {folder} has no manifest for fold {fold} ({path}), so nothing says "
                        f"how it was made or whether it is complete; make it with: {command}")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    made_with = manifest.get("shape_overrides") or {}
    if bank_suffix(backend, made_with) != bank_suffix(backend, shapes):
        # made before bank folders carried their shape settings: it belongs to another study's folder
        own = bank_dir(dataset, backend, configuration, plans_identifier, made_with)
        raise BankError(f"the {backend} bank {folder} (fold {fold}) was generated with "
                        f"{shape_flags(made_with).strip() or 'the synth plan shapes'}, not with "
                        f"{shape_flags(shapes).strip() or 'the synth plan shapes'}; a bank with shape settings has "
                        f"its own folder now: move it to {own}, and make this one with: {command}")
    plan = bank_plan(dataset, backend, configuration, plans_identifier, made_with)
    requested = int(manifest["num_cases"])
    # the bank's own shape flags (also those its name leaves out, as transplant's --deformation template)
    command = generate_command(dataset, backend, configuration, fold, plans_identifier, made_with)
    flags = {"--seed": manifest.get("seed"), "--sampling-steps": manifest.get("sampling_steps"),
             "--checkpoint": manifest.get("checkpoint")}
    command = command.replace(" -n N", f" -n {requested}") + "".join(
        f" {flag} {value}" for flag, value in flags.items() if value is not None)
    if "settings" in manifest:
        diff = _differences(manifest, {"settings": bank_settings(plan)}, ("settings",))
        if diff:
            raise BankError(f"the {backend} bank {folder} (fold {fold}) was generated with other {diff[0]} than "
                            f"the synth plan has now; delete the bank folder and make it again with: {command}")
    found = len(bank_identifiers(folder, fold))
    skipped = len(manifest.get("skipped", []))
    unfinished = sorted(k for k, v in manifest.get("parts", {}).items() if not v.get("finished"))
    state = (f"the {backend} bank {folder} holds {found} of the {requested} cases requested for fold {fold} "
             f"({skipped} skipped: no lesion fitted{'; parts not finished: ' if unfinished else ''}"
             f"{', '.join(unfinished)})")
    if found + skipped >= requested:
        return state
    if not plan.allow_partial_bank:
        raise BankError(f"{state}: its generation stopped early; complete it with: {command} (finished cases are "
                        f"kept), or set \"allow_partial_bank\": true in the synth plan to train on it as it is")
    return f"{state}; allow_partial_bank is set in the synth plan: training on it as it is"


def generate_bank(dataset: str | int, backend: str, num_cases: int, configuration: str = "3d_fullres",
                  fold: int | str = 0, plans_identifier: str = DEFAULT_PLANS_IDENTIFIER,
                  sampling_steps: int | None = None, num_parts: int = 1, part: int = 0, device: str | None = None,
                  checkpoint: str | None = None, seed: int | None = None, export_raw_dir: Path | None = None,
                  progress: bool = True, size_class: str | None = None, deformation: str | None = None,
                  size_preset: str | None = None) -> list[str]:
    """Generates bank cases ``part, part + num_parts, ...`` below ``num_cases`` for one fold.

    ``size_preset``, ``size_class`` and ``deformation`` override the synth plan's shapes; a bank made with any
    of them has its own folder, named by them (:func:`~nnunet_synth.generators.paths.bank_dir`, e.g.
    ``nnUNetSynthBank_ldm_3d_fullres_tiny``), and records them in its manifest (``shape_overrides``).

    Returns:
        Identifiers written by this call (finished cases found on disk are skipped).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tqdm import tqdm

    from nnunet_synth.dataset_conversion.merge import read_case_cohorts
    from nnunet_synth.generators import get_backend
    from nnunet_synth.generators.lesions import insert_tumours_in_case
    from nnunet_synth.generators.splits import split_cases
    from nnunet_synth.generators.templates import fold_templates
    from nnunet_synth.planning import preprocessed_dir

    if num_cases < 1:
        raise ValueError(f"-n must be at least 1, got {num_cases}")
    if not 0 <= part < num_parts:
        raise ValueError(f"-part_id must be in [0, {num_parts}), got {part}")
    params = {k: v for k, v in {"fold": fold, "checkpoint": checkpoint, "sampling_steps": sampling_steps,
                                "device": device}.items() if v is not None}
    shapes = {k: v for k, v in {"size_preset": size_preset, "size_class": size_class,
                                "deformation": deformation}.items() if v is not None}
    plan = bank_plan(dataset, backend, configuration, plans_identifier, shapes, params)
    seed = int(plan.seed if seed is None else seed)
    generator = get_backend(backend)(plan)
    train_cases, _, real_folder = split_cases(dataset, configuration, fold, plans_identifier)
    cohorts = read_case_cohorts(plan.dataset_name, train_cases)  # None: not a merged dataset
    healthy = [c for c in plan.healthy_cases if c in set(train_cases)]
    base = preprocessed_dir(dataset)
    plans_manager = PlansManager(load_json(base / f"{plans_identifier}.json"))
    conf = plans_manager.get_configuration(configuration)
    dataset_json = load_json(base / "dataset.json")
    label_manager = plans_manager.get_label_manager(dataset_json)
    dataset_class = infer_dataset_class(str(real_folder))
    real = dataset_class(str(real_folder), list(train_cases))
    templates = None
    if plan.shapes.deformation == "template":
        templates, _ = fold_templates(base, conf, plan, train_cases)
    out = bank_dir(dataset, backend, configuration, plans_identifier, shapes)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out / TMP_DIR)  # what killed generations left
    if export_raw_dir is not None:
        remove_stale(Path(export_raw_dir) / TMP_DIR)
    manifest = {"dataset_name": plan.dataset_name, "backend": backend, "configuration": configuration,
                "fold": fold, "seed": seed, "num_cases": num_cases,
                "checkpoint": None if generator.checkpoint is None else str(generator.checkpoint),
                "sampling_steps": generator.sampling_steps, "training_cases": train_cases,
                "shapes": dataclasses.asdict(plan.shapes), "shape_overrides": shapes, "settings": bank_settings(plan),
                # how sources are chosen (source_cases): healthy controls first, spread evenly over the cohorts
                "sources": {"healthy_first": healthy,
                            "cohorts": None if cohorts is None else sorted({cohorts[c] for c in train_cases})}}
    manifest_path, part_key = out / MANIFEST_DIR / f"fold_{fold}.json", f"{part}/{num_parts}"
    _check_manifest(manifest_path, manifest, part_key)

    written, skipped = [], []
    done = {parse_bank_identifier(i)[2] for i in bank_identifiers(out, fold)}
    indices = range(part, num_cases, num_parts)
    for index in tqdm(indices, desc=f"bank {backend} fold {fold} part {part}/{num_parts}", unit="case",
                      disable=not progress):
        if index in done:
            continue
        rng = np.random.default_rng([seed, _fold_seed(fold), index])
        # the index's own source case first (healthy controls, cohorts in turn); where nothing fits, the next ones
        for source in source_cases(index, train_cases, healthy, cohorts):
            data, seg, _, properties = real.load_case(source)
            new_data, new_seg, lesions, z = insert_tumours_in_case(np.asarray(data), np.asarray(seg), plan, rng,
                                                                   generator, templates)
            if lesions:
                break
        identifier = bank_identifier(source, fold, index)
        if not lesions:
            skipped.append((index, identifier))
            continue
        props = copy.deepcopy(properties)
        props["class_locations"] = class_locations(new_seg, label_manager)
        synthetic = (new_seg[0] == plan.tumour_label) & (np.asarray(seg)[0] != plan.tumour_label)
        # the slices (first spatial axis, nnU-Net's 2d slicing) holding synthetic tumour: a 2d trainer's sample of
        # this case is one of them (nnunet_synth.trainers.bank.SyntheticSlices)
        synthetic_slices = [int(s) for s in np.flatnonzero(synthetic.any(axis=tuple(range(1, synthetic.ndim))))]
        props["synth"] = {"source": source, "fold": fold, "index": index, "backend": backend, "seed": seed,
                          "lesions": [lesion.to_dict() for lesion in lesions], "slice": z,
                          "synthetic_slices": synthetic_slices,
                          "cohort": None if cohorts is None else cohorts[source],
                          "checkpoint": manifest["checkpoint"], "sampling_steps": manifest["sampling_steps"]}
        if export_raw_dir is not None:  # first: a failed export (e.g. a missing raw file) leaves no bank case behind
            export_raw(new_data, np.asarray(data), synthetic, props, plans_manager, conf, dataset_json,
                       Path(export_raw_dir), identifier, plan.tumour_label)
        _save_case_atomic(dataset_class, new_data, new_seg.astype(np.asarray(seg).dtype), props, out, identifier,
                          tuple(conf.patch_size))
        written.append(identifier)
    _finish_part(manifest_path, part_key, num_cases, [index for index, _ in skipped])
    if skipped:
        names = [identifier for _, identifier in skipped]
        warnings.warn(f"{len(skipped)} bank case(s) skipped: no lesion fitted the placement region of their source "
                      f"case ({', '.join(names[:5])}{'...' if len(names) > 5 else ''})", stacklevel=2)
    return written


def main(argv: list[str] | None = None) -> None:
    from nnunet_synth.cli import HelpFormatter, add_deprecated_alias

    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_generate", formatter_class=HelpFormatter,
                                     description="Insert generated lesions into training-fold cases and write them "
                                     "as an nnU-Net preprocessed bank.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or ID")
    parser.add_argument("-g", "--generator", required=True, help="backend, e.g. ddpm")
    parser.add_argument("-n", "--num-cases", type=int, required=True, help="bank cases for this fold (all parts)")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration")
    parser.add_argument("-f", "--fold", default="0", help="segmenter fold whose training cases are sources")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS_IDENTIFIER, help="plans identifier")
    parser.add_argument("--sampling-steps", type=int, default=None, help="DDIM steps (ddpm default: 250, ldm: 10)")
    add_deprecated_alias(parser, parser.add_argument("-num_parts", type=int, default=1, metavar="P",
                                                     help="split the work into P parts (array jobs)"), "--num-parts")
    add_deprecated_alias(parser, parser.add_argument("-part_id", type=int, default=0, metavar="I",
                                                     help="which part this process writes (0 to P-1)"), "--part")
    add_deprecated_alias(parser, parser.add_argument("-device", choices=["cpu", "cuda"], default=None,
                                                     help="device of the generator (default: cuda if available)"),
                         "--device")
    parser.add_argument("--checkpoint", default=None, help="best (default), final, latest or a checkpoint path")
    parser.add_argument("--seed", type=int, default=None, help="default: the synth plan's seed")
    parser.add_argument("--export-raw", type=Path, default=None, help="also write each case as an nnU-Net raw case "
                        "here (imagesTr/, labelsTr/, synthetic_masksTr/): the source case's raw files from "
                        "nnUNet_raw, unchanged outside the lesion, with the lesion in raw intensity units")
    parser.add_argument("--size-class", default=None, help="size class of the lesions (default: the synth plan's "
                        "shapes.size_class); sd_inversion on a 2d configuration: tiny, small, medium, large, "
                        "very_large or any (per-slice tumour area bins)")
    parser.add_argument("--deformation", default=None, choices=["elastic", "simplex", "template", "none"],
                        help="lesion deformation (default: the synth plan's shapes.deformation); template: real "
                        "tumour masks of the fold's training cases")
    parser.add_argument("--size-preset", default=None, help="size preset whose classes --size-class names "
                        "(default: the synth plan's shapes.size_preset): labelfree, quartile or liver_mri. A bank "
                        "made with --size-preset, --size-class or --deformation has its own folder named by them "
                        "(e.g. nnUNetSynthBank_ldm_3d_fullres_tiny), mixed in by the study trainers such as "
                        "nnUNetTrainerSynth20TinyLDM")
    args = parser.parse_args(argv)
    from nnunet_synth.cli import exit_on_user_error
    from nnunet_synth.generators.splits import parse_fold

    # besides the common user errors: an unknown (KeyError) or unbuilt backend, and bad -n/-part_id/-f values
    with exit_on_user_error(parser.prog, also=(NotImplementedError, KeyError, ValueError)):
        written = generate_bank(args.dataset, args.generator, args.num_cases, args.configuration,
                                parse_fold(args.fold), args.plans, args.sampling_steps, args.num_parts, args.part_id,
                                args.device, args.checkpoint, args.seed, args.export_raw,
                                size_class=args.size_class, deformation=args.deformation,
                                size_preset=args.size_preset)
        out = bank_dir(args.dataset, args.generator, args.configuration, args.plans,
                       {"size_preset": args.size_preset, "size_class": args.size_class,
                        "deformation": args.deformation})
        print(f"wrote {len(written)} bank case(s) to {out}")
        cases, size = bank_disk_use(out, parse_fold(args.fold))
        if cases:
            print(f"bank fold {args.fold}: {cases} case(s), {size / 2 ** 20:.1f} MiB on disk, "
                  f"{size / cases / 2 ** 20:.2f} MiB per case (each a whole copy of its source case)")


if __name__ == "__main__":
    main()
