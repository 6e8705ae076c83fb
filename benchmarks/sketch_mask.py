"""What `sketch_mask` does on the demo model: a sketch of one shape, a prompt that names two, a mask around the sketch.

Each case draws one shape free-hand in one half of the frame and prompts for it and for a second shape of another
colour ("a red star and a blue circle on a white background"). Each case and seed is generated three ways, with the
same seed: unguided, guided by the sketch (its blank paper then says "no edges" everywhere else), and guided with a
`sketch_mask` that covers the sketched shape's half of the frame. For each image:

- the sketched shape follows the sketch: IoU of the foreground pixels of its colour with the filled sketch;
- the second shape appears: the foreground pixels of its colour outside the mask, as a fraction of the image, and
  whether there are at least `MIN_SECOND_SHAPE_FRACTION` of them.

    python -m benchmarks.sketch_mask --num_cases 12 --seeds 0 1 2      # demo model, CPU, a few minutes
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from benchmarks.efficacy import COLOURS, _article, segment_foreground
from pipeline_sketch_guided.demo import SHAPES, filled_mask, freehand_sketch, load_demo_pipeline, shape_polygon

# A shape whose colour covers less than this fraction of the image outside the mask counts as absent (specks and
# halos stay below it; the smallest shapes the demo draws cover about 3%).
MIN_SECOND_SHAPE_FRACTION = 0.01
IMAGE_SIZE = 64


def colour_mask(image: PIL.Image.Image, colour: str) -> np.ndarray:
    """Foreground pixels nearest, among the named colours, to `colour`."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    named = np.array(list(COLOURS.values()), dtype=np.float32)
    nearest = np.linalg.norm(array[..., None, :] - named, axis=-1).argmin(axis=-1)
    return segment_foreground(image) & (nearest == list(COLOURS).index(colour))


def make_cases(count: int, seed: int = 7_000_000) -> list[dict]:
    """Held-out cases: the sketched shape in the left or right half, the other shape and colour named in the prompt."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        first, second = rng.sample(SHAPES, 2)
        colour, other_colour = rng.sample(list(COLOURS), 2)
        left = index % 2 == 0
        center = (rng.uniform(14, 18) if left else rng.uniform(46, 50), rng.uniform(24, 40))
        radius, rotation = rng.uniform(10, 13), rng.uniform(0, 360)
        sketch = freehand_sketch(first, center, radius, rotation, seed=index, wobble=0.08, size=IMAGE_SIZE)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        if left:
            mask[:, : IMAGE_SIZE // 2] = 255
        else:
            mask[:, IMAGE_SIZE // 2 :] = 255
        cases.append(
            {
                "prompt": f"{_article(colour)} {colour} {first} and {_article(other_colour)} {other_colour} {second}"
                " on a white background",
                "sketch": sketch,
                "mask": PIL.Image.fromarray(mask),
                "filled": filled_mask(shape_polygon(first, center, radius, rotation)),
                "colour": colour,
                "other_colour": other_colour,
            }
        )
    return cases


def measure(image: PIL.Image.Image, case: dict) -> dict:
    shape = colour_mask(image, case["colour"])
    union = np.logical_or(shape, case["filled"]).sum()
    outside = np.asarray(case["mask"]) == 0
    second = (colour_mask(image, case["other_colour"]) & outside).mean()
    return {
        "iou": float(np.logical_and(shape, case["filled"]).sum() / union) if union else 0.0,
        "second_fraction": float(second),
        "second_present": bool(second >= MIN_SECOND_SHAPE_FRACTION),
    }


def run(num_cases: int, seeds: list[int], steps: int, output_dir: Path | None) -> dict:
    pipe = load_demo_pipeline()
    cases = make_cases(num_cases)
    modes = {"unguided": {}, "guided": {"use_sketch": True}, "guided, masked": {"use_sketch": True, "use_mask": True}}
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    sheet_rows = []
    for index, case in enumerate(cases):
        for seed in seeds:
            row = [case["sketch"].convert("RGB"), case["mask"].convert("RGB")]
            for mode, use in modes.items():
                image = pipe(
                    case["prompt"],
                    sketch=case["sketch"] if use.get("use_sketch") else None,
                    sketch_mask=case["mask"] if use.get("use_mask") else None,
                    num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(seed),
                ).images[0]
                results[mode].append(measure(image, case))
                row.append(image)
            sheet_rows.append(row)
        print(f"case {index + 1}/{len(cases)}: {case['prompt']}", file=sys.stderr, flush=True)
    summary = {
        mode: {
            "iou": statistics.mean(m["iou"] for m in values),
            "second_shape_present": statistics.mean(m["second_present"] for m in values),
            "second_shape_fraction": statistics.mean(m["second_fraction"] for m in values),
            "images": len(values),
        }
        for mode, values in results.items()
    }
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        sheet = PIL.Image.new("RGB", (5 * IMAGE_SIZE, len(sheet_rows) * IMAGE_SIZE), "white")
        for r, row in enumerate(sheet_rows):
            for c, image in enumerate(row):
                sheet.paste(image.resize((IMAGE_SIZE, IMAGE_SIZE)), (c * IMAGE_SIZE, r * IMAGE_SIZE))
        sheet.save(output_dir / "sketch_mask_sheet.png")
        (output_dir / "sketch_mask.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_cases", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output_dir", type=Path, default=None, help="Also write a sheet and the JSON here.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run(args.num_cases, args.seeds, args.steps, args.output_dir)
    print(f"{'':<16}{'IoU (sketched)':>16}{'second shape':>14}{'its area':>10}")
    for mode, value in summary.items():
        print(
            f"{mode:<16}{value['iou']:>16.3f}{value['second_shape_present']:>14.0%}"
            f"{value['second_shape_fraction']:>10.3f}   ({value['images']} images)"
        )
    return summary


if __name__ == "__main__":
    main()
