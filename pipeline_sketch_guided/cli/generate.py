"""`sketch-guided generate`: one prompt, one sketch, images written with their settings."""

from __future__ import annotations

import argparse
import inspect
import logging
import os

from .. import loading
from ..loading import SCHEDULERS
from ..saving import file_sha256, image_grid, save_image
from .common import (
    UsageError,
    add_model_arguments,
    check_image_file,
    check_model_arguments,
    check_output_path,
    lgp_name,
    load_model,
    positive_int,
    resolve_device,
    resolve_dtype,
    set_threads,
)

# A plain logger (not diffusers' get_logger, which would import diffusers before `quiet_libraries`).
logger = logging.getLogger(__name__)


def add_generate_parser(subparsers) -> None:
    from ..demo import VOCABULARY_HELP
    from ..pipeline import DEFAULT_SKETCH_FILL_SCALE, DEFAULT_SKETCH_GUIDANCE_END, DEFAULT_SKETCH_GUIDANCE_SCALE

    parser = subparsers.add_parser(
        "generate",
        help="draw an image from a prompt, following a sketch",
        description=(
            "Generate images with a SketchGuidedStableDiffusionPipeline. Without --model it uses the shipped demo"
            " model (64x64 pictures of coloured shapes), offline. --model takes any Stable Diffusion 1.x/2.x, XL or 3,"
            " or FLUX.1 repo id or folder (a Hub id needs internet) and --lgp an LGP trained for it."
            f" {VOCABULARY_HELP}"
        ),
    )
    parser.add_argument("--prompt", required=True, help="what to draw")
    parser.add_argument("--negative-prompt", help="what to keep out of the image")
    parser.add_argument(
        "--sketch",
        help="the drawing to follow (an image file, either polarity), or the map the LGP was trained on (a silhouette:"
        " white shapes on black; a depth map: light is near; a colour map); without it, no guidance",
    )
    parser.add_argument(
        "--sketch-mask",
        help="where the sketch applies (an image: white where it is an instruction, black where the prompt decides);"
        " default: all of it",
    )
    parser.add_argument(
        "--image",
        help="a photo or render to draw into (image-to-image; with --mask-image, inpainting); the image takes its size"
        " unless --height and --width say otherwise (inpainting: the model's size by default)",
    )
    parser.add_argument(
        "--mask-image",
        help="with --image: the region to repaint (white), where the sketch guides too unless --sketch-mask says"
        " otherwise",
    )
    parser.add_argument(
        "--strength",
        type=float,
        help="with --image: how much of the image is redrawn, from 0 (none) to 1 (all); default: the pipeline's (0.8"
        " for image-to-image, 1 for inpainting). Guidance fractions count the steps this runs (strength x --steps)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="where to write the image (.png keeps the prompt, seed and settings in its metadata; .jpg, .webp, ...);"
        " with --num-images > 1 a grid of them, each image also beside it as <name>-<k>",
    )
    parser.add_argument("--num-images", type=positive_int, default=1, help="images, seeds --seed, --seed + 1, ...")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the first image (default 0)")
    parser.add_argument("--steps", type=positive_int, default=30, help="denoising steps (default 30)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the model's own)")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        help="classifier-free guidance (FLUX.1: its distilled guidance); default: the pipeline's (7.5 for SD 1.x/2.x"
        " and XL, 7 for SD3, 3.5 for FLUX)",
    )
    parser.add_argument(
        "--sketch-guidance-scale",
        type=float,
        default=DEFAULT_SKETCH_GUIDANCE_SCALE,
        help=f"beta: how strongly to follow the sketch, about 1 to 4 (default {DEFAULT_SKETCH_GUIDANCE_SCALE})",
    )
    parser.add_argument(
        "--sketch-guidance-start", type=float, default=0.0, help="fraction of the steps before guidance (default 0)"
    )
    parser.add_argument(
        "--sketch-guidance-end",
        type=float,
        default=DEFAULT_SKETCH_GUIDANCE_END,
        help=f"fraction of the steps after which guidance stops (default {DEFAULT_SKETCH_GUIDANCE_END})",
    )
    parser.add_argument(
        "--sketch-guidance-interval",
        type=positive_int,
        default=1,
        help="compute the sketch gradient every k-th step of the guided part (and every step of the first 10%%),"
        " reusing it between: faster, approximate (default 1, the exact method; 2 with --sketch-guidance-end 0.5"
        " costs what the defaults cost)",
    )
    parser.add_argument(
        "--sketch-guidance-recurrence",
        type=positive_int,
        default=1,
        help="take each guided step of the first 10%% of the steps this many times, from re-noised latents: follows"
        " the sketch more closely for a guided step's cost per repeat (default 1: once)",
    )
    parser.add_argument(
        "--invert-map",
        action="store_true",
        help="for a depth LGP: the map is dark where near (a distance map), so turn it round (the LGP reads light as"
        " near); sketches and silhouettes are read either way round without it",
    )
    parser.add_argument(
        "--sketch-fill",
        help="fill guidance (with a fill LGP): 'auto' fills what the sketch's outlines enclose, or"
        " an image of the filled shapes (white on black); default: auto when the model has a fill LGP",
    )
    parser.add_argument(
        "--sketch-fill-scale",
        type=float,
        default=DEFAULT_SKETCH_FILL_SCALE,
        help=f"weight of the fill against the sketch, 0 turns fill guidance off (default {DEFAULT_SKETCH_FILL_SCALE})",
    )
    parser.add_argument("--height", type=positive_int, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=positive_int, help="image width in pixels (default: the model's)")
    parser.add_argument(
        "--edge-map-out",
        help="also write the LGP's predicted map at the last guided step (for an edge LGP bright where it predicts"
        " strokes; otherwise the kind of map it was trained on)",
    )
    add_model_arguments(parser)
    parser.set_defaults(func=run_generate)


def check_generate_args(args: argparse.Namespace) -> None:
    from ..pipeline import MAX_SKETCH_GUIDANCE_SCALE

    check_output_path(args.out, "--out")
    if args.edge_map_out:
        if not args.sketch:
            raise UsageError("--edge-map-out needs --sketch: edge maps are predicted while guiding.")
        check_output_path(args.edge_map_out, "--edge-map-out")
    if args.sketch:
        check_image_file(args.sketch, "--sketch")
    if args.sketch_mask:
        if not args.sketch:
            raise UsageError("--sketch-mask needs --sketch: it says where the sketch applies.")
        check_image_file(args.sketch_mask, "--sketch-mask")
    if args.mask_image and not args.image:
        raise UsageError("--mask-image needs --image: it says which part of that image to repaint.")
    if args.strength is not None and not args.image:
        raise UsageError("--strength needs --image: it says how much of that image is redrawn.")
    if args.strength is not None and not 0 < args.strength <= 1:  # NaN fails too
        raise UsageError(f"--strength {args.strength}: must be above 0 and at most 1.")
    for path, option in ((args.image, "--image"), (args.mask_image, "--mask-image")):
        if path:
            check_image_file(path, option)
    scale = args.sketch_guidance_scale
    if not 0 <= scale <= MAX_SKETCH_GUIDANCE_SCALE:  # NaN fails both comparisons
        raise UsageError(
            f"--sketch-guidance-scale {scale}: must be from 0 (no guidance) to {MAX_SKETCH_GUIDANCE_SCALE}; about 1"
            " to 4 follows a sketch."
        )
    if not 0 <= args.sketch_guidance_start < args.sketch_guidance_end <= 1:
        raise UsageError(
            f"--sketch-guidance-start {args.sketch_guidance_start} and --sketch-guidance-end"
            f" {args.sketch_guidance_end}: need 0 <= start < end <= 1 (fractions of the steps)."
        )
    if args.sketch_fill and not args.sketch:
        raise UsageError("--sketch-fill needs --sketch: the fill says which side of its lines is the shape.")
    if args.sketch_fill and args.sketch_fill != "auto":
        check_image_file(args.sketch_fill, "--sketch-fill")
    if not 0 <= args.sketch_fill_scale <= MAX_SKETCH_GUIDANCE_SCALE:
        raise UsageError(
            f"--sketch-fill-scale {args.sketch_fill_scale}: must be from 0 (no fill guidance) to"
            f" {MAX_SKETCH_GUIDANCE_SCALE}."
        )
    for size in (args.height, args.width):
        if size is not None and size % 8:
            raise UsageError(f"--height and --width must be multiples of 8, got {size}.")
    check_model_arguments(args)


def fill_setting(args: argparse.Namespace, pipe) -> str | None:
    """What the image's metadata records as its fill: "auto", the fill image's sha256, or None (no fill guidance)."""
    if not args.sketch or args.sketch_fill_scale == 0 or not pipe.fills_by_default:
        return None
    return file_sha256(args.sketch_fill) if args.sketch_fill not in (None, "auto") else "auto"


def numbered(path: str, index: int) -> str:
    stem, extension = os.path.splitext(path)
    return f"{stem}-{index}{extension}"


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__
    from ..demo import VOCABULARY_HELP, unknown_words

    check_generate_args(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, guided=args.sketch is not None)
    set_threads(args, device)
    if args.model is None and (unknown := unknown_words(f"{args.prompt} {args.negative_prompt or ''}")):
        logger.warning(f"The demo model does not know {', '.join(map(repr, unknown))}. {VOCABULARY_HELP}")

    pipe = load_model(args, device, dtype)
    try:
        pipe = loading.editing_pipeline(pipe, image=bool(args.image), mask=bool(args.mask_image))
    except ValueError as error:
        raise UsageError(f"--image: {error}") from None
    editing = {}
    takes_size = "height" in inspect.signature(type(pipe).__call__).parameters
    if args.image:
        import PIL.Image

        editing["image"] = PIL.Image.open(args.image).convert("RGB")
        if not takes_size and (args.height or args.width):  # image-to-image makes images of the image's size
            photo = editing["image"]
            editing["image"] = photo.resize((args.width or photo.width, args.height or photo.height))
        if args.mask_image:
            editing["mask_image"] = PIL.Image.open(args.mask_image).convert("L")
        if args.strength is not None:
            editing["strength"] = args.strength
    fill = {"sketch_fill": args.sketch_fill, "sketch_fill_scale": args.sketch_fill_scale}
    if args.scheduler:
        try:
            loading.set_scheduler(pipe, args.scheduler)
        except ValueError as error:
            raise UsageError(f"--scheduler {args.scheduler}: {error}") from None
    pipe.set_progress_bar_config(disable=False, desc=f"{args.num_images} image(s), {args.steps} steps")
    seeds = [args.seed + k for k in range(args.num_images)]
    output = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        sketch=args.sketch,
        sketch_mask=args.sketch_mask,
        num_inference_steps=args.steps,
        **({} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}),
        sketch_guidance_scale=args.sketch_guidance_scale,
        sketch_guidance_start=args.sketch_guidance_start,
        sketch_guidance_end=args.sketch_guidance_end,
        sketch_guidance_interval=args.sketch_guidance_interval,
        sketch_guidance_recurrence=args.sketch_guidance_recurrence,
        **({"height": args.height, "width": args.width} if takes_size else {}),
        num_images_per_prompt=args.num_images,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        return_edge_maps=bool(args.edge_map_out),
        invert_map=args.invert_map,
        **fill,
        **editing,
    )
    fill_used = fill_setting(args, pipe)
    settings = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "sampler": type(pipe.scheduler).__name__,
        "cfg_scale": pipe.guidance_scale,
        "size": f"{output.images[0].width}x{output.images[0].height}",
        "model": args.model or "pipeline_sketch_guided demo model",
        "lgp": lgp_name(args),
        "sketch_sha256": file_sha256(args.sketch) if args.sketch else None,
        "sketch_mask_sha256": file_sha256(args.sketch_mask) if args.sketch_mask else None,
        "sketch_guidance_scale": args.sketch_guidance_scale if args.sketch else None,
        "sketch_guidance_start": args.sketch_guidance_start if args.sketch else None,
        "sketch_guidance_end": args.sketch_guidance_end if args.sketch else None,
        "sketch_guidance_interval": args.sketch_guidance_interval if args.sketch else None,
        "sketch_guidance_recurrence": args.sketch_guidance_recurrence if args.sketch else None,
        "invert_map": True if args.invert_map else None,
        "sketch_fill": fill_used,
        "sketch_fill_scale": args.sketch_fill_scale if fill_used else None,
        "fill_lgp": args.fill_lgp if fill_used else None,  # None: the model's own
        "image_sha256": file_sha256(args.image) if args.image else None,
        "mask_image_sha256": file_sha256(args.mask_image) if args.mask_image else None,
        "strength": args.strength,
        "generator": f"pipeline_sketch_guided {__version__}",
    }
    written = []
    if args.num_images == 1:
        save_image(output.images[0], args.out, {**settings, "seed": seeds[0]})
    else:
        for k, (image, seed) in enumerate(zip(output.images, seeds, strict=True)):
            save_image(image, numbered(args.out, k), {**settings, "seed": seed})
            written.append(numbered(args.out, k))
        save_image(image_grid(output.images), args.out, {**settings, "seed": seeds[0], "seeds": seeds})
    size = f"{output.images[0].width}x{output.images[0].height}"
    print(f"Wrote {args.out} ({size}{f', a grid of {args.num_images}' if written else ''}).")
    if args.edge_map_out:
        save_image(image_grid(output.edge_maps), args.edge_map_out)
        print(f"Wrote {args.edge_map_out}.")
    return 0
