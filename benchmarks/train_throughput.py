"""Training throughput of the LGP trainer: images and latent pixels per second, and peak memory.

Times the trainer's own step (`pipeline_sketch_guided.training.train_lgp.lgp_loss`: caption encoding, noising, the
frozen UNet forward up to the last captured block, the LGP forward and backward, the optimizer step) on random data,
after warm-up steps. VAE latents are taken as cached (`--cache_latents`); `--include_vae` also encodes the images and
edge maps every step.

    python -m benchmarks.train_throughput --model tiny --batch_size 8               # CPU, tiny random model
    python -m benchmarks.train_throughput --model sd15-random --resolution 512 --batch_size 8 --mixed_precision fp16
    python -m benchmarks.train_throughput --model <hub id or folder of a Stable Diffusion model> ...

`sd15-random` is Stable Diffusion 1.5's architecture (UNet, VAE, CLIP ViT-L/14 text encoder) randomly initialised:
the cost of a step does not depend on the weights, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from benchmarks.models import SD15_SCHEDULER, SD15_TEXT, SD15_UNET, SD15_VAE
from pipeline_sketch_guided import LGPModel
from pipeline_sketch_guided.testing import tiny_components
from pipeline_sketch_guided.training.train_lgp import encode_latents, last_block_to_run, lgp_loss
from pipeline_sketch_guided.utils import dtype_kwargs


def build_components(
    model: str, dtype: torch.dtype
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, int, DDPMScheduler]:
    """(unet, vae, text encoder, token sequence length, noise scheduler) for a benchmark model or a pretrained one."""
    if model == "tiny":
        components = tiny_components()
        unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]
        max_length = components["tokenizer"].model_max_length
        scheduler_config = components["scheduler"].config
    elif model == "sd15-random":
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        max_length, scheduler_config = SD15_TEXT["max_position_embeddings"], SD15_SCHEDULER
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            model, safety_checker=None, requires_safety_checker=False, **dtype_kwargs(dtype)
        )
        unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        max_length, scheduler_config = pipe.tokenizer.model_max_length, pipe.scheduler.config
    for module in (unet, vae, text_encoder):
        # Always: a saved model may be stored in another dtype (the demo model is float16).
        module.requires_grad_(False).eval().to(dtype)
    return unet, vae, text_encoder, max_length, DDPMScheduler.from_config(scheduler_config)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated"
    # Linux reports ru_maxrss in KiB: the whole process's peak resident memory, weights and Python included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, sd15-random, or a Hub id / folder of an SD model.")
    parser.add_argument("--resolution", type=int, default=None, help="Default: 32 for tiny, 512 otherwise.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_preset", default="sketch2img")
    parser.add_argument("--hidden_dims", type=int, nargs="+", default=[512, 256, 128, 64])
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--include_vae", action="store_true", help="Encode images and edge maps every step.")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    resolution = args.resolution or (32 if args.model == "tiny" else 512)

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    device = accelerator.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if dtype == torch.float16 and device.type != "cuda":
        raise SystemExit("fp16 needs a CUDA GPU; use --mixed_precision bf16 or no on the CPU.")
    unet, vae, text_encoder, max_length, scheduler = build_components(args.model, dtype)
    unet, vae, text_encoder = unet.to(device), vae.to(device), text_encoder.to(device)
    torch.manual_seed(0)
    lgp = LGPModel.from_unet(unet, preset=args.block_preset, hidden_dims=args.hidden_dims).train()
    optimizer = torch.optim.AdamW(lgp.parameters(), lr=1e-4)
    lgp, optimizer = accelerator.prepare(lgp, optimizer)
    config = accelerator.unwrap_model(lgp).config

    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = resolution // vae_factor
    batch = args.batch_size
    token_ids = torch.randint(0, text_encoder.config.vocab_size, (batch, max_length), device=device)
    pixels = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    latents = torch.randn(batch, 4, latent_size, latent_size, device=device)
    edge_latents = torch.randn_like(latents)
    with torch.no_grad():
        embeds = text_encoder(token_ids)[0]
        probe = latents[:1].to(dtype)
        stop_block = unet.get_submodule(
            last_block_to_run(unet, config.blocks, probe, 0, encoder_hidden_states=embeds[:1])
        )

    def step() -> float:
        with torch.no_grad():
            encoder_hidden_states = text_encoder(token_ids)[0]
            image_latents, target = latents, edge_latents
            if args.include_vae:
                image_latents, target = encode_latents(vae, pixels), encode_latents(vae, pixels)
            noise = torch.randn_like(image_latents, dtype=torch.float32)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        loss = lgp_loss(
            unet, lgp, config, image_latents, target, encoder_hidden_states, timesteps, noise, scheduler, stop_block
        )
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises the device

    for _ in range(args.warmup_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    memory, memory_kind = peak_memory_mib(device)

    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "resolution": resolution,
        "latent_size": latent_size,
        "batch_size": batch,
        "mixed_precision": args.mixed_precision,
        "include_vae": args.include_vae,
        "lgp_blocks": len(config.blocks),
        "lgp_in_features": accelerator.unwrap_model(lgp).in_features,
        "seconds_per_step": round(seconds, 4),
        "images_per_second": round(batch / seconds, 2),
        "latent_pixels_per_second": round(batch * latent_size**2 / seconds),
        "peak_memory_mib": round(memory),
        "peak_memory_kind": memory_kind,
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return result


if __name__ == "__main__":
    main()
