"""The LGP's training loss on prepared sets it did and did not train on: does a longer run fit its renders too closely?

For each LGP and each prepared set (`prepare_data`'s folders), the mean of the trainer's own loss
(`train_lgp.lgp_loss`, unweighted) over the set's first `--num_examples` examples. Every LGP sees each example at the
same timestep (drawn from `--min_timestep` to `--max_timestep`, by default where the shipped recipe trains and guidance
acts) and with the same noise, so LGPs with the same target compare directly; the gap between the set an LGP trained
on and a held-out one is how closely it fits its own renders. Losses of LGPs with different targets (`target`,
`target_scale`, `target_blur`) are not comparable with each other.

    python training/shapes.py --output_dir outputs/heldout-raw --num_images 512 --first_seed 2000000
    python training/prepare_data.py --input_dir outputs/heldout-raw --output_dir outputs/heldout --resolution 64
    python -m benchmarks.lgp_loss --model pipeline_sketch_guided/demo_model \
        --lgp pipeline_sketch_guided/demo_model/lgp outputs/exp/NAME --data outputs/lgp-shapes-inside outputs/heldout
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline_sketch_guided import LGPModel
from pipeline_sketch_guided.training.denoisers import training_denoiser
from pipeline_sketch_guided.training.prepare_data import load_prepared_dataset
from pipeline_sketch_guided.training.train_lgp import (
    EdgeDataset,
    collate,
    encode_latents,
    lgp_loss,
    lgp_targets,
    load_base,
    prepared_resolution,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="The base model the LGPs were trained on (folder or Hub id).")
    parser.add_argument("--lgp", nargs="+", required=True, help="LGP folders or Hub ids.")
    parser.add_argument("--data", nargs="+", required=True, help="Prepared sets (prepare_data's output folders).")
    parser.add_argument("--num_examples", type=int, default=512, help="The first N examples of each set.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--min_timestep", type=int, default=500)
    parser.add_argument("--max_timestep", type=int, default=999)
    parser.add_argument("--seed", type=int, default=0, help="Seeds the timesteps and the noise.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    parser.add_argument("--output", type=Path, default=None, help="Also write the results here, as JSON.")
    args = parser.parse_args(argv)
    if args.num_examples < 1 or args.batch_size < 1:
        parser.error("--num_examples and --batch_size must be at least 1")
    if not 0 <= args.min_timestep <= args.max_timestep:
        parser.error(f"need 0 <= --min_timestep <= --max_timestep, got {args.min_timestep} and {args.max_timestep}")
    for folder in args.data:
        if not Path(folder, "metadata.jsonl").is_file():
            parser.error(f"--data {folder!r} is not a prepared set (no metadata.jsonl): make it with prepare_data")
    return args


@torch.no_grad()
def mean_loss(base, lgp: LGPModel, data: str, args: argparse.Namespace) -> tuple[float, int]:
    """The LGP's mean loss over the first `args.num_examples` examples of `data`, and how many there were."""
    examples = load_prepared_dataset(data)[: args.num_examples]
    resolution = prepared_resolution(examples)  # as the trainer takes it
    denoiser = training_denoiser(base, resolution)
    if args.max_timestep >= denoiser.num_train_timesteps:
        raise ValueError(f"--max_timestep must be below the base model's {denoiser.num_train_timesteps} timesteps.")
    # An inpainting UNet reads a repaint mask per example, drawn as the trainer draws them.
    mask_seed = args.seed if denoiser.inpainting else None
    dataset = EdgeDataset(examples, resolution, lgp.config.sketch_polarity, lgp.config.map_kind, mask_seed)
    # The same timestep and noise for an example whichever LGP is measured.
    generator = torch.Generator().manual_seed(args.seed)
    timesteps = torch.randint(args.min_timestep, args.max_timestep + 1, (len(examples),), generator=generator)
    total, start = 0.0, 0
    for batch in DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate):
        count = len(batch["caption"])
        image_latents = encode_latents(base, batch["pixel_values"])
        noise = torch.randn(image_latents.shape, generator=generator)
        targets = lgp_targets(base, lgp, batch["edge_values"])
        conditioning = denoiser.conditioning(batch["caption"], lgp.config.feature_branch)
        inpainting = denoiser.inpainting_inputs(batch["pixel_values"], batch.get("mask"))
        batch_timesteps = timesteps[start : start + count].to(image_latents.device)
        loss = lgp_loss(
            denoiser,
            lgp,
            lgp.config,
            image_latents,
            targets,
            conditioning,
            batch_timesteps,
            noise,
            inpainting=inpainting,
        )
        total += loss.item() * count
        start += count
    return total / len(examples), len(examples)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.model, torch.float32)
    rows = []
    for lgp_path in args.lgp:
        lgp = LGPModel.from_pretrained(lgp_path, torch_dtype=torch.float32).eval()
        for data in args.data:
            loss, count = mean_loss(base, lgp, data, args)
            rows.append({"lgp": lgp_path, "data": data, "examples": count, "loss": loss})
    print("| LGP | data | examples | loss |\n|---|---|---:|---:|")
    for row in rows:
        print(f"| {row['lgp']} | {row['data']} | {row['examples']} | {row['loss']:.5f} |")
    if args.output is not None:
        result = {"command": "python -m benchmarks.lgp_loss " + " ".join(argv or sys.argv[1:]), "rows": rows}
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
