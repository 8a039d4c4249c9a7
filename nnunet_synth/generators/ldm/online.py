"""On-the-fly LDM inpainting of a training batch on the GPU (used by ``nnUNetTrainerSynth{N}LDMOnline``).

The online trainers pass the samples their loader marked (:class:`nnunet_synth.injection.OnlineSynthMarker`: chosen
with probability ``p``, healthy cases first, and kept out of nnU-Net's intensity augmentation, which the trainer
applies after this inpainting); called on its own, each sample is chosen with probability ``p``. For each chosen
sample the lesion pipeline (:func:`nnunet_synth.generators.lesions.plan_lesions`) draws and places its lesion masks
(CPU, cheap), then all of them are inpainted together with a few DDIM steps on the batch's device, and the tumour
label is written into every deep-supervision target. Voxels farther than the blend margin from a lesion stay
unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_synth.generators.ldm.sampling import LDMModels, inpaint_volume
from nnunet_synth.generators.lesions import plan_lesions

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan

ONLINE_DRAWS = 5  # lesion draws per flagged sample: an augmented patch often shows little of the organ


@torch.no_grad()
def inpaint_batch(models: LDMModels, scheduler, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor],
                  plan: SynthPlan, probability: float, rng: np.random.Generator,
                  generator: torch.Generator | None = None, intensity_range: list[list[float]] | None = None,
                  templates: list[np.ndarray] | None = None, samples: Sequence[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor], list[int]]:
    """Inpaints synthetic tumours into the samples ``samples``, or into a share ``probability`` of the batch's samples.

    Args:
        models: trained LDM networks on ``data``'s device.
        scheduler: DDIM scheduler with its timesteps set (the number of steps).
        data: images (B, C, *patch) on the device.
        target: segmentation (B, 1, *patch) or nnU-Net's deep-supervision list (full resolution first).
        plan: the synth plan (labels, spacing, shapes, placement).
        probability: chance per sample of carrying a synthetic tumour (without ``samples``).
        rng: numpy generator for the per-sample decisions and lesion shapes/positions.
        generator: torch generator on the device for the diffusion noise.
        intensity_range: per-channel [low, high] the generated voxels are clipped to (None: no clipping).
        templates: real tumour masks of the training fold (deformation ``template``).
        samples: indices of the samples to inpaint (the loader's marks); None: drawn with ``probability``.

    Returns:
        (data, target, indices of the samples that got a tumour); inputs are not modified. A chosen sample where no
        lesion fits is left as it is and not listed.
    """
    targets = list(target) if isinstance(target, (list, tuple)) else [target]
    full = targets[0]
    margin = int(models.blend_margin)
    limit = tuple(max(1, s - 2 * (margin + 1)) for s in data.shape[2:])
    mask = torch.zeros((data.shape[0], 1, *data.shape[2:]), device=data.device)
    chosen = []
    wanted = None if samples is None else {int(b) for b in samples}
    for b in range(data.shape[0]):
        if (rng.uniform() >= probability) if wanted is None else (b not in wanted):
            continue
        placed = plan_lesions(data[b].detach().float().cpu().numpy(), full[b, 0].detach().cpu().numpy(), plan, rng,
                              templates=templates, max_lesion_shape=limit, draws=ONLINE_DRAWS)
        if not placed:
            continue
        for p in placed:
            region = mask[(b, 0, *p.lesion.bbox)]
            region[torch.from_numpy(p.lesion.mask).to(data.device)] = 1.0
        chosen.append(b)
    if not chosen:
        return data, target, chosen
    index = torch.tensor(chosen, device=data.device)
    blended, weight = inpaint_volume(models, scheduler, data[index].float(), mask[index], generator)
    if intensity_range is not None:
        low = torch.tensor([r[0] for r in intensity_range], device=data.device).view(1, -1, *[1] * (data.ndim - 2))
        high = torch.tensor([r[1] for r in intensity_range], device=data.device).view(1, -1, *[1] * (data.ndim - 2))
        blended = torch.where(weight > 0, torch.minimum(torch.maximum(blended, low), high), blended)
    data = data.clone()
    data[index] = blended.to(data.dtype)
    new_targets = []
    for t in targets:
        t = t.clone()
        m = mask if t.shape[2:] == mask.shape[2:] else F.interpolate(mask, size=t.shape[2:], mode="nearest-exact")
        t[index] = torch.where(m[index] > 0.5, torch.as_tensor(plan.tumour_label, dtype=t.dtype,
                                                                 device=t.device), t[index])
        new_targets.append(t)
    return data, (new_targets if isinstance(target, (list, tuple)) else new_targets[0]), chosen
