"""The interface every tumour generator backend implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan


@dataclass(frozen=True)
class Lesion:
    """A placed lesion: a boolean mask and where it sits in the patch.

    Attributes:
        bbox: one slice per spatial axis of the patch; ``mask`` has the shape of the patch cropped by it.
        mask: bool array, True inside the lesion.
        texture: (C, *mask.shape) intensities of the real tumour this mask was cut from, in units of its ring
            (see :mod:`nnunet_synth.generators.appearance`), carried with the mask through the pipeline's
            flips, zoom and placement; None for drawn shapes. The transplant backend paints it.
        tissue: (*spatial) bool over the whole image: the tissue the lesion was placed in (the organ, or the
            tissue region without an organ label), on which backends measure the site's ring; None: any voxel.
    """

    bbox: tuple[slice, ...]
    mask: np.ndarray
    texture: np.ndarray | None = None
    tissue: np.ndarray | None = None

    @property
    def num_voxels(self) -> int:
        return int(self.mask.sum())


class TumourGenerator(abc.ABC):
    """Inserts one synthetic tumour into a patch.

    A backend is built once per data-loader worker from the synth plan (a validated
    :class:`~nnunet_synth.synth_plan.SynthPlan`) and must be picklable. It only changes image voxels inside the lesion
    mask; the caller writes the tumour label.

    Besides :meth:`synthesize`, a backend may set the optional hooks below; callers read them as plain
    attributes and treat None as "not applicable".

    Attributes:
        name: the registry name, set by :func:`nnunet_synth.generators.register_backend`.
        training_module: dotted name of the module that trains this backend's model for
            ``nnUNetv2_synth_train_generator`` (see :class:`nnunet_synth.generators.training_utils.BackendTraining`
            for what it defines); None for backends without training (analytic).
        checkpoint: the model file the backend loaded (recorded in bank manifests); None without one.
        sampling_steps: sampling steps of the backend's generative model (recorded in bank manifests); None
            when it has none.
        required_shapes: plan ``shapes`` settings the backend needs (transplant: template deformation), applied
            by :meth:`~nnunet_synth.synth_plan.SynthPlan.with_backend`.
    """

    name: ClassVar[str]
    training_module: ClassVar[str | None] = None
    checkpoint: Path | None = None
    sampling_steps: int | None = None
    required_shapes: ClassVar[dict] = {}

    def __init__(self, synth_plan: SynthPlan):
        self.synth_plan = synth_plan

    @property
    def halo_mm(self) -> float:
        """How far outside the lesion mask the backend may change voxels (an edge that straddles the label
        border, as real edges do); 0 for backends that change the mask's voxels only. Callers keep lesions at
        least this far from real tumours (the plan's ``gap_mm``)."""
        return 0.0

    @property
    def max_lesion_shape(self) -> tuple[int, ...] | None:
        """Largest lesion bounding box in voxels (per spatial axis) the backend can fill; None: no limit.

        Backends that work in a fixed window around the lesion (ddpm, ldm) set it; callers draw another lesion
        when one exceeds it.
        """
        return None

    @abc.abstractmethod
    def synthesize(self, image: np.ndarray, lesion: Lesion, spacing: tuple[float, ...],
                   rng: np.random.Generator) -> None:
        """Writes a tumour into ``image`` in place.

        Args:
            image: float32 array (C, *spatial) in nnU-Net's normalised intensity space.
            lesion: where the tumour goes; voxels farther than :attr:`halo_mm` outside ``lesion.mask``
                must stay bit-identical.
            spacing: voxel spacing in mm of the spatial axes.
            rng: the caller's random generator (seeded per worker).
        """
