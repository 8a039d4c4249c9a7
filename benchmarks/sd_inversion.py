"""Slices per second and peak memory of sd_inversion tumour insertion, per device and model size.

Sizes: ``tiny`` (the tests' randomly initialised pipeline, 32 x 32 model input, 64 x 64 slice) and ``512``
(the Stable Diffusion 1.x architecture, randomly initialised from its configuration, 512 x 512 model input,
256 x 256 slice; sampling cost does not depend on the weights). ``--base-model PATH`` times a real local
model at its native resolution instead of the random 512 one. Every insertion runs the paper's recipe:
inversion with the source prompt and regeneration of ``--strength`` of ``--sampling-steps`` DDPM steps,
both with classifier-free guidance, LoRA rank 4 on the UNet.

    python benchmarks/sd_inversion.py                                  # cpu, tiny
    python benchmarks/sd_inversion.py --device cuda --size tiny 512 --num 5
    python benchmarks/sd_inversion.py --device cuda --base-model /models/sd-v1-4 --dtype float16
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nnunet_synth.generators.sd_inversion.captions import caption
from nnunet_synth.generators.sd_inversion.components import StableDiffusionParts, add_lora, load_parts
from nnunet_synth.generators.sd_inversion.insertion import InsertionSettings, insert_tumour
from nnunet_synth.generators.sd_inversion.tiny import build_tiny_base_model


def random_sd15_parts(folder: Path, device: str) -> StableDiffusionParts:
    """The Stable Diffusion 1.x architecture (UNet 320-1280 channels, 4-level VAE, CLIP ViT-L/14 text encoder)
    with random weights; the tokenizer is the tiny one (prompt token ids only index the embedding)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(build_tiny_base_model(folder / "tiny"), subfolder="tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device).eval()
    add_lora(unet, 4)
    return StableDiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, folder)


def ellipse(shape: tuple[int, int], area_px: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    r = np.sqrt(area_px / np.pi)
    return ((yy - shape[0] / 2) / r) ** 2 + ((xx - shape[1] / 2) / (0.8 * r)) ** 2 <= 1 / 0.8


def measure(parts: StableDiffusionParts, resolution: int, slice_px: int, num: int, settings: InsertionSettings,
            dtype: torch.dtype) -> dict:
    if dtype != torch.float32:
        for module in (parts.unet, parts.vae, parts.text_encoder):
            module.to(dtype)
    device = parts.unet.device
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, slice_px, slice_px)).astype(np.float32)
    mask = ellipse(image.shape[1:], min(500.0, 0.05 * slice_px ** 2))
    args = (parts, image, mask, [[-3.0, 3.0]], resolution, caption("none"), caption("medium"), settings)
    insert_tumour(*args, rng)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(num):
        insert_tumour(*args, rng)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / num
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds_per_slice": seconds, "slices_per_s": 1 / seconds, "peak_MiB": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", nargs="+", choices=["cpu", "cuda"], default=["cpu"])
    parser.add_argument("--size", nargs="+", choices=["tiny", "512"], default=["tiny"])
    parser.add_argument("--base-model", default=None, help="time a real local model instead of the random 512 one")
    parser.add_argument("--num", type=int, default=3, help="insertions timed per size and device")
    parser.add_argument("--sampling-steps", type=int, default=100)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = InsertionSettings(sampling_steps=args.sampling_steps, strength=args.strength)
    dtype = getattr(torch, args.dtype)
    print(f"{'device':<7}{'size':<7}{'steps':>6}{'s/slice':>10}{'slices/s':>10}{'peak MiB':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for device in args.device:
            for size in args.size:
                if size == "tiny":
                    parts, resolution, slice_px = load_parts(build_tiny_base_model(Path(tmp) / "t"), device, 4), 32, 64
                elif args.base_model:
                    parts = load_parts(args.base_model, device, 4)
                    resolution, slice_px = parts.native_resolution, 256
                else:
                    parts, resolution, slice_px = random_sd15_parts(Path(tmp), device), 512, 256
                result = measure(parts, resolution, slice_px, args.num, settings, dtype)
                steps = round(args.strength * args.sampling_steps)
                print(f"{device:<7}{size:<7}{steps:>6}{result['seconds_per_slice']:>10.3f}"
                      f"{result['slices_per_s']:>10.3f}{result['peak_MiB']:>10.0f}")
                del parts
                if device == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
