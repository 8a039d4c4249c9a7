"""The synthetic bank: pre-generated cases in nnU-Net's preprocessed format (``nnUNetv2_synth_generate``).

Each bank case is a training-fold case of the segmenter with one lesion inserted by a generator backend
(mask from the shapes engine, position from placement, content from the backend), written with nnU-Net's
own dataset class into ``nnUNet_preprocessed/DatasetNNN/nnUNetSynthBank_<backend>_<configuration>/``
(:func:`nnunet_synth.generators.paths.bank_dir`; another plans identifier than ``nnUNetPlans`` is in the name).
Identifiers are ``<source case>__synth_f<fold>_<index>``: the fold and source are in the name, so a
trainer takes only bank cases made for its fold from its own training cases. Case ``index`` depends only on
(seed, fold, index), so parts (``--num-parts P --part I``, e.g. SLURM array tasks on different machines)
write disjoint, reproducible cases, and a rerun skips finished ones. A case becomes visible only when
complete: its files are written in a temporary subfolder and renamed, the data file last.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np

from nnunet_synth.generators.paths import DEFAULT_PLANS_IDENTIFIER, bank_dir
from nnunet_synth.planning import preprocessed_dir, write_json_atomic

BANK_PATTERN = re.compile(r"^(?P<source>.+)__synth_f(?P<fold>all|\d+)_(?P<index>\d+)$")
MANIFEST_DIR = "manifest"  # a subfolder, so the bank folder itself holds nothing but case files
TMP_DIR = ".tmp"
SOURCE_TRIES = 4  # training cases tried, in turn, for one bank case before it is skipped
# manifest entries a later part or rerun must share with the bank it adds to
MANIFEST_KEYS = ("backend", "configuration", "seed", "checkpoint", "sampling_steps", "shapes")


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

    tmp = folder / TMP_DIR / f"{identifier}.{os.getpid()}"
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


def export_raw(data: np.ndarray, seg: np.ndarray, properties: dict, plans_manager, configuration_manager,
               dataset_json: dict, out_dir: Path, identifier: str, synthetic: np.ndarray | None = None) -> list[Path]:
    """Writes a preprocessed case back in raw space (resampled, uncropped, untransposed) as image + label files,
    and with ``synthetic`` (bool, spatial) the synthetic lesion voxels as ``synthetic_masksTr/<id>``.

    CT-normalised channels are mapped back to HU; other channels stay in nnU-Net's normalised units.
    """
    import SimpleITK as sitk

    if "sitk_stuff" not in properties:
        raise ValueError("--export-raw needs a dataset read with SimpleITK (properties lack 'sitk_stuff')")
    spacing_t = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape = properties["shape_after_cropping_and_before_resampling"]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) \
        else [spacing_t[0], *configuration_manager.spacing]
    image = np.asarray(configuration_manager.resampling_fn_data(np.asarray(data, dtype=np.float32), shape, current,
                                                                spacing_t))
    seg = np.maximum(np.asarray(seg[:1]), 0)
    if synthetic is not None:  # a second channel, resampled with the labels (nearest neighbour)
        seg = np.concatenate([seg, np.asarray(synthetic, dtype=seg.dtype)[None]])
    labels = np.asarray(configuration_manager.resampling_fn_seg(seg, shape, current, spacing_t))
    bbox = properties["bbox_used_for_cropping"]
    region = tuple(slice(lo, hi) for lo, hi in bbox)
    full_image = np.zeros((image.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
    full_image[(slice(None), *region)] = image
    full_seg = np.zeros((labels.shape[0], *properties["shape_before_cropping"]), dtype=np.uint8)
    full_seg[(slice(None), *region)] = labels
    intensity = plans_manager.foreground_intensity_properties_per_channel
    for c, scheme in enumerate(configuration_manager.normalization_schemes):
        if scheme == "CTNormalization":
            props = intensity[str(c)]
            full_image[c] = full_image[c] * max(props["std"], 1e-8) + props["mean"]
    back = list(plans_manager.transpose_backward)
    full_image = full_image.transpose([0] + [i + 1 for i in back])
    full_seg = full_seg.transpose([0] + [i + 1 for i in back])
    ending = dataset_json.get("file_ending", ".nii.gz")
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    if synthetic is not None:
        (out_dir / "synthetic_masksTr").mkdir(parents=True, exist_ok=True)
    written = []

    def write(array: np.ndarray, path: Path) -> None:
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(properties["sitk_stuff"]["spacing"])
        itk.SetOrigin(properties["sitk_stuff"]["origin"])
        itk.SetDirection(properties["sitk_stuff"]["direction"])
        sitk.WriteImage(itk, str(path), True)
        written.append(path)

    for c in range(full_image.shape[0]):
        write(full_image[c], out_dir / "imagesTr" / f"{identifier}_{c:04d}{ending}")
    write(full_seg[0], out_dir / "labelsTr" / f"{identifier}{ending}")
    if synthetic is not None:
        write(full_seg[1], out_dir / "synthetic_masksTr" / f"{identifier}{ending}")
    return written


def _fold_seed(fold: int | str) -> int:
    return fold if isinstance(fold, int) else 1_000_000


def _check_manifest(path: Path, manifest: dict) -> None:
    """Refuses to mix cases made with another seed, checkpoint or sampling setting into one bank."""
    import json

    if path.is_file():
        old = json.loads(path.read_text())
        # keys an older manifest lacks (shapes, recorded since plans were typed) are not held against it
        diff = {k: (old[k], manifest[k]) for k in MANIFEST_KEYS if k in old and old[k] != manifest[k]}
        if diff:
            raise RuntimeError(f"the bank described by {path} was generated with other settings "
                               f"(existing, now: {diff}); delete the bank folder {path.parent.parent} or use "
                               f"the same settings")
        manifest = dict(manifest, num_cases=max(int(old.get("num_cases", 0)), manifest["num_cases"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, path)


def generate_bank(dataset: str | int, backend: str, num_cases: int, configuration: str = "3d_fullres",
                  fold: int | str = 0, plans_identifier: str = DEFAULT_PLANS_IDENTIFIER,
                  sampling_steps: int | None = None, num_parts: int = 1, part: int = 0, device: str | None = None,
                  checkpoint: str | None = None, seed: int | None = None, export_raw_dir: Path | None = None,
                  progress: bool = True, size_class: str | None = None, deformation: str | None = None
                  ) -> list[str]:
    """Generates bank cases ``part, part + num_parts, ...`` below ``num_cases`` for one fold.

    Returns:
        Identifiers written by this call (finished cases found on disk are skipped).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tqdm import tqdm

    from nnunet_synth.generators import get_backend
    from nnunet_synth.generators.lesions import insert_tumours_in_case
    from nnunet_synth.generators.splits import split_cases
    from nnunet_synth.generators.templates import fold_templates
    from nnunet_synth.planning import load_synth_plan

    if num_cases < 1:
        raise ValueError(f"-n must be at least 1, got {num_cases}")
    if not 0 <= part < num_parts:
        raise ValueError(f"--part must be in [0, {num_parts}), got {part}")
    plan = load_synth_plan(dataset, configuration, plans_identifier)
    params = dict(plan.backend_params)
    params.update({k: v for k, v in {"fold": fold, "checkpoint": checkpoint, "sampling_steps": sampling_steps,
                                     "device": device}.items() if v is not None})
    shapes = {k: v for k, v in {"size_class": size_class, "deformation": deformation}.items() if v is not None}
    if backend == "sd_inversion" and len(plan.spacing) == 2:
        shapes["size_preset"] = "slice_area"  # the breast 2D paper's classes are tumour areas per slice
    plan = plan.replace(backend=backend, backend_params=params, shapes=shapes).validated(
        f"synth plan of {plan.dataset_name} with -g {backend} and shapes {shapes}")
    seed = int(plan.seed if seed is None else seed)
    generator = get_backend(backend)(plan)
    train_cases, _, real_folder = split_cases(dataset, configuration, fold, plans_identifier)
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
    out = bank_dir(dataset, backend, configuration, plans_identifier)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"dataset_name": plan.dataset_name, "backend": backend, "configuration": configuration,
                "fold": fold, "seed": seed, "num_cases": num_cases,
                "checkpoint": None if generator.checkpoint is None else str(generator.checkpoint),
                "sampling_steps": generator.sampling_steps, "training_cases": train_cases,
                "shapes": dataclasses.asdict(plan.shapes)}
    _check_manifest(out / MANIFEST_DIR / f"fold_{fold}.json", manifest)

    written, skipped = [], []
    done = {parse_bank_identifier(i)[2] for i in bank_identifiers(out, fold)}
    indices = range(part, num_cases, num_parts)
    for index in tqdm(indices, desc=f"bank {backend} fold {fold} part {part}/{num_parts}", unit="case",
                      disable=not progress):
        if index in done:
            continue
        rng = np.random.default_rng([seed, _fold_seed(fold), index])
        # the index's own source case first; where nothing fits it whole, the next training cases
        for source in (train_cases[(index + k) % len(train_cases)] for k in range(min(SOURCE_TRIES, len(train_cases)))):
            data, seg, _, properties = real.load_case(source)
            new_data, new_seg, lesions, z = insert_tumours_in_case(np.asarray(data), np.asarray(seg), plan, rng,
                                                                   generator, templates)
            if lesions:
                break
        identifier = bank_identifier(source, fold, index)
        if not lesions:
            skipped.append(identifier)
            continue
        props = copy.deepcopy(properties)
        props["class_locations"] = class_locations(new_seg, label_manager)
        props["synth"] = {"source": source, "fold": fold, "index": index, "backend": backend, "seed": seed,
                          "lesions": [lesion.to_dict() for lesion in lesions], "slice": z,
                          "checkpoint": manifest["checkpoint"], "sampling_steps": manifest["sampling_steps"]}
        _save_case_atomic(dataset_class, new_data, new_seg.astype(np.asarray(seg).dtype), props, out, identifier,
                          tuple(conf.patch_size))
        if export_raw_dir is not None:
            synthetic = (new_seg[0] == plan.tumour_label) & (np.asarray(seg)[0] != plan.tumour_label)
            export_raw(new_data, new_seg, props, plans_manager, conf, dataset_json, Path(export_raw_dir), identifier,
                       synthetic)
        written.append(identifier)
    if skipped:
        warnings.warn(f"{len(skipped)} bank case(s) skipped: no lesion fitted the placement region of their source "
                      f"case ({', '.join(skipped[:5])}{'...' if len(skipped) > 5 else ''})", stacklevel=2)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_generate", description="Insert generated lesions into "
                                     "training-fold cases and write them as an nnU-Net preprocessed bank.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or ID")
    parser.add_argument("-g", "--generator", required=True, help="backend, e.g. ddpm")
    parser.add_argument("-n", "--num-cases", type=int, required=True, help="bank cases for this fold (all parts)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-f", "--fold", default="0", help="segmenter fold whose training cases are sources")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS_IDENTIFIER, help="plans identifier")
    parser.add_argument("--sampling-steps", type=int, default=None, help="DDIM steps (ddpm default: 250, ldm: 10)")
    parser.add_argument("--num-parts", type=int, default=1, help="split the work into P parts (array jobs)")
    parser.add_argument("--part", type=int, default=0, help="which part this process writes (0-based)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--checkpoint", default=None, help="best (default), final, latest or a checkpoint path")
    parser.add_argument("--seed", type=int, default=None, help="default: the synth plan's seed")
    parser.add_argument("--export-raw", type=Path, default=None, help="also write NIfTI image/label files here")
    parser.add_argument("--size-class", default=None, help="size class of the lesions (default: the synth plan's "
                        "shapes.size_class); sd_inversion on a 2d configuration: tiny, small, medium, large, "
                        "very_large or any (per-slice tumour area bins)")
    parser.add_argument("--deformation", default=None, choices=["elastic", "simplex", "template", "none"],
                        help="lesion deformation (default: the synth plan's shapes.deformation); template: real "
                        "tumour masks of the fold's training cases")
    args = parser.parse_args(argv)
    from nnunet_synth.cli import exit_on_user_error
    from nnunet_synth.generators.splits import parse_fold

    # besides the common user errors: an unknown (KeyError) or unbuilt backend, and bad -n/--part/--fold values
    with exit_on_user_error(parser.prog, also=(NotImplementedError, KeyError, ValueError)):
        written = generate_bank(args.dataset, args.generator, args.num_cases, args.configuration,
                                parse_fold(args.fold), args.plans, args.sampling_steps, args.num_parts, args.part,
                                args.device, args.checkpoint, args.seed, args.export_raw,
                                size_class=args.size_class, deformation=args.deformation)
        out = bank_dir(args.dataset, args.generator, args.configuration, args.plans)
        print(f"wrote {len(written)} bank case(s) to {out}")


if __name__ == "__main__":
    main()
