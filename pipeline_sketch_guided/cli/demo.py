"""`sketch-guided demo`: the sheet of built-in sketches, unguided and guided, from the shipped demo model."""

from __future__ import annotations

import argparse

from .. import loading
from ..saving import save_image
from .common import check_output_path, positive_int, resolve_device, set_threads


def add_demo_parser(subparsers) -> None:
    from ..demo import VOCABULARY_HELP

    parser = subparsers.add_parser(
        "demo",
        help="a sheet of built-in sketches with unguided and guided images, from the demo model",
        description=(
            "For each built-in free-hand sketch, draw its prompt with the shipped demo model twice with the same seed,"
            f" without and with the sketch, and write one sheet: sketch | unguided | guided. {VOCABULARY_HELP}"
        ),
    )
    parser.add_argument("--out", default="sketch_guided_demo.png", help="the sheet to write (PNG, JPEG, ...)")
    parser.add_argument("--steps", type=positive_int, default=30, help="denoising steps (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of every image (default 0)")
    parser.add_argument("--scale", type=positive_int, default=3, help="enlarge each 64x64 tile this many times")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: the cores not busy, at least 1)")
    parser.set_defaults(func=run_demo, device=None)


def run_demo(args: argparse.Namespace) -> int:
    import PIL.Image
    import PIL.ImageDraw
    import torch
    from tqdm.auto import tqdm

    from ..demo import DEMO_IMAGE_SIZE, demo_sketches

    check_output_path(args.out, "--out")
    device = resolve_device(None)
    set_threads(args, device)
    pipe = loading.load_pipeline(None, None, device)
    tile = DEMO_IMAGE_SIZE * args.scale
    header = 14
    pairs = demo_sketches()
    sheet = PIL.Image.new("RGB", (3 * tile, header + len(pairs) * tile), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for column, title in enumerate(("sketch", "unguided", "guided")):
        draw.text((column * tile + 4, 2), title, fill="black")
    with tqdm(total=2 * len(pairs), desc="demo images", unit="image") as progress:
        for row, (prompt, sketch) in enumerate(pairs):
            images = [sketch.convert("RGB")]
            for guided in (False, True):
                generator = torch.Generator("cpu").manual_seed(args.seed)
                images.append(
                    pipe(
                        prompt, sketch=sketch if guided else None, num_inference_steps=args.steps, generator=generator
                    ).images[0]
                )
                progress.update()
            for column, image in enumerate(images):
                tile_image = image.resize((tile, tile), PIL.Image.Resampling.NEAREST)
                sheet.paste(tile_image, (column * tile, header + row * tile))
    save_image(sheet, args.out)
    print(f"Wrote {args.out}: {len(pairs)} sketches, each sketch | unguided | guided (seed {args.seed}).")
    return 0
