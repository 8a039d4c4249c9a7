"""The three training stages of the ``ldm`` backend on nnU-Net's preprocessed data (breast SynBT paper).

1. ``vqvae``: the whole VQ-VAE (encoder, EMA codebook, decoder) on random sub-patches of ``vq_patch_size``;
   L1 reconstruction + commitment loss (+ optional patch-GAN loss).
2. ``vqvae-volume``: whole ``volume_size`` crops are encoded tile by tile with the frozen encoder, the latents
   reassembled on their grid and quantised with the frozen codebook; only the decoder is fine-tuned, on the
   whole volume, which removes the grid artefacts of patch-only decoding.
3. ``diffusion``: a latent U-Net learns to restore the real tumour's latent from noise, conditioned on the
   latent of the tumour-removed volume and the mask on the latent grid (1000-step schedule).

Each stage writes ``checkpoint_{latest,best,final}.pth`` (stages 1-2 in ``stage_vqvae/`` and
``stage_vqvae_volume/`` of the fold folder, stage 3 in the fold folder itself, holding the autoencoder too, so
the ``ldm`` generator loads one file) and starts from the previous stage's best checkpoint. A few training-fold
cases with tumours are held out of every stage for its validation loss. ``torchrun`` runs one process per GPU with
DistributedDataParallel (every rank draws its own batches, rank 0 validates and writes; all ranks read the previous
stage's checkpoint, so several nodes need a shared ``nnUNet_results``); batches are drawn in background processes
(``-np``), mixed precision on CUDA (``--amp``).
"""

from __future__ import annotations

from pathlib import Path

from nnunet_synth.generators.checkpoints import GeneratorCheckpointError
from nnunet_synth.generators.ldm.autoencoder_training import PerceptualNetworkError, train_volume, train_vqvae
from nnunet_synth.generators.ldm.diffusion_training import train_diffusion
from nnunet_synth.generators.ldm.model import PRESETS, get_preset
from nnunet_synth.generators.ldm.stages import STAGES, StageData, stage_dir
from nnunet_synth.generators.training_utils import append_log, setup_distributed

__all__ = ["PRESETS", "STAGES", "USER_ERRORS", "stage_dir", "train"]

# errors the command reports as a message (no traceback)
USER_ERRORS = (GeneratorCheckpointError, PerceptualNetworkError)

_STAGE_TRAINERS = {"vqvae": train_vqvae, "vqvae-volume": train_volume, "diffusion": train_diffusion}


def _finished(folder: Path) -> bool:
    return (folder / "checkpoint_final.pth").is_file()


def train(job) -> Path:
    """Trains the stage ``job.stage`` of the LDM, or every stage in order when it is None.

    With ``job.resume`` (``--c``), a stage continues from its latest checkpoint; when all stages run, finished
    stages are skipped and stages never started start from the previous stage.

    Returns:
        Path of the last trained stage's final checkpoint.
    """
    stage = getattr(job, "stage", None)
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown ldm stage {stage!r}; stages: {', '.join(STAGES)}")
    preset = get_preset(job.preset)
    preset.check()
    dist = setup_distributed(job.device)
    data = StageData(job, preset, dist)
    Path(job.output_dir).mkdir(parents=True, exist_ok=True)
    path = None
    for name in [stage] if stage else STAGES:
        folder = stage_dir(job.output_dir, name)
        resume = bool(job.resume)
        if resume and stage is None:
            if _finished(folder):
                if dist.is_main:
                    append_log(Path(job.output_dir),
                               f"[{name}] already finished ({folder / 'checkpoint_final.pth'}); skipped")
                path = folder / "checkpoint_final.pth"
                continue
            resume = (folder / "checkpoint_latest.pth").is_file()
        elif resume and not (folder / "checkpoint_latest.pth").is_file():
            raise GeneratorCheckpointError(f"--c given but {folder / 'checkpoint_latest.pth'} does not exist; "
                                           f"start the {name} stage without --c")
        path = _STAGE_TRAINERS[name](job, data, preset, resume)
    dist.close()
    return path
