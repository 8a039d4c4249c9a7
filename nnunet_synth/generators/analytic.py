"""The analytic backend, CPU only: a tumour texture measured from the dataset's own tumours, or without real
tumours the texture model of label-free liver tumour synthesis (Hu et al., CVPR 2023).

* **Learned** (the synth plan has a ``texture``, measured by ``nnUNetv2_synth_plan`` on the real tumours): each
  lesion takes the appearance of one real tumour drawn from the plan: a smooth Gaussian-filtered noise at that
  tumour's texture scale plus its share of white noise, given that tumour's intensity distribution by quantile
  mapping (skew and tails survive) in units of the target site's tissue ring, and that tumour's edge: a
  normal-CDF transition straddling the label border.
* **Paper** (label-free, or ``backend_params["texture"] = "paper"``): Gaussian-filtered uniform noise,
  min-max scaled over a field of at least six filter widths (not over a tiny lesion's own box), Bernoulli
  sampled and filtered again at several voxels as the paper's code does, scaled to a target mean; the change per
  channel is the synth plan's tumour-minus-surrounding contrast in nnU-Net's normalised space (hyperintense MRI
  tumours work as well as hypodense CT ones), feathered across the border.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import gaussian_filter

from nnunet_synth.generators import register_backend
from nnunet_synth.generators.appearance import edge_halo_mm, paint_lesion, quantile_map
from nnunet_synth.generators.base import Lesion, TumourGenerator
from nnunet_synth.generators.shapes import smooth_field

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan, TumourAppearance

TEXTURES = ("learned", "paper")
# Parameter ranges of the paper's texture generator (its voxels are ~1 mm, so we read them as mm).
DEFAULT_PARAMS = {
    "texture": "learned",  # "paper" keeps the label-free texture where real tumours were measured
    "texture_sigma_mm": [3.0, 15.0],  # first filter of the uniform noise (sigma_a)
    "grain_sigma_mm": [4.0, 7.0],  # filter after Bernoulli sampling (sigma_b)
    "texture_scale": [0.19, 0.21],
    "texture_base": [0.04, 0.06],
    "target_mean": [0.5, 0.55],  # u_0: mean of the texture where it exceeds 0.12
    "edge_sigma_mm": [1.0, 2.0],  # edge width
}
FIELD_WIDTHS = 6  # the paper's first field is min-max scaled over at least this many filter widths per axis


def texture(shape: tuple[int, ...], spacing: np.ndarray, params: dict, rng: np.random.Generator) -> tuple[
        np.ndarray, float]:
    """The paper's texture map in [0, 1] and its target mean u_0."""
    sigma_vox = rng.uniform(*params["texture_sigma_mm"]) / spacing
    # min-max over a field several filter widths wide, as the paper's whole-volume field: a tiny lesion's own box
    # would stretch the full range across a few voxels
    field = tuple(max(n, int(np.ceil(FIELD_WIDTHS * s))) for n, s in zip(shape, sigma_vox))
    a = smooth_field(field, sigma_vox, rng, distribution="uniform")
    span = a.max() - a.min()
    a = (a - a.min()) / (span if span > 0 else 1.0)
    corner = [int(rng.integers(f - n + 1)) for f, n in zip(field, shape)]
    a = a[tuple(slice(c, c + n) for c, n in zip(corner, shape))]
    a = rng.uniform(*params["texture_scale"]) * a + rng.uniform(*params["texture_base"])
    b = (a > rng.uniform(0, 1, size=shape)).astype(np.float32)
    b = gaussian_filter(b, rng.uniform(*params["grain_sigma_mm"]) / spacing)
    u0 = rng.uniform(*params["target_mean"])
    bright = b > 0.12
    mean = b[bright].mean() if bright.any() else max(float(b.mean()), 1e-3)
    return np.clip(u0 / mean * b, 0, 1), u0


def learned_values(mask: np.ndarray, spacing: np.ndarray, tumour: TumourAppearance, levels: tuple[float, ...],
                   rng: np.random.Generator) -> np.ndarray:
    """Ring-unit intensities (C, mask.sum()) with one real tumour's texture scale, white share and quantiles."""
    smooth = smooth_field(mask.shape, tumour.texture_sigma_mm / spacing, rng)[mask].astype(np.float64)
    smooth = (smooth - smooth.mean()) / max(float(smooth.std()), 1e-12)
    white = rng.standard_normal(smooth.size)
    field = np.sqrt(1 - tumour.nugget) * smooth + np.sqrt(tumour.nugget) * white
    return quantile_map(field, levels, np.asarray(tumour.quantiles))


@register_backend("analytic")
class AnalyticGenerator(TumourGenerator):
    """The dataset's measured tumour texture (or the label-free paper's), painted with a feathered edge."""

    def __init__(self, synth_plan: SynthPlan):
        super().__init__(synth_plan)
        self.params = {**DEFAULT_PARAMS, **synth_plan.backend_params}
        if self.params["texture"] not in TEXTURES:
            raise ValueError(f"analytic backend_params 'texture' = {self.params['texture']!r}; expected one of "
                             f"{', '.join(TEXTURES)}")
        self.channels = synth_plan.channels
        self.texture = synth_plan.texture if self.params["texture"] == "learned" else None

    @property
    def halo_mm(self) -> float:
        # the widest edge this backend paints (the lesion pipeline keeps edges off real tumours and padding)
        if self.texture is not None:
            return max(edge_halo_mm(t.edge_sigma_mm, t.edge_offset_mm) for t in self.texture.tumours)
        return edge_halo_mm(max(self.params["edge_sigma_mm"]))

    def synthesize(self, image: np.ndarray, lesion: Lesion, spacing: tuple[float, ...],
                   rng: np.random.Generator) -> None:
        if image.shape[0] != len(self.channels):
            raise ValueError(f"image has {image.shape[0]} channels but the synth plan describes "
                             f"{len(self.channels)}; re-run nnUNetv2_synth_plan for this dataset")
        sp = np.asarray(spacing, dtype=float)
        clips = [channel.clip for channel in self.channels]
        if self.texture is not None:
            tumour = self.texture.tumours[rng.integers(len(self.texture.tumours))]
            values = learned_values(lesion.mask, sp, tumour, self.texture.levels, rng)
            paint_lesion(image, lesion.bbox, lesion.mask, spacing, values, tumour.edge_sigma_mm,
                         tumour.edge_offset_mm, edge_halo_mm(tumour.edge_sigma_mm, tumour.edge_offset_mm), clips,
                         tissue=lesion.tissue)
            return
        tex, _ = texture(lesion.mask.shape, sp, self.params, rng)
        profile = tex[lesion.mask]
        profile /= max(float(profile.mean()), 1e-6)
        quantile = rng.uniform()  # one draw for all channels keeps multi-channel contrast coherent
        changes = np.stack([(lo + quantile * (hi - lo)) * profile for lo, hi in (c.contrast_range for c in
                                                                                 self.channels)])
        edge = rng.uniform(*self.params["edge_sigma_mm"])
        paint_lesion(image, lesion.bbox, lesion.mask, spacing, changes, edge, 0.0, edge_halo_mm(edge), clips,
                     additive=True)
