"""Noisy tumour labels for the pancreas paper's label-noise study (Peng et al., Table 3).

Real images stay as they are; the real tumour label of each training case is elastically deformed. The paper
names four levels without numbers; we define each by its mean boundary displacement in mm (``LABEL_NOISE_MM``:
Low 1, Moderate 2, High 4, Extreme 8), the displacement field being Gaussian-smoothed noise with a coherence length
of twice that (at least 3 mm), as the paper's elastic deformation.

The paper degrades the training labels once: :class:`NoisyLabelDataset` (the default of the
``nnUNetTrainerNoisyLabels*`` trainers) deforms each training case's whole segmentation with a generator seeded by
(plan seed, case identifier, level), in memory before nnU-Net's crop, so a case carries the same corrupted label in
every epoch, worker, fold and crop; nnU-Net's preprocessed files are never written. :class:`NoisyTumourLabelTransform`
(the ``...Jitter`` trainers) instead redraws the deformation of every sample every iteration: zero-mean jitter of
the boundary rather than a corrupted label set.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from scipy.ndimage import map_coordinates

from nnunet_synth.generators.shapes import smooth_field
from nnunet_synth.injection import worker_index

# mean displacement (vector length) in mm of each level
LABEL_NOISE_MM = {"Low": 1.0, "Moderate": 2.0, "High": 4.0, "Extreme": 8.0}
# E|d| of a displacement with independent N(0, s^2) components is s * sqrt(8/pi) in 3D, s * sqrt(pi/2) in 2D
MEAN_LENGTH_PER_STD = {3: np.sqrt(8 / np.pi), 2: np.sqrt(np.pi / 2)}
MIN_COHERENCE_MM = 3.0


def displacement(shape: tuple[int, ...], spacing: np.ndarray, mean_mm: float, rng: np.random.Generator
                 ) -> list[np.ndarray]:
    """Smooth random displacement per axis, in mm, whose mean vector length is ``mean_mm``."""
    std = mean_mm / MEAN_LENGTH_PER_STD[len(shape)]
    coherence = max(2 * mean_mm, MIN_COHERENCE_MM)
    fields = [smooth_field(shape, coherence / spacing, rng) for _ in shape]
    return [f * (std / (f.std() + 1e-8)) for f in fields]


def deform_mask(mask: np.ndarray, spacing: np.ndarray, mean_mm: float, rng: np.random.Generator) -> np.ndarray:
    """``mask`` warped by a smooth random displacement of mean length ``mean_mm`` (nearest-neighbour).

    With one spacing entry fewer than ``mask`` has axes (a 2d configuration's 3D case), every slice along the first
    axis that holds any of the mask is deformed on its own, in plane, as a 2D training sample would be.
    """
    spacing = np.asarray(spacing, dtype=float)
    if len(spacing) == mask.ndim - 1:
        return np.stack([deform_mask(m, spacing, mean_mm, rng) if m.any() else m for m in mask])
    fields = displacement(mask.shape, spacing, mean_mm, rng)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in mask.shape], indexing="ij")
    return map_coordinates(mask.astype(np.uint8), [g + f / s for g, f, s in zip(grid, fields, spacing)],
                           order=0, mode="nearest").astype(bool)


def noisy_tumour_label(seg0: np.ndarray, tumour_label: int, fill_label: int, mean_mm: float,
                       spacing: tuple[float, ...], rng: np.random.Generator, ignore_label: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """Where the deformed tumour label of one label map differs from the real one.

    Voxels that leave the tumour get ``fill_label``; voxels it grows into must be labelled (never -1, outside the
    image, or the ignore label).

    Args:
        seg0: label map (spatial axes only; a 2d configuration's 3D case with 2D ``spacing``).
        tumour_label: label value of the tumour.
        fill_label: label for voxels the deformed tumour no longer covers.
        mean_mm: mean boundary displacement.
        spacing: voxel spacing (mm) of the deformed axes (the last ``len(spacing)`` axes of ``seg0``).
        rng: the generator of the deformation.
        ignore_label: nnU-Net's ignore label, if any.

    Returns:
        (flat indices into ``seg0`` that become ``fill_label``, flat indices that become ``tumour_label``), or None
        where ``seg0`` holds no tumour.
    """
    tumour = seg0 == tumour_label
    if not tumour.any():
        return None
    sp = np.asarray(spacing, dtype=float)[-seg0.ndim:]
    pad = np.ceil(3 * mean_mm / sp).astype(int) + 1
    pad = np.concatenate([np.zeros(seg0.ndim - len(sp), int), pad])  # no displacement across 2D slices
    idx = np.nonzero(tumour)
    box = tuple(slice(max(0, i.min() - p), min(n, i.max() + p + 1)) for i, p, n in zip(idx, pad, seg0.shape))
    crop = tumour[box]
    warped = deform_mask(crop, sp, mean_mm, rng)
    region = seg0[box]
    labelled = region >= 0 if ignore_label is None else (region >= 0) & (region != ignore_label)
    offset = np.array([b.start for b in box])

    def flat(local: np.ndarray) -> np.ndarray:
        return np.ravel_multi_index(tuple(np.argwhere(local).T + offset[:, None]), seg0.shape)

    return flat(crop & ~warped), flat(warped & ~crop & labelled)


def case_seed(seed: int, identifier: str, mean_mm: float) -> list[int]:
    """The seed of one case's corrupted label: stable across processes and runs (crc32, not Python's salted hash)."""
    return [int(seed), zlib.crc32(identifier.encode("utf-8")), int(round(1000 * mean_mm))]


class NoisyLabelDataset:
    """nnU-Net's training dataset with every case's tumour label deformed once, the same in every epoch.

    ``load_case`` returns the base dataset's case with segmentation channel 0 replaced by an in-memory copy whose
    tumour label is deformed by a generator seeded by :func:`case_seed` (plan seed, identifier, level): whichever
    worker loads the case, in whatever order, and whichever patch nnU-Net crops from it, the label is the same. Only
    the changed voxels are kept per case (the boundary shell, small). The preprocessed files are never written.
    ``properties['class_locations']`` stay nnU-Net's, from the real label: they only steer foreground
    oversampling, and the deformed tumour lies within a few displacements of them. It offers what
    ``nnUNetDataLoader`` uses (``identifiers``, ``load_case``, ``__getitem__``), as
    :class:`nnunet_synth.bank.RealAndBankDataset`.

    Args:
        dataset: nnU-Net dataset of the training cases.
        tumour_label: label value of the tumour.
        fill_label: label for voxels the deformed tumour no longer covers.
        mean_displacement_mm: mean boundary displacement.
        spacing: voxel spacing of the configuration (mm); 2D for a 2d configuration.
        seed: base seed (the plan's): with the identifier and the level it fixes each case's corrupted label.
        ignore_label: nnU-Net's ignore label, if any.
    """

    def __init__(self, dataset, tumour_label: int, fill_label: int, mean_displacement_mm: float,
                 spacing: tuple[float, ...], seed: int, ignore_label: int | None = None):
        self.dataset = dataset
        self.identifiers = dataset.identifiers
        self.tumour_label, self.fill_label = tumour_label, fill_label
        self.mean_displacement_mm = float(mean_displacement_mm)
        self.spacing = tuple(float(s) for s in spacing)
        self.seed, self.ignore_label = int(seed), ignore_label
        self._changes: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}

    def changes(self, identifier: str, seg0: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The changed voxels of one case (see :func:`noisy_tumour_label`), drawn at its first load."""
        if identifier not in self._changes:
            try:
                rng = np.random.default_rng(case_seed(self.seed, identifier, self.mean_displacement_mm))
                self._changes[identifier] = noisy_tumour_label(
                    seg0, self.tumour_label, self.fill_label, self.mean_displacement_mm, self.spacing, rng,
                    self.ignore_label)
            except Exception as e:
                raise RuntimeError(f"label noise: cannot deform the tumour label of case {identifier!r} "
                                   f"(segmentation of shape {seg0.shape}, spacing {self.spacing}): {e}") from e
        return self._changes[identifier]

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        seg = np.array(seg[:])  # a private copy: the base dataset's may be a read-only map of nnU-Net's file
        change = self.changes(identifier, seg[0])
        if change is not None:
            lost, gained = change
            flat = seg[0].reshape(-1)  # a view: seg is a fresh contiguous array
            flat[lost] = self.fill_label
            flat[gained] = self.tumour_label
        return data, seg, seg_prev, properties

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)


class NoisyTumourLabelTransform(BasicTransform):
    """Deforms the tumour label of segmentation channel 0 anew in every sample (the ``...Jitter`` trainers); the
    image is untouched. :class:`NoisyLabelDataset` instead fixes each case's corrupted label (the paper's study).

    Voxels that leave the tumour get ``fill_label`` (the organ where the dataset has one); voxels it grows
    into must be labelled (never -1 or the ignore label).

    Args:
        tumour_label: label value of the tumour.
        fill_label: label for voxels the deformed tumour no longer covers.
        mean_displacement_mm: mean boundary displacement.
        spacing: voxel spacing of the configuration (mm).
        seed: base seed; each worker uses ``default_rng([seed, worker_index()])``.
        ignore_label: nnU-Net's ignore label, if any.
    """

    def __init__(self, tumour_label: int, fill_label: int, mean_displacement_mm: float, spacing: tuple[float, ...],
                 seed: int, ignore_label: int | None = None):
        super().__init__()
        self.tumour_label, self.fill_label = tumour_label, fill_label
        self.mean_displacement_mm = mean_displacement_mm
        self.spacing = tuple(float(s) for s in spacing)
        self.seed, self.ignore_label = seed, ignore_label
        self._rng: np.random.Generator | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rng": None, "_pid": None}

    def __call__(self, **data_dict) -> dict:
        if self._rng is None or self._pid != os.getpid():
            self._rng, self._pid = np.random.default_rng([self.seed, worker_index()]), os.getpid()
        seg = data_dict["segmentation"]
        seg0 = seg[0].numpy()
        change = noisy_tumour_label(seg0, self.tumour_label, self.fill_label, self.mean_displacement_mm,
                                    self.spacing, self._rng, self.ignore_label)
        if change is None:
            return data_dict
        out = seg.numpy().copy()
        flat = out[0].reshape(-1)
        flat[change[0]] = self.fill_label
        flat[change[1]] = self.tumour_label
        data_dict["segmentation"] = torch.from_numpy(out)
        return data_dict
