"""A tiny, randomly initialised Stable Diffusion 1.x pipeline for tests and CPU benchmarks.

Built from small configs as diffusers' own pipeline tests do (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel) with a CLIP tokenizer whose vocabulary (characters and the caption words) and merges are
written here, then saved in ``save_pretrained`` layout: the folder works as ``--base-model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nnunet_synth.extras import require_extra
from nnunet_synth.generators.sd_inversion.captions import NO_TUMOUR_TEMPLATES, SIZE_WORDS, TUMOUR_TEMPLATES

MAX_TOKENS = 77


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A character-level CLIP BPE vocabulary with whole-word tokens for the caption words, and its merges."""
    text = " ".join([*TUMOUR_TEMPLATES, *NO_TUMOUR_TEMPLATES, *SIZE_WORDS.values()]).lower()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(set(text) - {" "}):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def build_tiny_base_model(folder: str | Path, resolution: int = 32, seed: int = 0) -> Path:
    """Writes a tiny Stable Diffusion pipeline (VAE factor 2, two UNet levels) of ``resolution`` to ``folder``."""
    require_extra("sd", "diffusers", "transformers")
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    vocab, merges = _write_tokenizer_files(folder / ".tokenizer_source")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=resolution // 2,
                                    in_channels=4, out_channels=4, norm_num_groups=4, attention_head_dim=2,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16)
        vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=4, sample_size=resolution)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32,
            num_attention_heads=2, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder
