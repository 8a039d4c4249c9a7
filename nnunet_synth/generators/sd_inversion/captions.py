"""Automatic captions of 2D slices from their tumour masks (breast 2D paper, section 2.1).

The size class of a slice is the tumour's pixel area in that slice (pixels of nnU-Net's preprocessed 2d
slice, the same bins as the ``slice_area`` size preset): tiny < 200, small 200-399, medium 400-699, large
700-1599, very large >= 1600; a slice without tumour is captioned "no tumor". The wording follows the paper
("2D axial MRI view ...") and avoids anatomical words, which trip the safety filters of public models.
"""

from __future__ import annotations

import numpy as np

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


def caption_of_mask(mask: np.ndarray, template: int = 0) -> str:
    """The prompt of a 2D slice from its boolean tumour mask."""
    return caption(size_class_of_area(int(np.count_nonzero(mask))), template)
