"""3D DDPM inpainting backend of the liver-MRI paper: presets and network (model), training on nnU-Net's
preprocessed data (training), masked DDIM inpainting (sampling) and the registered ``ddpm`` generator
(backend)."""

from nnunet_synth.generators.ddpm import backend  # noqa: F401  (registers "ddpm")
