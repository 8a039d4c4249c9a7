"""Generator quality: how real the synthetic tumours of a backend look (``nnUNetv2_synth_quality``).

Real tumours are the connected components of the tumour label in the preprocessed cases; synthetic tumours
are inserted by the backend into organ patches of the same cases exactly as training inserts them
(:class:`~nnunet_synth.injection.SynthTumourTransform`, patches drawn as the preview draws them). Every
tumour is cut out with a context margin and measured in nnU-Net's normalised intensities (see
:mod:`nnunet_synth.evaluation.lesion_features`). Three checks follow:

* realism AUC: a classifier cross-validated by case on the intensity, edge and texture features (0.5: the
  synthetic tumours cannot be told from the real ones), :func:`~nnunet_synth.evaluation.realism.realism_auc`;
* with a trained model (``-m``): the liver-MRI paper's model selection, a one-class SVM on the encoder features
  of real tumours scoring the synthetic ones (:mod:`~nnunet_synth.evaluation.encoder_features`);
* per-channel contrast to the organ, edge sharpness and heterogeneity of real and synthetic tumours side by
  side, and a panel of examples.

Outputs: ``quality.json``, ``quality.md``, ``intensity_stats.png``, ``examples.png``. With ``--select-checkpoint``
the command instead scores every checkpoint of a learned generator's training with the one-class SVM and records the
best (:mod:`~nnunet_synth.evaluation.checkpoint_selection`). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import find_objects
from scipy.ndimage import label as connected_components
from tqdm import tqdm

from nnunet_synth.cli import HelpFormatter, exit_on_user_error
from nnunet_synth.evaluation.lesion_features import (
    CHANNEL_FEATURES,
    central_slice,
    glcm_features,
    volume_features,
)
from nnunet_synth.evaluation.realism import CLASSIFIERS, one_class_svm_scores, realism_auc

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan


class QualityError(ValueError):
    """A quality check that cannot run; the message names the dataset, case or option at fault."""


@dataclass(frozen=True)
class QualitySettings:
    """Settings of the quality checks (the defaults are the command's).

    Attributes:
        context_mm: margin around a tumour's bounding box in every crop (mm).
        shell_mm: width of the organ shell the contrast is measured against (mm).
        min_voxels: tumours (real components or synthetic lesions) with fewer voxels are left out.
        glcm_levels: grey levels of the co-occurrence texture.
        attempts: patches tried per synthetic tumour before giving up on it.
        classifier: realism classifier, one of :data:`~nnunet_synth.evaluation.realism.CLASSIFIERS`.
        n_splits: cross-validation folds of the realism classifier and the one-class SVM.
        n_repeats: repetitions of the realism cross-validation with reshuffled folds.
        nu: the one-class SVM's bound on the share of training outliers.
        examples: real and synthetic examples each in ``examples.png``.
    """

    context_mm: float = 10.0
    shell_mm: float = 4.0
    min_voxels: int = 8
    glcm_levels: int = 16
    attempts: int = 20
    classifier: str = "forest"
    n_splits: int = 5
    n_repeats: int = 5
    nu: float = 0.1
    examples: int = 6

    def check(self) -> None:
        """Raises QualityError for settings out of range."""
        if self.classifier not in CLASSIFIERS:
            raise QualityError(f"unknown classifier {self.classifier!r}; expected one of {', '.join(CLASSIFIERS)}")
        if self.context_mm < 0 or self.shell_mm <= 0:
            raise QualityError(f"context_mm must be >= 0 and shell_mm > 0, got {self.context_mm}, {self.shell_mm}")
        if self.min_voxels < 1 or self.glcm_levels < 2 or self.attempts < 1 or self.n_splits < 2 \
                or self.n_repeats < 1 or self.examples < 1:
            raise QualityError(f"settings out of range: {self}")
        if not 0 < self.nu <= 1:
            raise QualityError(f"nu must be in (0, 1], got {self.nu}")


@dataclass
class LesionCrop:
    """One real or synthetic tumour, measured.

    Attributes:
        kind: ``"real"`` or ``"synthetic"``.
        case: identifier of the preprocessed case.
        centre: tumour centroid in voxel coordinates of the case (z, y, x).
        num_voxels: tumour size in voxels (pixels for a 2d configuration).
        diameter_mm: equivalent diameter.
        slice_image: (C, *plane) the crop's slice through the tumour's largest cross-section.
        slice_lesion: (*plane) tumour mask on that slice.
        channel_features: per channel, the features of :data:`CHANNEL_FEATURES` (texture added later).
        embedding: per pooling, the encoder feature vector (with a model only).
    """

    kind: str
    case: str
    centre: tuple[int, ...]
    num_voxels: int
    diameter_mm: float
    slice_image: np.ndarray
    slice_lesion: np.ndarray
    channel_features: list[dict[str, float]]
    embedding: dict[str, np.ndarray] | None = None
    p_synthetic: float = float("nan")
    svm_score: dict[str, float] = field(default_factory=dict)


def resolve_dataset(dataset: str | int) -> Path:
    """The preprocessed folder of a dataset name or ID, as a QualityError when nnU-Net cannot find it."""
    from nnunet_synth.planning import preprocessed_dir

    try:
        base = preprocessed_dir(dataset)
    except (RuntimeError, ValueError) as e:
        raise QualityError(f"dataset {dataset!r}: {e}") from e
    if not base.is_dir():
        raise QualityError(f"{base} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    return base


def training_cases(dataset: str | int, configuration: str, plans_identifier: str, identifiers: Sequence[str],
                   fold: int | str | None) -> list[str]:
    """The cases a fold trains on, split by nnU-Net's own ``do_split``
    (:func:`~nnunet_synth.generators.splits.split_cases`); every preprocessed case for None.

    Raises:
        QualityError: for a negative fold, or a split that lists cases that are not preprocessed.
    """
    from nnunet_synth.generators.splits import split_cases

    if fold is None:
        return sorted(identifiers)
    if fold != "all" and int(fold) < 0:
        raise QualityError(f"fold must be >= 0 or 'all', got {fold}")
    cases, _, _ = split_cases(dataset, configuration, fold if fold == "all" else int(fold), plans_identifier)
    missing = sorted(set(cases) - set(identifiers))
    if missing:
        raise QualityError(f"splits_final.json lists training cases of fold {fold} that are not preprocessed for "
                           f"{configuration}: {', '.join(missing[:5])}")
    return cases


def _crop(volume: np.ndarray, labels: np.ndarray, coords: tuple[np.ndarray, ...], values: np.ndarray,
          box: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A box of a case with the tumour's voxel values written in (a no-op for real tumours).

    Returns:
        image (C, *box) float32, tumour mask, labels (-1 outside the case).
    """
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd  # imports torch: not at --help

    image = np.array(crop_and_pad_nd(volume, box, 0), dtype=np.float32)
    crop_labels = np.asarray(crop_and_pad_nd(labels, box, -1))
    local = [c - lo for c, (lo, _) in zip(coords, box)]
    inside = np.logical_and.reduce([(x >= 0) & (x < hi - lo) for x, (lo, hi) in zip(local, box)])
    local = tuple(x[inside] for x in local)
    lesion = np.zeros(image.shape[1:], dtype=bool)
    lesion[local] = True
    image[(slice(None), *local)] = values[:, inside]
    return image, lesion, crop_labels


class _CropMaker:
    """Cuts, measures and (with an encoder) embeds tumours of one dataset."""

    def __init__(self, plan: SynthPlan, spacing: tuple[float, ...], settings: QualitySettings, encoder=None):
        self.plan, self.spacing, self.settings, self.encoder = plan, spacing, settings, encoder
        self.margin = [int(math.ceil(settings.context_mm / s)) + 1 for s in spacing]

    def __call__(self, kind: str, case: str, volume: np.ndarray, labels: np.ndarray,
                 coords: tuple[np.ndarray, ...], values: np.ndarray, slice_index: int | None) -> LesionCrop:
        from nnunet_synth.generators.shapes import equivalent_diameter_mm  # scipy.stats: not at --help

        box = [[int(c.min()) - m, int(c.max()) + 1 + m] for c, m in zip(coords, self.margin)]
        image, lesion, crop_labels = _crop(volume, labels, coords, values, box)
        organ_label = self.plan.organ_label  # None: no organ label, the lesion's surrounding is unlabelled tissue
        organ = (crop_labels == organ_label) & ~lesion if organ_label is not None else np.zeros_like(lesion)
        features = volume_features(image, lesion, organ, self.spacing, self.settings.shell_mm)
        if lesion.ndim == 3:
            z = central_slice(lesion)
            slice_image, slice_lesion = image[:, z], lesion[z]
        else:
            slice_image, slice_lesion = image, lesion
        centre = tuple(int(round(float(c.mean()))) for c in coords)
        embedding = None
        if self.encoder is not None:
            window = [[c - p // 2, c - p // 2 + p] for c, p in zip(centre, self.encoder.patch_size)]
            patch, patch_lesion, _ = _crop(volume, labels, coords, values, window)
            embedding = self.encoder.embed(patch, patch_lesion)
        if slice_index is not None:
            centre = (slice_index, *centre)
        n = int(len(coords[0]))
        return LesionCrop(kind, case, centre, n, equivalent_diameter_mm(n, self.spacing), slice_image.copy(),
                          slice_lesion.copy(), features, embedding)


def _real_tumours(seg0: np.ndarray, tumour_label: int, two_d: bool
                  ) -> list[tuple[tuple[np.ndarray, ...], int | None]]:
    """Voxel coordinates of every connected tumour component (2d: on the slice of its largest cross-section)."""
    components, n = connected_components(seg0 == tumour_label)
    out = []
    for index, box in enumerate(find_objects(components), start=1):
        if box is None:
            continue
        local = np.nonzero(components[box] == index)
        coords = tuple(x + s.start for x, s in zip(local, box))
        if not two_d:
            out.append((coords, None))
            continue
        z = int(np.bincount(coords[0]).argmax())
        on_slice = coords[0] == z
        out.append((tuple(x[on_slice] for x in coords[1:]), z))
    return out


def collect_crops(ds, cases: Sequence[str], plan: SynthPlan, transform, patch_size: tuple[int, ...], num_synthetic: int,
                  settings: QualitySettings, rng: np.random.Generator, dataset_name: str, encoder=None,
                  progress: bool = True) -> tuple[list[LesionCrop], list[LesionCrop], dict[str, int]]:
    """Real tumours of ``cases`` and ``num_synthetic`` synthetic ones inserted into organ patches of the same cases.

    Synthetic tumours are spread evenly over the cases; each is tried in up to ``settings.attempts`` patches
    (:func:`nnunet_synth.preview.draw_synthetic_patch`) and given up when none takes it.

    Returns:
        Real crops, synthetic crops and counts of what was left out.
    """
    from nnunet_synth.preview import draw_synthetic_patch

    spacing = tuple(float(s) for s in plan.spacing[-len(patch_size):])
    two_d = len(patch_size) == 2
    make = _CropMaker(plan, spacing, settings, encoder)
    per_case = [num_synthetic // len(cases) + (i < num_synthetic % len(cases)) for i in range(len(cases))]
    real, synthetic = [], []
    counts = {"real_too_small": 0, "synthetic_too_small": 0, "synthetic_too_large": 0, "synthetic_not_placed": 0}
    for case, wanted in tqdm(list(zip(cases, per_case)), desc=f"quality: tumours of {dataset_name}", unit="case",
                             disable=not progress):
        try:
            data, seg, _, _ = ds.load_case(case)
            data, seg = np.asarray(data), np.asarray(seg)
        except Exception as e:  # nnU-Net's loaders raise many kinds; name the case
            raise QualityError(f"{dataset_name}: cannot load preprocessed case {case}: {e}") from e
        try:
            for coords, z in _real_tumours(seg[0], plan.tumour_label, two_d):
                if len(coords[0]) < settings.min_voxels:
                    counts["real_too_small"] += 1
                    continue
                volume, labels = (data, seg[0]) if z is None else (data[:, z], seg[0, z])
                real.append(make("real", case, volume, labels, coords, volume[(slice(None), *coords)], z))
            for _ in range(wanted):
                for _ in range(settings.attempts):
                    try:
                        drawn = draw_synthetic_patch(data, seg, plan, transform, patch_size, rng)
                    except LesionTooLarge:
                        counts["synthetic_too_large"] += 1
                        continue
                    if drawn is None:
                        continue
                    if drawn.lesion.sum() >= settings.min_voxels:
                        break
                    counts["synthetic_too_small"] += 1
                else:
                    counts["synthetic_not_placed"] += 1
                    continue
                z = drawn.slice_index
                volume, labels = (data, seg[0]) if z is None else (data[:, z], seg[0, z])
                local = np.nonzero(drawn.lesion)
                coords = tuple(x + lo for x, (lo, _) in zip(local, drawn.bbox))
                values = drawn.new_image.numpy()[(slice(None), *local)]
                synthetic.append(make("synthetic", case, volume, labels, coords, values, z))
        except ValueError as e:
            raise QualityError(f"{dataset_name} case {case}: {e}") from e
    return real, synthetic, counts


def add_texture(crops: Sequence[LesionCrop], levels: int) -> list[tuple[float, float]]:
    """Adds the co-occurrence features to every crop, quantising each channel over one range for all crops.

    The range per channel is the 1st to 99th percentile of the tumour pixels of all crops' central slices.

    Returns:
        The range per channel.
    """
    n_channels = crops[0].slice_image.shape[0]
    ranges = []
    for c in range(n_channels):
        pixels = np.concatenate([crop.slice_image[c][crop.slice_lesion] for crop in crops])
        lo, hi = np.percentile(pixels, [1, 99])
        ranges.append((float(lo), float(hi)))
    for crop in crops:
        for c, features in enumerate(crop.channel_features):
            features.update(glcm_features(crop.slice_image[c], crop.slice_lesion, ranges[c], levels))
    return ranges


def feature_matrix(crops: Sequence[LesionCrop], channel_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(n, channels x features) matrix of :data:`CHANNEL_FEATURES` and its column names ``channel:feature``."""
    names = [f"{ch}:{f}" for ch in channel_names for f in CHANNEL_FEATURES]
    rows = [[crop.channel_features[c][f] for c in range(len(channel_names)) for f in CHANNEL_FEATURES]
            for crop in crops]
    return np.asarray(rows, dtype=np.float64), names


def check_backend(backend: str) -> None:
    """Raises QualityError with the registry's message (it names the available backends) for a backend that
    cannot be built."""
    from nnunet_synth.generators import get_backend

    try:
        get_backend(backend)
    except (NotImplementedError, KeyError) as e:
        raise QualityError(e.args[0] if e.args else str(e)) from e


class LesionTooLarge(Exception):
    """A drawn lesion exceeds what the backend can fill (its ``max_lesion_shape``); another one is drawn."""


class _SizeLimited:
    """Wraps a backend with a ``max_lesion_shape`` (learned backends working in a fixed patch) so that a lesion it
    cannot fill is redrawn, as the bank generator does, instead of failing the whole check."""

    def __init__(self, generator):
        self.generator = generator
        self.limit = tuple(generator.max_lesion_shape)

    def synthesize(self, image: np.ndarray, lesion, spacing: tuple[float, ...], rng: np.random.Generator) -> None:
        if any(m > lim for m, lim in zip(lesion.mask.shape, self.limit)):
            raise LesionTooLarge(f"lesion box {lesion.mask.shape} exceeds {self.limit}")
        self.generator.synthesize(image, lesion, spacing, rng)


def _build_transform(plan: SynthPlan, backend: str, patch_size: tuple[int, ...], seed: int,
                     templates: Callable[[SynthPlan], list] | None = None):
    """The synth plan with ``backend`` set (and the shapes it needs) and the transform that inserts its tumours;
    ``templates`` gives the real tumour templates where the plan's deformation is ``template``.

    Raises:
        QualityError: for a backend that cannot be built (unknown, not implemented, missing or mismatched
            generator checkpoint).
    """
    from nnunet_synth.generators.checkpoints import GeneratorCheckpointError
    from nnunet_synth.injection import SynthTumourTransform

    check_backend(backend)
    plan = plan.with_backend(backend)
    try:
        masks = templates(plan) if plan.shapes.deformation == "template" and templates is not None else None
        transform = SynthTumourTransform(plan, 1.0, patch_size, seed, templates=masks)
    except (GeneratorCheckpointError, FileNotFoundError, ValueError) as e:
        raise QualityError(f"generator backend {backend!r}: {e}") from e
    if transform.generator.max_lesion_shape is not None:
        transform.generator = _SizeLimited(transform.generator)
    return plan, transform


def load_dataset(dataset: str | int, configuration: str, plans_identifier: str,
                 synth_plan: SynthPlan | dict | None = None):
    """The preprocessed dataset a quality check reads.

    Args:
        dataset: dataset name or ID.
        configuration: nnU-Net configuration.
        plans_identifier: nnU-Net plans identifier.
        synth_plan: a synth plan to use instead of the dataset's (validated against it), or None.

    Returns:
        (preprocessed dataset folder, nnU-Net configuration manager, preprocessed data folder, synth plan).

    Raises:
        QualityError: missing plans, configuration or preprocessed data, or an invalid synth plan.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_synth.planning import load_synth_plan
    from nnunet_synth.synth_plan import SynthPlan, SynthPlanError

    base = resolve_dataset(dataset)
    plans_file = base / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise QualityError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    try:
        conf = PlansManager(load_json(plans_file)).get_configuration(configuration)
    except (KeyError, RuntimeError) as e:
        raise QualityError(f"{base.name}, {plans_file.name}: {e}") from e
    folder = base / conf.data_identifier
    if not folder.is_dir():
        raise QualityError(f"{folder} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset} "
                           f"-c {configuration} first")
    try:
        if synth_plan is None:
            plan = load_synth_plan(dataset, configuration, plans_identifier)
        else:
            source = "the synth_plan argument of assess_quality"
            plan = synth_plan if isinstance(synth_plan, SynthPlan) else SynthPlan.from_dict(synth_plan, source)
            plan = plan.validated(source, load_json(base / "dataset.json"))
    except SynthPlanError as e:
        raise QualityError(f"{base.name}: {e}") from e
    return base, conf, folder, plan


def load_encoder(model_folder: str | Path, fold: int | str, checkpoint_name: str, device: str | None,
                 dataset_name: str, data_identifier: str, num_channels: int):
    """A trained model's encoder (:class:`~nnunet_synth.evaluation.encoder_features.EncoderEmbedder`), checked to
    be trained on the data the check reads.

    Raises:
        QualityError: the model cannot be loaded, or was trained on another dataset, configuration or channel count.
    """
    from nnunet_synth.evaluation.encoder_features import EncoderEmbedder, EncoderError

    try:
        encoder = EncoderEmbedder(model_folder, fold, checkpoint_name, device)
    except EncoderError as e:
        raise QualityError(str(e)) from e
    if (encoder.dataset_name, encoder.data_identifier) != (dataset_name, data_identifier) \
            or encoder.num_input_channels != num_channels:
        raise QualityError(f"the model in {model_folder} was trained on {encoder.dataset_name} "
                           f"({encoder.data_identifier}, {encoder.num_input_channels} channels) but the check "
                           f"reads {dataset_name} ({data_identifier}, {num_channels} channels); pass the "
                           f"matching -d/-c/-p")
    return encoder


def assess_quality(dataset: str | int, backend: str, output_dir: str | Path, num: int = 100,
                   configuration: str = "3d_fullres", plans_identifier: str = "nnUNetPlans",
                   fold: int | str | None = None, model_folder: str | Path | None = None,
                   checkpoint_name: str = "checkpoint_final.pth", device: str | None = None, seed: int = 0,
                   settings: QualitySettings | None = None, synth_plan: SynthPlan | dict | None = None,
                   progress: bool = True) -> dict:
    """Runs the generator-quality checks and writes the report.

    Args:
        dataset: dataset name or ID (preprocessed for ``configuration``).
        backend: generator backend to assess (overrides the synth plan's).
        output_dir: folder for ``quality.json``, ``quality.md``, ``intensity_stats.png``, ``examples.png``.
        num: synthetic tumours to generate.
        configuration: nnU-Net configuration whose preprocessed data and patch size are used.
        plans_identifier: nnU-Net plans identifier.
        fold: use only this fold's training cases (int or ``"all"``); None: all cases.
        model_folder: trained model folder for the one-class SVM check (needs ``fold``).
        checkpoint_name: checkpoint of the model.
        device: torch device of the encoder (default CUDA when available).
        seed: seed of placement, synthesis and cross-validation.
        settings: measurement and classifier settings.
        synth_plan: a synth plan to use instead of the dataset's ``nnUNetSynthPlans.json`` (e.g. an edited copy
            made with :meth:`SynthPlan.replace`, or its flat JSON form, to compare generator settings); it is
            validated against the dataset.
        progress: show progress bars.

    Returns:
        The summary written to ``quality.json``.

    Raises:
        QualityError: for an unknown or unbuilt backend, a dataset without real tumours, a model that does
            not match the dataset and other conditions the message names.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_synth.evaluation.quality_report import write_report
    from nnunet_synth.planning import MAX_CASES_FOR_STATISTICS

    settings = settings or QualitySettings()
    settings.check()
    if num < 2:
        raise QualityError(f"-n must be at least 2 synthetic tumours, got {num}")
    if model_folder is not None and fold is None:
        raise QualityError("a model (-m) needs the fold (-f) whose checkpoint to load")
    check_backend(backend)  # fail fast, before any data is read
    base, conf, folder, plan = load_dataset(dataset, configuration, plans_identifier, synth_plan)
    ds = infer_dataset_class(str(folder))(str(folder))
    identifiers = list(ds.identifiers)
    # the plan's statistics saw every case unless there are more than it samples: then no tumour means none
    if plan.tumour_sizes.count == 0 and len(identifiers) <= MAX_CASES_FOR_STATISTICS:
        raise QualityError(f"{base.name} has no real tumours (label {plan.tumour_label}) in its preprocessed "
                           f"cases: no real tumours to compare the synthetic ones with")
    patch_size = tuple(int(p) for p in conf.patch_size)
    cases = training_cases(dataset, configuration, plans_identifier, identifiers, fold)

    def templates(p: SynthPlan) -> list:  # real tumours of the cases whose tumours are compared, as a trainer's fold
        from nnunet_synth.generators.templates import fold_templates

        return fold_templates(base, conf, p, list(cases))[0]

    plan, transform = _build_transform(plan, backend, patch_size, seed, templates)
    if not cases:
        raise QualityError(f"{base.name} has no preprocessed cases" + (f" in fold {fold}'s training split"
                                                                        if fold not in (None, "all") else ""))
    channel_names = [ch.name for ch in plan.channels]

    encoder = None
    if model_folder is not None:
        encoder = load_encoder(model_folder, fold, checkpoint_name, device, base.name, conf.data_identifier,
                               len(channel_names))

    rng = np.random.default_rng(seed)
    real, synthetic, counts = collect_crops(ds, cases, plan, transform, patch_size, num, settings, rng, base.name,
                                            encoder, progress)
    where = f"{len(cases)} {'training cases of fold ' + str(fold) if fold not in (None, 'all') else 'cases'}"
    if len(real) < 2:
        raise QualityError(f"{base.name}: {len(real)} real tumour(s) of at least {settings.min_voxels} voxels in "
                           f"{where}; at least 2 are needed as real tumours to compare with")
    if len(synthetic) < 2:
        raise QualityError(f"{base.name}: only {len(synthetic)} of {num} synthetic tumours could be placed in "
                           f"{where} ({settings.attempts} patches tried per tumour): is organ label "
                           f"{plan.organ_label} right? (nnUNetv2_synth_plan --organ-label N)")
    crops = real + synthetic
    texture_ranges = add_texture(crops, settings.glcm_levels)
    x, names = feature_matrix(crops, channel_names)
    is_synthetic = np.array([c.kind == "synthetic" for c in crops])
    realism = realism_auc(x, is_synthetic, [c.case for c in crops], names, settings.classifier, settings.n_splits,
                          settings.n_repeats, seed)
    for crop, p in zip(crops, realism.pop("p_synthetic")):
        crop.p_synthetic = p

    svm = None
    if encoder is not None:
        svm = {"model_folder": str(Path(model_folder).resolve()), "fold": fold, "checkpoint": checkpoint_name,
               "trainer": encoder.trainer_name, "patch_size": list(encoder.patch_size)}
        from nnunet_synth.evaluation.encoder_features import POOLINGS

        for pooling in POOLINGS:
            result = one_class_svm_scores(np.stack([c.embedding[pooling] for c in real]),
                                          np.stack([c.embedding[pooling] for c in synthetic]),
                                          [c.case for c in real], settings.nu, settings.n_splits, seed)
            for crop, score in zip(real, result.pop("real_heldout_scores")):
                crop.svm_score[pooling] = score
            for crop, score in zip(synthetic, result.pop("synthetic_scores")):
                crop.svm_score[pooling] = score
            result["feature_dim"] = int(real[0].embedding[pooling].size)
            svm[pooling] = result

    summary = {
        "dataset": base.name,
        "configuration": configuration,
        "plans_identifier": plans_identifier,
        "backend": backend,
        "fold": fold,
        "cases": list(cases),
        "seed": seed,
        "num_requested": num,
        "settings": asdict(settings),
        "spacing": [float(s) for s in plan.spacing[-len(patch_size):]],
        "patch_size": list(patch_size),
        "channels": channel_names,
        "counts": {"real": len(real), "synthetic": len(synthetic), **counts},
        "texture_ranges": [list(r) for r in texture_ranges],
        "realism": realism,
        "one_class_svm": svm,
    }
    return write_report(summary, real, synthetic, Path(output_dir))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nnUNetv2_synth_quality``."""
    d = QualitySettings()
    p = argparse.ArgumentParser(
        prog="nnUNetv2_synth_quality", formatter_class=HelpFormatter,
        description="How real a generator backend's synthetic tumours look: realism AUC of a classifier telling "
                    "real from synthetic tumours (0.5 = indistinguishable), with -m a one-class SVM on a trained "
                    "nnU-Net's encoder features (the liver-MRI paper's model selection), per-channel contrast and "
                    "edge statistics, and example crops. Writes quality.json, quality.md, intensity_stats.png, "
                    "examples.png.")
    p.add_argument("-d", "--dataset", required=True, help="dataset name or ID (preprocessed)")
    p.add_argument("-g", "--generator", required=True, metavar="BACKEND", help="generator backend, e.g. analytic")
    p.add_argument("-n", "--num", type=int, default=100, help="synthetic tumours to generate (default 100)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", "--fold", default=None,
                   help="use only this fold's training cases (0-4 or 'all'; default: all cases); the fold of -m")
    p.add_argument("-m", "--model", default=None, metavar="MODEL_FOLDER",
                   help="trained nnU-Net model folder (nnUNet_results/DatasetNNN/TRAINER__PLANS__CONFIG) for the "
                        "one-class SVM check; needs -f")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint of -m")
    p.add_argument("-device", default=None, help="torch device of the encoder (default: cuda if available, else cpu)")
    p.add_argument("--classifier", choices=CLASSIFIERS, default=d.classifier,
                   help=f"realism classifier (default {d.classifier})")
    p.add_argument("--context-mm", type=float, default=d.context_mm, help=f"crop margin (default {d.context_mm})")
    p.add_argument("--shell-mm", type=float, default=d.shell_mm,
                   help=f"organ shell width for the contrast (default {d.shell_mm})")
    p.add_argument("--min-voxels", type=int, default=d.min_voxels,
                   help=f"leave out smaller tumours (default {d.min_voxels})")
    p.add_argument("--nu", type=float, default=d.nu, help=f"one-class SVM nu (default {d.nu})")
    p.add_argument("--repeats", type=int, default=d.n_repeats,
                   help=f"cross-validation repeats of the realism classifier (default {d.n_repeats})")
    p.add_argument("--examples", type=int, default=d.examples,
                   help=f"real and synthetic examples each in examples.png (default {d.examples})")
    p.add_argument("--seed", type=int, default=0, help="seed of the patches, lesions and classifiers (default 0)")
    p.add_argument("--select-checkpoint", action="store_true",
                   help="instead of the report: score every checkpoint of the generator's training folder of fold -f "
                        "(checkpoint_iter*.pth, checkpoint_best.pth, checkpoint_final.pth) as the liver-MRI paper "
                        "selects its model (one-class SVM on the encoder features of -m at the real tumours of the "
                        "fold's validation images, each replaced by the checkpoint's synthetic tumour), record the "
                        "best in the generator folder's selected_checkpoint.json (bank generation and the ddpm "
                        "backend then use it) and write checkpoint_selection.json/.md to -o; needs -m and -f")
    p.add_argument("--pooling", choices=("global", "lesion"), default="global",
                   help="encoder pooling of --select-checkpoint (default global: the paper's patch latent)")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help="sampling steps of the generator in --select-checkpoint (default: the synth plan's, else "
                        "the backend's, e.g. 250 for ddpm)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@exit_on_user_error("nnUNetv2_synth_quality")
def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``nnUNetv2_synth_quality``; ``argv`` defaults to ``sys.argv[1:]``.

    Returns:
        0 on success; errors exit with status 2 and a message naming the dataset, case or option at fault.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    fold = args.fold
    if fold is not None and fold != "all":
        try:
            fold = int(fold)
        except ValueError:
            parser.error(f"-f must be a fold number or 'all', got {args.fold!r}")
    if args.model is not None and fold is None:
        parser.error("-m needs -f FOLD (the fold whose checkpoint is loaded; its training cases are used)")
    settings = QualitySettings(context_mm=args.context_mm, shell_mm=args.shell_mm, min_voxels=args.min_voxels,
                               classifier=args.classifier, n_repeats=args.repeats, nu=args.nu,
                               examples=args.examples)
    if args.select_checkpoint:
        if args.model is None:
            parser.error("--select-checkpoint needs -m MODEL_FOLDER (the trained nnU-Net whose encoder scores) and -f")
        if args.sampling_steps is not None and args.sampling_steps < 1:
            parser.error(f"--sampling-steps must be at least 1, got {args.sampling_steps}")
        from nnunet_synth.evaluation.checkpoint_selection import select_checkpoint

        selection = select_checkpoint(args.dataset, args.generator, args.model, fold, args.output, args.configuration,
                                      args.plans, args.checkpoint, args.device, args.seed, settings, args.pooling,
                                      args.sampling_steps, progress=not args.quiet)
        print(f"nnUNetv2_synth_quality: selected {selection['checkpoint']} of {len(selection['scores'])} "
              f"{selection['backend']} checkpoints (score {selection['score']:.4g}, lower is better; "
              f"{selection['num_tumours']} validation tumours); recorded in {selection['selection_file']}; report "
              f"in {args.output}")
        return 0
    summary = assess_quality(args.dataset, args.generator, args.output, args.num, args.configuration, args.plans,
                             fold, args.model, args.checkpoint, args.device, args.seed, settings,
                             progress=not args.quiet)
    line = (f"nnUNetv2_synth_quality: {summary['backend']} on {summary['dataset']}: realism AUC "
            f"{summary['realism']['auc']:.3f} ({summary['counts']['real']} real, {summary['counts']['synthetic']} "
            f"synthetic tumours)")
    if summary["one_class_svm"] is not None:
        g = summary["one_class_svm"]["global"]
        line += (f"; one-class SVM: {100 * g['synthetic_inlier_share']:.0f}% of synthetic tumours accepted "
                 f"(real held out {100 * g['real_heldout_inlier_share']:.0f}%)")
    print(line + f"; report in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
