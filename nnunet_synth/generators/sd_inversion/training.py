"""LoRA fine-tuning of a local Stable Diffusion 1.x on nnU-Net's 2d slices (breast 2D paper, sections 2.1, 3.2).

Slices of the segmenter's training-fold cases (tumour slices, and tumour-free ones for the "no tumor" caption:
see :class:`SliceSource`) are mapped to [0, 1] by per-channel percentiles, padded to a square, resized to the
model's resolution (its native one, 512 for SD 1.x) and captioned from their tumour area counted on that
resized image, as the paper's bins are (:mod:`.captions`); tumour slices are drawn with the preset's share.
The VAE and text encoder are frozen; LoRA adapters (rank 4, lr 1e-4, batch 1 in the paper) on the UNet's
attention projections learn the usual noise-prediction loss. Checkpoints hold the LoRA weights,
the optimiser state and the configuration, including the base model folder and a fingerprint of its
configuration, which the backend checks on load. ``torchrun`` runs one process per GPU with DistributedDataParallel
(every rank draws its own slices, rank 0 evaluates and writes); slices are drawn in background processes
(``-np``), mixed precision on CUDA (``--amp``); see :mod:`nnunet_synth.generators.training_utils`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_synth.generators.checkpoints import GeneratorCheckpointError, load_checkpoint, save_checkpoint
from nnunet_synth.generators.sd_inversion.captions import TUMOUR_TEMPLATES, caption, size_class_of_area
from nnunet_synth.generators.sd_inversion.components import (
    BaseModelError,
    base_model_fingerprint,
    check_base_model,
    load_parts,
    lora_state,
    to_model,
    to_unit,
)
from nnunet_synth.generators.training_utils import (
    MixedPrecision,
    append_log,
    as_tensor,
    batch_loader,
    iteration_seed,
    plot_losses,
    process_rank,
    setup_distributed,
)

__all__ = ["PRESETS", "USER_ERRORS", "FixedLoss", "SliceBatch", "SlicePreset", "SliceSource", "train"]

BACKEND = "sd_inversion"
MAX_INTENSITY_SLICES = 64
FIXED_LOSS_SAMPLES = 16
GRAD_CLIP_NORM = 1.0
RESUME_KEYS = ("dataset_name", "configuration", "fold", "num_channels", "preset", "resolution", "lora_rank",
               "base_model_fingerprint")
# errors the command reports as a message (no traceback)
USER_ERRORS = (BaseModelError, GeneratorCheckpointError)


@dataclass(frozen=True)
class SlicePreset:
    """Fine-tuning hyper-parameters.

    Attributes:
        lora_rank: rank of the LoRA adapters.
        learning_rate: AdamW learning rate of the adapters.
        batch_size: slices per step.
        iterations: optimiser steps (default of ``--iterations``).
        resolution: model input size; None: the base model's native resolution.
        save_every: steps between ``checkpoint_latest.pth`` writes.
        tumour_slice_share: probability that a training slice holds tumour (when both kinds exist).
    """

    lora_rank: int = 4
    learning_rate: float = 1e-4
    batch_size: int = 1
    iterations: int = 60000
    resolution: int | None = None
    save_every: int = 1000
    tumour_slice_share: float = 0.5


PRESETS = {
    "paper": SlicePreset(),  # Stable Diffusion v1.4, LoRA rank 4, lr 1e-4, batch 1, 60000 steps
    "tiny": SlicePreset(learning_rate=1e-2, batch_size=2, iterations=40, save_every=10),  # tests, CPU
}


class SliceSource:
    """Slices of nnU-Net's preprocessed (C, Z, Y, X) cases with their tumour area, drawn with a tumour share.

    Tumour slices hold the tumour label; tumour-free slices (the "no tumor" caption, the paper's healthy
    slices) hold none: with an organ label those showing the organ (where tumours are inserted), without one
    every slice with image content (not only nnU-Net's -1 padding). The tumour area is counted on the mask as the
    model sees it (:func:`~nnunet_synth.generators.sd_inversion.captions.model_area`) when ``resolution`` is
    given, in slice pixels otherwise.

    Args:
        dataset: nnU-Net dataset of the training-fold cases.
        cases: the training-fold case identifiers.
        tumour_label: label value of tumours.
        tumour_share: probability that a drawn slice holds tumour (when both kinds exist).
        organ_label: label of the organ tumours are inserted into, or None.
        resolution: model input size the areas are counted at; None: pixels of the slice.
    """

    def __init__(self, dataset, cases: list[str], tumour_label: int, tumour_share: float,
                 organ_label: int | None = None, resolution: int | None = None):
        from nnunet_synth.generators.sd_inversion.captions import model_area

        self.dataset, self.tumour_share = dataset, tumour_share
        self.tumour, self.plain = [], []
        for case in tqdm(cases, desc="indexing slices", unit="case", disable=process_rank() != 0):
            seg = np.asarray(dataset.load_case(case)[1][0])
            if seg.ndim != 3:
                raise ValueError(f"case {case}: expected a (Z, Y, X) segmentation, got shape {seg.shape}")
            tumour = seg == tumour_label
            has_tumour = tumour.any(axis=(1, 2))
            # a dataset labelling only tumours has no organ slices: its tumour-free slices are all the others
            healthy = (seg == organ_label).any(axis=(1, 2)) if organ_label is not None else (seg >= 0).any(axis=(1, 2))
            for z in np.flatnonzero(has_tumour):
                area = int(tumour[z].sum()) if resolution is None else model_area(tumour[z], resolution)
                self.tumour.append((case, int(z), area))
            self.plain.extend((case, int(z), 0) for z in np.flatnonzero(healthy & ~has_tumour))
        if not self.tumour and not self.plain:
            raise RuntimeError(f"no slices found in the training cases {cases[:5]}")

    def counts(self) -> dict:
        return {"tumour_slices": len(self.tumour), "no_tumour_slices": len(self.plain)}

    def draw(self, rng: np.random.Generator) -> tuple[str, int, int]:
        pool = self.tumour if self.tumour and (not self.plain or rng.uniform() < self.tumour_share) else self.plain
        return pool[int(rng.integers(len(pool)))]

    def load(self, case: str, z: int) -> np.ndarray:
        return np.asarray(self.dataset.load_case(case)[0][:, z], dtype=np.float32)


def intensity_range(source: SliceSource, seed: int) -> list[list[float]]:
    """Per-channel 0.5/99.5 percentiles over up to 64 training slices: the range mapped to [0, 1]."""
    rng = np.random.default_rng([seed, 3])
    slices = np.stack([source.load(*source.draw(rng)[:2]) for _ in range(MAX_INTENSITY_SLICES)])
    flat = slices.transpose(1, 0, 2, 3).reshape(slices.shape[1], -1)
    return [[float(v) for v in np.percentile(ch, [0.5, 99.5])] for ch in flat]


@dataclass(frozen=True)
class SliceBatch:
    """Draws one training batch: [0, 1] slices (B, C, Y, X) and their captions (a caption template drawn per
    slice); picklable, so background loader processes can run it."""

    source: SliceSource
    intensity_range: list[list[float]]
    batch_size: int

    def __call__(self, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        drawn = [self.source.draw(rng) for _ in range(self.batch_size)]
        unit = np.stack([to_unit(self.source.load(case, z), self.intensity_range) for case, z, _ in drawn])
        prompts = [caption(size_class_of_area(area), int(rng.integers(len(TUMOUR_TEMPLATES)))) for *_, area in drawn]
        return unit, prompts


class FixedLoss:
    """Noise-prediction loss on fixed slices, noise and timesteps: comparable across the whole fine-tuning."""

    def __init__(self, source: SliceSource, intensity_range: list[list[float]], resolution: int, seed: int,
                 samples: int = FIXED_LOSS_SAMPLES):
        rng = np.random.default_rng([seed, 5])
        drawn = [source.draw(rng) for _ in range(samples)]
        self.unit = [to_unit(source.load(case, z), intensity_range)[None] for case, z, _ in drawn]
        self.prompts = [caption(size_class_of_area(area)) for *_, area in drawn]
        self.resolution, self.seed = resolution, seed

    @torch.no_grad()
    def __call__(self, parts) -> float:
        was_training = parts.unet.training
        parts.unet.eval()
        device = parts.unet.device
        generator = torch.Generator().manual_seed(self.seed)
        losses = []
        for unit, prompt in zip(self.unit, self.prompts):
            latents = parts.encode_images(to_model(torch.from_numpy(unit).to(device), self.resolution))
            noise = torch.randn(latents.shape, generator=generator).to(device)
            t = torch.randint(0, parts.scheduler.config.num_train_timesteps, (1,), generator=generator).to(device)
            target = parts.scheduler.get_velocity(latents, noise, t) \
                if parts.scheduler.config.prediction_type == "v_prediction" else noise
            pred = parts.unet(parts.scheduler.add_noise(latents, noise, t), t,
                              encoder_hidden_states=parts.encode_prompts([prompt])).sample
            losses.append(float(torch.nn.functional.mse_loss(pred.float(), target.float())))
        parts.unet.train(was_training)
        return float(np.mean(losses))


def train(job) -> Path:
    """Fine-tunes LoRA adapters for ``job`` (a :class:`nnunet_synth.generators.training_utils.GeneratorJob`).

    Raises:
        BaseModelError: no ``job.base_model`` or an incomplete folder (the message names the layout needed).
        ValueError: a 3D configuration.

    Returns:
        Path of the final checkpoint.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_synth.planning import load_synth_plan, preprocessed_dir, write_json_atomic

    folder = check_base_model(getattr(job, "base_model", None))
    preset = PRESETS[job.preset]
    iterations = int(job.iterations if job.iterations is not None else preset.iterations)
    plans = PlansManager(load_json(preprocessed_dir(job.dataset_name) / f"{job.plans_identifier}.json"))
    conf = plans.get_configuration(job.configuration)
    if len(conf.patch_size) != 2:
        raise ValueError(f"the sd_inversion generator is 2D; configuration {job.configuration} is 3D (use -c 2d)")
    synth_plan = load_synth_plan(job.dataset_name, job.configuration, job.plans_identifier)
    dist = setup_distributed(job.device)
    device = dist.device
    amp = MixedPrecision(device, job.amp)
    parts = load_parts(folder, device, lora_rank=preset.lora_rank, seed=job.seed)
    resolution = int(preset.resolution or parts.native_resolution)
    dataset = infer_dataset_class(str(job.preprocessed_folder))(str(job.preprocessed_folder), list(job.cases))
    source = SliceSource(dataset, list(job.cases), synth_plan.tumour_label, preset.tumour_slice_share,
                         organ_label=synth_plan.organ_label, resolution=resolution)
    config = {
        "backend": BACKEND, "preset": job.preset, "preset_params": asdict(preset),
        "dataset_name": str(job.dataset_name), "configuration": job.configuration,
        "plans_identifier": job.plans_identifier, "fold": job.fold,
        "num_channels": int(source.load(*source.draw(np.random.default_rng(0))[:2]).shape[0]),
        "spacing": [float(s) for s in conf.spacing], "normalization_schemes": list(conf.normalization_schemes),
        "tumour_label": synth_plan.tumour_label, "intensity_range": intensity_range(source, job.seed),
        # the size captions' areas are pixels of this resolution (the backend counts the target's the same way)
        "resolution": resolution, "caption_resolution": resolution, "lora_rank": preset.lora_rank,
        "base_model": str(folder),
        "base_model_fingerprint": base_model_fingerprint(folder),
        "prediction_type": parts.scheduler.config.prediction_type, "train_cases": list(job.cases),
        **source.counts(), "iterations": iterations, "seed": job.seed, "world_size": dist.world,
        "amp": amp.state_dict()["dtype"], "num_workers": job.num_workers,
    }
    params = [p for p in parts.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=preset.learning_rate)
    noise_gen = torch.Generator(device=device)
    iteration, train_loss, history = 0, [], []
    out = Path(job.output_dir)
    if job.resume:
        latest = out / "checkpoint_latest.pth"
        if not latest.is_file():
            raise GeneratorCheckpointError(f"--c given but {latest} does not exist; start without --c")
        state = load_checkpoint(latest, BACKEND, {k: config[k] for k in RESUME_KEYS})
        from nnunet_synth.generators.sd_inversion.components import load_lora_state

        load_lora_state(parts.unet, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        amp.load_state_dict(state.get("amp"))
        iteration, train_loss = int(state["iteration"]), list(state["train_loss"])
        history = list(state["history"])
        config["intensity_range"] = state["config"]["intensity_range"]
    fixed_loss = None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        start = f"resumed at iteration {iteration}" if job.resume else "started"
        append_log(out, f"{start}: preset {job.preset}, base model {folder}, resolution {resolution}, "
                  f"{source.counts()}, {dist.world} process(es), device {device}, {amp.describe()}, "
                  f"{job.num_workers} loader worker(s) per process")
        fixed_loss = FixedLoss(source, config["intensity_range"], resolution, job.seed)
        if not history:
            history.append({"iteration": 0, "fixed_loss": fixed_loss(parts)})

    def save(name: str, resumable: bool = True) -> None:
        """LoRA weights and configuration; the latest checkpoint also the optimiser and scaler states (resume)."""
        state = {"backend": BACKEND, "config": config, "lora": lora_state(parts.unet), "iteration": iteration,
                 "train_loss": train_loss, "history": history}
        if resumable:
            state.update(optimizer=optimizer.state_dict(), amp=amp.state_dict())
        save_checkpoint(state, out / name)

    scheduler = parts.scheduler
    net = dist.wrap(parts.unet)
    parts.unet.train()
    # every batch and its noise depend on (seed, rank, iteration) only: reproducible for any -np, exact on resume
    batches = batch_loader(SliceBatch(source, config["intensity_range"], preset.batch_size), (job.seed, 11, dist.rank),
                           iteration, iterations, job.num_workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=iterations, initial=iteration, desc="sd_inversion LoRA", unit="it", disable=not dist.is_main)
    for unit, prompts in batches:
        noise_gen.manual_seed(iteration_seed(job.seed, dist.rank, iteration))
        latents = parts.encode_images(to_model(as_tensor(unit).to(device), resolution), noise_gen)
        noise = torch.randn(latents.shape, generator=noise_gen, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(prompts),), generator=noise_gen,
                          device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t) if config["prediction_type"] == "v_prediction" else noise
        with torch.no_grad():
            text = parts.encode_prompts(list(prompts))
        with amp.autocast():
            pred = net(noisy, t, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        amp.step(loss, optimizer, params, GRAD_CLIP_NORM)
        iteration += 1
        train_loss.append(round(float(loss.detach()), 6))
        if not math.isfinite(train_loss[-1]):
            raise RuntimeError(f"sd_inversion fine-tuning diverged at iteration {iteration} (loss {train_loss[-1]})")
        bar.update(1)
        if iteration % preset.save_every == 0 or iteration == iterations:
            if dist.is_main:
                recent = float(np.mean(train_loss[-preset.save_every:]))
                history.append({"iteration": iteration, "train_loss": recent, "fixed_loss": fixed_loss(parts)})
                append_log(out, f"iteration {iteration}: training loss {recent:.5f}, fixed-batch loss "
                          f"{history[-1]['fixed_loss']:.5f}")
                save("checkpoint_latest.pth")
                write_json_atomic({"config": config, "history": history, "train_loss": train_loss},
                                  out / "training_log.json")
                plot_losses(out / "progress.png", train_loss,
                      [{"iteration": h["iteration"], "val_loss": h["fixed_loss"]} for h in history])
            dist.barrier()
    bar.close()
    replicas = dist.check_replicas({"unet": parts.unet})
    if dist.is_main:
        save("checkpoint_final.pth", resumable=False)
        append_log(out, f"finished at iteration {iteration}; {replicas}")
        print(json.dumps({"output": str(out), "iteration": iteration}))
    dist.close()
    return out / "checkpoint_final.pth"
