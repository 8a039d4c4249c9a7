"""What the three ``ldm`` training stages share: the fold's data, the stage loop (batches drawn in background
processes, validation, checkpoints, logs, resume, DDP ranks) and the hand-over from one stage to the next."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_synth.generators.checkpoints import (
    GeneratorCheckpointError,
    iteration_checkpoint_name,
    load_checkpoint,
    save_checkpoint,
)
from nnunet_synth.generators.ldm.model import NUM_TRAIN_TIMESTEPS
from nnunet_synth.generators.training_utils import (
    Distributed,
    MixedPrecision,
    PatchSource,
    append_log,
    batch_loader,
    find_tumours,
    iteration_seed,
    plot_losses,
    split_generator_cases,
)

BACKEND = "ldm"
STAGES = ("vqvae", "vqvae-volume", "diffusion")
_STAGE_DIRS = {"vqvae": "stage_vqvae", "vqvae-volume": "stage_vqvae_volume", "diffusion": "."}
VAL_CROPS = 8
GRAD_CLIP_NORM = 1.0
SCALE_CROPS = 8
# config entries a resumed stage (and a stage built on the previous one) must share with the checkpoint
RESUME_KEYS = ("dataset_name", "configuration", "fold", "num_channels", "preset", "tumour_label")


def stage_dir(output_dir: Path, stage: str) -> Path:
    """Folder of a stage's checkpoints: ``stage_vqvae``, ``stage_vqvae_volume`` or the fold folder (diffusion)."""
    return (Path(output_dir) / _STAGE_DIRS[stage]).resolve()


class StageData:
    """The fold's preprocessed cases, its tumours, the generator's own train/validation split and this process's
    place in a ``torchrun`` job (``dist``)."""

    def __init__(self, job, preset, dist: Distributed):
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from nnunet_synth.planning import load_synth_plan, preprocessed_dir

        plan = load_synth_plan(job.dataset_name, job.configuration, job.plans_identifier)
        plans = PlansManager(load_json(preprocessed_dir(job.dataset_name) / f"{job.plans_identifier}.json"))
        conf = plans.get_configuration(job.configuration)
        if len(conf.patch_size) != 3:
            raise ValueError(f"the ldm generator is 3D; configuration {job.configuration} is 2D")
        self.dataset = infer_dataset_class(str(job.preprocessed_folder))(str(job.preprocessed_folder),
                                                                        list(job.cases))
        self.dist = dist
        self.tumour_label = plan.tumour_label
        self.sites = find_tumours(self.dataset, list(job.cases), self.tumour_label)
        if len({s.case for s in self.sites}) < 2:
            raise RuntimeError(f"the ldm generator needs real tumours (label {self.tumour_label}) in at least two "
                               f"training cases of fold {job.fold} (one is held out for validation); found them in "
                               f"{len({s.case for s in self.sites})}")
        tumour_train, self.val_cases = split_generator_cases(self.sites, job.seed)
        self.train_cases = [c for c in job.cases if c not in self.val_cases]  # the autoencoder sees all others
        self.train_sites = [s for s in self.sites if s.case in tumour_train]
        self.val_sites = [s for s in self.sites if s.case in self.val_cases]
        self.volumes = PatchSource(self.dataset, preset.volume_size, self.tumour_label)
        self.num_channels = int(self.dataset.load_case(job.cases[0])[0].shape[0])
        self.config = {
            "backend": BACKEND, "preset": job.preset, "preset_params": preset.to_dict(),
            "dataset_name": str(job.dataset_name), "configuration": job.configuration,
            "plans_identifier": job.plans_identifier, "fold": job.fold, "num_channels": self.num_channels,
            "spacing": [float(s) for s in conf.spacing], "normalization_schemes": list(conf.normalization_schemes),
            "tumour_label": self.tumour_label, "volume_size": list(preset.volume_size),
            "vq_patch_size": list(preset.vq_patch_size), "train_cases": self.train_cases,
            "val_cases": self.val_cases, "segmenter_val_excluded": True, "seed": job.seed,
            "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "world_size": dist.world, "num_workers": job.num_workers,
        }

    def random_crop(self, case: str, size: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """A crop of ``size`` at a uniformly random position of ``case`` (zero-padded where the case is smaller)."""
        from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

        data = self.dataset.load_case(case)[0]
        lower = [int(rng.integers(0, max(1, n - s + 1))) for n, s in zip(data.shape[1:], size)]
        bbox = [[0, data.shape[0]]] + [[lo, lo + s] for lo, s in zip(lower, size)]
        return np.asarray(crop_and_pad_nd(data, bbox, 0), dtype=np.float32)

    def random_batch(self, cases: list[str], size: tuple[int, ...], n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` crops of :meth:`random_crop` of random ``cases`` (the stage-1 and stage-2 training batch)."""
        return np.stack([self.random_crop(cases[i], size, rng) for i in rng.integers(len(cases), size=n)])


def run_stage(job, data: StageData, stage: str, modules: dict[str, torch.nn.Module],
              optimizers: dict[str, torch.optim.Optimizer], step: Callable, validate: Callable[[], float],
              iterations: int, val_every: int, config: dict, resume: bool, draw: Callable,
              amps: dict[str, MixedPrecision], notes: tuple[str, ...] = (), save_every: int | None = None) -> Path:
    """The loop every stage shares: batches, validation, checkpoints (temp + rename), logs, resume, DDP ranks.

    Batch ``i`` is ``draw(Generator seeded by (seed, stage, rank, i))``, drawn in ``job.num_workers`` background
    processes, and the torch generator handed to ``step`` is seeded by the same keys before every step, so a
    resumed stage reproduces the uninterrupted one whatever ``-np``. Rank 0 validates, writes and logs.

    Args:
        step: ``step(iteration, batch, noise_gen)`` runs one optimiser step and returns its loss terms (dict of
            floats; the first is logged as the training loss).
        validate: the validation loss (rank 0 only).
        draw: makes one training batch from a numpy Generator.
        amps: the stage's :class:`MixedPrecision` objects by checkpoint key (their scaler states are saved).
        notes: added to the stage's start line in the log.
        save_every: also keep ``checkpoint_iter{N:07d}.pth`` (weights) every this many iterations.
    """
    dist = data.dist
    folder, out = stage_dir(job.output_dir, stage), Path(job.output_dir)
    if dist.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    device = dist.device
    index = STAGES.index(stage)
    noise_gen = torch.Generator(device=device)
    iteration, best, train_loss, history, terms = 0, math.inf, [], [], {}
    if resume:
        state = load_checkpoint(folder / "checkpoint_latest.pth", BACKEND, {k: config[k] for k in RESUME_KEYS})
        if state.get("stage") != stage:
            raise GeneratorCheckpointError(f"{folder / 'checkpoint_latest.pth'} is a {state.get('stage')!r} "
                                           f"checkpoint, not {stage!r}")
        for name, module in modules.items():
            module.load_state_dict(state[name])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state[name])
        for name, amp in amps.items():
            amp.load_state_dict(state.get(name))
        iteration, best = int(state["iteration"]), float(state["best_val_loss"])
        train_loss, history = list(state["train_loss"]), list(state["history"])
        terms = {k: list(v) for k, v in state.get("loss_terms", {}).items()}
    config = dict(config, amp=next(iter(amps.values())).state_dict()["dtype"])
    if dist.is_main:
        start = f"resumed at iteration {iteration}" if resume else "started"
        append_log(out, f"[{stage}] {start}: preset {job.preset}, "
                  f"{len(data.train_cases)} training cases ({len(data.train_sites)} tumours), held-out cases "
                  f"{data.val_cases}, {dist.world} process(es), device {device}, "
                  f"{next(iter(amps.values())).describe()}, {job.num_workers} loader worker(s) per process"
                  + "".join(f"; {n}" for n in notes))

    def save(name: str, resumable: bool = True) -> None:
        state = {"backend": BACKEND, "stage": stage, "config": config,
                 **{k: m.state_dict() for k, m in modules.items()}, "iteration": iteration, "best_val_loss": best,
                 "history": history}
        if resumable:
            state.update({k: o.state_dict() for k, o in optimizers.items()})
            state.update({k: a.state_dict() for k, a in amps.items()})
            state.update(train_loss=train_loss, loss_terms=terms)
        save_checkpoint(state, folder / name)

    batches = batch_loader(draw, (job.seed, index, dist.rank), iteration, iterations, job.num_workers,
                           pin_memory=device.type == "cuda")
    bar = tqdm(total=iterations, initial=iteration, desc=f"ldm {stage} {job.preset}", unit="it",
               disable=not dist.is_main)
    for batch in batches:
        noise_gen.manual_seed(iteration_seed(job.seed, index, dist.rank, iteration))
        values = step(iteration, batch, noise_gen)
        iteration += 1
        for name, value in values.items():
            terms.setdefault(name, []).append(round(float(value), 6))
        train_loss.append(round(float(next(iter(values.values()))), 6))
        bar.update(1)
        if dist.is_main and save_every and iteration % save_every == 0:
            save(iteration_checkpoint_name(iteration), resumable=False)
        if iteration % val_every == 0 or iteration == iterations:
            if dist.is_main:
                val_loss = validate()
                recent = float(np.mean(train_loss[-val_every:]))
                improved = val_loss < best
                best = min(best, val_loss)
                history.append({"iteration": iteration, "train_loss": recent, "val_loss": val_loss})
                append_log(out, f"[{stage}] iteration {iteration}: training loss {recent:.5f}, "
                                f"validation loss {val_loss:.5f}"
                          + (" (new best)" if improved else ""))
                save("checkpoint_latest.pth")
                if improved:
                    save("checkpoint_best.pth")
                from nnunet_synth.planning import write_json_atomic

                write_json_atomic({"stage": stage, "config": config, "history": history, "train_loss": train_loss,
                                   "loss_terms": terms}, folder / "training_log.json")
                plot_losses(folder / "progress.png", train_loss, history)
            dist.barrier()
    bar.close()
    replicas = dist.check_replicas(modules)
    if dist.is_main:
        save("checkpoint_final.pth")
        append_log(out, f"[{stage}] finished at iteration {iteration}; best validation loss {best:.5f}; {replicas}")
        print(json.dumps({"stage": stage, "output": str(folder), "iteration": iteration, "best_val_loss": best}))
    dist.barrier()  # the next stage starts from this one's checkpoints
    return folder / "checkpoint_final.pth"


def previous_stage(job, data: StageData, stage: str) -> dict:
    """Best checkpoint of the stage before ``stage``; a clear error with the command that makes it."""
    from nnunet_synth.generators.paths import train_command

    before = STAGES[STAGES.index(stage) - 1]
    path = stage_dir(job.output_dir, before) / "checkpoint_best.pth"
    command = train_command(job.dataset_name, BACKEND, job.configuration, job.fold, job.plans_identifier)
    hint = f"train it with: {command} --stage {before}"
    return load_checkpoint(path, BACKEND, {k: data.config[k] for k in RESUME_KEYS}, hint=hint)
