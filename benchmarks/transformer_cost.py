"""The cost of sketch guidance on the diffusion transformers: SD3 (medium's architecture) and FLUX.1 (dev's), random
weights.

For each family it times whole generations (`output_type="latent"`: the transformer's work, without the VAE's decode,
which guidance does not change) unguided and guided at the defaults, SD3's guided steps both "split" and "batched"
(`pipe.guided_step_mode`), and on a GPU the peak memory of each. The prompt embeddings are random tensors of the real
shapes (T5's 4096 wide), so no text encoder is built. The LGP reads the `spread` preset's blocks and predicts the map
itself (`target="map"`: no VAE encode of the sketch).

On a GPU, the real sizes:

    python -m benchmarks.transformer_cost --device cuda --dtype bfloat16 --resolution 1024

On a CPU, the real widths with fewer blocks (a check of the machinery; what the full models cost needs the GPU run):

    python -m benchmarks.transformer_cost --resolution 128 --steps 10 --sd3_layers 2 --flux_layers 1 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

from pipeline_sketch_guided import LGPModel, SketchGuidedFluxPipeline, SketchGuidedStableDiffusion3Pipeline
from pipeline_sketch_guided.guidance import DEFAULT_SKETCH_GUIDANCE_END, DEFAULT_SKETCH_GUIDANCE_SCALE

# stabilityai/stable-diffusion-3-medium-diffusers's transformer/config.json (2B parameters).
SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
# black-forest-labs/FLUX.1-dev's transformer/config.json (12B parameters).
FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# The 16-channel VAE both use (only its config matters here: the generations stop at the latents).
FLOW_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 8, 8],
    "latent_channels": 16,
    "norm_num_groups": 8,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def build(family: str, layers: list[int], dtype: torch.dtype, device: str):
    """A sketch-guided pipeline of `family` with random weights at the real widths and `layers` blocks, its LGP, and
    the prompt embeddings to call it with."""
    torch.manual_seed(0)
    with torch.device(device):
        if family == "sd3":
            transformer = SD3Transformer2DModel(**{**SD3_MEDIUM, "num_layers": layers[0]}).to(dtype)
            vae = AutoencoderKL(**FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609)
        else:
            config = {**FLUX_DEV, "num_layers": layers[0], "num_single_layers": layers[1]}
            transformer = FluxTransformer2DModel(**config).to(dtype)
            vae = AutoencoderKL(**FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159)
        lgp = LGPModel.from_transformer(transformer, target="map").eval().to(dtype)
    vae = vae if dtype == torch.float32 else vae.to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    if family == "sd3":
        pipe = SketchGuidedStableDiffusion3Pipeline(
            transformer, scheduler, vae, None, None, None, None, None, None, lgp=lgp
        )
        embeds = {
            "prompt_embeds": torch.randn(1, 333, 4096),
            "negative_prompt_embeds": torch.randn(1, 333, 4096),
            "pooled_prompt_embeds": torch.randn(1, 2048),
            "negative_pooled_prompt_embeds": torch.randn(1, 2048),
        }
    else:
        pipe = SketchGuidedFluxPipeline(scheduler, vae, None, None, None, None, transformer, lgp=lgp)
        embeds = {"prompt_embeds": torch.randn(1, 512, 4096), "pooled_prompt_embeds": torch.randn(1, 768)}
    pipe.set_progress_bar_config(disable=True)
    return pipe, {name: value.to(device, dtype) for name, value in embeds.items()}


def square_sketch(size: int) -> PIL.Image.Image:
    array = np.full((size, size), 255, dtype=np.uint8)
    low, high = size // 4, 3 * size // 4
    width = max(2, size // 128)
    array[low : low + width, low:high] = array[high - width : high, low:high] = 0
    array[low:high, low : low + width] = array[low:high, high - width : high] = 0
    return PIL.Image.fromarray(array)


def timed(pipe, kwargs: dict[str, Any], runs: int, device: str) -> dict[str, Any]:
    """Median seconds of `runs` generations after a warm-up one; on a GPU, the peak memory of one."""
    seconds, peak = [], None
    for run in range(runs + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        pipe(generator=torch.Generator().manual_seed(run), output_type="latent", **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        if run > 0:
            seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "runs": runs, "peak_gib": peak}


def measure(family: str, args: argparse.Namespace) -> dict[str, Any]:
    layers = args.sd3_layers if family == "sd3" else args.flux_layers
    pipe, embeds = build(family, layers, getattr(torch, args.dtype), args.device)
    common = {
        **embeds,
        "height": args.resolution,
        "width": args.resolution,
        "num_inference_steps": args.steps,
        "max_sequence_length": embeds["prompt_embeds"].shape[1],
    }
    guided = {
        "sketch": square_sketch(args.resolution),
        "sketch_guidance_scale": DEFAULT_SKETCH_GUIDANCE_SCALE,
        "sketch_guidance_end": DEFAULT_SKETCH_GUIDANCE_END,
    }
    record: dict[str, Any] = {
        "layers": layers,
        "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "lgp_parameters": sum(p.numel() for p in pipe.lgp.parameters()),
        "lgp_blocks": list(pipe.lgp.config.blocks),
        "unguided": timed(pipe, common, args.runs, args.device),
    }
    modes = ("split", "batched") if family == "sd3" else (None,)
    for mode in modes:
        pipe.guided_step_mode = mode
        record[f"guided_{mode}" if mode else "guided"] = timed(pipe, {**common, **guided}, args.runs, args.device)
    unguided = record["unguided"]["median_s"]
    for name in [key for key in record if key.startswith("guided")]:
        record[name]["ratio"] = record[name]["median_s"] / unguided
    return record


def table(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        f"{config['resolution']}x{config['resolution']}, {config['steps']} steps, {config['dtype']} on"
        f" {config['device_name']}; guided at beta {DEFAULT_SKETCH_GUIDANCE_SCALE}, the first"
        f" {DEFAULT_SKETCH_GUIDANCE_END:.0%} of the steps; latents out (no VAE decode).",
        "",
        "| model | blocks | transformer parameters | LGP parameters | unguided s | guided s | guided / unguided |"
        " peak GiB (unguided / guided) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for family, record in report["families"].items():
        for name in [key for key in record if key.startswith("guided")]:
            label = family + (f" ({name.removeprefix('guided_')})" if name != "guided" else "")
            peaks = record["unguided"]["peak_gib"], record[name]["peak_gib"]
            peak_text = "-" if peaks[0] is None else f"{peaks[0]:.1f} / {peaks[1]:.1f}"
            lines.append(
                f"| {label} | {'+'.join(map(str, record['layers']))} | {record['parameters']:,} |"
                f" {record['lgp_parameters']:,} | {record['unguided']['median_s']:.2f} |"
                f" {record[name]['median_s']:.2f} | {record[name]['ratio']:.2f}x | {peak_text} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (28: both pipelines' default)")
    parser.add_argument("--runs", type=int, default=2, help="timed generations after a warm-up one")
    parser.add_argument("--sd3_layers", type=int, nargs=1, default=[SD3_MEDIUM["num_layers"]])
    parser.add_argument(
        "--flux_layers", type=int, nargs=2, default=[FLUX_DEV["num_layers"], FLUX_DEV["num_single_layers"]]
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default="outputs/transformer_cost.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    report = {
        "config": {**vars(args), "device_name": device_name},
        "families": {family: measure(family, args) for family in args.families},
    }
    report["table"] = table(report)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
