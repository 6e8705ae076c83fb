"""`sketch-guided batch`: every row of a manifest, resumable, on one or many GPUs."""

from __future__ import annotations

import argparse
import os
import sys

from .common import (
    add_model_arguments,
    check_model_arguments,
    check_output_path,
    lgp_name,
    load_model,
    positive_int,
    resolve_device,
    resolve_dtype,
    set_threads,
)


def add_batch_parser(subparsers) -> None:
    from ..batch import MANIFEST_FIELDS

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
    from ..batch import contact_sheet, process_state, read_manifest, run_manifest

    read_manifest(args.manifest)  # a manifest that cannot be read at all fails now, before a model is loaded
    check_model_arguments(args)
    if args.contact_sheet:
        check_output_path(args.contact_sheet, "--contact-sheet")
    state = process_state()
    device = resolve_device(args.device) if args.device or state.num_processes == 1 else str(state.device)
    dtype = resolve_dtype(args.dtype, device, guided=True)
    set_threads(args, device)
    pipe = load_model(args, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    context = {"model": args.model or "pipeline_sketch_guided demo model", "lgp": lgp_name(args)}
    context["dtype"] = str(dtype)
    if args.fill_lgp:
        context["fill_lgp"] = args.fill_lgp
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
