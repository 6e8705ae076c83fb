"""A procedural dataset of 64x64 images of filled shapes with captions that name them, for the demo model.

Seeded and reproducible: `render_sample(seed)` always draws the same picture. Each sample also carries the shapes'
masks, which the efficacy benchmark uses to score where a shape was drawn, and `render_silhouette` draws them as a
map (white shapes on black): the training maps of the demo silhouette LGP (`--silhouettes_dir`). `render_drawn_edges`
draws each shape's outline as a hand might (bent, broken, overshooting strokes of any width), an alternative to the
Canny edges of the renders for the edge LGP's training maps (`--drawn_edges_dir`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageChops
import PIL.ImageDraw

from pipeline_sketch_guided import demo
from pipeline_sketch_guided.demo import SHAPES, filled_mask, freehand_sketch, shape_polygon

IMAGE_SIZE = 64
# Shapes are drawn this many times larger, then shrunk, so that their edges are anti-aliased.
SUPERSAMPLE = 4

# The demo vocabulary's colours and backgrounds (pipeline_sketch_guided.demo) as RGB.
COLOURS = dict(
    zip(
        demo.COLOURS,
        [(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 210, 40), (140, 60, 190), (245, 140, 30)],
        strict=True,
    )
)
# Neutral backgrounds, so that no background can be mistaken for a shape's colour.
BACKGROUNDS = dict(
    zip(demo.BACKGROUNDS, [(245, 245, 245), (150, 150, 150), (25, 25, 25), (225, 210, 180)], strict=True)
)
BACKGROUND_STYLES = ("plain", "gradient", "textured")
# A style the demo model never saw: its UNet fine-tuned on it is the "fine-tune of the base" that the unchanged LGP
# is checked on (benchmarks.controlnet_comparison).
NEW_STYLES = ("striped",)
LAYOUTS = ("inside", "anywhere")  # how shapes are sized and placed (random_shapes)
WORDS = sorted(demo.VOCABULARY)  # the whole caption vocabulary


@dataclass
class Shape:
    kind: str
    colour: str
    center: tuple[float, float]  # in pixels of the 64x64 image
    radius: float
    rotation: float  # degrees


def shape_mask(shape: Shape) -> np.ndarray:
    """A boolean 64x64 mask of the filled shape."""
    return filled_mask(shape_polygon(shape.kind, shape.center, shape.radius, shape.rotation))


def caption(shapes: list[Shape], background: str) -> str:
    names = " and ".join(
        f"{'an' if shape.colour[0] in 'aeiou' else 'a'} {shape.colour} {shape.kind}" for shape in shapes
    )
    return f"{names} on a {background} background"


def _background(rng: random.Random, name: str, style: str) -> np.ndarray:
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    image = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if style == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1) - 0.5
        ramp = (xs * math.cos(angle) + ys * math.sin(angle))[..., None]
        image += ramp * rng.uniform(20, 50)
    elif style == "textured":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(4, 10), (IMAGE_SIZE, IMAGE_SIZE, 1))
        image += noise
    elif style == "striped":
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 12)
        ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        stripes = np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period) > 0
        image += (stripes[..., None] - 0.5) * rng.uniform(30, 50)
    elif style != "plain":
        raise ValueError(f"Unknown background style {style!r}; choose from {BACKGROUND_STYLES + NEW_STYLES}.")
    return image


def random_shapes(rng: random.Random, layout: str = "inside") -> list[Shape]:
    """One or two shapes of different colours that overlap little, placed by `layout` (`LAYOUTS`).

    "inside", demo model v1's data and the shipped LGPs': one or two shapes equally often, a single one of radius 10 to
    22, kept mostly inside the frame. "anywhere", what demo model v2's UNet was trained further on: one shape in 60% of
    the images, from a quarter of the frame's width to filling it, centred anywhere it stays mostly inside the frame
    (users draw large, off-centre and edge-touching sketches).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")
    anywhere = layout == "anywhere"
    count = (1 if rng.random() < 0.6 else 2) if anywhere else rng.choice((1, 2))
    shapes: list[Shape] = []
    while len(shapes) < count:
        if anywhere:
            radius = rng.uniform(9, 31) if count == 1 else rng.uniform(8, 16)
        else:
            radius = rng.uniform(10, 22) if count == 1 else rng.uniform(8, 15)
        low, high = _centre_range(radius, 0.6 if anywhere and count == 1 else 0.8)
        shape = Shape(
            kind=rng.choice(SHAPES),
            colour=rng.choice([c for c in COLOURS if c not in {s.colour for s in shapes}]),
            center=(rng.uniform(low, high), rng.uniform(low, high)),
            radius=radius,
            rotation=rng.uniform(0, 360),
        )
        if all(math.dist(shape.center, other.center) > 0.9 * (shape.radius + other.radius) for other in shapes):
            shapes.append(shape)
    return shapes


def _centre_range(radius: float, margin: float) -> tuple[float, float]:
    """Where a shape's centre may lie: at least `margin` x radius inside the frame, or at the centre if it is larger."""
    low = min(margin * radius, IMAGE_SIZE / 2)
    return low, IMAGE_SIZE - low


def render(shapes: list[Shape], background: str, style: str, rng: random.Random) -> PIL.Image.Image:
    big = IMAGE_SIZE * SUPERSAMPLE
    image = PIL.Image.fromarray(np.clip(_background(rng, background, style), 0, 255).astype(np.uint8))
    image = image.resize((big, big), PIL.Image.Resampling.NEAREST)
    draw = PIL.ImageDraw.Draw(image)
    for shape in shapes:
        center = (shape.center[0] * SUPERSAMPLE, shape.center[1] * SUPERSAMPLE)
        points = shape_polygon(shape.kind, center, shape.radius * SUPERSAMPLE, shape.rotation)
        draw.polygon(points, fill=COLOURS[shape.colour])
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.Resampling.BOX)


def render_silhouette(shapes: list[Shape]) -> PIL.Image.Image:
    """The filled shapes, white on black, anti-aliased as `render` draws them: a 64x64 grey silhouette map."""
    big = IMAGE_SIZE * SUPERSAMPLE
    image = PIL.Image.new("L", (big, big), 0)
    draw = PIL.ImageDraw.Draw(image)
    for shape in shapes:
        center = (shape.center[0] * SUPERSAMPLE, shape.center[1] * SUPERSAMPLE)
        draw.polygon(shape_polygon(shape.kind, center, shape.radius * SUPERSAMPLE, shape.rotation), fill=255)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.Resampling.BOX)


def render_drawn_edges(shapes: list[Shape], seed: int) -> PIL.Image.Image:
    """Each shape's outline drawn free-hand, light strokes on black (the edge LGP's training convention), 64x64: a
    random stroke style per shape (wobble, breaks, overshoot, width from thin to thick), seeded by `seed`."""
    rng = random.Random(seed)
    size = IMAGE_SIZE * SUPERSAMPLE
    image = PIL.Image.new("L", (size, size), 0)
    for shape in shapes:
        style = {
            "wobble": rng.uniform(0.0, 0.15),
            "gaps": rng.choice((0, 0, 1, 2, 3, 4)),
            "overshoot": rng.choice((0.0, rng.uniform(0.02, 0.15))),
            "line_width": rng.uniform(0.7, 3.5),
        }
        outline = freehand_sketch(
            shape.kind, shape.center, shape.radius, shape.rotation, seed=rng.getrandbits(32), dark_on_light=False,
            size=size, **style,
        )  # fmt: skip
        image = PIL.ImageChops.lighter(image, outline)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.Resampling.BOX)


def render_sample(
    seed: int, styles: tuple[str, ...] = BACKGROUND_STYLES, layout: str = "inside"
) -> tuple[PIL.Image.Image, str, list[Shape]]:
    """The image, caption and shapes of sample `seed`, its background in one of `styles`, its shapes placed by
    `layout`."""
    rng = random.Random(seed)
    shapes = random_shapes(rng, layout)
    background = rng.choice(list(BACKGROUNDS))
    style = rng.choice(styles)
    return render(shapes, background, style, rng), caption(shapes, background), shapes


def write_image_folder(
    output_dir: Path,
    num_images: int,
    first_seed: int = 0,
    silhouettes_dir: Path | None = None,
    drawn_edges_dir: Path | None = None,
    layout: str = "inside",
) -> None:
    """Write samples first_seed .. first_seed + num_images - 1 as an ImageFolder (PNGs and metadata.jsonl), and each
    one's silhouette map in `silhouettes_dir` and free-hand edge map in `drawn_edges_dir`, under the same file name
    (for `prepare_data --map folder:...`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for folder in (silhouettes_dir, drawn_edges_dir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "metadata.jsonl", "w") as metadata:
        for seed in range(first_seed, first_seed + num_images):
            image, text, shapes = render_sample(seed, layout=layout)
            image.save(output_dir / f"{seed:07d}.png")
            if silhouettes_dir is not None:
                render_silhouette(shapes).save(silhouettes_dir / f"{seed:07d}.png")
            if drawn_edges_dir is not None:
                render_drawn_edges(shapes, seed).save(drawn_edges_dir / f"{seed:07d}.png")
            metadata.write(json.dumps({"file_name": f"{seed:07d}.png", "text": text}) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Write shapes samples as an ImageFolder for pipeline_sketch_guided.training.prepare_data."
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--num_images", type=int, default=3000)
    parser.add_argument("--first_seed", type=int, default=0)
    parser.add_argument(
        "--silhouettes_dir",
        type=Path,
        default=None,
        help="Also write each image's silhouette map (same file name) here.",
    )
    parser.add_argument(
        "--drawn_edges_dir",
        type=Path,
        default=None,
        help="Also write each image's outlines drawn free-hand (same file name, light on black) here.",
    )
    parser.add_argument(
        "--layout",
        default="inside",
        choices=LAYOUTS,
        help="inside: demo model v1's data and the shipped LGPs'; anywhere: larger, off-centre shapes (v2's UNet)",
    )
    args = parser.parse_args(argv)
    write_image_folder(
        args.output_dir, args.num_images, args.first_seed, args.silhouettes_dir, args.drawn_edges_dir, args.layout
    )
    silhouettes = f" and their silhouettes to {args.silhouettes_dir}" if args.silhouettes_dir else ""
    print(f"Wrote {args.num_images} images with captions to {args.output_dir}{silhouettes}.")


if __name__ == "__main__":
    main()
