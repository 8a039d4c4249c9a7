"""Noisy tumour labels for the pancreas paper's label-noise study (Peng et al., Table 3).

Real images stay as they are; the real tumour label of each training sample is elastically deformed. The
paper names four levels without numbers; we define each by its mean boundary displacement in mm
(``LABEL_NOISE_MM``: Low 1, Moderate 2, High 4, Extreme 8), the displacement field being Gaussian-smoothed
noise with a coherence length of twice that (at least 3 mm), as the paper's elastic deformation.
"""

from __future__ import annotations

import os

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


class NoisyTumourLabelTransform(BasicTransform):
    """Deforms the tumour label of segmentation channel 0; the image is untouched.

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
        tumour = seg0 == self.tumour_label
        if not tumour.any():
            return data_dict
        sp = np.asarray(self.spacing[-seg0.ndim:])
        pad = np.ceil(3 * self.mean_displacement_mm / sp).astype(int) + 1
        idx = np.nonzero(tumour)
        box = tuple(slice(max(0, i.min() - p), min(n, i.max() + p + 1)) for i, p, n in zip(idx, pad, seg0.shape))
        crop = tumour[box]
        fields = displacement(crop.shape, sp, self.mean_displacement_mm, self._rng)
        grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in crop.shape], indexing="ij")
        warped = map_coordinates(crop.astype(np.uint8), [g + f / s for g, f, s in zip(grid, fields, sp)],
                                 order=0, mode="nearest").astype(bool)
        out = seg.numpy().copy()
        region = out[0][box]
        labelled = region >= 0 if self.ignore_label is None else (region >= 0) & (region != self.ignore_label)
        region[crop & ~warped] = self.fill_label
        region[warped & ~crop & labelled] = self.tumour_label
        data_dict["segmentation"] = torch.from_numpy(out)
        return data_dict
