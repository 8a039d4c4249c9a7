"""The analytic texture backend of label-free liver tumour synthesis (Hu et al., CVPR 2023), CPU only.

The texture is Gaussian-filtered uniform noise, Bernoulli-sampled, filtered again and scaled to a target
mean; the lesion edge is blurred. Unlike the paper's code, which filters whole volumes, everything is
computed in the lesion's bounding box, and the intensity change per channel comes from the synth plan's
tumour-minus-organ contrast in nnU-Net's normalised space, so hyperintense MRI/DCE tumours work as well
as hypodense CT ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import gaussian_filter

from nnunet_synth.generators import register_backend
from nnunet_synth.generators.base import Lesion, TumourGenerator
from nnunet_synth.generators.shapes import smooth_field

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan

# Parameter ranges of the paper's texture generator (its voxels are ~1 mm, so we read them as mm).
DEFAULT_PARAMS = {
    "texture_sigma_mm": [3.0, 15.0],  # first filter of the uniform noise (sigma_a)
    "grain_sigma_mm": [0.5, 1.0],  # filter after Bernoulli sampling (sigma_b)
    "texture_scale": [0.19, 0.21],
    "texture_base": [0.04, 0.06],
    "target_mean": [0.5, 0.55],  # u_0: mean of the texture where it exceeds 0.12
    "edge_sigma_mm": [1.0, 2.0],  # edge blur
}


def texture(shape: tuple[int, ...], spacing: np.ndarray, params: dict, rng: np.random.Generator) -> tuple[
        np.ndarray, float]:
    """The paper's texture map in [0, 1] and its target mean u_0."""
    a = smooth_field(shape, rng.uniform(*params["texture_sigma_mm"]) / spacing, rng, distribution="uniform")
    span = a.max() - a.min()
    a = rng.uniform(*params["texture_scale"]) * (a - a.min()) / (span if span > 0 else 1.0) \
        + rng.uniform(*params["texture_base"])
    b = (a > rng.uniform(0, 1, size=shape)).astype(np.float32)
    # at least one voxel: on coarse grids a sub-voxel filter would leave isolated speckles of zero change
    b = gaussian_filter(b, np.maximum(rng.uniform(*params["grain_sigma_mm"]) / spacing, 1.0))
    u0 = rng.uniform(*params["target_mean"])
    bright = b > 0.12
    mean = b[bright].mean() if bright.any() else max(float(b.mean()), 1e-3)
    return np.clip(u0 / mean * b, 0, 1), u0


@register_backend("analytic")
class AnalyticGenerator(TumourGenerator):
    """Texture model of the label-free liver paper, contrast per channel from the synth plan."""

    def __init__(self, synth_plan: SynthPlan):
        super().__init__(synth_plan)
        self.params = {**DEFAULT_PARAMS, **synth_plan.backend_params}
        self.channels = synth_plan.channels

    def synthesize(self, image: np.ndarray, lesion: Lesion, spacing: tuple[float, ...],
                   rng: np.random.Generator) -> None:
        if image.shape[0] != len(self.channels):
            raise ValueError(f"image has {image.shape[0]} channels but the synth plan describes "
                             f"{len(self.channels)}; re-run nnUNetv2_synth_plan for this dataset")
        sp = np.asarray(spacing, dtype=float)
        mask = lesion.mask
        tex, _ = texture(mask.shape, sp, self.params, rng)
        edge = gaussian_filter(mask.astype(np.float32), rng.uniform(*self.params["edge_sigma_mm"]) / sp)
        # shape of the intensity change, zero outside the mask by construction; scaled to mean 1 inside it so
        # that the mean change over the lesion is the planned contrast (texture and blurred edge average < 1)
        profile = (tex * edge)[mask]
        profile /= max(float(profile.mean()), 1e-6)
        quantile = rng.uniform()  # one draw for all channels keeps multi-channel contrast coherent
        for c, channel in enumerate(self.channels):
            lo, hi = channel.contrast_range
            region = image[c][lesion.bbox]
            values = region[mask] + (lo + quantile * (hi - lo)) * profile
            if channel.clip is not None:
                values = np.clip(values, *channel.clip)
            region[mask] = values
