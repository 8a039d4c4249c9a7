"""What every learned backend's training shares: the job, the training-module contract and common helpers.

``nnUNetv2_synth_train_generator`` (:mod:`nnunet_synth.generator_training`) resolves a :class:`GeneratorJob`
from the command line and nnU-Net's files and hands it to the training module the backend class names in its
``training_module`` (:class:`BackendTraining` says what that module defines). The helpers below find real
tumours, crop patches around them, hold cases out for a generator's validation loss, measure intensity
ranges and write logs and loss plots; the ddpm, ldm and sd_inversion trainings use them.

What scales a training, also shared by all three: :func:`setup_distributed` (one process per GPU under
``torchrun``, DistributedDataParallel), :class:`MixedPrecision` (the one AMP optimiser step: autocast,
GradScaler, unscale, clip, step, update) and :func:`batch_loader` (training batches drawn in background
processes, each batch seeded by the seed, the rank and its iteration only, so a run is reproducible for any
worker count and resumes exactly).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import find_objects
from scipy.ndimage import label as connected_components
from tqdm import tqdm

if TYPE_CHECKING:  # torch is imported where used: the command's --help stays fast
    import torch

MIN_TUMOUR_VOXELS = 8
VAL_CASE_SHARE = 0.1  # of the training-fold cases with tumours, held out of the generator's training
MAX_INTENSITY_CROPS = 64


@dataclass
class GeneratorJob:
    """Everything a backend's training needs, resolved from the command line and nnU-Net's files.

    Attributes:
        backend: generator backend name.
        dataset_name: nnU-Net dataset name (DatasetNNN_Name).
        configuration: nnU-Net configuration whose preprocessed data and plans are used.
        plans_identifier: nnU-Net plans identifier.
        fold: the segmenter's fold whose training cases the generator may use ('all' for all cases).
        cases: identifiers of those training cases.
        preprocessed_folder: folder of the configuration's preprocessed cases.
        output_dir: where checkpoints, logs and plots go.
        preset: model preset name of the backend.
        iterations: optimiser steps in total (None: the preset's default).
        device: 'cpu' or 'cuda'.
        resume: continue from the latest checkpoint in ``output_dir``.
        seed: base random seed.
        stage: the one training stage to run, for backends trained in stages (ldm: vqvae, vqvae-volume,
            diffusion); None runs all stages in order.
        base_model: local folder of a pretrained model the backend fine-tunes (sd_inversion).
        amp: mixed precision (:class:`MixedPrecision`: float16 autocast + GradScaler on CUDA, bfloat16 autocast
            on CPU).
        num_workers: background processes per rank that draw training batches (0: the training process).
        save_every: keep ``checkpoint_iter{N:07d}.pth`` every this many iterations (ddpm, ldm diffusion stage).
        perceptual_network: local torchvision ResNet-50 state dict for the VQ-VAE's perceptual loss (ldm).
    """

    backend: str
    dataset_name: str
    configuration: str
    plans_identifier: str
    fold: int | str
    cases: list[str]
    preprocessed_folder: Path
    output_dir: Path
    preset: str
    iterations: int | None
    device: str
    resume: bool
    seed: int = 12345
    stage: str | None = None
    base_model: str | None = None
    amp: bool = False
    num_workers: int = 0
    save_every: int | None = None
    perceptual_network: str | None = None


@dataclass(frozen=True)
class BackendTraining:
    """A backend's training module as the command reads it.

    The module (named by the backend class's ``training_module``) defines at module level:

    * ``PRESETS``: dict of preset name to preset; the first is the default of ``--preset``;
    * ``train(job: GeneratorJob) -> Path``: trains and returns the final checkpoint;
    * optionally ``STAGES``: tuple of stage names ``--stage`` accepts (absent: one stage);
    * optionally ``USER_ERRORS``: tuple of exception classes the command reports as a one-line message
      instead of a traceback (a missing base model, a missing checkpoint to resume).

    Attributes:
        backend: backend name.
        presets: the module's ``PRESETS``.
        train: the module's ``train``.
        stages: the module's ``STAGES`` (empty: trains in one stage).
        user_errors: the module's ``USER_ERRORS``.
    """

    backend: str
    presets: dict
    train: Callable[[GeneratorJob], Path]
    stages: tuple[str, ...] = ()
    user_errors: tuple[type[BaseException], ...] = ()


def load_training(backend: str) -> BackendTraining:
    """Imports the training module of a registered backend.

    Raises:
        KeyError: for an unknown backend or one without training (the message names the trainable ones).
    """
    from nnunet_synth.generators import get_backend, trainable_backends

    module_name = get_backend(backend).training_module
    if module_name is None:
        raise KeyError(f"backend {backend!r} has no generator training; trainable backends: "
                       f"{', '.join(trainable_backends())}")
    module = importlib.import_module(module_name)
    return BackendTraining(backend, dict(module.PRESETS), module.train, tuple(getattr(module, "STAGES", ())),
                           tuple(getattr(module, "USER_ERRORS", ())))


def process_rank() -> int:
    """The process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one) and its device.

    Every rank draws its own batches (seeded by its rank) and trains a DistributedDataParallel replica; rank 0
    validates and writes checkpoints and logs while the others wait at :meth:`barrier`.
    """

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in DistributedDataParallel with several processes, else itself."""
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def average_gradients(self, parameters) -> None:
        """Averages the gradients of ``parameters`` over the ranks (for a module not wrapped in DDP, e.g. a
        discriminator called several times per step)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def check_replicas(self, modules: dict[str, torch.nn.Module]) -> str:
        """Checks that every rank holds the same parameters (a sum per tensor, gathered from all ranks).

        Returns:
            A line for the log.

        Raises:
            RuntimeError: the replicas differ (names the module).
        """
        if self.world == 1:
            return "one process"
        import torch
        import torch.distributed as dist

        for name, module in modules.items():
            with torch.no_grad():
                sums = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(self.device)
            gathered = [torch.empty_like(sums) for _ in range(self.world)]
            dist.all_gather(gathered, sums)
            if any(not torch.equal(g, gathered[0]) for g in gathered[1:]):
                raise RuntimeError(f"the {name} parameters differ between the {self.world} training processes")
        return f"parameters identical on all {self.world} ranks ({', '.join(modules)})"

    def close(self) -> None:
        """Waits for every rank and ends the process group."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def setup_distributed(device: str) -> Distributed:
    """The :class:`Distributed` of this process: under ``torchrun`` (``WORLD_SIZE`` > 1) joins the process group
    (nccl on CUDA, one GPU per local rank; gloo on CPU); otherwise rank 0 of 1 on ``device``."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(0, 1, torch.device(device))
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(),
                       torch.device(f"cuda:{local_rank}" if device == "cuda" else "cpu"))


class MixedPrecision:
    """Automatic mixed precision of one training: the autocast context and the optimiser step with its GradScaler.

    float16 autocast with a GradScaler on CUDA; bfloat16 autocast (no scaler: bfloat16 has float32's range) on
    CPU; disabled, everything runs in float32 and :meth:`step` is the plain backward/clip/step.

    Args:
        device: the training device.
        enabled: use mixed precision.
        dtype: autocast dtype (default: float16 on CUDA, bfloat16 on CPU); float16 always comes with a scaler.
    """

    def __init__(self, device: torch.device, enabled: bool, dtype: torch.dtype | None = None):
        import torch

        self.device_type = torch.device(device).type
        if enabled and dtype is None:
            dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        self.dtype = dtype if enabled else None
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def describe(self) -> str:
        """E.g. ``mixed precision float16 (autocast + GradScaler)`` or ``mixed precision off (float32)``."""
        if not self.enabled:
            return "mixed precision off (float32)"
        scaler = " + GradScaler" if self.scaler.is_enabled() else ""
        return f"mixed precision {str(self.dtype).removeprefix('torch.')} (autocast{scaler})"

    def autocast(self):
        """The forward pass's context: autocast to :attr:`dtype` (a no-op when disabled)."""
        import torch

        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters, clip_norm: float | None = None,
             before_unscale: Callable[[], None] | None = None) -> bool:
        """Zeroes the gradients, back-propagates the (scaled) loss, unscales, clips to ``clip_norm``, steps and
        updates the scale.

        Args:
            loss: the loss of the forward pass.
            optimizer: the optimiser of ``parameters``.
            parameters: the trained parameters (clipped; a list, it is iterated twice).
            clip_norm: gradient-norm clip (None: no clipping).
            before_unscale: called after backward (e.g. averaging gradients over ranks).

        Returns:
            Whether the optimiser stepped (False when the scaler skipped a step with inf/NaN gradients).
        """
        import torch

        parameters = list(parameters)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if before_unscale is not None:
            before_unscale()
        self.scaler.unscale_(optimizer)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(optimizer)
        self.scaler.update()
        return scale is None or self.scaler.get_scale() >= scale  # the scale drops only on a skipped step

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the autocast dtype and the scaler's state (scale, growth tracker)."""
        return {"dtype": str(self.dtype).removeprefix("torch.") if self.enabled else None,
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        """Restores the scaler of a resumed run (ignored where either run had no scaler)."""
        if state and state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])


def iteration_seed(*keys: int) -> int:
    """A 32-bit seed of ``keys`` (e.g. seed, rank, iteration) for torch generators: the noise of an iteration
    depends on nothing else, so a resumed run reproduces the uninterrupted one."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class _IterationBatches:
    """Batch ``i`` of a training = ``draw(numpy Generator seeded by (*seed, i))``; a map-style dataset whose index
    is the iteration, so torch's DataLoader hands iterations to its workers in turn and returns them in order."""

    def __init__(self, draw: Callable[[np.random.Generator], object], seed: tuple[int, ...], stop: int):
        self.draw, self.seed, self.stop = draw, tuple(int(s) for s in seed), int(stop)

    def __len__(self) -> int:
        return self.stop

    def __getitem__(self, iteration: int):
        return self.draw(np.random.default_rng([*self.seed, int(iteration)]))


def batch_loader(draw: Callable[[np.random.Generator], object], seed: tuple[int, ...], start: int, stop: int,
                 num_workers: int, pin_memory: bool = False):
    """Training batches of iterations ``start .. stop - 1``, drawn by ``draw`` in ``num_workers`` background
    processes (torch's DataLoader; 0: drawn in this process when the loop asks for them).

    Batch ``i`` comes from ``draw(np.random.default_rng([*seed, i]))`` whatever the worker count, so the same
    seed gives the same batches with any ``num_workers``, and a run resumed at ``start`` draws what the
    uninterrupted run drew. Put the rank into ``seed`` so every rank draws its own batches.

    Args:
        draw: makes one batch (numpy arrays, or tuples/dicts/lists of them and of strings) from a Generator.
        seed: the seed keys, e.g. ``(seed, stage, rank)``.
        start, stop: the iterations to draw.
        num_workers: background processes (``-np``); 0 draws in the calling process.
        pin_memory: pin the batches' memory (faster copies to CUDA).

    Returns:
        An iterator of batches (numpy arrays become tensors where workers are used).
    """
    batches = _IterationBatches(draw, seed, stop)
    if num_workers <= 0:
        return (batches[i] for i in range(start, stop))
    from torch.utils.data import DataLoader

    return iter(DataLoader(batches, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                           pin_memory=pin_memory, prefetch_factor=2))


def as_tensor(array) -> torch.Tensor:
    """A batch array from :func:`batch_loader` (a numpy array in-process, a tensor from a worker) as a tensor."""
    import torch

    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))


@dataclass(frozen=True)
class TumourSite:
    """One real tumour (connected component): its case, centre and bounding-box size in voxels."""

    case: str
    centre: tuple[int, ...]
    size: tuple[int, ...]


def find_tumours(dataset, cases: list[str], tumour_label: int, min_voxels: int = MIN_TUMOUR_VOXELS
                 ) -> list[TumourSite]:
    """Connected components of the tumour label with at least ``min_voxels`` voxels, per case."""
    sites = []
    for case in tqdm(cases, desc="finding tumours", unit="case", disable=process_rank() != 0):
        seg = np.asarray(dataset.load_case(case)[1][0])
        components, n = connected_components(seg == tumour_label)
        if not n:
            continue
        sizes = np.bincount(components.ravel())
        for index, box in enumerate(find_objects(components), start=1):
            if box is None or sizes[index] < min_voxels:
                continue
            sites.append(TumourSite(case, tuple((s.start + s.stop) // 2 for s in box),
                                    tuple(s.stop - s.start for s in box)))
    return sites


class PatchSource:
    """Crops (image, mask) training patches around tumour sites from nnU-Net's preprocessed cases.

    Args:
        dataset: nnU-Net dataset object of the configuration (``load_case``).
        patch_size: spatial patch size (z, y, x).
        tumour_label: label value of the tumour; its voxels in the patch form the mask.
    """

    def __init__(self, dataset, patch_size: tuple[int, ...], tumour_label: int):
        self.dataset = dataset
        self.patch_size = tuple(int(p) for p in patch_size)
        self.tumour_label = tumour_label

    def crop(self, site: TumourSite, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        """Patch around ``site``; with ``rng`` randomly shifted (the tumour stays inside if it fits) and flipped.

        Returns:
            float32 image (C, *patch) and float32 mask (1, *patch) in {0, 1}.
        """
        from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

        data, seg, _, _ = self.dataset.load_case(site.case)
        centre = np.array(site.centre)
        if rng is not None:
            slack = np.maximum(np.array(self.patch_size) - np.array(site.size), 0) // 2
            centre = centre + rng.integers(-slack, slack + 1)
        lower = centre - np.array(self.patch_size) // 2
        bbox = [[0, data.shape[0]]] + [[int(lo), int(lo) + p] for lo, p in zip(lower, self.patch_size)]
        image = np.asarray(crop_and_pad_nd(data, bbox, 0), dtype=np.float32)
        seg_bbox = [[0, 1]] + bbox[1:]
        mask = (np.asarray(crop_and_pad_nd(seg, seg_bbox, -1)) == self.tumour_label).astype(np.float32)
        if rng is not None:
            flips = tuple(a + 1 for a in range(len(self.patch_size)) if rng.uniform() < 0.5)
            if flips:
                image, mask = np.flip(image, flips), np.flip(mask, flips)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def split_generator_cases(sites: list[TumourSite], seed: int) -> tuple[list[str], list[str]]:
    """Holds out about 10% (at least one) of the cases with tumours for the generator's validation loss."""
    cases = sorted({s.case for s in sites})
    if len(cases) < 2:
        raise RuntimeError(f"the generator needs real tumours in at least two training cases (one is held out for "
                           f"its validation loss); found tumours in {len(cases)}")
    n_val = max(1, int(round(VAL_CASE_SHARE * len(cases))))
    val = sorted(np.random.default_rng(seed).choice(cases, n_val, replace=False).tolist())
    return [c for c in cases if c not in val], val


def intensity_range(source: PatchSource, sites: list[TumourSite], seed: int) -> list[list[float]]:
    """Per-channel 0.05/99.95 percentiles over training crops: generated values are clipped to it."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(sites), min(len(sites), MAX_INTENSITY_CROPS), replace=False)
    images = np.stack([source.crop(sites[i], None)[0] for i in picks])
    flat = images.transpose(1, 0, 2, 3, 4).reshape(images.shape[1], -1)
    return [[float(v) for v in np.percentile(ch, [0.05, 99.95])] for ch in flat]


def plot_losses(path: Path, train_loss: list[float], history: list[dict]) -> None:
    """Loss plot: training loss (moving average) and validation loss against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    losses = np.asarray(train_loss)
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid") if len(losses) >= window else losses
    ax.plot(np.arange(window, window + len(smooth)), smooth, label=f"training loss (mean of {window})")
    if history:
        ax.plot([h["iteration"] for h in history], [h["val_loss"] for h in history], "o-", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("masked noise MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def append_log(output_dir: Path, message: str) -> None:
    """Appends a time-stamped line to ``training_log.txt`` in ``output_dir``."""
    with open(output_dir / "training_log.txt", "a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {message}\n")
