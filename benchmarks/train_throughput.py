"""Training throughput of the LGP trainer: images and latent pixels per second, and peak memory.

Times the trainer's own step (`pipeline_sketch_guided.training.train_lgp.lgp_loss`: caption encoding, noising, the
frozen UNet forward up to the last captured block, the LGP forward and backward, the optimizer step) on random data,
after warm-up steps. VAE latents are taken as cached (`--cache_latents`); `--include_vae` also encodes the images and
edge maps every step.

    python -m benchmarks.train_throughput --model tiny --batch_size 8               # CPU, tiny random model
    python -m benchmarks.train_throughput --model sd15-random --resolution 512 --batch_size 8 --mixed_precision fp16
    python -m benchmarks.train_throughput --model sdxl-random --batch_size 4 --mixed_precision fp16   # SDXL, 1024 px
    python -m benchmarks.train_throughput --model <hub id or folder of a Stable Diffusion (XL) model> ...

`sd15-random` and `sdxl-random` are Stable Diffusion 1.5's and XL's architectures (UNet, VAE, text encoders) randomly
initialised: the cost of a step does not depend on the weights, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from benchmarks.models import build_pipeline
from pipeline_sketch_guided import LGPModel
from pipeline_sketch_guided.training.denoisers import training_denoiser
from pipeline_sketch_guided.training.train_lgp import (
    encode_latents,
    freeze,
    last_block_to_run,
    lgp_loss,
    load_base,
)
from pipeline_sketch_guided.utils import device_name

# Every step encodes this caption for each image of the batch, as the trainer encodes its captions.
CAPTION = "a red square and a blue circle on a grey background"


def build_base(model: str, dtype: torch.dtype, device: torch.device):
    """The frozen base pipeline (SD or SDXL, no LGP) for a benchmark model or a pretrained one, on `device`."""
    if model in ("tiny", "tiny-sdxl", "sd15-random", "sdxl-random"):
        base = freeze(build_pipeline(model, dtype=dtype, device=str(device)))
        base.lgp = None
    else:
        base = load_base(model, dtype)  # as the trainer loads it
    return base.to(device, dtype)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated"
    # Linux reports ru_maxrss in KiB: the whole process's peak resident memory, weights and Python included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny, tiny-sdxl, sd15-random, sdxl-random, or a Hub id / folder of an SD or SDXL model.",
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="Default: 32 for tiny models, 1024 for SDXL, 512 otherwise."
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_preset", default="sketch2img")
    parser.add_argument("--hidden_dims", type=int, nargs="+", default=[512, 256, 128, 64])
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--include_vae", action="store_true", help="Encode images and edge maps every step.")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    resolution = args.resolution or (32 if args.model.startswith("tiny") else 1024 if "xl" in args.model else 512)

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    device = accelerator.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if dtype == torch.float16 and device.type != "cuda":
        raise SystemExit("fp16 needs a CUDA GPU; use --mixed_precision bf16 or no on the CPU.")
    base = build_base(args.model, dtype, device)
    unet, scheduler = base.unet, DDPMScheduler.from_config(base.scheduler.config)
    denoiser = training_denoiser(base, resolution)
    torch.manual_seed(0)
    lgp = LGPModel.from_unet(unet, preset=args.block_preset, hidden_dims=args.hidden_dims).train()
    optimizer = torch.optim.AdamW(lgp.parameters(), lr=1e-4)
    lgp, optimizer = accelerator.prepare(lgp, optimizer)
    config = accelerator.unwrap_model(lgp).config

    latent_size = resolution // base.vae_scale_factor
    batch = args.batch_size
    captions = [CAPTION] * batch
    pixels = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    latents = torch.randn(batch, 4, latent_size, latent_size, device=device)
    edge_latents = torch.randn_like(latents)
    with torch.no_grad():
        probe_conditioning = denoiser.conditioning(captions[:1], config.feature_branch)
        probe, zero = latents[:1], torch.zeros(1, dtype=torch.long, device=device)
        stop_block = unet.get_submodule(
            last_block_to_run(unet, config.blocks, lambda: denoiser.forward(probe, zero, probe_conditioning))
        )

    def step() -> float:
        with torch.no_grad():
            conditioning = denoiser.conditioning(captions, config.feature_branch)
            image_latents, target = latents, edge_latents
            if args.include_vae:
                image_latents, target = encode_latents(base, pixels), encode_latents(base, pixels)
            noise = torch.randn_like(image_latents, dtype=torch.float32)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        loss = lgp_loss(denoiser, lgp, config, image_latents, target, conditioning, timesteps, noise, stop_block)
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
        "device": device_name(device),
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
