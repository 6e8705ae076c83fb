"""LGP guidance against ControlNet, side by side on one base model, one set of training pairs and one set of sketches.

    python -m benchmarks.controlnet_comparison \
        --controlnets outputs/demo-v2/controlnet-fp16/seconds-97 outputs/demo-v2/controlnet-fp16/seconds-202 \
        --finetuned_model outputs/demo-striped/pipeline

Users choose between this method and ControlNet. Both were trained on the demo model (`--model`, default the shipped
one) from the same 4,000 renders and their Canny edges (`pipeline_sketch_guided.training.train_lgp` and
`.train_controlnet`, the latter with snapshots at the LGP's training time and at a longer budget). This command
measures, in one run and for each method:

- sketch and prompt agreement on `benchmarks.efficacy`'s held-out free-hand sketches (IoU of the image's foreground
  with the filled sketch, outline F-score, prompt colour, recognisable shape, one shape drawn), each case with the
  same seeds; the development set by default, `--placement anywhere` or `freehand` for the other two;
- training time (from each model's `training.json`), trainable parameters and the weights' file size;
- the seconds of one 30-step generation on this machine, and that over unguided (on the base: a fine-tune has the
  same architecture, so the same cost).

Both methods get the same sketch: `prepare_sketch` turns it light-on-dark, the convention both were trained on (the LGP
encodes it with the VAE; ControlNet reads it in [0, 1] as its condition). With `--finetuned_model` (the base's text
encoder and UNet trained further on a style the base never saw, by `train_demo_model --init_from ... --styles
striped`), every method is measured again on the fine-tune with its weights unchanged: an LGP reads the UNet's
activations, so does it still guide a fine-tune of its base?

Writes `comparison.json` (every row's figures, each image's own under `per_image` by seed and case, and the cases)
and `comparison.md` (the table in docs/controlnet.md) to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel

from benchmarks import efficacy
from benchmarks.measuring import measure
from benchmarks.models import SD15_UNET
from pipeline_sketch_guided import LGPModel
from pipeline_sketch_guided.demo import DEMO_MODEL_DIR
from pipeline_sketch_guided.sketch import prepare_sketch

# The pipeline's defaults (sketch_guidance_scale, _start, _end): the LGP is measured as a user gets it.
LGP_GUIDANCE: dict[str, float] = {}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR), help="the base: a sketch-guided pipeline folder")
    parser.add_argument("--lgp", default=None, help="an LGP folder (default: the model's own)")
    parser.add_argument("--controlnets", nargs="+", required=True, help="ControlNet folders trained on --model")
    parser.add_argument(
        "--fill_lgp",
        default=None,
        help="fill guidance for the LGP rows on every base: a silhouette LGP folder, or `none` for none (default: each"
        " model's own; the demo model has one, so its LGP row guides with each sketch's fill)",
    )
    parser.add_argument("--finetuned_model", default=None, help="a fine-tune of --model to measure each method on")
    parser.add_argument(
        "--placement",
        default="inside",
        choices=efficacy.PLACEMENTS,
        help="which held-out sketches (benchmarks.efficacy's --placement): the development set, `anywhere` or the"
        " second drawer's `freehand`",
    )
    parser.add_argument("--num_cases", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num_inference_steps", type=int, default=efficacy.DEFAULT_STEPS)
    parser.add_argument("--controlnet_conditioning_scale", type=float, default=1.0)
    parser.add_argument("--timing_runs", type=int, default=5, help="0 skips the timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/controlnet-comparison"))
    return parser.parse_args(argv)


def weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def training_record(folder: Path) -> dict[str, Any]:
    """What a model's `training.json` says of its training time and device (empty when it has none)."""
    path = folder / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def controlnet_pipeline(pipe, controlnet: ControlNetModel) -> StableDiffusionControlNetPipeline:
    """The ControlNet pipeline on `pipe`'s components: the same base, scheduler and dtype."""
    components = {name: getattr(pipe, name) for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    result = StableDiffusionControlNetPipeline(
        **components,
        controlnet=controlnet.to(pipe.unet.dtype),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    result.set_progress_bar_config(disable=True)
    return result


def condition(case: efficacy.EfficacyCase, size: int) -> torch.Tensor:
    """The case's sketch as ControlNet's condition: light strokes on dark, in [0, 1], 1 x 3 x size x size."""
    return (prepare_sketch(case.sketch, size, size, "light_on_dark") + 1) / 2


def generate_controlnet(
    pipe: StableDiffusionControlNetPipeline,
    cases: Sequence[efficacy.EfficacyCase],
    seed: int,
    size: int,
    steps: int,
    conditioning_scale: float,
    batch_size: int = 16,
) -> list:
    """One image per case with `efficacy.case_seed`'s noise: the same noise as the LGP's and unguided images."""
    images = []
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        images += pipe(
            [case.prompt for case in batch],
            image=torch.cat([condition(case, size) for case in batch]),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=efficacy.DEFAULT_CFG,
            controlnet_conditioning_scale=conditioning_scale,
            generator=[torch.Generator().manual_seed(efficacy.case_seed(seed, case)) for case in batch],
        ).images
    return images


def interleaved_medians(generators: dict[str, Any], runs: int) -> dict[str, float | None]:
    """Median seconds of each generator over `runs` rounds after a warm-up round (`measuring.measure`: the rounds take
    every generator in turn, so a slow spell of a shared machine falls on all of them rather than on one)."""
    if runs < 1:
        return dict.fromkeys(generators)
    timed = measure(generators, repeats=runs, warmup=1, device=torch.device("cpu"))
    return {name: float(np.median(value["runs"])) for name, value in timed.items()}


def measure_base(args, model: str, label: str, cases, size: int, timed: bool) -> list[dict[str, Any]]:
    """Unguided, LGP-guided and ControlNet rows on one base model; with `timed`, the seconds of one image each (every
    ControlNet snapshot has the same architecture, so one is timed for all)."""
    lgp_folder = Path(args.lgp) if args.lgp else Path(args.model) / "lgp"  # the base's LGP, on a fine-tune too
    pipe = efficacy.load_pipeline(model, str(lgp_folder))
    efficacy.set_fill_lgp(pipe, args.fill_lgp)
    steps = args.num_inference_steps
    strokes = [efficacy.case_strokes(case, size) for case in cases]  # once per case, not once per image and row

    def score(images_per_seed) -> dict[str, Any]:
        """The row's figures over every image, then each image's own (`per_image`: which sketches hold it down)."""
        per_image = [
            {"seed": seed, "case": case.index, **efficacy.measure_image(image, case, stroke)}
            for seed, images in zip(args.seeds, images_per_seed, strict=True)
            for image, case, stroke in zip(images, cases, strokes, strict=True)
        ]
        return {**efficacy.summarize(per_image), "per_image": per_image}

    def lgp_images(guidance, chosen=cases, seeds=args.seeds):
        return [efficacy.generate(pipe, chosen, seed, size, steps, guidance=guidance) for seed in seeds]

    controlnets = {
        folder: ControlNetModel.from_pretrained(folder, torch_dtype=pipe.unet.dtype)
        for folder in map(Path, args.controlnets)
    }
    cn_pipes = {folder: controlnet_pipeline(pipe, controlnet) for folder, controlnet in controlnets.items()}

    def controlnet_images(folder, chosen=cases, seeds=args.seeds):
        return [
            generate_controlnet(cn_pipes[folder], chosen, seed, size, steps, args.controlnet_conditioning_scale)
            for seed in seeds
        ]

    one, first = cases[:1], next(iter(controlnets))
    seconds = interleaved_medians(
        {
            "unguided": lambda: lgp_images(None, one, [0]),
            "lgp": lambda: lgp_images(LGP_GUIDANCE, one, [0]),
            "controlnet": lambda: controlnet_images(first, one, [0]),
        },
        args.timing_runs if timed else 0,
    )
    lgp_training = training_record(lgp_folder)
    fill_lgp = getattr(pipe, "fill_lgp", None)  # guides by default where the model has one
    lgps = [pipe.lgp] if fill_lgp is None else [pipe.lgp, fill_lgp]
    fill = {}
    if fill_lgp is not None:  # the pair is what the user trains and ships: its time and files count together
        fill_folder = Path(args.fill_lgp) if args.fill_lgp is not None else Path(model) / "fill_lgp"
        fill = {
            "fill_training_seconds": training_record(fill_folder).get("seconds"),
            "fill_file_bytes": weights_bytes(fill_folder),
        }
    rows = [
        {"method": "unguided", "base": label, **score(lgp_images(None)), "seconds": seconds["unguided"]},
        {
            "method": "LGP guidance (pipeline defaults" + (", with fill guidance)" if fill_lgp is not None else ")"),
            "base": label,
            "fill_guidance": fill_lgp is not None,
            **score(lgp_images(LGP_GUIDANCE)),
            "seconds": seconds["lgp"],
            "training_seconds": lgp_training.get("seconds"),
            "training_device": lgp_training.get("device"),
            "trainable_parameters": sum(p.numel() for lgp in lgps for p in lgp.parameters()),
            "file_bytes": weights_bytes(lgp_folder) + fill.get("fill_file_bytes", 0),
            **fill,
        },
    ]
    for folder, controlnet in controlnets.items():
        record = training_record(folder)
        rows.append(
            {
                "method": f"ControlNet, {record.get('seconds', '?')} s of training"
                + (f" ({record['steps']:,} steps)" if record.get("steps") else ""),
                "base": label,
                **score(controlnet_images(folder)),
                "seconds": seconds["controlnet"],
                "training_seconds": record.get("seconds"),
                "training_device": record.get("device"),
                "training_steps": record.get("steps"),
                "trainable_parameters": sum(p.numel() for p in controlnet.parameters()),
                "file_bytes": weights_bytes(folder),
            }
        )
    for row in rows:
        row["over_unguided"] = row["seconds"] / seconds["unguided"] if row["seconds"] and seconds["unguided"] else None
    return rows


def sd15_sizes() -> dict[str, int]:
    """Trainable parameters of each method on Stable Diffusion 1.5's architecture: a ControlNet (diffusers'
    `from_unet`, as the published SD1.5 ControlNets are made) and an LGP on the sketch2img blocks. Built on the meta
    device: shapes only, no memory, no weights."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        return {
            "unet": sum(p.numel() for p in unet.parameters()),
            "controlnet": sum(
                p.numel() for p in ControlNetModel.from_unet(unet, load_weights_from_unet=False).parameters()
            ),
            "lgp": sum(p.numel() for p in LGPModel.from_unet(unet).parameters()),
        }


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| base | method | IoU | outline F | colour | recognisable | one object | training | trainable parameters"
        " | file | s / image | over unguided |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        training = (
            [f"{row['training_seconds']:.0f} s on {row['training_device']}"] if row.get("training_seconds") else []
        )
        if "fill_training_seconds" in row:
            fill_seconds = row["fill_training_seconds"]
            training.append(f"fill LGP {fill_seconds:.0f} s" if fill_seconds else "fill LGP's time not recorded")
        training = " + ".join(training) or "-"
        parameters = f"{row['trainable_parameters'] / 1e6:.2f}M" if row.get("trainable_parameters") else "-"
        size = f"{row['file_bytes'] / 2**20:.1f} MiB" if row.get("file_bytes") else "-"
        seconds = f"{row['seconds']:.2f}" if row.get("seconds") else "-"
        over = f"{row['over_unguided']:.2f}x" if row.get("over_unguided") else "-"
        lines.append(
            f"| {row['base']} | {row['method']} | {row['iou']:.3f} | {row['outline_f_score']:.3f}"
            f" | {row['colour_agreement']:.0%} | {row['recognisable']:.0%} | {row['one_object']:.0%} | {training}"
            f" | {parameters} | {size}"
            f" | {seconds} | {over} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for folder in args.controlnets:
        if not (Path(folder) / "config.json").is_file():
            raise SystemExit(f"{folder} is not a ControlNet folder (no config.json): train one with train_controlnet.")
    size = efficacy.DEMO_IMAGE_SIZE
    cases = efficacy.held_out_cases(args.num_cases, size, placement=args.placement)
    rows = measure_base(args, args.model, "base", cases, size, timed=True)
    if args.finetuned_model:
        rows += measure_base(args, args.finetuned_model, "fine-tune of the base", cases, size, timed=False)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) for key, value in vars(args).items()}
    sizes = sd15_sizes()
    report = {
        "settings": settings,
        "cases": [case.describe() for case in cases],
        "rows": rows,
        "sd15_trainable_parameters": sizes,
    }
    (args.output_dir / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(rows) + (
        f"\nOn Stable Diffusion 1.5's architecture (UNet {sizes['unet'] / 1e6:.0f}M parameters): a ControlNet trains"
        f" {sizes['controlnet'] / 1e6:.0f}M, an LGP on the sketch2img blocks {sizes['lgp'] / 1e6:.1f}M.\n"
    )
    (args.output_dir / "comparison.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
