"""Patch-to-volume VQ-VAE + mask-conditioned latent diffusion backend of the breast SynBT paper: presets and
networks (model), patch-wise latent encoding and conditioned DDIM inpainting (sampling), the three training
stages on nnU-Net's preprocessed data (training), GPU inpainting of batches (online) and the registered
``ldm`` generator (backend)."""

from nnunet_synth.generators.ldm import backend  # noqa: F401  (registers "ldm")
