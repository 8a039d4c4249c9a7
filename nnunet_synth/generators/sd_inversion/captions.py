"""Automatic captions of 2D slices from their tumour masks (breast 2D paper, section 2.1).

The size class of a slice is the tumour's pixel area in that slice: tiny < 200, small 200-399, medium 400-699,
large 700-1599, very large >= 1600; a slice without tumour is captioned "no tumor". The paper's bins count pixels
of the 512 x 512 image the model sees, so the generator counts them on the tumour mask as it is fed to the model
(:func:`model_area`: padded to a square and resized to the model's resolution like the image); without a
resolution (checkpoints made before, the ``slice_area`` size preset) they count pixels of nnU-Net's slice.
The wording follows the paper ("2D axial MRI view ...") and avoids anatomical words, which trip the safety
filters of public models.
"""

from __future__ import annotations

import numpy as np
import torch

from nnunet_synth.generators.sizes import slice_area_class

NO_TUMOUR = "none"
# size class -> words used in the prompt
SIZE_WORDS = {"tiny": "tiny", "small": "small", "medium": "medium", "large": "large", "very_large": "very large"}
# training draws one template per slice (the paper's "diverse set of text prompts"); insertion uses the first
TUMOUR_TEMPLATES = ("2D axial MRI view with a {size} tumor", "2D axial MRI image, {size} tumor",
                    "2D axial MRI view, {size} size tumor visible")
NO_TUMOUR_TEMPLATES = ("2D axial MRI view with no tumor", "2D axial MRI image, no tumor",
                       "2D axial MRI view, no tumor visible")


def size_class_of_area(area_px: int) -> str:
    """Size class of a tumour area in pixels; ``'none'`` for 0 pixels."""
    return slice_area_class(area_px) or NO_TUMOUR


def caption(size_class: str, template: int = 0) -> str:
    """The prompt of a size class (``'none'`` for a slice without tumour), in template number ``template``."""
    if size_class == NO_TUMOUR:
        return NO_TUMOUR_TEMPLATES[template % len(NO_TUMOUR_TEMPLATES)]
    if size_class not in SIZE_WORDS:
        raise ValueError(f"unknown size class {size_class!r}; one of {[*SIZE_WORDS, NO_TUMOUR]}")
    return TUMOUR_TEMPLATES[template % len(TUMOUR_TEMPLATES)].format(size=SIZE_WORDS[size_class])


def model_area(mask: np.ndarray, resolution: int) -> int:
    """Pixels of a 2D tumour mask on the image the model sees: the mask goes through the image's own mapping
    (:func:`~nnunet_synth.generators.sd_inversion.components.to_model`: zero-padded to a square, resized to
    ``resolution`` x ``resolution``) and counts where it is at least one half. A non-empty mask counts at least
    one pixel (a tumour the resizing shrinks below a pixel is still tiny, never "no tumor")."""
    from nnunet_synth.generators.sd_inversion.components import to_model

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D (Y, X) tumour mask, got shape {mask.shape}")
    count = int(np.count_nonzero(mask))
    if count == 0:
        return 0
    resized = to_model(torch.from_numpy(mask.astype(np.float32))[None, None], int(resolution))[0, 0]
    return max(1, int(((resized + 1) / 2 >= 0.5).sum()))


def caption_of_mask(mask: np.ndarray, template: int = 0, resolution: int | None = None) -> str:
    """The prompt of a 2D slice from its boolean tumour mask; the area is counted on the image the model sees
    when ``resolution`` is given (:func:`model_area`), else in the slice's own pixels."""
    area = int(np.count_nonzero(mask)) if resolution is None else model_area(mask, resolution)
    return caption(size_class_of_area(area), template)
