"""2D Stable Diffusion backend of the breast MRI 2D paper (Luna et al.): LoRA fine-tuning of a local Stable
Diffusion 1.x pipeline on nnU-Net's 2d slices captioned by tumour size (captions, components, training) and
tumour insertion by edit-friendly DDPM inversion (inversion, backend, registered as ``sd_inversion``)."""

from nnunet_synth.generators.sd_inversion import backend  # noqa: F401  (registers "sd_inversion")
