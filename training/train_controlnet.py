"""Train a ControlNet on an LGP training set, for the side-by-side comparison with LGP guidance.

    python -m pipeline_sketch_guided.training.train_controlnet \
        --pretrained_model_name_or_path outputs/demo-v2/sd/pipeline --train_data_dir outputs/demo-v2/lgp-data \
        --output_dir outputs/demo-v2/controlnet --snapshot_seconds 97 388

ControlNet is what users weigh this method against. The recipe is diffusers' (examples/controlnet/train_controlnet.py):
`ControlNetModel.from_unet` copies the frozen UNet's encoder, its zero convolutions start the control at nothing, and it
learns the UNet's noise-prediction loss with the map (in [0, 1], three channels) as its condition; the VAE, text
encoder and UNet stay frozen. It reads the folder `prepare_data` writes for the LGP (images, maps, captions), so both
methods learn from the same pairs. Training runs on one device with a wall-clock budget: `--snapshot_seconds` saves a
ControlNet at each budget (counted from the start of the command, data preparation included, as the LGP's training time
is), and the run stops after the last one. Each snapshot is `<output_dir>/seconds-<S>/` (a diffusers ControlNetModel
folder with `training.json`), written atomically. `--snapshot_steps` counts optimiser steps instead (`steps-<N>/`): a
budget that does not change with the machine's speed, for matching a run measured on another day or machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler

from pipeline_sketch_guided.training.prepare_data import load_prepared_dataset
from pipeline_sketch_guided.training.train_demo_model import atomic_save
from pipeline_sketch_guided.training.train_lgp import load_base
from pipeline_sketch_guided.utils import device_name


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="the base Stable Diffusion pipeline")
    parser.add_argument("--train_data_dir", type=Path, required=True, help="a prepare_data output folder")
    parser.add_argument("--output_dir", type=Path, required=True)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--snapshot_seconds",
        type=float,
        nargs="+",
        help="save a ControlNet when the command has run this long; stop after the last",
    )
    budget.add_argument(
        "--snapshot_steps",
        type=int,
        nargs="+",
        help="save a ControlNet after this many optimiser steps; stop after the last",
    )
    parser.add_argument("--train_batch_size", type=int, default=32)
    # The recipe's examples use 1e-5 for SD1.5 over days; a small model on a budget of minutes needs a larger step.
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--proportion_empty_prompts", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.snapshot_steps and min(args.snapshot_steps) < 1:
        parser.error(f"--snapshot_steps {min(args.snapshot_steps)}: each budget must be at least 1 step.")
    if args.snapshot_seconds and not all(seconds >= 0 for seconds in args.snapshot_seconds):  # NaN fails too
        parser.error("--snapshot_seconds: each budget must be a number of seconds, 0 or more.")
    return args


def conditioning_channels(vae: AutoencoderKL) -> tuple[int, ...]:
    """The conditioning embedding's widths, one fewer than the VAE's blocks so that it shrinks the map by the VAE's
    factor (diffusers' default, four, suits SD's 8x VAE; the demo VAE shrinks 4x)."""
    widths = (16, 32, 96, 256, 512)
    return widths[: len(vae.config.block_out_channels)]


def load_pairs(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images (uint8 N x H x W x 3), maps (uint8 N x H x W x 3) and captions of a prepare_data folder."""
    try:
        examples = load_prepared_dataset(str(folder))
    except ValueError as error:  # not a prepared folder, or a listed file missing: say so in one line
        raise SystemExit(str(error)) from None

    def read(path: str) -> np.ndarray:
        with PIL.Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    images = np.stack([read(example.image_path) for example in examples])
    maps = np.stack([read(example.edge_path) for example in examples])
    return images, maps, [example.caption for example in examples]


def main(argv=None) -> None:
    started = time.monotonic()
    args = parse_args(argv)
    by_steps = args.snapshot_steps is not None
    budgets = sorted(args.snapshot_steps if by_steps else args.snapshot_seconds)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = args.pretrained_model_name_or_path
    base = load_base(model, torch.float32).to(device)  # frozen, as the LGP trainer loads it
    vae, unet, text_encoder, tokenizer = base.vae, base.unet, base.text_encoder, base.tokenizer
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(vae)).to(
        device
    )
    controlnet.train()
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")

    images, maps, captions = load_pairs(args.train_data_dir)
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = torch.cat(
            [vae.encode(pixels[i : i + 256].to(device)).latent_dist.mean for i in range(0, len(pixels), 256)]
        )
        latents = latents * vae.config.scaling_factor
        ids = tokenizer(captions + [""], padding="max_length", truncation=True, return_tensors="pt").input_ids
        states = torch.cat([text_encoder(ids[i : i + 512].to(device))[0] for i in range(0, len(ids), 512)])
    conditions = torch.from_numpy(maps).permute(0, 3, 1, 2).to(device)  # uint8 on the device, scaled per batch
    caption_states, empty_state = states[:-1], states[-1]

    parameters = list(controlnet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=1e-2, foreach=True)
    generator = torch.Generator().manual_seed(args.seed)
    step, losses, saved = 0, [], []
    print(f"{len(latents)} pairs, {sum(p.numel() for p in parameters) / 1e6:.2f}M trainable parameters", flush=True)
    while budgets:
        index = torch.randint(len(latents), (args.train_batch_size,), generator=generator).to(device)
        clean = latents[index]
        hidden = caption_states[index].clone()
        empty = (torch.rand(len(index), generator=generator) < args.proportion_empty_prompts).to(device)
        hidden[empty] = empty_state
        noise = torch.randn(clean.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
        timesteps = timesteps.to(device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        down, mid = controlnet(
            noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=conditions[index].float() / 255,
            return_dict=False,
        )  # fmt: skip
        prediction = unet(
            noisy, timesteps, encoder_hidden_states=hidden, down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample  # fmt: skip
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.detach())
        if step % 100 == 0:
            recent = torch.stack(losses[-100:]).mean().item()
            print(f"step {step}: loss {recent:.4f} ({time.monotonic() - started:.0f} s)", flush=True)
        elapsed = time.monotonic() - started
        if (step if by_steps else elapsed) >= budgets[0]:
            budget = budgets.pop(0)
            report = {
                ("budget_steps" if by_steps else "budget_seconds"): budget,
                "seconds": round(elapsed, 1),
                "steps": step,
                "batch_size": args.train_batch_size,
                "learning_rate": args.learning_rate,
                "trainable_parameters": sum(p.numel() for p in parameters),
                "loss_last_100_steps": torch.stack(losses[-100:]).mean().item(),
                "device": device_name(device),
                "pairs": len(latents),
                "base_model": str(model),
            }

            def write(folder: Path, report: dict = report) -> None:
                controlnet.save_pretrained(folder)
                (folder / "training.json").write_text(json.dumps(report, indent=2) + "\n")

            target = args.output_dir / (f"steps-{budget}" if by_steps else f"seconds-{budget:g}")
            args.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_save(write, target)
            saved.append(str(target))
            print(f"saved {target} at step {step}", flush=True)
    print(json.dumps({"snapshots": saved, "steps": step}), flush=True)


if __name__ == "__main__":
    main()
