"""The interface every tumour generator backend implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class Lesion:
    """A placed lesion: a boolean mask and where it sits in the patch.

    Attributes:
        bbox: one slice per spatial axis of the patch; ``mask`` has the shape of the patch cropped by it.
        mask: bool array, True inside the lesion.
    """

    bbox: tuple[slice, ...]
    mask: np.ndarray

    @property
    def num_voxels(self) -> int:
        return int(self.mask.sum())


class TumourGenerator(abc.ABC):
    """Inserts one synthetic tumour into a patch.

    A backend is built once per data-loader worker from the synth plan (a dict, see
    :mod:`nnunet_synth.planning`) and must be picklable. It only changes image voxels inside the lesion
    mask; the caller writes the tumour label.
    """

    name: ClassVar[str]

    def __init__(self, synth_plan: dict):
        self.synth_plan = synth_plan

    @abc.abstractmethod
    def synthesize(self, image: np.ndarray, lesion: Lesion, spacing: tuple[float, ...],
                   rng: np.random.Generator) -> None:
        """Writes a tumour into ``image`` in place.

        Args:
            image: float32 array (C, *spatial) in nnU-Net's normalised intensity space.
            lesion: where the tumour goes; voxels outside ``lesion.mask`` must stay bit-identical.
            spacing: voxel spacing in mm of the spatial axes.
            rng: the caller's random generator (seeded per worker).
        """
