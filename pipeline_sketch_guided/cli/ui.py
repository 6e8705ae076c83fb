"""`sketch-guided ui`: the canvas in the browser."""

from __future__ import annotations

import argparse
import os

from .common import (
    UsageError,
    add_model_arguments,
    check_model_arguments,
    lgp_name,
    load_model,
    resolve_device,
    resolve_dtype,
    set_threads,
)


def add_ui_parser(subparsers) -> None:
    from ..ui import DEFAULT_MAX_UPLOAD_MB

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
    check_model_arguments(args)
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

    from ..ui import SketchGuidedApp, launch

    pipe = load_model(args, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    app = SketchGuidedApp(
        pipe, output_dir, model_name=args.model or "pipeline_sketch_guided demo model", lgp_name=lgp_name(args)
    )
    examples = app.write_examples() if args.model is None and args.lgp is None else None
    launch(app, host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb, examples=examples)
    return 0
