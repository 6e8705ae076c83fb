"""Draw a shape into a photo: inpainting with and without a sketch on the shipped demo model.

Each case is a render of the demo's kind (one shape on one half of a background, `training/shapes.py`'s renderer), the
other half masked for repainting, and a free-hand sketch of a second shape in that half; the prompt names the second
shape. The same seeds are inpainted without the sketch and with it (`SketchGuidedStableDiffusionInpaintPipeline`, the
sketch mask defaulting to the inpainting mask; where the model has a fill LGP, as the demo does, the sketch is guided
with its fill at `--sketch_fill_scale`, and 0 measures the sketch alone), and each image is measured:

- IoU, inside the repainted half, of the image's foreground with the sketched shape (filled);
- colour: whether that foreground has the prompt's colour;
- kept: the largest and the mean absolute change (0..255) of the pixels outside the mask against the photo. The demo
  model's UNet has 4 input channels, so diffusers blends the photo's latents back into the known half after every
  step; what changes there is the VAE's doing, measured for reference on the photo encoded and decoded alone ("VAE
  round trip", whose IoU and colour rows mean nothing: it has no new shape).

    python -m benchmarks.inpainting --output_dir outputs/inpainting

`--model` measures another model instead (an inpainting checkpoint made from the demo, `train_demo_model --inpainting`,
whose 9-channel UNet is not blended back: there the kept half is the UNet's own doing) with the LGP at `--lgp`, or the
model's own:

    python -m benchmarks.inpainting --model outputs/demo-inpainting/pipeline \
        --lgp pipeline_sketch_guided/demo_model/lgp --output_dir outputs/inpainting-carry-over
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from benchmarks.efficacy import foreground_colour, iou, named_colour, segment_foreground
from pipeline_sketch_guided.demo import COLOURS, SHAPES, freehand_sketch
from pipeline_sketch_guided.guidance import DEFAULT_SKETCH_FILL_SCALE
from pipeline_sketch_guided.loading import editing_pipeline, load_pipeline
from pipeline_sketch_guided.training.shapes import (
    BACKGROUND_STYLES,
    BACKGROUNDS,
    IMAGE_SIZE,
    Shape,
    caption,
    render,
    shape_mask,
)

CASE_SEED = 7_000_000  # apart from the training renders (1,000,000+) and the efficacy cases (5,000,000+)


def random_shape(rng: random.Random, colour: str, in_left: bool) -> Shape:
    """A shape of `colour` of radius 9 to 12 around the middle of the left or the right half."""
    half = IMAGE_SIZE // 2
    x = (half / 2 if in_left else half + half / 2) + rng.uniform(-3, 3)
    center = (x, half + rng.uniform(-8, 8))
    return Shape(rng.choice(SHAPES), colour, center, rng.uniform(9, 12), rng.uniform(0, 90))


def inpainting_cases(num_cases: int) -> list[dict[str, Any]]:
    """The photos, masks, sketches and prompts, the same for the same `num_cases`."""
    cases = []
    for index in range(num_cases):
        rng = random.Random(CASE_SEED + index)
        background, style = rng.choice(list(BACKGROUNDS)), rng.choice(BACKGROUND_STYLES)
        left = rng.random() < 0.5  # where the photo's shape is; the new one goes in the other half
        half = IMAGE_SIZE // 2
        existing_colour, new_colour = rng.sample(COLOURS, 2)

        existing, new = random_shape(rng, existing_colour, left), random_shape(rng, new_colour, not left)
        photo = render([existing], background, style, rng)
        region = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        region[:, half:] = left
        region[:, :half] = not left
        sketch = freehand_sketch(
            new.kind, new.center, new.radius, new.rotation, seed=rng.getrandbits(32), wobble=0.06, gaps=1,
            line_width=1.5, size=256,
        )  # fmt: skip
        cases.append(
            {
                "index": index,
                "photo": photo,
                "mask": PIL.Image.fromarray(region.astype(np.uint8) * 255),
                "region": region,
                "sketch": sketch,
                "prompt": caption([new], background),
                "shape": new,
                "target": shape_mask(new),
            }
        )
    return cases


def measure(image: PIL.Image.Image, case: dict[str, Any]) -> dict[str, Any]:
    region = case["region"]
    foreground = segment_foreground(image) & region
    colour = foreground_colour(image, foreground)
    change = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(case["photo"].convert("RGB"), dtype=np.int16))
    outside = change[~region]
    return {
        "iou": iou(foreground, case["target"]),
        "colour_ok": colour is not None and named_colour(colour) == case["shape"].colour,
        "kept_max": int(outside.max()),
        "kept_mean": float(outside.mean()),
    }


def vae_round_trip(pipe, photo: PIL.Image.Image) -> PIL.Image.Image:
    """The photo encoded and decoded by the pipeline's VAE: what the known half can at best come back as."""
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(photo)
        latents = pipe.vae.encode(pixels).latent_dist.mode()
        return pipe.image_processor.postprocess(pipe.vae.decode(latents).sample)[0]


def summarize(values: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "iou": statistics.mean(v["iou"] for v in values),
        "colour": statistics.mean(float(v["colour_ok"]) for v in values),
        "kept_max": max(v["kept_max"] for v in values),
        "kept_mean": statistics.mean(v["kept_mean"] for v in values),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    pipe = editing_pipeline(load_pipeline(args.model, args.lgp, fill_lgp=args.fill_lgp), image=True, mask=True)
    if pipe.lgp is None:
        raise ValueError(f"{args.model!r} has no LGP: pass `--lgp` with the folder or Hub id of one trained for it.")
    fills = pipe.fills_by_default and args.sketch_fill_scale > 0
    fill = {"sketch_fill_scale": args.sketch_fill_scale} if pipe.fills_by_default else {}  # 0 too: off, not default
    pipe.set_progress_bar_config(disable=True)
    cases = inpainting_cases(args.num_cases)
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {"unguided": [], "guided": [], "VAE round trip": []}
    sheet = []
    for seed in args.seeds:
        for case in cases:
            common = {
                "image": case["photo"],
                "mask_image": case["mask"],
                "num_inference_steps": args.steps,
                "generator": torch.Generator().manual_seed(1000 * seed + case["index"]),
            }
            plain = pipe(case["prompt"], **common).images[0]
            common["generator"] = torch.Generator().manual_seed(1000 * seed + case["index"])
            guided = pipe(case["prompt"], sketch=case["sketch"], **common, **fill).images[0]
            results["unguided"].append(measure(plain, case))
            results["guided"].append(measure(guided, case))
            if seed == args.seeds[0]:  # the floor outside the mask: the photo through the VAE and back
                results["VAE round trip"].append(measure(vae_round_trip(pipe, case["photo"]), case))
            if seed == args.seeds[0] and case["index"] < 8:
                sheet.append(
                    [case["photo"], case["mask"].convert("RGB"), case["sketch"].resize(plain.size), plain, guided]
                )
    summary = {name: summarize(values) for name, values in results.items()}
    summary["ratio"] = summary["guided"]["iou"] / max(summary["unguided"]["iou"], 1e-9)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tile = 128
    canvas = PIL.Image.new("RGB", (tile * 5, tile * len(sheet)), "white")
    for row, images in enumerate(sheet):
        for column, image in enumerate(images):
            canvas.paste(
                image.convert("RGB").resize((tile, tile), PIL.Image.Resampling.NEAREST), (column * tile, row * tile)
            )
    canvas.save(out / "inpainting_sheet.png")
    record = {
        "config": vars(args),
        "summary": summary,
        "seconds": time.perf_counter() - started,
        "per_image": results,
    }
    (out / "inpainting.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "| | IoU in the repainted half | colour | outside the mask: largest change | mean change |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("unguided", "guided", "VAE round trip"):
        values = summary[name]
        kept = f"{values['kept_max']} | {values['kept_mean']:.2f}"
        lines.append(f"| {name} | {values['iou']:.3f} | {values['colour']:.0%} | {kept} |")
    lines.append(f"\nguided / unguided IoU: {summary['ratio']:.2f}x ({len(cases)} cases x {len(args.seeds)} seeds)")
    fill_lgp = "the model's fill LGP" if args.fill_lgp is None else args.fill_lgp
    lines.append(f"fill guidance: {f'{fill_lgp}, scale {args.sketch_fill_scale}' if fills else 'none'}")
    table = "\n".join(lines)
    (out / "inpainting.md").write_text(table + "\n")
    print(table)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a Stable Diffusion folder or Hub id (default: the demo model)")
    parser.add_argument("--lgp", default=None, help="an LGP folder or Hub id (default: the model's own)")
    parser.add_argument("--fill_lgp", default=None, help="a fill LGP folder or Hub id (default: the model's own)")
    parser.add_argument(
        "--sketch_fill_scale",
        type=float,
        default=DEFAULT_SKETCH_FILL_SCALE,
        help=f"fill guidance's weight where there is a fill LGP; 0: none (default {DEFAULT_SKETCH_FILL_SCALE})",
    )
    parser.add_argument("--output_dir", default="outputs/inpainting")
    parser.add_argument("--num_cases", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.lgp is not None and args.model is None:
        parser.error("--lgp needs --model: the demo model brings its own LGP.")
    if args.fill_lgp is not None and args.model is None:
        parser.error("--fill_lgp needs --model: the demo model brings its own fill LGP.")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    main()
