"""The shipped demo model: a tiny Stable Diffusion trained here on pictures of coloured shapes, and its LGP.

`load_demo_pipeline()` works offline on the CPU in seconds. The shapes' geometry and the free-hand sketches of them
live here too, because the demo command draws its sketches from them (the training scripts import them as well).
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from .lgp import LGPModel
from .pipeline import SketchGuidedStableDiffusionPipeline
from .utils import dtype_kwargs

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"
# The demo LGPs, by the map each was trained on, and their folders in DEMO_MODEL_DIR: the edge LGP is the pipeline's
# own `lgp` component; the silhouette LGP (filled shapes, white on black) is its `fill_lgp`, which guides each sketch's
# fill alongside it (fill guidance), and the `lgp` of `load_demo_pipeline(map="silhouette")`.
DEMO_LGP_FOLDERS = {"edges": "lgp", "silhouette": "fill_lgp"}
DEMO_IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star")
# The demo model was trained on captions "a <colour> <shape> [and a <colour> <shape>] on a <background> background";
# its tokenizer knows these words and no others.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("white", "grey", "black", "beige")
VOCABULARY = frozenset({"a", "an", "and", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS})
VOCABULARY_HELP = (
    f"The demo model knows {len(SHAPES)} shapes ({', '.join(SHAPES)}), {len(COLOURS)} colours ({', '.join(COLOURS)})"
    f" and {len(BACKGROUNDS)} backgrounds ({', '.join(BACKGROUNDS)}): prompts like 'a red star on a white"
    " background'. Other words mean nothing to it."
)


def load_demo_pipeline(
    torch_dtype: torch.dtype = torch.float32, map: str = "edges"
) -> SketchGuidedStableDiffusionPipeline:
    """The demo `SketchGuidedStableDiffusionPipeline` (64x64 images of shapes), with an LGP, on the CPU.

    `map` picks the LGP, by the map it was trained on: `"edges"` (the default: sketches, outlines of either polarity)
    or `"silhouette"` (filled shapes, white on black: "put a red thing here, this big"), whose guidance map is passed
    as `sketch` like any other. With `"edges"` the silhouette LGP is the pipeline's `fill_lgp`: each sketch's fill
    guides too (`sketch_fill`, on by default; `sketch_fill_scale=0` turns it off). The weights are stored in float16 to
    keep the package small and loaded in `torch_dtype` (float32 by default, since the CPU does not run float16 well).
    """
    if map not in DEMO_LGP_FOLDERS:
        raise ValueError(f"The demo has no LGP for the map {map!r}; choose one of {list(DEMO_LGP_FOLDERS)}.")
    lgp_dir = DEMO_MODEL_DIR / DEMO_LGP_FOLDERS[map]
    if not (DEMO_MODEL_DIR / "model_index.json").is_file() or not (lgp_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"The demo model (or its {map} LGP) is missing from {DEMO_MODEL_DIR}. Reinstall the package, or train it"
            " with `python -m pipeline_sketch_guided.training.train_demo_model` (see docs/demo_model.md)."
        )
    # Another map's LGP replaces the pipeline's own (which is then never loaded), and guides without a fill: its map is
    # no sketch to fill.
    extra = {}
    if map != "edges":
        extra = {"lgp": LGPModel.from_pretrained(lgp_dir, **dtype_kwargs(torch_dtype)), "fill_lgp": None}
    pipe = SketchGuidedStableDiffusionPipeline.from_pretrained(DEMO_MODEL_DIR, **dtype_kwargs(torch_dtype), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unknown_words(prompt: str) -> list[str]:
    """The words of `prompt` that the demo model's captions never used (it draws as if they were not there)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    return sorted(set(words) - VOCABULARY, key=words.index)


def shape_polygon(kind: str, center: tuple[float, float], radius: float, rotation: float) -> list[tuple[float, float]]:
    """The outline of a shape as polygon points (a circle as a 64-gon); `rotation` in degrees."""
    if kind == "circle":
        corners, radii = 64, [radius]
    elif kind == "square":
        corners, radii, rotation = 4, [radius], rotation + 45
    elif kind == "triangle":
        corners, radii = 3, [radius]
    elif kind == "star":
        corners, radii = 10, [radius, radius * 0.45]
    else:
        raise ValueError(f"Unknown shape {kind!r}; choose one of {SHAPES}.")
    cx, cy = center
    points = []
    for index in range(corners):
        angle = math.radians(rotation) + 2 * math.pi * index / corners - math.pi / 2
        r = radii[index % len(radii)]
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def filled_mask(points: list[tuple[float, float]], size: int = DEMO_IMAGE_SIZE) -> np.ndarray:
    """A boolean `size` x `size` mask of the polygon's inside."""
    canvas = PIL.Image.new("L", (size, size), 0)
    PIL.ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas) > 127


def wobbly_outline(
    kind: str, center: tuple[float, float], radius: float, rotation: float, wobble: float, rng: random.Random
) -> list[tuple[float, float]]:
    """The shape's outline resampled densely (so that wobble bends the strokes, not only the corners) and bent in and
    out along the radius by up to `wobble` x `radius`, by three random waves: a hand's outline of the shape."""
    outline = shape_polygon(kind, center, radius, rotation)
    closed = [*outline, outline[0]]
    dense = []
    for (x0, y0), (x1, y1) in zip(closed, closed[1:], strict=False):
        steps = max(2, int(math.dist((x0, y0), (x1, y1)) * 2))
        dense += [(x0 + (x1 - x0) * s / steps, y0 + (y1 - y0) * s / steps) for s in range(steps)]
    count = len(dense)
    waves = [(rng.uniform(1, 4), rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.0)) for _ in range(3)]
    points = []
    for index, (x, y) in enumerate(dense):
        phase = 2 * math.pi * index / count
        bend = wobble * radius * sum(a * math.sin(f * phase + p) for f, p, a in waves) / 3
        dx, dy = x - center[0], y - center[1]
        norm = math.hypot(dx, dy) or 1.0
        points.append((x + bend * dx / norm, y + bend * dy / norm))
    return points


def freehand_blob(
    kind: str,
    center: tuple[float, float],
    radius: float,
    rotation: float = 0.0,
    *,
    seed: int = 0,
    wobble: float = 0.15,
    size: int = 256,
) -> tuple[PIL.Image.Image, list[tuple[float, float]]]:
    """A hand-drawn-looking filled blob of roughly the shape, white on black at `size` x `size` pixels: a silhouette
    map as a person would paint one ("a thing here, this big"). Coordinates are in the 64x64 frame of the demo model.

    Returns the image and the blob's outline in the 64x64 frame (`filled_mask` of it is what the blob asks for).
    """
    points = wobbly_outline(kind, center, radius, rotation, wobble, random.Random(seed))
    scale = size / DEMO_IMAGE_SIZE
    image = PIL.Image.new("L", (size, size), 0)
    PIL.ImageDraw.Draw(image).polygon([(x * scale, y * scale) for x, y in points], fill=255)
    return image, points


def freehand_sketch(
    kind: str,
    center: tuple[float, float],
    radius: float,
    rotation: float = 0.0,
    *,
    seed: int = 0,
    wobble: float = 0.0,
    gaps: int = 0,
    overshoot: float = 0.0,
    line_width: float = 1.5,
    dark_on_light: bool = True,
    size: int = 256,
) -> PIL.Image.Image:
    """A hand-drawn-looking outline of a shape, as a person would sketch it, at `size` x `size` pixels.

    Coordinates are in the 64x64 frame of the demo model and scaled to `size`. `wobble` bends the stroke by up to that
    fraction of the radius, `gaps` breaks it in that many places, `overshoot` runs the stroke past its start by that
    fraction of the perimeter, and `line_width` is in 64x64 pixels.
    """
    rng = random.Random(seed)
    points = wobbly_outline(kind, center, radius, rotation, wobble, rng)
    count = len(points)
    points += points[: int(overshoot * count) + 1]  # close the loop, running past the start by `overshoot`

    # Break the stroke into pieces at `gaps` random places, each gap about 4% of the perimeter.
    cut = sorted(rng.sample(range(count), gaps)) if gaps else []
    gap = max(1, count // 25)
    pieces, start = [], 0
    for position in cut:
        pieces.append(points[start:position])
        start = position + gap
    pieces.append(points[start:])

    scale = size / DEMO_IMAGE_SIZE
    paper, ink = (255, 0) if dark_on_light else (0, 255)
    image = PIL.Image.new("L", (size, size), paper)
    draw = PIL.ImageDraw.Draw(image)
    for piece in pieces:
        if len(piece) > 1:
            draw.line(
                [(x * scale, y * scale) for x, y in piece],
                fill=ink,
                width=max(1, round(line_width * scale)),
                joint="curve",
            )
    return image


# The demo command's sketches: (prompt, shape, center, radius, rotation, free-hand style).
DEMO_SKETCHES = [
    ("a red star on a white background", "star", (22, 24), 16, 10, {"wobble": 0.08, "overshoot": 0.05}),
    ("a blue circle on a grey background", "circle", (42, 40), 14, 0, {"wobble": 0.12, "gaps": 2}),
    ("a yellow triangle on a black background", "triangle", (32, 36), 20, 180, {"dark_on_light": False}),
    ("a green square on a beige background", "square", (24, 40), 13, 20, {"line_width": 3.0, "wobble": 0.05}),
]


def demo_sketches() -> list[tuple[str, PIL.Image.Image]]:
    """The (prompt, sketch) pairs that `sketch-guided demo` draws."""
    return [
        (prompt, freehand_sketch(kind, center, radius, rotation, seed=index, **style))
        for index, (prompt, kind, center, radius, rotation, style) in enumerate(DEMO_SKETCHES)
    ]
