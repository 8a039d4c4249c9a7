"""nnunet_synth: synthetic-tumour augmentation for nnU-Net v2."""
