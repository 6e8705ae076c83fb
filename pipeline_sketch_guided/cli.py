"""The `sketch-guided` command line. Each subcommand is an `add_<name>_parser(subparsers)` and a `run_<name>(args)`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

# A plain logger (not diffusers' get_logger, which would import diffusers before `quiet_libraries`).
logger = logging.getLogger(__name__)


def add_convert_parser(subparsers) -> None:
    from .convert import COMMUNITY_FORMATS

    parser = subparsers.add_parser(
        "convert",
        help="convert a published SD1.5 LGP checkpoint to a diffusers LGPModel folder",
        description=(
            "Convert a community LGP (nyanko7/sketch2img-edge-predictor-train or"
            " ogkalu/Stable-Diffusion-Latent-Guidance-Predictor) to a folder that LGPModel.from_pretrained loads"
            " (config.json + safetensors). SRC is a local file, or a Hub repo id (needs internet)."
        ),
    )
    parser.add_argument("src", help="checkpoint file, or Hub repo id")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--filename", help="the file in the Hub repo (known for the two community repos)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    parser.add_argument(
        "--format",
        dest="source_format",
        choices=list(COMMUNITY_FORMATS),
        help="the checkpoint's format; by default told from its input width",
    )
    parser.add_argument(
        "--sketch-polarity",
        choices=["dark_on_light", "light_on_dark"],
        help="how the LGP's training edge maps looked, where it is not the format's recorded one (sketch2img's"
        " history has both; the README's 'Which way round' shows a one-minute check)",
    )
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_community_lgp

    download_kwargs = {"revision": args.revision} if args.revision else {}
    lgp = convert_community_lgp(
        args.src,
        args.out,
        filename=args.filename,
        source_format=args.source_format,
        sketch_polarity=args.sketch_polarity,
        **download_kwargs,
    )
    print(
        f"Saved {args.out}: LGPModel with {lgp.in_features} inputs, blocks {', '.join(lgp.config.blocks)}"
        f" ({lgp.config.feature_branch} branch, sketches {lgp.config.sketch_polarity})."
    )
    return 0


def add_push_parser(subparsers) -> None:
    from .convert import COMMUNITY_FORMATS
    from .hub import DEFAULT_BASE_MODEL, DEFAULT_LICENSE

    parser = subparsers.add_parser(
        "push",
        help="publish an LGP on the Hub with its model card and the custom-pipeline code",
        description=(
            "Build the repo folder of a published LGP (model card, config.json with auto_map, safetensors weights,"
            " pipeline.py and the modules it imports, figures) and upload it. With --dry-run only the folder is built."
        ),
    )
    parser.add_argument("lgp", help="LGP folder or Hub repo id (LGPModel.from_pretrained)")
    parser.add_argument("repo_id", help="the Hub repo to publish to, <user or org>/<name>")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="Hub id of the model whose UNet it reads")
    parser.add_argument("--license", help=f"Hub license id (default {DEFAULT_LICENSE}; 'other' with --converted-from)")
    parser.add_argument("--training-data", help="what it was trained on, a sentence or two")
    parser.add_argument("--training-details", help="steps, batch size, loss, hardware, command line")
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id for the metadata (repeatable)")
    parser.add_argument("--figure", action="append", default=[], help="image file shown in the card (repeatable)")
    parser.add_argument(
        "--converted-from",
        choices=list(COMMUNITY_FORMATS),
        help="credit the community checkpoint it was converted from",
    )
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", help="Hub token with write access (default: the logged-in one)")
    parser.add_argument("--output-dir", help="build the folder here (kept); by default a temporary folder")
    parser.add_argument("--dry-run", action="store_true", help="build the folder in --output-dir, do not upload")
    parser.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    from .convert import COMMUNITY_FORMATS
    from .hub import DEFAULT_LICENSE, export_hub_folder, push_lgp_to_hub, upload_hub_folder
    from .lgp import LGPModel

    if args.dry_run and not args.output_dir:
        raise SystemExit("--dry-run builds the folder only: give it --output-dir.")
    source = COMMUNITY_FORMATS[args.converted_from] if args.converted_from else None
    card_kwargs = {
        "base_model": args.base_model,
        "license": args.license or ("other" if source else DEFAULT_LICENSE),
        "training_data": args.training_data,
        "training_details": args.training_details,
        "datasets": args.dataset,
        "figures": args.figure,
        "source": source,
    }
    lgp = LGPModel.from_pretrained(args.lgp)
    hub_kwargs = {"private": args.private or None, "token": args.token}
    if args.output_dir:
        folder = export_hub_folder(lgp, args.output_dir, args.repo_id, **card_kwargs)
        print(f"Built {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}.")
        if args.dry_run:
            return 0
        url = upload_hub_folder(folder, args.repo_id, **hub_kwargs)
    else:
        url = push_lgp_to_hub(lgp, args.repo_id, **hub_kwargs, **card_kwargs)
    print(f"Pushed to https://huggingface.co/{args.repo_id} ({url}).")
    return 0


# `--scheduler` names: diffusers' schedulers for Stable Diffusion (KarrasDiffusionSchedulers), by their usual names.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++_single": "DPMSolverSinglestepScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "dpm2_a": "KDPM2AncestralDiscreteScheduler",
    "deis": "DEISMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "dpm_sde": "DPMSolverSDEScheduler",
    "edm_euler": "EDMEulerScheduler",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --lgp, --device, --dtype, --threads: what runs, and where."""
    parser.add_argument(
        "--model", help="base model: a Hub repo id or a folder (default: the shipped demo model, offline)"
    )
    parser.add_argument("--lgp", help="LGP: a Hub repo id or a folder (default: the one saved with --model, if any)")
    parser.add_argument(
        "--demo-map",
        choices=["edges", "silhouette"],
        help="without --model: which of the demo model's LGPs guides, by the map it reads: edges (sketches, the"
        " default) or silhouette (filled shapes, white on black: 'put a red thing here, this big')",
    )
    parser.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights' precision (default auto: float16 on a GPU, else float32)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads (default: the cores not busy, i.e. the cores less the 1-minute load average, at least 1:"
        " on a loaded machine more threads than free cores run many times slower)",
    )


def add_generate_parser(subparsers) -> None:
    from .demo import VOCABULARY_HELP
    from .pipeline import DEFAULT_SKETCH_GUIDANCE_END, DEFAULT_SKETCH_GUIDANCE_SCALE

    parser = subparsers.add_parser(
        "generate",
        help="draw an image from a prompt, following a sketch",
        description=(
            "Generate images with a SketchGuidedStableDiffusionPipeline. Without --model it uses the shipped demo"
            " model (64x64 pictures of coloured shapes), offline. --model takes any Stable Diffusion 1.x/2.x or XL repo"
            f" id or folder (a Hub id needs internet) and --lgp an LGP trained for it. {VOCABULARY_HELP}"
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
        "--out",
        required=True,
        help="where to write the image (.png keeps the prompt, seed and settings in its metadata; .jpg, .webp, ...);"
        " with --num-images > 1 a grid of them, each image also beside it as <name>-<k>",
    )
    parser.add_argument("--num-images", type=positive_int, default=1, help="images, seeds --seed, --seed + 1, ...")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the first image (default 0)")
    parser.add_argument("--steps", type=positive_int, default=30, help="denoising steps (default 30)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the model's own)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
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
    parser.add_argument("--height", type=positive_int, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=positive_int, help="image width in pixels (default: the model's)")
    parser.add_argument(
        "--edge-map-out",
        help="also write the LGP's predicted map at the last guided step (for an edge LGP bright where it predicts"
        " strokes; otherwise the kind of map it was trained on)",
    )
    add_model_arguments(parser)
    parser.set_defaults(func=run_generate)


def load_pipeline(
    model: str | None,
    lgp: str | None,
    device: str | None = None,
    torch_dtype=None,
    demo_map: str | None = None,
    **kwargs,
):
    """The demo pipeline (`model=None`, with its LGP for `demo_map`, edges by default) or the Stable Diffusion model at
    `model` (a folder or Hub id, loaded with `kwargs` as for `from_pretrained`), with the LGP at `lgp` when given, on
    `device`.

    `torch_dtype` defaults to float16 on a GPU and float32 on the CPU.
    """
    import torch

    from .demo import load_demo_pipeline
    from .lgp import LGPModel
    from .utils import dtype_kwargs

    if torch_dtype is None:
        torch_dtype = torch.float16 if device is not None and device.startswith("cuda") else torch.float32
    if model is None:
        pipe = load_demo_pipeline(torch_dtype=torch_dtype, map=demo_map or "edges")
    else:
        pipeline_class = pipeline_class_for(model, revision=kwargs.get("revision"))
        pipe = pipeline_class.from_pretrained(model, **dtype_kwargs(torch_dtype), **kwargs)
    if lgp is not None:
        pipe.lgp = LGPModel.from_pretrained(lgp, **dtype_kwargs(torch_dtype))
    return pipe.to(device) if device is not None else pipe


def pipeline_class_for(model: str, revision: str | None = None):
    """The sketch-guided pipeline for a saved model, by the class its `model_index.json` names: the SDXL one for
    Stable Diffusion XL, the SD 1.x/2.x one otherwise."""
    from diffusers import DiffusionPipeline

    from .pipeline import SketchGuidedStableDiffusionPipeline
    from .pipeline_xl import SketchGuidedStableDiffusionXLPipeline

    class_name = DiffusionPipeline.load_config(model, revision=revision).get("_class_name", "")
    return SketchGuidedStableDiffusionXLPipeline if "XL" in class_name else SketchGuidedStableDiffusionPipeline


# ---------------------------------------------------------------------------------------------------------------------
# Checks that run before anything is loaded, so that a mistake costs a second, not a model load and a generation.


class UsageError(ValueError):
    """A command-line argument that cannot work: reported as one line, before any work."""


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device; use cuda, cuda:<index>, mps or cpu.") from None
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
            raise UsageError(f"--device {device}: {why}; use --device cpu (or install torch for your CUDA).")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPU(s), from cuda:0.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu.")
    return device


def resolve_dtype(name: str, device: str, guided: bool):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if name == "float16" and device == "cpu" and guided:
        raise UsageError(
            "--dtype float16 on the CPU cannot back-propagate through the UNet for sketch guidance; use float32 or"
            " bfloat16 there (float16 on a GPU)."
        )
    return getattr(torch, name)


def check_output_path(path: str, option: str) -> None:
    import PIL.Image

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist; create it first.")
    extension = os.path.splitext(path)[1].lower()
    if PIL.Image.registered_extensions().get(extension) not in PIL.Image.SAVE:
        raise UsageError(
            f"{option} {path}: {extension or 'no extension'} is not an image format this can write; end the name in"
            " .png (which keeps the prompt, seed and settings in its metadata), .jpg or .webp."
        )


def check_image_file(path: str, option: str) -> None:
    import PIL.Image

    if not os.path.isfile(path):
        raise UsageError(f"{option} {path}: no such file.")
    try:
        with PIL.Image.open(path) as image:
            image.verify()
    except Exception as error:
        raise UsageError(f"{option} {path}: not an image this can read ({error}).") from None


def lgp_name(args: argparse.Namespace) -> str | None:
    """What an image's metadata names as its LGP: `--lgp`, the demo's LGP for `--demo-map`, or None (the model's)."""
    return args.lgp or (f"pipeline_sketch_guided demo {args.demo_map} LGP" if args.demo_map else None)


def check_demo_map(args: argparse.Namespace) -> None:
    if args.demo_map is not None and (args.model is not None or args.lgp is not None):
        raise UsageError("--demo-map picks one of the demo model's LGPs: use it without --model and --lgp.")


def check_model_source(source: str | None, option: str, what: str) -> None:
    """A folder that exists, or something that can be a Hub repo id; a path that does not exist is reported now
    instead of after the Hub's retries."""
    if source is None or os.path.isdir(source):
        return
    if os.path.isfile(source):
        raise UsageError(f"{option} {source}: a file; {option} takes the {what} folder or a Hub repo id.")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    first = source.split("/")[0]
    looks_local = source.startswith((".", "/", "~", "\\")) or source.count("/") > 1 or os.path.isdir(first)
    try:
        validate_repo_id(source)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise UsageError(f"{option} {source}: no such folder (and not a Hub repo id, <user or org>/<name>).")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UsageError(f"{option} {source}: no such folder here, and the Hub is off (HF_HUB_OFFLINE is set).")


def default_threads() -> int:
    """The cores not busy: all of them less the 1-minute load average, at least 1."""
    import torch

    cores = torch.get_num_threads()
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this platform
        busy = 0
    return max(1, min(cores, (os.cpu_count() or cores) - busy))


def set_threads(args: argparse.Namespace, device: str) -> None:
    import torch

    if device == "cpu":
        torch.set_num_threads(args.threads or default_threads())


def check_generate_args(args: argparse.Namespace) -> None:
    from .pipeline import MAX_SKETCH_GUIDANCE_SCALE

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
    for size in (args.height, args.width):
        if size is not None and size % 8:
            raise UsageError(f"--height and --width must be multiples of 8, got {size}.")
    check_demo_map(args)
    check_model_source(args.model, "--model", "model's")
    check_model_source(args.lgp, "--lgp", "LGP's")


# ---------------------------------------------------------------------------------------------------------------------
# generate


def png_metadata(settings: dict):
    """The settings as PNG text chunks: `parameters` in the one-line form other generators write, and `sketch_guided`
    as JSON."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    first = f"{settings['prompt']}\n"
    if settings.get("negative_prompt"):
        first += f"Negative prompt: {settings['negative_prompt']}\n"
    rest = {k: v for k, v in settings.items() if k not in ("prompt", "negative_prompt") and v is not None}
    info.add_text("parameters", first + ", ".join(f"{k}: {v}" for k, v in rest.items()))
    info.add_text("sketch_guided", json.dumps(settings))
    return info


def save_image(image, path: str, settings: dict | None = None, extra_text: dict[str, str] | None = None) -> None:
    """Write through a temporary file (one per process) and rename, so that an interrupted write leaves no half image.
    A PNG gets `settings` (`png_metadata`) and `extra_text` in its text chunks."""
    extension = os.path.splitext(path)[1]
    temporary = f"{path}.{os.getpid()}.tmp{extension}"
    kwargs = {}
    if settings and extension.lower() == ".png":
        info = png_metadata(settings)
        for key, value in (extra_text or {}).items():
            info.add_text(key, value)
        kwargs["pnginfo"] = info
    image.save(temporary, **kwargs)
    os.replace(temporary, path)


def file_sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def image_grid(images: list):
    """The images in a near-square grid, row by row, on white (one image is returned as it is)."""
    import PIL.Image

    if len(images) == 1:
        return images[0]
    columns = math.ceil(math.sqrt(len(images)))
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (columns * width, math.ceil(len(images) / columns) * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, (index % columns * width, index // columns * height))
    return grid


def numbered(path: str, index: int) -> str:
    stem, extension = os.path.splitext(path)
    return f"{stem}-{index}{extension}"


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .demo import VOCABULARY_HELP, unknown_words

    check_generate_args(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, guided=args.sketch is not None)
    set_threads(args, device)
    if args.model is None and (unknown := unknown_words(f"{args.prompt} {args.negative_prompt or ''}")):
        logger.warning(f"The demo model does not know {', '.join(map(repr, unknown))}. {VOCABULARY_HELP}")

    pipe = load_pipeline(args.model, args.lgp, device, dtype, demo_map=args.demo_map)
    if args.scheduler:
        import diffusers

        scheduler_class = getattr(diffusers, SCHEDULERS[args.scheduler])
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=False, desc=f"{args.num_images} image(s), {args.steps} steps")
    seeds = [args.seed + k for k in range(args.num_images)]
    output = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        sketch=args.sketch,
        sketch_mask=args.sketch_mask,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        sketch_guidance_scale=args.sketch_guidance_scale,
        sketch_guidance_start=args.sketch_guidance_start,
        sketch_guidance_end=args.sketch_guidance_end,
        sketch_guidance_interval=args.sketch_guidance_interval,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        return_edge_maps=bool(args.edge_map_out),
    )
    settings = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "sampler": type(pipe.scheduler).__name__,
        "cfg_scale": args.guidance_scale,
        "size": f"{output.images[0].width}x{output.images[0].height}",
        "model": args.model or "pipeline_sketch_guided demo model",
        "lgp": lgp_name(args),
        "sketch_sha256": file_sha256(args.sketch) if args.sketch else None,
        "sketch_mask_sha256": file_sha256(args.sketch_mask) if args.sketch_mask else None,
        "sketch_guidance_scale": args.sketch_guidance_scale if args.sketch else None,
        "sketch_guidance_start": args.sketch_guidance_start if args.sketch else None,
        "sketch_guidance_end": args.sketch_guidance_end if args.sketch else None,
        "sketch_guidance_interval": args.sketch_guidance_interval if args.sketch else None,
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


# ---------------------------------------------------------------------------------------------------------------------
# batch


def add_batch_parser(subparsers) -> None:
    from .batch import MANIFEST_FIELDS

    parser = subparsers.add_parser(
        "batch",
        help="generate every row of a manifest (JSON lines or CSV), resumable, on one or many GPUs",
        description=(
            "Generate one image per manifest row. Fields: " + ", ".join(MANIFEST_FIELDS) + " (only prompt is needed;"
            " paths are relative to the manifest; a row without a sketch is unguided; output defaults to"
            " <row>-seed<seed>.png). Rows with the same settings are generated together. Run again after a stop:"
            " finished rows are skipped. Many GPUs: accelerate launch -m pipeline_sketch_guided batch ..."
        ),
    )
    parser.add_argument("manifest", help="a .jsonl or .csv file, one row per image")
    parser.add_argument("--out", required=True, help="the folder for the images and results.jsonl")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per pipeline call (default 4)")
    parser.add_argument("--steps", type=positive_int, default=30, help="default num_inference_steps (default 30)")
    parser.add_argument("--contact-sheet", help="also write a grid of all the images here")
    add_model_arguments(parser)
    parser.set_defaults(func=run_batch)


def run_batch(args: argparse.Namespace) -> int:
    from .batch import contact_sheet, process_state, read_manifest, run_manifest

    read_manifest(args.manifest)  # a manifest that cannot be read at all fails now, before a model is loaded
    check_demo_map(args)
    check_model_source(args.model, "--model", "model's")
    check_model_source(args.lgp, "--lgp", "LGP's")
    if args.contact_sheet:
        check_output_path(args.contact_sheet, "--contact-sheet")
    state = process_state()
    device = resolve_device(args.device) if args.device or state.num_processes == 1 else str(state.device)
    dtype = resolve_dtype(args.dtype, device, guided=True)
    set_threads(args, device)
    pipe = load_pipeline(args.model, args.lgp, device, dtype, demo_map=args.demo_map)
    pipe.set_progress_bar_config(disable=True)
    context = {"model": args.model or "pipeline_sketch_guided demo model", "lgp": lgp_name(args)}
    context["dtype"] = str(dtype)
    summary = run_manifest(
        pipe,
        args.manifest,
        args.out,
        batch_size=args.batch_size,
        defaults={"num_inference_steps": args.steps},
        context=context,
        progress=state.is_local_main_process,
    )
    if not state.is_main_process:
        return 0
    if args.contact_sheet:
        contact_sheet(summary.rows, args.contact_sheet)
    for result in summary.rows:
        if result["status"] == "failed":
            print(f"row {result['row']}: {result['error']}", file=sys.stderr)
    print(
        f"{summary.done} done, {summary.skipped} skipped, {summary.failed} failed: results in"
        f" {os.path.join(args.out, 'results.jsonl')}."
    )
    return 1 if summary.failed else 0


# ---------------------------------------------------------------------------------------------------------------------
# demo


def add_demo_parser(subparsers) -> None:
    from .demo import VOCABULARY_HELP

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

    from .demo import DEMO_IMAGE_SIZE, demo_sketches

    check_output_path(args.out, "--out")
    device = resolve_device(None)
    set_threads(args, device)
    pipe = load_pipeline(None, None, device)
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


# ---------------------------------------------------------------------------------------------------------------------
# ui


def add_ui_parser(subparsers) -> None:
    from .ui import DEFAULT_MAX_UPLOAD_MB

    parser = subparsers.add_parser(
        "ui",
        help="a page in the browser to draw a sketch, type a prompt and see the result (needs the ui extra)",
        description=(
            "Serve a Gradio page: a canvas to draw on (or upload a sketch), the prompt and the guidance settings, the"
            " sketch-guided image beside the unguided one of the same seed, the LGP's predicted edge map, and this"
            " session's results as PNGs with their settings. Without --model it serves the shipped demo model,"
            " offline. Only this machine can reach it unless --host says otherwise; the API is at /gradio_api."
        ),
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 lets the network in)",
    )
    parser.add_argument("--port", type=int, help="the port (default: 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (needs internet)")
    parser.add_argument(
        "--output-dir",
        default="sketch-guided-outputs",
        help="where the results, their sketches and edge maps, and the page's uploads go; nothing is written elsewhere"
        " (default ./sketch-guided-outputs)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"uploads above this size are refused (default {DEFAULT_MAX_UPLOAD_MB})",
    )
    add_model_arguments(parser)
    parser.set_defaults(func=run_ui)


def run_ui(args: argparse.Namespace) -> int:
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be from 1 to 65535.")
    if not args.max_upload_mb > 0:
        raise UsageError(f"--max-upload-mb {args.max_upload_mb}: must be more than 0.")
    output_dir = os.path.abspath(args.output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output-dir {args.output_dir}: a file, not a folder.")
    if not os.path.isdir(os.path.dirname(output_dir)):
        raise UsageError(f"--output-dir {args.output_dir}: the folder {os.path.dirname(output_dir)} does not exist.")
    check_demo_map(args)
    check_model_source(args.model, "--model", "model's")
    check_model_source(args.lgp, "--lgp", "LGP's")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, guided=True)
    # Gradio keeps uploads and served copies in its temporary folder, which it reads when it is imported: inside the
    # output folder, so that the app writes nowhere else. No usage statistics leave the machine unless asked for.
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(output_dir, ".gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401 (the ui extra)
    except ImportError:
        raise UsageError(
            'sketch-guided ui needs Gradio: pip install "pipeline_sketch_guided[ui]" (or pip install gradio).'
        ) from None
    set_threads(args, device)
    os.makedirs(output_dir, exist_ok=True)

    from .ui import SketchGuidedApp, launch

    pipe = load_pipeline(args.model, args.lgp, device, dtype, demo_map=args.demo_map)
    pipe.set_progress_bar_config(disable=True)
    app = SketchGuidedApp(
        pipe, output_dir, model_name=args.model or "pipeline_sketch_guided demo model", lgp_name=lgp_name(args)
    )
    examples = app.write_examples() if args.model is None and args.lgp is None else None
    launch(app, host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb, examples=examples)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sketch-guided", description="Sketch-guided text-to-image for diffusers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the libraries' warnings, and a traceback with any error"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_batch_parser(subparsers)
    add_ui_parser(subparsers)
    add_demo_parser(subparsers)
    add_convert_parser(subparsers)
    add_push_parser(subparsers)
    return parser


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside the context, the libraries' notices that say nothing to a user of this command (transformers' torchvision
    fallback, diffusers' deprecations, loading bars) are silenced; this package's own warnings still show."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(library.get_verbosity(), library.is_progress_bar_enabled()) for library in libraries]
    with warnings.catch_warnings():
        for module in ("diffusers", "transformers", "torch", "huggingface_hub", "accelerate"):
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category, module=module)
        for library in libraries:
            library.set_verbosity_error()
            library.disable_progress_bar()
        try:
            yield
        finally:
            for library, (verbosity, progress_bar) in zip(libraries, saved, strict=True):
                library.set_verbosity(verbosity)
                if progress_bar:
                    library.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Quiet before the parser's help texts import the pipeline (and with it, the libraries).
    with contextlib.nullcontext() if "--debug" in argv else quiet_libraries():
        args = build_parser().parse_args(argv)
        try:
            return args.func(args)
        except KeyboardInterrupt:
            raise SystemExit(f"sketch-guided {args.command}: interrupted") from None
        except Exception as error:
            if args.debug:
                raise
            # One line that says what was wrong; --debug shows where.
            message = " ".join(str(error).split()) or type(error).__name__
            if not isinstance(error, (ValueError, OSError)):
                message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
            raise SystemExit(f"sketch-guided {args.command}: error: {message}") from error


if __name__ == "__main__":
    raise SystemExit(main())
