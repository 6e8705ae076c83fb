"""Measure how well sketch-guided images follow their sketches.

For each (sketch, prompt) pair the pipeline draws two images with the same seed, one guided by the sketch and one
unguided (plain Stable Diffusion), and the edges of each (Canny, as in training) are compared with the sketch's strokes
(for an LGP trained on another map, `map_kind` in its config: with the Canny edges of the map as the LGP reads it, the
outlines of a silhouette, the depth edges of a depth map):

- chamfer distance: the mean distance in pixels from each edge pixel to the nearest stroke pixel and from each stroke
  pixel to the nearest edge pixel, averaged over the two directions (lower is better);
- edge precision, recall and F-score with a tolerance: an edge pixel counts as correct when a stroke pixel lies within
  `tolerance` pixels, a stroke pixel as found when an edge pixel does (higher is better). This is the distance-
  tolerance form of the boundary F-measure, without its one-to-one matching.

    python -m pipeline_sketch_guided.training.evaluate --pretrained_model_name_or_path <base> \
        --lgp <lgp folder or Hub id> --pairs pairs.jsonl --output_dir eval

`--pairs` is a JSON-lines file of {"sketch": <image path, relative to the file>, "prompt": <text>}, or a folder made by
`pipeline_sketch_guided.training.prepare_data` (its edge maps are the sketches, its captions the prompts). Writes
`guided/`, `unguided/` and `sketches/` images, `metrics.jsonl` (one line per pair) and `summary.json` (the means).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from pipeline_sketch_guided import LGPModel, SketchGuidedStableDiffusionPipeline, prepare_sketch
from pipeline_sketch_guided.batch import run_rows
from pipeline_sketch_guided.sketch import prepare_map
from pipeline_sketch_guided.training.prepare_data import (
    DEFAULT_CANNY_HIGH,
    DEFAULT_CANNY_LOW,
    METADATA_FILE,
    canny_edges,
    load_prepared_dataset,
)
from pipeline_sketch_guided.utils import dtype_kwargs

logger = logging.getLogger(__name__)

# Pixels within which an edge and a stroke count as the same line; 2 allows for the width of a stroke and for
# Canny's one-pixel localisation error.
DEFAULT_TOLERANCE = 2.0


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def distance_to(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance in pixels from every pixel to the nearest `True` pixel of `mask` (which must have one)."""
    import cv2

    return cv2.distanceTransform(np.where(mask, 0, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def chamfer_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric chamfer distance between two boolean edge maps of one size, in pixels.

    0 when both are empty, infinite when only one is.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"Edge maps must have the same size, got {a.shape} and {b.shape}.")
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    return float((distance_to(b)[a].mean() + distance_to(a)[b].mean()) / 2)


def edge_f_score(predicted: np.ndarray, target: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, float]:
    """Precision, recall and F-score of `predicted` edges against `target` strokes, within `tolerance` pixels."""
    predicted, target = np.asarray(predicted, dtype=bool), np.asarray(target, dtype=bool)
    if predicted.shape != target.shape:
        raise ValueError(f"Edge maps must have the same size, got {predicted.shape} and {target.shape}.")
    if not predicted.any() and not target.any():
        return {"precision": 1.0, "recall": 1.0, "f_score": 1.0}
    precision = float((distance_to(target)[predicted] <= tolerance).mean()) if predicted.any() and target.any() else 0.0
    recall = float((distance_to(predicted)[target] <= tolerance).mean()) if predicted.any() and target.any() else 0.0
    f_score = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f_score": f_score}


def sketch_strokes(sketch, height: int, width: int) -> np.ndarray:
    """The strokes of a sketch (any format or polarity that the pipeline accepts) as a boolean map."""
    light_on_dark = prepare_sketch(sketch, height, width, polarity="light_on_dark")
    return light_on_dark[0, 0].numpy() > 0


def map_edges(guidance_map, height: int, width: int, lgp_config=None) -> np.ndarray:
    """What an image guided by `guidance_map` should have as edges, as a boolean map: a sketch's strokes
    (`sketch_strokes`) for an edge LGP (or none given), and for an LGP of another `map_kind` the Canny edges of the map
    prepared as that LGP reads it (`prepare_map`)."""
    kind = getattr(lgp_config, "map_kind", "edges")
    if kind == "edges":
        return sketch_strokes(guidance_map, height, width)
    prepared = prepare_map(guidance_map, height, width, kind, lgp_config.sketch_polarity, lgp_config.map_normalization)
    pixels = ((prepared[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return canny_edges(PIL.Image.fromarray(pixels)) > 0


def edge_agreement(
    image: PIL.Image.Image,
    strokes: np.ndarray,
    tolerance: float = DEFAULT_TOLERANCE,
    canny_low: int = DEFAULT_CANNY_LOW,
    canny_high: int = DEFAULT_CANNY_HIGH,
) -> dict[str, float]:
    """How well the Canny edges of `image` agree with `strokes`: chamfer distance and edge F-score."""
    edges = canny_edges(image, canny_low, canny_high) > 0
    return {"chamfer": chamfer_distance(edges, strokes), **edge_f_score(edges, strokes, tolerance)}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class SketchPrompt:
    sketch: str
    prompt: str


def read_pairs(path: str) -> list[SketchPrompt]:
    """(sketch, prompt) pairs from a JSON-lines file or a folder made by
    `pipeline_sketch_guided.training.prepare_data`."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, METADATA_FILE)):
            raise ValueError(f"{path!r} is a folder without {METADATA_FILE}: pass a prepared set or a .jsonl file.")
        return [SketchPrompt(e.edge_path, e.caption) for e in load_prepared_dataset(path)]
    if not os.path.isfile(path):
        raise ValueError(f"`--pairs` {path!r} does not exist.")
    pairs = []
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "sketch" not in row or "prompt" not in row:
                raise ValueError(f"{path}:{line_number} needs both `sketch` and `prompt`.")
            sketch = os.path.join(os.path.dirname(path), row["sketch"])
            if not os.path.isfile(sketch):
                raise ValueError(f"{path}:{line_number}: the sketch {sketch!r} does not exist.")
            pairs.append(SketchPrompt(sketch, row["prompt"]))
    if not pairs:
        raise ValueError(f"{path!r} lists no pairs.")
    return pairs


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of every metric over the pairs, for the guided and the unguided images (chamfer over finite values)."""
    summary: dict[str, Any] = {"num_pairs": len(results)}
    for kind in ("guided", "unguided"):
        summary[kind] = {}
        for metric in results[0][kind]:
            values = np.array([r[kind][metric] for r in results], dtype=np.float64)
            finite = values[np.isfinite(values)]
            summary[kind][metric] = float(finite.mean()) if len(finite) else float("inf")
        summary[kind]["num_without_edges"] = int(sum(not np.isfinite(r[kind]["chamfer"]) for r in results))
    return summary


def evaluate_pairs(
    pipe: SketchGuidedStableDiffusionPipeline,
    pairs: Sequence[SketchPrompt],
    output_dir: str,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    canny_low: int = DEFAULT_CANNY_LOW,
    canny_high: int = DEFAULT_CANNY_HIGH,
    batch_size: int = 4,
    **pipeline_kwargs,
) -> dict[str, Any]:
    """Generate each pair guided and unguided (seed `seed + index` for both), measure, and write everything.

    `pipeline_kwargs` go to both calls (`num_inference_steps`, `guidance_scale`, ...); `sketch_guidance_*` arguments
    to the guided one only. Returns the summary, also written to `summary.json`.
    """
    if height is None or width is None:
        sample_size = pipe.unet.config.sample_size
        height = width = sample_size * pipe.vae_scale_factor
    guided_only = {k: pipeline_kwargs.pop(k) for k in list(pipeline_kwargs) if k.startswith("sketch_guidance_")}
    out = Path(output_dir)
    (out / "sketches").mkdir(parents=True, exist_ok=True)
    # Every image through `sketch-guided batch`'s runner: batched where the settings agree, each image its own row's
    # (seed `seed + index` for both of a pair's images), resumable, shared between processes under accelerate.
    rows, results = [], {}
    for index, pair in enumerate(pairs):
        try:
            strokes = map_edges(pair.sketch, height, width, getattr(pipe.lgp, "config", None))
        except ValueError as error:  # a blank sketch has nothing to follow
            logger.warning(f"Skipping pair {index} ({pair.sketch}): {error}")
            continue
        PIL.Image.fromarray(strokes.astype(np.uint8) * 255).save(out / "sketches" / f"{index:04d}.png")
        results[index] = ({"index": index, "prompt": pair.prompt, "sketch": pair.sketch, "seed": seed + index}, strokes)
        common = {"prompt": pair.prompt, "seed": seed + index, "height": height, "width": width, **pipeline_kwargs}
        rows.append(
            {**common, "sketch": os.path.abspath(pair.sketch), **guided_only, "output": f"guided/{index:04d}.png"}
        )
        rows.append({**common, "output": f"unguided/{index:04d}.png"})
    if rows:
        summary = run_rows(pipe, rows, out, out, batch_size=batch_size, progress=False)
        failed = [row for row in summary.rows if row["status"] == "failed"]
        if failed:
            raise ValueError(f"Generating pair images failed: {failed[0]['error']}")
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as metrics_file:
        for index, (result, strokes) in results.items():
            for kind in ("guided", "unguided"):
                with PIL.Image.open(out / kind / f"{index:04d}.png") as image:
                    result[kind] = edge_agreement(image.convert("RGB"), strokes, tolerance, canny_low, canny_high)
            metrics_file.write(json.dumps(result) + "\n")
    results = [result for result, _ in results.values()]
    if not results:
        raise ValueError("No pair could be evaluated: every sketch was blank.")
    summary = summarize(results)
    summary.update(tolerance=tolerance, height=height, width=width, seed=seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure how well sketch-guided images follow their sketches.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="Base model, Hub id or path.")
    parser.add_argument("--lgp", type=str, required=True, help="LGP folder or Hub id (LGPModel.from_pretrained).")
    parser.add_argument("--pairs", type=str, required=True, help="A .jsonl of sketch/prompt pairs, or a prepared set.")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--max_pairs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None, help="Image side; default: the base model's.")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--sketch_guidance_scale", type=float, default=1.6)
    parser.add_argument("--sketch_guidance_start", type=float, default=0.0)
    parser.add_argument("--sketch_guidance_end", type=float, default=0.5)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="Edge F-score tolerance, pixels.")
    parser.add_argument("--canny_low", type=int, default=DEFAULT_CANNY_LOW)
    parser.add_argument("--canny_high", type=int, default=DEFAULT_CANNY_HIGH)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", type=str, default=None, choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    if args.max_pairs is not None and args.max_pairs < 1:
        raise ValueError(f"`--max_pairs` must be at least 1, got {args.max_pairs}.")
    if args.tolerance < 0:
        raise ValueError(f"`--tolerance` must be >= 0 pixels, got {args.tolerance}.")
    if args.resolution is not None and args.resolution % 8 != 0:
        raise ValueError(f"`--resolution` must be a multiple of 8, got {args.resolution}.")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    args = parse_args(argv)
    pairs = read_pairs(args.pairs)[: args.max_pairs]
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device == "cuda" else torch.float32)
    pipe = SketchGuidedStableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        lgp=LGPModel.from_pretrained(args.lgp),
        **dtype_kwargs(dtype),
        safety_checker=None,
        requires_safety_checker=False,
    ).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    summary = evaluate_pairs(
        pipe,
        pairs,
        args.output_dir,
        seed=args.seed,
        height=args.resolution,
        width=args.resolution,
        tolerance=args.tolerance,
        canny_low=args.canny_low,
        canny_high=args.canny_high,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        sketch_guidance_scale=args.sketch_guidance_scale,
        sketch_guidance_start=args.sketch_guidance_start,
        sketch_guidance_end=args.sketch_guidance_end,
    )
    for kind in ("guided", "unguided"):
        values = summary[kind]
        logger.info(
            f"{kind:>8}: chamfer {values['chamfer']:.2f} px, edge F-score {values['f_score']:.3f}"
            f" (precision {values['precision']:.3f}, recall {values['recall']:.3f}) over {summary['num_pairs']} pairs"
        )
    return summary


if __name__ == "__main__":
    main()
