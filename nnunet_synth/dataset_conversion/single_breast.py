"""Single-breast crops (Luna et al.: each breast as its own image): one case per breast, cut at the body's midline.

The left-right axis is the image axis whose direction is closest to the patient's left-right axis (world x in
ITK's LPS space); the cut lies at the centre of mass of the body (:func:`~nnunet_synth.generators.regions.
body_mask` of the first channel) along it. Images and label are cropped alike with SimpleITK's slicing, which moves
the origin with the crop, so every half stays in world space. The half whose centre lies towards +x (the patient's
left) is ``<id>_L``, the other ``<id>_R``. The converters (``--single-breast``) write a patient-grouped split, so
the two breasts of a patient never fall in different folds.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nnunet_synth.dataset_conversion.common import ConversionError, OutputCase
from nnunet_synth.generators.regions import body_mask

SIDES = ("L", "R")


def lateral_axis(image: sitk.Image) -> int:
    """The image (ITK, x-y-z order) axis closest to the patient's left-right axis."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(image.GetDimension(), image.GetDimension())
    return int(np.argmax(np.abs(direction[0])))  # row 0: the world x component of each index axis


def midline(image: sitk.Image, axis: int) -> int:
    """Index along ``axis`` (ITK order) of the body's centre of mass: where the two breasts are cut apart."""
    array = sitk.GetArrayViewFromImage(image)
    body = body_mask(array.astype(np.float32))
    profile = body.sum(axis=tuple(a for a in range(array.ndim) if a != array.ndim - 1 - axis))
    if profile.sum() == 0:
        return image.GetSize()[axis] // 2
    return int(round(float((np.arange(profile.size) * profile).sum() / profile.sum())))


def split_breasts(case: OutputCase) -> list[OutputCase]:
    """The two single-breast cases of a case: ``<id>_L`` and ``<id>_R``, images and label cropped alike.

    Raises:
        ConversionError: where the midline leaves one side empty (naming the case).
    """
    reference = case.images[0]
    axis = lateral_axis(reference)
    n = reference.GetSize()[axis]
    cut = midline(reference, axis)
    if not 0 < cut < n:
        raise ConversionError(f"case {case.identifier}: the body's midline (index {cut} of {n} along image axis "
                              f"{axis}) leaves no second breast; convert it without --single-breast")
    halves = []
    for lo, hi in ((0, cut), (cut, n)):
        crop = tuple(slice(lo, hi) if a == axis else slice(None) for a in range(reference.GetDimension()))
        centre = [(lo + hi - 1) / 2 if a == axis else (s - 1) / 2 for a, s in enumerate(reference.GetSize())]
        x = reference.TransformContinuousIndexToPhysicalPoint(centre)[0]
        halves.append((x, [im[crop] for im in case.images], case.label[crop]))
    left, right = sorted(halves, key=lambda h: -h[0])  # LPS: +x is the patient's left
    return [OutputCase(f"{case.identifier}_{side}", images, label, case.sources, case.record)
            for side, (_, images, label) in zip(SIDES, (left, right))]


def single_breast_ids(identifiers: list[str]) -> list[str]:
    """The identifiers :func:`split_breasts` makes of ``identifiers``."""
    return [f"{i}_{side}" for i in identifiers for side in SIDES]
