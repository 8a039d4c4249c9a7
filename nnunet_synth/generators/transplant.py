"""The ``transplant`` backend (CarveMix / copy-paste family): real tumours of the training fold pasted into new
sites.

The lesion pipeline draws a template (a real tumour component of the training fold, see :mod:`.templates`),
flips, turns and zooms it to the requested size class and places it; the placed lesion carries the tumour's
image in units of its own ring. This backend turns those ring units into the target site's intensities (per
channel, the shift and scale of the site's ring: its median and robust spread) and paints them with a feathered
edge that straddles the label border (:func:`~nnunet_synth.generators.appearance.paint_lesion`; the site's ring
is measured on the tissue the lesion was placed in, ``Lesion.tissue``, as the donor's was). The edge width
and offset are the medians measured on the dataset's real tumours by ``nnUNetv2_synth_plan`` (the plan's
``texture``), or 1 mm and 0 mm without them. Voxels farther than :attr:`TransplantGenerator.halo_mm` outside the
mask stay bit-identical (the lesion pipeline keeps the edge off real tumours, padding and ignored voxels).

It needs ``shapes.deformation`` ``template`` (the ``nnUNetTrainerSynthNTransplant`` trainers set it) and a
training fold with real tumours.
"""

from __future__ import annotations

import numpy as np

from nnunet_synth.generators import register_backend
from nnunet_synth.generators.appearance import edge_halo_mm, paint_lesion
from nnunet_synth.generators.base import Lesion, TumourGenerator

DEFAULT_EDGE_SIGMA_MM = 1.0
DEFAULT_EDGE_OFFSET_MM = 0.0


@register_backend("transplant")
class TransplantGenerator(TumourGenerator):
    """Pastes the real tumour a template mask was cut from, intensity-matched to the target site's ring."""

    required_shapes = {"deformation": "template"}

    @property
    def halo_mm(self) -> float:
        """How far the feathered edge reaches outside the mask (see :func:`~.appearance.edge_halo_mm`)."""
        return edge_halo_mm(*self.edge_mm)

    @property
    def edge_mm(self) -> tuple[float, float]:
        """(edge sigma, edge offset) in mm: the medians over the plan's measured tumours, else the defaults."""
        texture = self.synth_plan.texture
        if texture is None:
            return DEFAULT_EDGE_SIGMA_MM, DEFAULT_EDGE_OFFSET_MM
        return texture.median("edge_sigma_mm"), texture.median("edge_offset_mm")

    def synthesize(self, image: np.ndarray, lesion: Lesion, spacing: tuple[float, ...],
                   rng: np.random.Generator) -> None:
        if lesion.texture is None:
            raise ValueError("backend 'transplant' paints the real tumour a template mask was cut from, and this "
                             "lesion has no texture: use shapes.deformation 'template' with templates loaded with "
                             "their textures (fold_templates of a transplant plan), or the "
                             "nnUNetTrainerSynth{2,5,10,20,30,40,50,60}Transplant trainers, which set both")
        texture = np.asarray(lesion.texture)
        if texture.shape[0] != image.shape[0]:
            raise ValueError(f"backend 'transplant': the template texture has {texture.shape[0]} channel(s) and the "
                             f"image {image.shape[0]}; rebuild the template bank of this dataset and configuration "
                             f"(delete its nnUNetSynthTemplates_*.npz)")
        if texture.shape[1:] != lesion.mask.shape:
            raise ValueError(f"backend 'transplant': texture {texture.shape[1:]} and mask {lesion.mask.shape} of the "
                             f"lesion do not match")
        sigma, offset = self.edge_mm
        clips = [channel.clip for channel in self.synth_plan.channels]
        if len(clips) != image.shape[0]:
            raise ValueError(f"backend 'transplant': the synth plan has {len(clips)} channel(s) and the image "
                             f"{image.shape[0]}")
        paint_lesion(image, lesion.bbox, lesion.mask, spacing, texture[:, lesion.mask].astype(np.float64), sigma,
                     offset, self.halo_mm, clips, tissue=lesion.tissue)

