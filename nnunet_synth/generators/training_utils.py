"""What every learned backend's training shares: the job, the training-module contract and common helpers.

``nnUNetv2_synth_train_generator`` (:mod:`nnunet_synth.generator_training`) resolves a :class:`GeneratorJob`
from the command line and nnU-Net's files and hands it to the training module the backend class names in its
``training_module`` (:class:`BackendTraining` says what that module defines). The helpers below find real
tumours, crop patches around them, hold cases out for a generator's validation loss, measure intensity
ranges and write logs and loss plots; the ddpm, ldm and sd_inversion trainings use them.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import find_objects
from scipy.ndimage import label as connected_components
from tqdm import tqdm

MIN_TUMOUR_VOXELS = 8
VAL_CASE_SHARE = 0.1  # of the training-fold cases with tumours, held out of the generator's training
MAX_INTENSITY_CROPS = 64


@dataclass
class GeneratorJob:
    """Everything a backend's training needs, resolved from the command line and nnU-Net's files.

    Attributes:
        backend: generator backend name.
        dataset_name: nnU-Net dataset name (DatasetNNN_Name).
        configuration: nnU-Net configuration whose preprocessed data and plans are used.
        plans_identifier: nnU-Net plans identifier.
        fold: the segmenter's fold whose training cases the generator may use ('all' for all cases).
        cases: identifiers of those training cases.
        preprocessed_folder: folder of the configuration's preprocessed cases.
        output_dir: where checkpoints, logs and plots go.
        preset: model preset name of the backend.
        iterations: optimiser steps in total (None: the preset's default).
        device: 'cpu' or 'cuda'.
        resume: continue from the latest checkpoint in ``output_dir``.
        seed: base random seed.
        stage: the one training stage to run, for backends trained in stages (ldm: vqvae, vqvae-volume,
            diffusion); None runs all stages in order.
        base_model: local folder of a pretrained model the backend fine-tunes (sd_inversion).
    """

    backend: str
    dataset_name: str
    configuration: str
    plans_identifier: str
    fold: int | str
    cases: list[str]
    preprocessed_folder: Path
    output_dir: Path
    preset: str
    iterations: int | None
    device: str
    resume: bool
    seed: int = 12345
    stage: str | None = None
    base_model: str | None = None


@dataclass(frozen=True)
class BackendTraining:
    """A backend's training module as the command reads it.

    The module (named by the backend class's ``training_module``) defines at module level:

    * ``PRESETS``: dict of preset name to preset; the first is the default of ``--preset``;
    * ``train(job: GeneratorJob) -> Path``: trains and returns the final checkpoint;
    * optionally ``STAGES``: tuple of stage names ``--stage`` accepts (absent: one stage);
    * optionally ``USER_ERRORS``: tuple of exception classes the command reports as a one-line message
      instead of a traceback (a missing base model, a missing checkpoint to resume).

    Attributes:
        backend: backend name.
        presets: the module's ``PRESETS``.
        train: the module's ``train``.
        stages: the module's ``STAGES`` (empty: trains in one stage).
        user_errors: the module's ``USER_ERRORS``.
    """

    backend: str
    presets: dict
    train: Callable[[GeneratorJob], Path]
    stages: tuple[str, ...] = ()
    user_errors: tuple[type[BaseException], ...] = ()


def load_training(backend: str) -> BackendTraining:
    """Imports the training module of a registered backend.

    Raises:
        KeyError: for an unknown backend or one without training (the message names the trainable ones).
    """
    from nnunet_synth.generators import get_backend, trainable_backends

    module_name = get_backend(backend).training_module
    if module_name is None:
        raise KeyError(f"backend {backend!r} has no generator training; trainable backends: "
                       f"{', '.join(trainable_backends())}")
    module = importlib.import_module(module_name)
    return BackendTraining(backend, dict(module.PRESETS), module.train, tuple(getattr(module, "STAGES", ())),
                           tuple(getattr(module, "USER_ERRORS", ())))


def process_rank() -> int:
    """The process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class TumourSite:
    """One real tumour (connected component): its case, centre and bounding-box size in voxels."""

    case: str
    centre: tuple[int, ...]
    size: tuple[int, ...]


def find_tumours(dataset, cases: list[str], tumour_label: int, min_voxels: int = MIN_TUMOUR_VOXELS
                 ) -> list[TumourSite]:
    """Connected components of the tumour label with at least ``min_voxels`` voxels, per case."""
    sites = []
    for case in tqdm(cases, desc="finding tumours", unit="case", disable=process_rank() != 0):
        seg = np.asarray(dataset.load_case(case)[1][0])
        components, n = connected_components(seg == tumour_label)
        if not n:
            continue
        sizes = np.bincount(components.ravel())
        for index, box in enumerate(find_objects(components), start=1):
            if box is None or sizes[index] < min_voxels:
                continue
            sites.append(TumourSite(case, tuple((s.start + s.stop) // 2 for s in box),
                                    tuple(s.stop - s.start for s in box)))
    return sites


class PatchSource:
    """Crops (image, mask) training patches around tumour sites from nnU-Net's preprocessed cases.

    Args:
        dataset: nnU-Net dataset object of the configuration (``load_case``).
        patch_size: spatial patch size (z, y, x).
        tumour_label: label value of the tumour; its voxels in the patch form the mask.
    """

    def __init__(self, dataset, patch_size: tuple[int, ...], tumour_label: int):
        self.dataset = dataset
        self.patch_size = tuple(int(p) for p in patch_size)
        self.tumour_label = tumour_label

    def crop(self, site: TumourSite, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        """Patch around ``site``; with ``rng`` randomly shifted (the tumour stays inside if it fits) and flipped.

        Returns:
            float32 image (C, *patch) and float32 mask (1, *patch) in {0, 1}.
        """
        from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

        data, seg, _, _ = self.dataset.load_case(site.case)
        centre = np.array(site.centre)
        if rng is not None:
            slack = np.maximum(np.array(self.patch_size) - np.array(site.size), 0) // 2
            centre = centre + rng.integers(-slack, slack + 1)
        lower = centre - np.array(self.patch_size) // 2
        bbox = [[0, data.shape[0]]] + [[int(lo), int(lo) + p] for lo, p in zip(lower, self.patch_size)]
        image = np.asarray(crop_and_pad_nd(data, bbox, 0), dtype=np.float32)
        seg_bbox = [[0, 1]] + bbox[1:]
        mask = (np.asarray(crop_and_pad_nd(seg, seg_bbox, -1)) == self.tumour_label).astype(np.float32)
        if rng is not None:
            flips = tuple(a + 1 for a in range(len(self.patch_size)) if rng.uniform() < 0.5)
            if flips:
                image, mask = np.flip(image, flips), np.flip(mask, flips)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def split_generator_cases(sites: list[TumourSite], seed: int) -> tuple[list[str], list[str]]:
    """Holds out about 10% (at least one) of the cases with tumours for the generator's validation loss."""
    cases = sorted({s.case for s in sites})
    if len(cases) < 2:
        raise RuntimeError(f"the generator needs real tumours in at least two training cases (one is held out for "
                           f"its validation loss); found tumours in {len(cases)}")
    n_val = max(1, int(round(VAL_CASE_SHARE * len(cases))))
    val = sorted(np.random.default_rng(seed).choice(cases, n_val, replace=False).tolist())
    return [c for c in cases if c not in val], val


def intensity_range(source: PatchSource, sites: list[TumourSite], seed: int) -> list[list[float]]:
    """Per-channel 0.05/99.95 percentiles over training crops: generated values are clipped to it."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(sites), min(len(sites), MAX_INTENSITY_CROPS), replace=False)
    images = np.stack([source.crop(sites[i], None)[0] for i in picks])
    flat = images.transpose(1, 0, 2, 3, 4).reshape(images.shape[1], -1)
    return [[float(v) for v in np.percentile(ch, [0.05, 99.95])] for ch in flat]


def plot_losses(path: Path, train_loss: list[float], history: list[dict]) -> None:
    """Loss plot: training loss (moving average) and validation loss against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    losses = np.asarray(train_loss)
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid") if len(losses) >= window else losses
    ax.plot(np.arange(window, window + len(smooth)), smooth, label=f"training loss (mean of {window})")
    if history:
        ax.plot([h["iteration"] for h in history], [h["val_loss"] for h in history], "o-", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("masked noise MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def append_log(output_dir: Path, message: str) -> None:
    """Appends a time-stamped line to ``training_log.txt`` in ``output_dir``."""
    with open(output_dir / "training_log.txt", "a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {message}\n")
