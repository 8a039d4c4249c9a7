"""The LDM online trainers' samples get nnU-Net's intensity augmentation after inpainting (issue 13, SynBT).

The loader marks the samples chosen for synthesis and keeps them out of nnU-Net's intensity transforms
(:func:`nnunet_synth.injection.defer_intensity_transforms`); ``train_step`` inpaints them and then applies those
same transforms on the device (:class:`nnunet_synth.injection.DeviceIntensityAugmentation`). Unit tests run
nnU-Net's own transform pipeline on hand-made patches; the trainer test runs the online trainer's loader and
``synthesize`` on the CT phantom with a randomly initialised tiny LDM (CUDA refusal lifted).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_synth.generators.checkpoints import save_checkpoint
from nnunet_synth.generators.ldm.model import build_unet, build_vqvae, get_preset
from nnunet_synth.generators.paths import default_checkpoint
from nnunet_synth.injection import (
    MARKED,
    NOT_CHOSEN,
    ONLINE_KEY,
    OUTCOME_KEY,
    OUTSIDE_KEY,
    DeferredTransform,
    DeviceGaussianBlurTransform,
    OnlineSynthMarker,
    OutsideMaskRecorder,
    defer_intensity_transforms,
)
from nnunet_synth.planning import load_synth_plan
from nnunet_synth.trainers import nnUNetTrainerSynth20LDMOnline

from .conftest import cpu_trainer
from .test_injection import make_plan

PATCH = (8, 16, 16)
NOISE_STD = 0.3  # batchgeneratorsv2's "noise_variance" is the standard deviation it draws the noise with
FOLD = 4  # a fold no other test trains an LDM for: the random tiny checkpoint below is this file's own


def nnunet_transforms(use_mask_for_norm=None):
    """nnU-Net 2.8's training transforms as nnUNetTrainer.get_training_transforms builds them (no mirroring)."""
    return nnUNetTrainer.get_training_transforms(PATCH, (-0.5, 0.5), None, (), False,
                                                 use_mask_for_norm=use_mask_for_norm)


def force(transforms, spatial: bool = False) -> None:
    """Of nnU-Net's intensity transforms only Gaussian noise of std NOISE_STD, on every sample; nnU-Net's spatial
    transform an identity crop unless ``spatial``."""
    for t in transforms.transforms:
        t = t.transform if isinstance(t, DeferredTransform) else t
        if isinstance(t, SpatialTransform) and not spatial:
            t.p_rotation = t.p_scaling = 0.0
        if isinstance(t, RandomTransform):
            noise = isinstance(t.transform, GaussianNoiseTransform)
            t.apply_probability = float(noise)
            if noise:
                t.transform.noise_variance = (NOISE_STD, NOISE_STD)


def sample(seed: int = 0, channels: int = 2):
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.normal(0, 1, (channels, *PATCH)).astype(np.float32))
    seg = torch.zeros((1, *PATCH), dtype=torch.int16)
    seg[0, :, :, :3] = -1  # outside the image (nnU-Net masks it where use_mask_for_norm)
    return image, seg


def run(transforms, image, seg):
    return transforms(image=image.clone(), segmentation=seg.clone())


def test_marked_samples_skip_the_loaders_intensity_transforms_and_the_others_keep_nnunets():
    image, seg = sample()
    marked = nnunet_transforms()
    force(marked)
    defer_intensity_transforms(marked, OnlineSynthMarker(make_plan(), 1.0, seed=0))
    out = run(marked, image, seg)
    assert out[ONLINE_KEY] and torch.equal(out["image"], image), "a marked sample arrives un-augmented"

    unmarked = nnunet_transforms()
    force(unmarked)
    defer_intensity_transforms(unmarked, OnlineSynthMarker(make_plan(), 0.0, seed=0))
    residual = run(unmarked, image, seg)["image"] - image
    assert residual.std().item() == pytest.approx(NOISE_STD, rel=0.1), "an unmarked sample is noised as by nnU-Net"

    # with nnU-Net's own probabilities and spatial augmentation, an unmarked sample is bit-identical to nnU-Net's
    plain, deferred = nnunet_transforms(), nnunet_transforms()
    augmentation = defer_intensity_transforms(deferred, OnlineSynthMarker(make_plan(), 0.0, seed=0))
    assert len(augmentation.transforms) == 7 and sum(isinstance(t, DeferredTransform) for t in deferred.transforms) == 7
    for seed in range(6):
        outs = []
        for transforms in (plain, deferred):
            torch.manual_seed(seed)
            np.random.seed(seed)
            outs.append(run(transforms, *sample(seed)))
        assert torch.equal(outs[0]["image"], outs[1]["image"]) and torch.equal(outs[0]["segmentation"],
                                                                               outs[1]["segmentation"])


def test_device_augmentation_applies_nnunets_transforms_and_masking():
    image, seg = sample()
    transforms = nnunet_transforms(use_mask_for_norm=[True, True])
    force(transforms)
    marker = OnlineSynthMarker(make_plan(), 1.0, seed=0)
    augmentation = defer_intensity_transforms(transforms, marker)
    assert any(isinstance(t, OutsideMaskRecorder) for t in transforms.transforms)
    out = run(transforms, image, seg)
    outside = seg[0] < 0
    assert torch.equal(out["image"][:, ~outside], image[:, ~outside]) and (out["image"][:, outside] == 0).all()
    recorded = marker.take_outside()
    assert len(recorded) == 1 and torch.equal(recorded[0], outside)

    batch = torch.stack([out["image"], out["image"]])
    with pytest.raises(RuntimeError, match=OUTSIDE_KEY):
        augmentation(batch, [1])
    augmented = augmentation(batch, [1], outside=torch.stack([outside, outside]))
    assert torch.equal(augmented[0], batch[0]), "only the listed samples"
    residual = (augmented[1] - batch[1])[:, ~outside]
    assert residual.std().item() == pytest.approx(NOISE_STD, rel=0.1) and abs(residual.mean().item()) < 0.05
    assert (augmented[1][:, outside] == 0).all(), "masked again after the device augmentation"


def test_blur_on_the_device_is_nnunets_blur():
    image, _ = sample(channels=3)
    blur = GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False, synchronize_axes=False,
                                 p_per_channel=0.5, benchmark=False)
    blurred = 0
    for seed in range(4):
        outs = []
        for transform in (blur, DeviceGaussianBlurTransform.of(blur)):
            torch.manual_seed(seed)
            np.random.seed(seed)
            outs.append(transform(image=image.clone())["image"])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        blurred += not torch.equal(outs[0], image)
    assert blurred


def write_random_tiny_ldm(dataset: int, fold: int) -> None:
    """A diffusion-stage checkpoint of the tiny preset with random weights, where the online trainer of ``fold``
    looks for its generator (the test checks the augmentation, not the tumours' realism)."""
    plan = load_synth_plan(dataset, "3d_fullres")
    preset = get_preset("tiny")
    torch.manual_seed(0)
    vqvae, unet = build_vqvae(preset, len(plan.channels)), build_unet(preset)
    config = {"backend": "ldm", "preset": "tiny", "preset_params": preset.to_dict(),
              "dataset_name": plan.dataset_name, "configuration": "3d_fullres", "num_channels": len(plan.channels),
              "spacing": list(plan.spacing), "stage": "diffusion", "blend_margin": preset.blend_margin,
              "scale_factor": 1.0, "intensity_range": [[-5.0, 5.0]] * len(plan.channels)}
    save_checkpoint({"backend": "ldm", "stage": "diffusion", "config": config, "vqvae": vqvae.state_dict(),
                     "unet": unet.state_dict()}, default_checkpoint(dataset, "ldm", "3d_fullres", fold))


class NoisedOnline(nnUNetTrainerSynth20LDMOnline):
    """Every sample inpainted; of nnU-Net's intensity transforms only Gaussian noise, always."""

    synth_probability = 1.0
    sampling_steps = 2

    def get_training_transforms(self, patch_size, *args, **kwargs):
        transforms = super().get_training_transforms(patch_size, *args, **kwargs)
        force(transforms, spatial=True)
        return transforms


def test_online_trainer_inpaints_marked_samples_then_augments_them(phantom_ct, monkeypatch, one_torch_thread):
    write_random_tiny_ldm(phantom_ct, FOLD)
    monkeypatch.setattr(NoisedOnline, "_require_cuda", classmethod(lambda cls, device: None))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = cpu_trainer(NoisedOnline, phantom_ct, fold=FOLD)
    train_loader, _ = trainer.get_dataloaders()
    batch = next(train_loader)
    assert (batch[OUTCOME_KEY] == MARKED).all()
    tumour = trainer.synth_plan.tumour_label

    def synthesize(noise: bool):
        for t in trainer.device_augmentation.transforms:
            t.apply_probability = float(noise and isinstance(t.transform, GaussianNoiseTransform))
        trainer._rng = np.random.default_rng(0)  # the same lesions and diffusion noise in both runs
        trainer._noise.manual_seed(0)
        torch.manual_seed(0)
        return trainer.synthesize(batch)

    def full(target):  # nnU-Net's deep-supervision list or one tensor
        return target[0] if isinstance(target, list) else target

    clean, target = synthesize(noise=False)
    noised, target_again = synthesize(noise=True)
    lesion = (full(target) == tumour) & (full(batch["target"]) != tumour)
    assert torch.equal(full(target), full(target_again)) and lesion.any(), "the same lesions in both runs"
    residual = (noised - clean).permute(1, 0, 2, 3, 4)[:, lesion[:, 0]]
    assert residual.std().item() == pytest.approx(NOISE_STD, rel=0.15) and abs(residual.mean().item()) < 0.1, \
        "the synthetic region got nnU-Net's noise after inpainting"
    assert (clean[lesion.expand_as(clean)] != batch["data"][lesion.expand_as(clean)]).float().mean() > 0.9

    # train_step's counts (it trains on what synthesize returns): every sample marked, inpainted or skipped
    assert trainer._synth_seen[0] == trainer._synth_seen[1] + trainer._synth_skipped == 2 * len(batch["keys"])

    # healthy controls first: with the plan's healthy cases covering more than p of the drawn samples, the marked
    # samples all come from them
    train_cases = list(train_loader.data_loader.indices)
    trainer.synth_marker.plan = trainer.synth_plan.replace(healthy_cases=tuple(train_cases[:2]))
    trainer.synth_marker.probability.fill_(0.2)
    train_loader, _ = trainer.get_dataloaders()
    assert trainer.synth_marker.healthy == set(train_cases[:2])
    marked_cases, seen = [], 0
    for _ in range(12):
        batch = next(train_loader)
        seen += len(batch["keys"])
        marked_cases += [k for k, o in zip(batch["keys"], batch[OUTCOME_KEY].tolist()) if o == MARKED]
        assert set(batch[OUTCOME_KEY].tolist()) <= {MARKED, NOT_CHOSEN}
    assert marked_cases and set(marked_cases) <= set(train_cases[:2]), (marked_cases, train_cases)
    # an unmarked sample leaves synthesize untouched
    unmarked = {**batch, OUTCOME_KEY: torch.full_like(batch[OUTCOME_KEY], NOT_CHOSEN)}
    assert torch.equal(trainer.synthesize(unmarked)[0], batch["data"])
