"""`sketch-guided convert` and `sketch-guided push`: community LGPs in, published LGPs out."""

from __future__ import annotations

import argparse


def add_convert_parser(subparsers) -> None:
    from ..convert import COMMUNITY_FORMATS

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
        " history has both; docs/polarity.md shows a one-minute check)",
    )
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from ..convert import convert_community_lgp

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
    from ..convert import COMMUNITY_FORMATS
    from ..hub import DEFAULT_BASE_MODEL, DEFAULT_LICENSE

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
    from ..convert import COMMUNITY_FORMATS
    from ..hub import DEFAULT_LICENSE, export_hub_folder, push_lgp_to_hub, upload_hub_folder
    from ..lgp import LGPModel

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
