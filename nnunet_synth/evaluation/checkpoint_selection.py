"""Generator checkpoint selection by one-class SVM (``nnUNetv2_synth_quality --select-checkpoint``).

The liver-MRI paper (Quinton et al., section 2.4 and Appendix B) picks the generator checkpoint whose synthetic
tumours a trained nnU-Net's encoder sees closest to real ones:

1. a one-class SVM (RBF kernel, standardised features, as :func:`~nnunet_synth.evaluation.realism.one_class_svm_scores`)
   is fitted on the encoder features (:mod:`~nnunet_synth.evaluation.encoder_features`) of the validation images of
   the model's fold (cases neither the segmenter nor the generator trained on) at their real tumours;
2. for every checkpoint of the generator's training folder (``checkpoint_iter*.pth``, ``checkpoint_best.pth``,
   ``checkpoint_final.pth``), each real tumour of those images is replaced by the checkpoint's synthetic tumour in
   the same mask (the backend inpaints it; same seed per tumour for every checkpoint), and the modified image is
   embedded the same way;
3. a tumour's score is the absolute difference of the SVM's decision value between the image with its real and with
   its synthetic tumour, an image's the mean over its tumours, a checkpoint's the mean over the images (the paper's
   "average SVM difference", lower is better; Table B.4).

The winner is recorded atomically in the generator folder's ``selected_checkpoint.json`` with every checkpoint's
score (:func:`~nnunet_synth.generators.checkpoints.record_selection`); bank generation and the ``ddpm`` backend load
it where the synth plan names no checkpoint. ``checkpoint_selection.json`` and ``checkpoint_selection.md`` in the
output folder report the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_synth.evaluation.quality import (
    QualityError,
    QualitySettings,
    _crop,
    _real_tumours,
    check_backend,
    load_dataset,
    load_encoder,
)

# backends whose loader reads selected_checkpoint.json (the liver-MRI paper's DDPM)
SELECTABLE_BACKENDS = ("ddpm",)
CRITERION = ("mean over validation images of the mean over their tumours of |SVM decision(real tumour) - SVM "
             "decision(synthetic tumour in the same mask)|; lower is better")


@dataclass
class _Tumour:
    """One real tumour of a validation image: its voxels and its box."""

    case: str
    index: int
    coords: tuple[np.ndarray, ...]

    @property
    def bbox(self) -> tuple[slice, ...]:
        return tuple(slice(int(c.min()), int(c.max()) + 1) for c in self.coords)

    @property
    def mask(self) -> np.ndarray:
        box = self.bbox
        mask = np.zeros([s.stop - s.start for s in box], dtype=bool)
        mask[tuple(c - s.start for c, s in zip(self.coords, box))] = True
        return mask


def _embed(encoder, volume: np.ndarray, labels: np.ndarray, tumour: _Tumour, pooling: str) -> np.ndarray:
    """The encoder feature of the model-sized patch centred on ``tumour`` in ``volume`` (as the quality check cuts
    its patches)."""
    centre = [int(round(float(c.mean()))) for c in tumour.coords]
    window = [[c - p // 2, c - p // 2 + p] for c, p in zip(centre, encoder.patch_size)]
    patch, lesion, _ = _crop(volume, labels, tumour.coords, volume[(slice(None), *tumour.coords)], window)
    return encoder.embed(patch, lesion)[pooling]


def _iteration(path: Path) -> int | None:
    from nnunet_synth.generators.checkpoints import PERIODIC_CHECKPOINT

    match = PERIODIC_CHECKPOINT.match(path.name)
    return None if match is None else int(match["iteration"])


def select_checkpoint(dataset: str | int, backend: str, model_folder: str | Path, fold: int | str,
                      output_dir: str | Path, configuration: str = "3d_fullres",
                      plans_identifier: str = "nnUNetPlans", checkpoint_name: str = "checkpoint_final.pth",
                      device: str | None = None, seed: int = 0, settings: QualitySettings | None = None,
                      pooling: str = "global", sampling_steps: int | None = None, progress: bool = True) -> dict:
    """Scores every checkpoint of a generator training with the one-class SVM and records the best one.

    Args:
        dataset: dataset name or ID (preprocessed for ``configuration``).
        backend: learned generator backend whose training folder (fold ``fold``) holds the checkpoints.
        model_folder: trained nnU-Net model folder whose encoder gives the features.
        fold: the fold of the model and of the generator; its validation cases are the images scored.
        output_dir: folder for ``checkpoint_selection.json`` and ``checkpoint_selection.md``.
        configuration: nnU-Net configuration (3D).
        plans_identifier: nnU-Net plans identifier.
        checkpoint_name: checkpoint of the model.
        device: torch device of the encoder and the generator (default CUDA when available).
        seed: seed of the synthesis (the same per tumour for every checkpoint).
        settings: ``min_voxels`` (smaller real tumours are left out) and ``nu`` (the SVM's) are used.
        pooling: encoder pooling, ``global`` (the paper's latent) or ``lesion``
            (:data:`~nnunet_synth.evaluation.encoder_features.POOLINGS`).
        sampling_steps: sampling steps of the generator (default: the synth plan's, else the backend's).
        progress: show a progress bar over the checkpoints.

    Returns:
        The selection record (as written to ``selected_checkpoint.json``).

    Raises:
        QualityError: no checkpoints, a 2D configuration, fewer than two real tumours in the validation images,
            no tumour that every checkpoint can fill, or a model or checkpoint that does not fit the dataset.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import OneClassSVM

    from nnunet_synth.evaluation.encoder_features import POOLINGS
    from nnunet_synth.evaluation.quality_report import write_selection_report
    from nnunet_synth.generators import get_backend
    from nnunet_synth.generators.base import Lesion
    from nnunet_synth.generators.checkpoints import (
        SELECTION_FILE,
        GeneratorCheckpointError,
        record_selection,
        selectable_checkpoints,
    )
    from nnunet_synth.generators.paths import generator_output_dir, train_command
    from nnunet_synth.generators.splits import split_cases

    settings = settings or QualitySettings()
    settings.check()
    if pooling not in POOLINGS:
        raise QualityError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if backend not in SELECTABLE_BACKENDS:
        raise QualityError(f"--select-checkpoint selects checkpoints of the {', '.join(SELECTABLE_BACKENDS)} "
                           f"backend (whose loader reads {SELECTION_FILE}); {backend!r} would not use the selection")
    check_backend(backend)
    base, conf, _, plan = load_dataset(dataset, configuration, plans_identifier)
    if len(conf.patch_size) != 3:
        raise QualityError(f"checkpoint selection runs on 3D configurations; {configuration} is 2D")
    folder = generator_output_dir(base.name, backend, configuration, fold, plans_identifier)
    checkpoints = selectable_checkpoints(folder)
    if not checkpoints:
        raise QualityError(f"{folder} holds no generator checkpoints to select from (checkpoint_iter*.pth, "
                           f"checkpoint_best.pth, checkpoint_final.pth); train the generator with: "
                           f"{train_command(base.name, backend, configuration, fold, plans_identifier)}")
    encoder = load_encoder(model_folder, fold, checkpoint_name, device, base.name, conf.data_identifier,
                           len(plan.channels))
    _, cases, data_folder = split_cases(base.name, configuration, fold, plans_identifier)
    ds = infer_dataset_class(str(data_folder))(str(data_folder), cases)

    # the validation images with their real tumours, and the SVM fitted on them
    images, tumours, real = {}, [], []
    for case in tqdm(cases, desc=f"checkpoint selection: real tumours of {base.name}", unit="case",
                     disable=not progress):
        data, seg, _, _ = ds.load_case(case)
        data, labels = np.asarray(data, dtype=np.float32), np.asarray(seg)[0]
        found = [coords for coords, _ in _real_tumours(labels, plan.tumour_label, False)
                 if len(coords[0]) >= settings.min_voxels]
        if found:
            images[case] = (data, labels)
        for coords in found:
            tumours.append(_Tumour(case, len(tumours), coords))
            real.append(_embed(encoder, data, labels, tumours[-1], pooling))
    if len(tumours) < 2:
        raise QualityError(f"{base.name}: {len(tumours)} real tumour(s) of at least {settings.min_voxels} voxels in "
                           f"the {len(cases)} validation cases of fold {fold}; the one-class SVM needs at least 2")
    svm = make_pipeline(StandardScaler(), OneClassSVM(kernel="rbf", gamma="scale", nu=settings.nu))
    svm.fit(np.stack(real))
    real_decision = svm.decision_function(np.stack(real))

    spacing = tuple(float(s) for s in conf.spacing)
    params = {**plan.backend_params, "fold": fold}
    if device is not None:
        params["device"] = device
    if sampling_steps is not None:
        params["sampling_steps"] = int(sampling_steps)
    decisions = {}  # checkpoint name -> {tumour index: SVM decision of its synthetic replacement}
    for path in tqdm(checkpoints, desc=f"checkpoint selection: {backend} checkpoints", unit="checkpoint",
                     disable=not progress):
        try:
            generator = get_backend(backend)(plan.with_backend(backend).replace(
                backend_params={**params, "checkpoint": str(path)}))
        except (GeneratorCheckpointError, FileNotFoundError, ValueError) as e:
            raise QualityError(f"generator checkpoint {path}: {e}") from e
        limit = generator.max_lesion_shape
        scored = {}
        for case, (data, labels) in images.items():
            volume = data.copy()
            filled = []
            for tumour in (t for t in tumours if t.case == case):
                if limit is not None and any(s.stop - s.start > m for s, m in zip(tumour.bbox, limit)):
                    continue  # larger than this generator can fill: scored for no checkpoint
                rng = np.random.default_rng([seed, tumour.index])  # the same noise for every checkpoint
                generator.synthesize(volume, Lesion(tumour.bbox, tumour.mask), spacing, rng)
                filled.append(tumour)
            for tumour in filled:
                feature = _embed(encoder, volume, labels, tumour, pooling)
                scored[tumour.index] = float(svm.decision_function(feature[None])[0])
        decisions[path.name] = scored
        del generator

    common = sorted(set.intersection(*(set(d) for d in decisions.values())))
    if not common:
        raise QualityError(f"no real tumour of the validation cases of fold {fold} fits every checkpoint's "
                           f"{backend} patch; nothing to score the checkpoints on")
    scores = []
    for path in checkpoints:
        synthetic = decisions[path.name]
        per_image = {}
        for i in common:
            per_image.setdefault(tumours[i].case, []).append(abs(real_decision[i] - synthetic[i]))
        values = np.array([synthetic[i] for i in common])
        scores.append({"checkpoint": path.name, "iteration": _iteration(path),
                       "score": float(np.mean([np.mean(v) for v in per_image.values()])),
                       "synthetic_mean_decision": float(values.mean()),
                       "synthetic_inlier_share": float(np.mean(values >= 0)),
                       "per_image": {case: float(np.mean(v)) for case, v in per_image.items()}})
    best = min(scores, key=lambda s: s["score"])  # the first of equal scores
    selection = {
        "checkpoint": best["checkpoint"], "score": best["score"], "criterion": CRITERION,
        "dataset": base.name, "configuration": configuration, "plans_identifier": plans_identifier,
        "backend": backend, "fold": fold, "generator_folder": str(folder),
        "model_folder": str(Path(model_folder).resolve()), "model_checkpoint": checkpoint_name,
        "pooling": pooling, "nu": settings.nu, "seed": seed, "sampling_steps": params.get("sampling_steps"),
        "validation_cases": sorted(images), "num_tumours": len(common),
        "num_tumours_left_out": len(tumours) - len(common),
        "real_mean_decision": float(np.mean(real_decision[common])),
        "selection_file": str(folder / SELECTION_FILE), "scores": scores,
    }
    if not all(math.isfinite(s["score"]) for s in scores):
        raise QualityError(f"non-finite checkpoint scores (is a checkpoint broken?): "
                           f"{ {s['checkpoint']: s['score'] for s in scores} }")
    record_selection(folder, selection)
    write_selection_report(selection, Path(output_dir))
    return selection
