"""The transform that puts synthetic tumours into nnU-Net's training samples.

:class:`SynthTumourTransform` is inserted at index 0 of nnU-Net's training transforms: after the data
loader's crop of the enlarged patch and before spatial and intensity augmentation, so synthetic lesions are
rotated, scaled, noised and mirrored like real ones. It is a top-level, picklable class that holds no
reference to the trainer; it draws from its own numpy Generator, seeded per data-loader worker.

Healthy controls first: where the synth plan lists ``healthy_cases`` (a merged dataset's healthy scans, as the
pancreas paper inserts into), :class:`OutcomeDataLoader` hands the transform each sample's case identifier, and a
sample of a healthy case is chosen with probability ``min(1, p / h)``, any other with ``max(0, (p - h) / (1 - h))``,
``h`` being the share of drawn samples that come from healthy cases: the expected synthetic share stays ``p``.

Placement regions without an organ label (the tissue or FGT region): :class:`OutcomeDataLoader` also tells the
transform where in its case each patch lies (nnU-Net's box of the enlarged patch), and the transform reads the
patch's region from its whole case's (:class:`CaseRegions`: found once per case and loader process, kept
bit-packed), instead of finding it again on every enlarged patch, where it cost several times the lesion.

Synthesis on the device (``nnUNetTrainerSynth{N}LDMOnline``): :class:`OnlineSynthMarker` takes the transform's place
and only marks the chosen samples (same choice, healthy cases first, same per-worker seeding);
:func:`defer_intensity_transforms` wraps nnU-Net's intensity transforms (noise, blur, brightness, contrast,
low resolution, gamma) so that they skip the marked samples in the loader, and returns a
:class:`DeviceIntensityAugmentation` that applies the same transform objects (same parameters and probabilities) to
those samples on the device after the generator has inpainted them. A synthetic sample thus gets the augmentation of a
real one, and the generator sees un-augmented intensities. The intensity transforms then run after nnU-Net's mirroring
instead of before it; each of them is mirror-symmetric in distribution (i.i.d. noise, symmetric kernels, global
intensity maps), so the augmentation a sample receives is the same. Where nnU-Net masks the image after its intensity
transforms (``use_mask_for_norm``), the loader also records each marked sample's outside mask so that the masking is
repeated after the device augmentation.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform, _build_kernel
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_synth.generators import get_backend
from nnunet_synth.generators.lesions import RegionDepth, insert_tumours, placement_region, region_depth

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan

# counters per worker row: samples seen, samples with a synthetic tumour, samples where nothing fitted
SEEN, SYNTHETIC, SKIPPED = 0, 1, 2
MAX_WORKER_ROWS = 64
# what the transform did to one sample (see SynthTumourTransform.take_outcomes)
NOT_CHOSEN, INSERTED, NOTHING_FITTED = 0, 1, 2
PENDING_OUTCOMES = 4096  # outcomes kept until taken (a batch's worth is taken after each batch)
OUTCOME_KEY = "synth_outcome"  # the key of a training batch that holds one outcome per sample
MARKED = INSERTED  # OnlineSynthMarker's outcome of a sample chosen for synthesis on the device
ONLINE_KEY = "synth_online"  # flag in a sample's data dict: chosen for synthesis on the device, intensity deferred
CASE_REGION_MEGABYTES = 256  # whole-case placement regions one loader process keeps (bit-packed), see CaseRegions
OUTSIDE_KEY = "synth_outside"  # batch key: per sample, the voxels nnU-Net's masking set to zero (marked samples only)
# nnU-Net's intensity transforms (nnUNetTrainer.get_training_transforms), deferred for samples synthesised on the device
INTENSITY_TRANSFORMS = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
                        ContrastTransform, SimulateLowResolutionTransform, GammaTransform)


def worker_index() -> int:
    """0 in the main process, k for the k-th child process a parent started (batchgenerators' workers).

    multiprocessing numbers children in start order, so the index is the same from run to run.
    """
    identity = multiprocessing.current_process()._identity  # noqa: SLF001 - the only stable worker number
    return identity[-1] if identity else 0


def new_counters() -> torch.Tensor:
    """Counters in shared memory: data-loader workers (fork or spawn) add to the tensor the trainer reads."""
    return torch.zeros((MAX_WORKER_ROWS, 3), dtype=torch.int64).share_memory_()


class SampleChooser(BasicTransform):
    """Chooses, with probability ``p`` per sample (healthy cases first, see the module docstring), the samples that
    get a synthetic tumour; what happens to a chosen sample is the subclass's :meth:`take`.

    Args:
        synth_plan: the validated synth plan (see :func:`nnunet_synth.planning.load_synth_plan`).
        probability: chance that a sample carries a synthetic tumour.
        seed: base seed; each worker draws from ``default_rng([seed, worker_index()])``.
        counters: shared (rows, 3) int64 tensor of seen/synthetic/skipped counts, see :func:`new_counters`.
    """

    def __init__(self, synth_plan: SynthPlan, probability: float, seed: int, counters: torch.Tensor | None = None):
        super().__init__()
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"synthetic-tumour probability must be in [0, 1], got {probability}")
        self.plan = synth_plan
        # in shared memory so a trainer can change it mid-training (real-only fine-tuning) in every worker
        self.probability = torch.full((1,), float(probability), dtype=torch.float64).share_memory_()
        self.seed = seed
        self.counters = counters if counters is not None else new_counters()
        self._rng: np.random.Generator | None = None
        self._rng_pid: int | None = None
        self._outcomes: deque[int] = deque(maxlen=PENDING_OUTCOMES)
        self.healthy: frozenset[str] = frozenset()
        self.healthy_share = 0.0
        self._keys: deque[str] = deque()
        self._box: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def prefer_cases(self, healthy: Iterable[str], share: float) -> None:
        """Insert into the ``healthy`` cases first (see the module docstring).

        Args:
            healthy: identifiers of the healthy-control cases among the loader's cases.
            share: probability that a drawn sample comes from one of them (their sampling mass).
        """
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share of healthy samples must be in [0, 1], got {share}")
        self.healthy, self.healthy_share = frozenset(str(c) for c in healthy), float(share)

    def set_batch_keys(self, keys: Iterable[str]) -> None:
        """The case identifiers of the next samples, in the order the transform will see them (the loader's batch)."""
        self._keys = deque(str(k) for k in keys)

    def set_next_box(self, lower: Iterable[int], upper: Iterable[int]) -> None:
        """Where in its case the next sample's (enlarged) patch lies: voxels ``[lower, upper)``, which may reach
        outside the case (nnU-Net pads there)."""
        self._box = tuple(int(v) for v in lower), tuple(int(v) for v in upper)

    def case_probabilities(self) -> tuple[float, float]:
        """The chances of a synthetic tumour in a sample of a healthy case and in one of any other case: healthy
        cases first, so that the expected share over all samples is the probability."""
        p, h = float(self.probability[0]), self.healthy_share
        if not self.healthy or h <= 0.0 or h >= 1.0:
            return p, p
        return min(1.0, p / h), max(0.0, (p - h) / (1.0 - h))

    def sample_probability(self, identifier: str | None) -> float:
        """The chance that a sample of case ``identifier`` (None: unknown) gets a synthetic tumour."""
        if identifier is None:
            return float(self.probability[0])
        healthy, other = self.case_probabilities()
        return healthy if identifier in self.healthy else other

    @property
    def rng(self) -> np.random.Generator:
        # A forked worker inherits the parent's generator state: reseed once per process, by worker number.
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng = np.random.default_rng([self.seed, worker_index()])
            self._rng_pid = os.getpid()
        return self._rng

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_rng"] = state["_rng_pid"] = None
        state["_outcomes"] = deque(maxlen=PENDING_OUTCOMES)
        state["_keys"] = deque()
        state["_box"] = None
        return state

    def take_outcomes(self) -> list[int]:
        """What this process's calls did since the last take (:data:`NOT_CHOSEN`, :data:`INSERTED` or
        :data:`NOTHING_FITTED` per sample, in order); the loader attaches them to its batch, so the trainer counts
        the samples its training step consumes (the shared counters also count what the workers prefetched)."""
        outcomes = list(self._outcomes)
        self._outcomes.clear()
        return outcomes

    def __call__(self, **data_dict) -> dict:
        rng = self.rng
        row = self.counters[worker_index() % MAX_WORKER_ROWS]
        row[SEEN] += 1
        identifier = self._keys.popleft() if self._keys else None
        box, self._box = self._box, None
        if rng.uniform() >= self.sample_probability(identifier):
            self._outcomes.append(NOT_CHOSEN)
            return data_dict
        outcome = self.take(data_dict, rng, None if identifier is None or box is None else (identifier, box))
        row[SYNTHETIC if outcome == INSERTED else SKIPPED] += 1
        self._outcomes.append(outcome)
        return data_dict

    def take(self, data_dict: dict, rng: np.random.Generator,
             patch: tuple[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None) -> int:
        """Acts on a chosen sample's data dict in place; returns :data:`INSERTED` or :data:`NOTHING_FITTED`.

        ``patch``: the sample's case and its patch's box in it (see :meth:`set_next_box`), where the loader said."""
        raise NotImplementedError


class CaseRegions:
    """Placement regions of whole cases (3D configurations without an organ label), each found once per process
    with its depth map and cropped to every patch drawn from the case: the tissue or FGT region is found on the case,
    not again on every enlarged patch (where it cost several times the lesion, and where the patch's own borders
    shaped it).

    Regions are kept bit-packed along the last axis (one bit per voxel) beside their depth on its coarse grid, the
    least recently used dropped beyond ``max_megabytes``.

    Args:
        dataset: nnU-Net's dataset of the loader (``load_case(identifier)``).
        plan: the synth plan.
        max_megabytes: memory the kept regions may take in one process.
    """

    def __init__(self, dataset, plan: SynthPlan, max_megabytes: float = CASE_REGION_MEGABYTES):
        self.dataset, self.plan, self.max_bytes = dataset, plan, int(max_megabytes * 2 ** 20)
        self._kept: OrderedDict[str, tuple[np.ndarray, tuple[int, ...], RegionDepth]] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_kept": OrderedDict()}  # each worker finds its own

    def region(self, identifier: str) -> tuple[np.ndarray, tuple[int, ...], RegionDepth]:
        """The case's region packed along its last axis, its shape, and its depth."""
        if identifier in self._kept:
            self._kept.move_to_end(identifier)
            return self._kept[identifier]
        data, seg, *_ = self.dataset.load_case(identifier)
        region = placement_region(np.asarray(data), np.asarray(seg[0]), self.plan)
        self._kept[identifier] = (np.packbits(region, axis=-1), region.shape,
                                  region_depth(region, tuple(self.plan.spacing)))
        while len(self._kept) > 1 and sum(p.nbytes + d.coarse.nbytes for p, _, d in self._kept.values()) > \
                self.max_bytes:
            self._kept.popitem(last=False)
        return self._kept[identifier]

    def crop(self, identifier: str, lower: tuple[int, ...], upper: tuple[int, ...]
             ) -> tuple[np.ndarray, RegionDepth]:
        """The region of the patch ``[lower, upper)`` of the case (False outside the case) and its depth."""
        packed, full, depth = self.region(identifier)
        out = np.zeros(tuple(u - lo for lo, u in zip(lower, upper)), dtype=bool)
        lo = [max(v, 0) for v in lower]
        hi = [min(v, n) for v, n in zip(upper, full)]
        if all(h > low for low, h in zip(lo, hi)):
            first, last = lo[-1] // 8, -(-hi[-1] // 8)  # the bytes holding the last axis's range
            part = np.unpackbits(packed[(*(slice(a, b) for a, b in zip(lo[:-1], hi[:-1])), slice(first, last))],
                                 axis=-1)[..., lo[-1] - 8 * first:hi[-1] - 8 * first].astype(bool)
            out[tuple(slice(a - v, b - v) for a, b, v in zip(lo, hi, lower))] = part
        return out, depth.of_patch(lower, out.shape)


class SynthTumourTransform(SampleChooser):
    """With probability ``p`` per sample, inserts the synthetic tumours of one sample into the central window.

    The lesions come from the lesion pipeline (:func:`nnunet_synth.generators.lesions.insert_tumours`): inside
    the organ label (or, without one, whole inside the tissue region), away from real tumours, never on voxels
    labelled -1 (outside the image) or the ignore label. Only segmentation channel 0 gets the tumour label; the
    image changes only inside the lesions.

    Args:
        synth_plan: the validated synth plan (see :func:`nnunet_synth.planning.load_synth_plan`).
        probability: chance that a sample carries a synthetic tumour.
        final_patch_size: nnU-Net's patch size; lesion centres lie in this central window.
        seed: base seed; each worker draws from ``default_rng([seed, worker_index()])``.
        counters: shared (rows, 3) int64 tensor of seen/synthetic/skipped counts, see :func:`new_counters`.
        templates: real tumour masks of the training fold (deformation ``template``).
    """

    def __init__(self, synth_plan: SynthPlan, probability: float, final_patch_size: tuple[int, ...] | None,
                 seed: int, counters: torch.Tensor | None = None, templates: list[np.ndarray] | None = None):
        super().__init__(synth_plan, probability, seed, counters)
        if synth_plan.shapes.deformation == "template" and not templates:
            raise ValueError("deformation 'template' needs the training fold's template masks (none given)")
        self.templates = templates
        self.final_patch_size = None if final_patch_size is None else tuple(int(s) for s in final_patch_size)
        self.generator = get_backend(synth_plan.backend)(synth_plan)
        self.case_regions: CaseRegions | None = None
        self.owns_crops = False  # set by the loader where each crop is a fresh array (painted in place)

    def use_case_regions(self, dataset) -> None:
        """Without an organ label, read each patch's placement region from its whole case's (computed once per case
        in this process, :class:`CaseRegions`) instead of finding it on every patch; ``dataset`` is the loader's
        nnU-Net dataset (``load_case``)."""
        if self.plan.organ_label is None and len(self.plan.spacing) == 3:  # 2d: the region is found per slice
            self.case_regions = CaseRegions(dataset, self.plan)

    def take(self, data_dict: dict, rng: np.random.Generator,
             patch: tuple[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None) -> int:
        region = depth = None
        if self.case_regions is not None and patch is not None:
            region, depth = self.case_regions.crop(patch[0], *patch[1])
        image, seg = self.insert(data_dict["image"], data_dict["segmentation"], rng, region, depth)
        if image is None:
            return NOTHING_FITTED
        data_dict["image"], data_dict["segmentation"] = image, seg
        return INSERTED

    def insert(self, image: torch.Tensor, segmentation: torch.Tensor, rng: np.random.Generator,
               region: np.ndarray | None = None, depth: RegionDepth | None = None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Inserts the lesions of one synthetic sample (one, or several where the size class says so).

        ``region``, ``depth``: the patch's placement region and its depth when known (read from its case's); None:
        found on the patch.
        Returns the tensors with the lesions, or (None, None) when no lesion fits. The inputs are written to only
        where :attr:`owns_crops` says they are fresh arrays: otherwise the loader's crop may be a view of nnU-Net's
        preprocessed arrays.
        """
        new_image, new_seg, lesions = insert_tumours(image.numpy(), segmentation.numpy(), None, self.plan, rng,
                                                     generator=self.generator, templates=self.templates,
                                                     window=self.final_patch_size, region=region, depth=depth,
                                                     in_place=self.owns_crops)
        if not lesions:
            return None, None
        return torch.from_numpy(new_image), torch.from_numpy(new_seg)


class OnlineSynthMarker(SampleChooser):
    """Chooses the samples that the trainer synthesises on the device (as :class:`SynthTumourTransform` chooses its
    samples: probability ``p``, healthy cases first, seeded per worker) and only marks them: the sample's data dict
    gets :data:`ONLINE_KEY`, which the :class:`DeferredTransform` wrappers of nnU-Net's intensity transforms read,
    and its outcome (:data:`MARKED`) reaches the trainer with the batch (:class:`OutcomeDataLoader`).

    Args:
        synth_plan: the validated synth plan.
        probability: chance that a sample is synthesised.
        seed: base seed; each worker draws from ``default_rng([seed, worker_index()])``.
        counters: shared (rows, 3) int64 tensor of seen/marked counts, see :func:`new_counters`.
    """

    def __init__(self, synth_plan: SynthPlan, probability: float, seed: int, counters: torch.Tensor | None = None):
        super().__init__(synth_plan, probability, seed, counters)
        self._outside: deque[torch.Tensor | None] = deque(maxlen=PENDING_OUTCOMES)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_outside": deque(maxlen=PENDING_OUTCOMES)}

    def take(self, data_dict: dict, rng: np.random.Generator,
             patch: tuple[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None) -> int:
        data_dict[ONLINE_KEY] = True
        return MARKED

    def record_outside(self, outside: torch.Tensor | None) -> None:
        """One sample's voxels that nnU-Net's masking set to zero (None: not a marked sample), in batch order."""
        self._outside.append(outside)

    def take_outside(self) -> list[torch.Tensor | None]:
        """The masks recorded since the last take (empty where nnU-Net does not mask)."""
        outside = list(self._outside)
        self._outside.clear()
        return outside


class DeferredTransform(BasicTransform):
    """One of nnU-Net's intensity transforms, skipped for samples marked by :class:`OnlineSynthMarker` (their
    augmentation runs on the device after synthesis, :class:`DeviceIntensityAugmentation`); any other sample gets
    the transform itself, with nnU-Net's parameters and random draws."""

    def __init__(self, transform: BasicTransform):
        super().__init__()
        self.transform = transform

    def __call__(self, **data_dict) -> dict:
        if data_dict.get(ONLINE_KEY):
            return data_dict
        return self.transform(**data_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


class OutsideMaskRecorder(BasicTransform):
    """Placed after nnU-Net's ``MaskImageTransform``: records, for each marked sample, the voxels it set to zero
    (segmentation < 0 in channel ``channel_idx_in_seg``), so that the masking can follow the device augmentation."""

    def __init__(self, marker: OnlineSynthMarker, channel_idx_in_seg: int):
        super().__init__()
        self.marker, self.channel_idx_in_seg = marker, channel_idx_in_seg

    def __call__(self, **data_dict) -> dict:
        marked = data_dict.get(ONLINE_KEY)
        self.marker.record_outside(data_dict["segmentation"][self.channel_idx_in_seg] < 0 if marked else None)
        return data_dict


def _intensity_transform(transform: BasicTransform) -> bool:
    inner = transform.transform if isinstance(transform, RandomTransform) else transform
    return isinstance(inner, INTENSITY_TRANSFORMS)


def defer_intensity_transforms(transforms: ComposeTransforms, marker: OnlineSynthMarker
                               ) -> DeviceIntensityAugmentation:
    """Puts ``marker`` at index 0 of nnU-Net's training transforms (after the crop, before spatial augmentation) and
    wraps each intensity transform (:data:`INTENSITY_TRANSFORMS`, with or without its ``RandomTransform``) in a
    :class:`DeferredTransform`, in place.

    Args:
        transforms: what ``nnUNetTrainer.get_training_transforms`` returned.
        marker: the marker of the samples synthesised on the device.

    Returns:
        The augmentation to apply to the marked samples on the device: the same transform objects, in their order.
    """
    deferred, mask = [], None
    for i, t in enumerate(transforms.transforms):
        if _intensity_transform(t):
            deferred.append(t)
            transforms.transforms[i] = DeferredTransform(t)
        elif isinstance(t, MaskImageTransform) and t.apply_to_channels:
            mask = t
    if mask is not None:
        transforms.transforms.insert(transforms.transforms.index(mask) + 1,
                                     OutsideMaskRecorder(marker, mask.channel_idx_in_seg))
    transforms.transforms.insert(0, marker)
    return DeviceIntensityAugmentation(deferred, mask)


def blur_axis(img: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """``batchgeneratorsv2``'s ``blur_dimension`` with its Gaussian kernel on the image's device and dtype (it builds
    it on the CPU, which a CUDA convolution refuses): reflect padding, separable 1D kernel, truncated at 6 sigma.

    Args:
        img: (C, *spatial) image.
        sigma: standard deviation in voxels.
        axis: spatial axis to blur (0 is the first spatial axis).
    """
    kernel = _build_kernel(sigma, truncate=6).to(img.device, img.dtype)  # blur_dimension's truncation
    spatial = img.ndim - 1
    shape = [1] * spatial
    shape[axis] = kernel.numel()
    padding = [0, 0] * spatial
    padding[2 * (spatial - 1 - axis)] = padding[2 * (spatial - 1 - axis) + 1] = kernel.numel() // 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    padded = F.pad(img, padding, mode="reflect")
    return conv(padded[None], kernel.view(1, 1, *shape).expand(img.shape[0], 1, *shape), groups=img.shape[0])[0]


class DeviceGaussianBlurTransform(GaussianBlurTransform):
    """nnU-Net's ``GaussianBlurTransform`` (same parameters and draws) blurring on the image's device."""

    @classmethod
    def of(cls, blur: GaussianBlurTransform) -> DeviceGaussianBlurTransform:
        new = cls.__new__(cls)
        new.__dict__.update(blur.__dict__)
        return new

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        for j, c in enumerate(np.flatnonzero(np.asarray(params["apply_to_channel"]))):
            sigmas = params["sigmas"] if self.synchronize_channels else params["sigmas"][j]
            sub = img[c:c + 1]
            for axis, sigma in enumerate(sigmas):
                sub = blur_axis(sub, sigma, axis)
            img[c:c + 1] = sub
        return img


def _on_device(transform: BasicTransform) -> BasicTransform:
    """``transform``, or a copy of it that runs on a CUDA image (only the blur needs one)."""
    if isinstance(transform, RandomTransform):
        inner = _on_device(transform.transform)
        return transform if inner is transform.transform else RandomTransform(inner, transform.apply_probability)
    if isinstance(transform, GaussianBlurTransform):
        return DeviceGaussianBlurTransform.of(transform)
    return transform


class DeviceIntensityAugmentation:
    """nnU-Net's intensity transforms (the objects its pipeline holds, with their parameters and probabilities),
    applied to chosen samples of a batch on the batch's device, each sample drawing its own parameters as in the
    loader; then nnU-Net's masking where its pipeline masks (``MaskImageTransform``).

    Args:
        transforms: the deferred intensity transforms, in pipeline order.
        mask: nnU-Net's ``MaskImageTransform`` of the pipeline (None: it does not mask).
    """

    def __init__(self, transforms: list[BasicTransform], mask: MaskImageTransform | None = None):
        self.transforms = transforms
        self.mask = mask

    @torch.no_grad()
    def __call__(self, data: torch.Tensor, samples: Iterable[int], num_image_channels: int | None = None,
                 outside: torch.Tensor | None = None) -> torch.Tensor:
        """Augments the ``samples`` of ``data`` (B, C, *spatial) and returns the new batch (the input is unchanged).

        Args:
            data: the batch on the device.
            samples: indices of the samples to augment.
            num_image_channels: leading channels that are image (the rest, a cascade's one-hot segmentation, are
                left alone); None: all.
            outside: (B, *spatial) bool, the voxels nnU-Net's masking zeroed in the loader (:data:`OUTSIDE_KEY`).
        """
        samples = list(samples)
        if not samples:
            return data
        if self.mask is not None and outside is None:
            raise RuntimeError("nnU-Net masks the image after its intensity augmentation (use_mask_for_norm), but the "
                               f"batch holds no {OUTSIDE_KEY!r}: build the loader with OutcomeDataLoader")
        n = data.shape[1] if num_image_channels is None else int(num_image_channels)
        transforms = [_on_device(t) for t in self.transforms]
        data = data.clone()
        for b in samples:
            sample = {"image": data[b, :n].clone()}
            for t in transforms:
                sample = t(**sample)
            image = sample["image"]
            if self.mask is not None:
                region = outside[b].to(image.device)
                for c in self.mask.apply_to_channels:
                    image[c][region] = self.mask.set_outside_to
            data[b, :n] = image
        return data


class OutcomeDataLoader(nnUNetDataLoader):
    """nnU-Net's training loader whose batches also hold :data:`OUTCOME_KEY`: per sample, what the
    :class:`SampleChooser` among its transforms did (it runs in the same worker process, once per sample, in
    batch order). The Synth trainers count the samples their training step consumes from it, not the ones the
    loader workers prefetched at start or resume; the LDM online trainers synthesise the samples it marks. Where an
    :class:`OutsideMaskRecorder` records the masking of marked samples, the batch holds them as :data:`OUTSIDE_KEY`
    ((B, *spatial) bool, all False for the other samples).

    It also tells the transform each sample's case, and which of its cases are the plan's healthy controls with
    their share of the drawn samples, so that synthetic tumours go into healthy cases first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        synth = self.synth_transform
        if isinstance(synth, SynthTumourTransform):
            synth.use_case_regions(self._data)
            # nnU-Net's blosc2 dataset decompresses every crop into a new array; its numpy dataset's crops may be
            # views of read-only memory maps, and other datasets may hand out arrays they keep
            synth.owns_crops = type(self._data) is nnUNetDatasetBlosc2
        if synth is not None and synth.plan.healthy_cases:
            listed = set(synth.plan.healthy_cases)
            is_healthy = np.array([i in listed for i in self.indices], dtype=bool)
            weights = (np.full(len(self.indices), 1.0 / max(1, len(self.indices))) if self.sampling_probabilities
                       is None else np.asarray(self.sampling_probabilities, dtype=float))
            synth.prefer_cases(np.asarray(self.indices)[is_healthy].tolist(),
                               float(np.clip(weights[is_healthy].sum() / weights.sum(), 0.0, 1.0)))

    @property
    def synth_transform(self) -> SampleChooser | None:
        return next((t for t in getattr(self.transforms, "transforms", []) if isinstance(t, SampleChooser)), None)

    def get_indices(self):
        keys = super().get_indices()
        synth = self.synth_transform
        if synth is not None:
            synth.set_batch_keys(keys)
        return keys

    def get_bbox(self, *args, **kwargs):
        # nnU-Net crops each sample's patch right after choosing its box, then runs the transforms on it
        lower, upper = super().get_bbox(*args, **kwargs)
        synth = self.synth_transform
        if synth is not None:
            synth.set_next_box(lower, upper)
        return lower, upper

    def generate_train_batch(self) -> dict:
        synth = self.synth_transform
        marker = synth if isinstance(synth, OnlineSynthMarker) else None
        if synth is not None:
            synth.take_outcomes()  # none left from an interrupted batch
        if marker is not None:
            marker.take_outside()
        batch = super().generate_train_batch()
        if synth is not None:
            batch[OUTCOME_KEY] = torch.as_tensor(synth.take_outcomes(), dtype=torch.int64)
        outside = marker.take_outside() if marker is not None else []
        if outside:
            shape = batch["data"].shape[2:]
            batch[OUTSIDE_KEY] = torch.stack([torch.zeros(shape, dtype=torch.bool) if o is None else o.reshape(shape)
                                              for o in outside])
        return batch


def achieved_rates(counters: torch.Tensor) -> dict[str, int]:
    """Totals over all workers."""
    total = counters.sum(0)
    return {"seen": int(total[SEEN]), "synthetic": int(total[SYNTHETIC]), "skipped": int(total[SKIPPED])}
