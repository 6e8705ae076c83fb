"""The `sketch-guided` command line. Each subcommand is an `add_<name>_parser(subparsers)` and a `run_<name>(args)`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


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
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_community_lgp

    download_kwargs = {"revision": args.revision} if args.revision else {}
    lgp = convert_community_lgp(
        args.src, args.out, filename=args.filename, source_format=args.source_format, **download_kwargs
    )
    print(
        f"Saved {args.out}: LGPModel with {lgp.in_features} inputs, blocks {', '.join(lgp.config.blocks)}"
        f" ({lgp.config.feature_branch} branch)."
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


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="draw an image from a prompt, following a sketch",
        description=(
            "Generate an image with a SketchGuidedStableDiffusionPipeline. Without --model it uses the shipped demo"
            " model (64x64 pictures of coloured shapes), offline. --model takes any Stable Diffusion 1.x/2.x repo id or"
            " folder (a Hub id needs internet) and --lgp an LGP trained for it."
        ),
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--sketch", help="the drawing to follow (image file); without it, no sketch guidance")
    parser.add_argument("--out", required=True, help="where to write the image (PNG, JPEG, ...)")
    parser.add_argument("--model", help="base model repo id or folder; default: the shipped demo model")
    parser.add_argument("--lgp", help="LGP repo id or folder; default: the one saved with --model, if any")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    parser.add_argument("--sketch-guidance-scale", type=float, help="beta; default: the pipeline's")
    parser.add_argument("--sketch-guidance-end", type=float, help="fraction of steps guided; default: the pipeline's")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--edge-map-out", help="also write the LGP's predicted edge map here")
    parser.set_defaults(func=run_generate)


def load_pipeline(model: str | None, lgp: str | None, device: str | None = None, torch_dtype=None, **kwargs):
    """The demo pipeline (`model=None`) or the Stable Diffusion model at `model` (a folder or Hub id, loaded with
    `kwargs` as for `from_pretrained`), with the LGP at `lgp` when given, on `device`.

    `torch_dtype` defaults to float16 on a GPU and float32 on the CPU.
    """
    import torch

    from .demo import load_demo_pipeline
    from .lgp import LGPModel
    from .pipeline import SketchGuidedStableDiffusionPipeline
    from .utils import dtype_kwargs

    if torch_dtype is None:
        torch_dtype = torch.float16 if device is not None and device.startswith("cuda") else torch.float32
    if model is None:
        pipe = load_demo_pipeline(torch_dtype=torch_dtype)
    else:
        pipe = SketchGuidedStableDiffusionPipeline.from_pretrained(model, **dtype_kwargs(torch_dtype), **kwargs)
    if lgp is not None:
        pipe.lgp = LGPModel.from_pretrained(lgp, **dtype_kwargs(torch_dtype))
    return pipe.to(device) if device is not None else pipe


def _pipeline_kwargs(args: argparse.Namespace) -> dict:
    import torch

    kwargs = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
        "generator": torch.Generator("cpu").manual_seed(args.seed),
    }
    if args.sketch_guidance_scale is not None:
        kwargs["sketch_guidance_scale"] = args.sketch_guidance_scale
    if args.sketch_guidance_end is not None:
        kwargs["sketch_guidance_end"] = args.sketch_guidance_end
    return kwargs


def _default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def run_generate(args: argparse.Namespace) -> int:
    if args.edge_map_out and not args.sketch:
        raise SystemExit("--edge-map-out needs --sketch: edge maps are predicted while guiding.")
    pipe = load_pipeline(args.model, args.lgp, _default_device(args.device))
    output = pipe(args.prompt, sketch=args.sketch, return_edge_maps=bool(args.edge_map_out), **_pipeline_kwargs(args))
    output.images[0].save(args.out)
    print(f"Wrote {args.out} ({output.images[0].width}x{output.images[0].height}).")
    if args.edge_map_out:
        output.edge_maps[0].save(args.edge_map_out)
        print(f"Wrote {args.edge_map_out}.")
    return 0


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="a sheet of built-in sketches with unguided and guided images, from the demo model",
        description=(
            "For each built-in free-hand sketch, draw its prompt with the shipped demo model twice with the same seed,"
            " without and with the sketch, and write one sheet: sketch | unguided | guided."
        ),
    )
    parser.add_argument("--out", default="sketch_guided_demo.png", help="the sheet to write")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=3, help="enlarge each 64x64 tile this many times (default 3)")
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import PIL.Image
    import PIL.ImageDraw
    import torch

    from .demo import DEMO_IMAGE_SIZE, demo_sketches

    pipe = load_pipeline(None, None, _default_device(None))
    tile = DEMO_IMAGE_SIZE * args.scale
    header = 14
    pairs = demo_sketches()
    sheet = PIL.Image.new("RGB", (3 * tile, header + len(pairs) * tile), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for column, title in enumerate(("sketch", "unguided", "guided")):
        draw.text((column * tile + 4, 2), title, fill="black")
    for row, (prompt, sketch) in enumerate(pairs):
        images = [sketch.convert("RGB")]
        for guided in (False, True):
            generator = torch.Generator("cpu").manual_seed(args.seed)
            images.append(
                pipe(
                    prompt, sketch=sketch if guided else None, num_inference_steps=args.steps, generator=generator
                ).images[0]
            )
        for column, image in enumerate(images):
            sheet.paste(image.resize((tile, tile), PIL.Image.Resampling.NEAREST), (column * tile, header + row * tile))
        print(f"{prompt}: done")
    sheet.save(args.out)
    print(f"Wrote {args.out}: {len(pairs)} sketches, each sketch | unguided | guided (seed {args.seed}).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sketch-guided", description="Sketch-guided text-to-image for diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_demo_parser(subparsers)
    add_convert_parser(subparsers)
    add_push_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        # Bad input (a blank sketch, a wrong LGP, a missing file) says what was wrong: a message, not a traceback.
        raise SystemExit(f"sketch-guided {args.command}: error: {error}") from error


if __name__ == "__main__":
    raise SystemExit(main())
