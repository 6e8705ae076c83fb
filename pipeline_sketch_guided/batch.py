"""Many sketch-guided images from one manifest: `sketch-guided batch MANIFEST --out DIR`.

A manifest is JSON lines (`.jsonl`) or CSV (`.csv`) with one row per image, its fields named as the pipeline's
arguments (`MANIFEST_FIELDS`). Rows with the same settings and size are generated together, `batch_size` at a time; each
image depends only on its own row (its seed included), not on the batch, process or machine that made it. A finished
image records its row's settings in its PNG metadata, so a run killed at any point and started again skips the rows
whose image is there with the same settings, and no image is ever half-written (each is written under a temporary name
and renamed). Launched with `accelerate launch`, the rows are shared between the processes (one per GPU), each writing
its own results, merged at the end into `results.jsonl`.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from . import loading
from .sketch import prepare_map, prepare_sketch_mask


def boolean(value: Any) -> bool:
    """A manifest's yes or no: JSON's true and false, or true/false, yes/no, 1/0 in a CSV cell."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(value)


# Every field a manifest row may have; `prompt` is the only one it must have.
MANIFEST_FIELDS = {
    "prompt": str,
    "sketch": str,
    "sketch_mask": str,
    "seed": int,
    "negative_prompt": str,
    "num_inference_steps": int,
    "guidance_scale": float,
    "sketch_guidance_scale": float,
    "sketch_guidance_start": float,
    "sketch_guidance_end": float,
    "sketch_guidance_interval": int,
    "sketch_guidance_recurrence": int,
    "height": int,
    "width": int,
    "invert_map": boolean,
    "sketch_fill": str,
    "sketch_fill_scale": float,
    "image": str,
    "mask_image": str,
    "strength": float,
    "output": str,
}
# The fields that each image of a batch may have its own of; rows that agree on all the others can share a batch.
PER_IMAGE_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "sketch",
    "sketch_mask",
    "sketch_fill",
    "image",
    "mask_image",
    "output",
)
RESULTS_FILE = "results.jsonl"
METADATA_KEY = "sketch_guided_row"


class ManifestError(ValueError):
    """A manifest that cannot be read at all (its rows' own errors are reported per row instead)."""


@dataclass
class Row:
    index: int
    settings: dict[str, Any]  # the row's fields, typed, relative paths made absolute
    output: Path
    error: str | None = None
    status: str = "pending"
    seconds: float | None = None

    def group_key(self) -> tuple:
        shared = {k: v for k, v in self.settings.items() if k not in PER_IMAGE_FIELDS}
        return (
            "sketch" in self.settings,
            "sketch_mask" in self.settings,
            self.fill_kind(),
            "image" in self.settings,
            "mask_image" in self.settings,
            tuple(sorted(shared.items())),
        )

    def fill_kind(self) -> str | None:
        """How the row gives its fill: "auto", an "image", or not at all (`None`); a batch shares one."""
        fill = self.settings.get("sketch_fill")
        return None if fill is None else "auto" if fill == "auto" else "image"

    def result(self) -> dict[str, Any]:
        return {
            "row": self.index,
            "status": self.status,
            "output": str(self.output),
            "seed": self.settings.get("seed"),
            "settings": self.settings,
            "seconds": self.seconds,
            "error": self.error,
        }


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """The manifest's rows as dicts of strings (JSON values are kept as they are)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"No manifest at {str(path)!r}.")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as file:
            rows = [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(file)]
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ManifestError(f"{path}:{number} is not valid JSON ({error.msg}).") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{number} is not a JSON object with the row's fields.")
            rows.append(row)
    else:
        raise ManifestError(f"{str(path)!r}: a manifest is JSON lines (.jsonl) or CSV (.csv).")
    if not rows:
        raise ManifestError(f"{str(path)!r} has no rows.")
    unknown = sorted({key for row in rows for key in row} - set(MANIFEST_FIELDS))
    if unknown:
        raise ManifestError(
            f"{str(path)!r} has fields {', '.join(unknown)} that are no pipeline argument here; the fields are"
            f" {', '.join(MANIFEST_FIELDS)}."
        )
    return rows


def parse_row(index: int, raw: dict[str, Any], manifest_dir: Path, out_dir: Path, defaults: dict[str, Any]) -> Row:
    """A typed `Row` (with `error` set if a value is wrong), paths relative to the manifest made absolute."""
    settings: dict[str, Any] = {}
    error = None
    for name, value in {**defaults, **raw}.items():
        kind = MANIFEST_FIELDS[name]
        try:
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            settings[name] = kind(value) if not (kind is int and isinstance(value, str)) else int(value.strip())
        except (TypeError, ValueError):
            what = {int: "an integer", float: "a number", boolean: "true or false"}.get(kind, "text")
            error = f"`{name}` must be {what}"
            error += f", got {value!r}"
    if "prompt" not in settings and error is None:
        error = "no `prompt`"
    for name in ("sketch", "sketch_mask", "sketch_fill", "image", "mask_image"):
        if name in settings and not (name == "sketch_fill" and settings[name] == "auto"):
            settings[name] = str((manifest_dir / settings[name]).resolve())
    settings.setdefault("seed", index)
    name = settings.pop("output", None) or f"{index:06d}-seed{settings['seed']}.png"
    output = (out_dir / name).resolve()
    if error is None and out_dir.resolve() not in output.parents:
        error = f"`output` {name!r} is outside the output folder"
    if error is None and output.suffix.lower() != ".png":
        error = f"`output` {name!r} must be a .png (its metadata records the row, for resuming)"
    return Row(index, settings, output, error=error, status="failed" if error else "pending")


def recorded_settings(path: Path) -> dict[str, Any] | None:
    """The row settings an image written by this runner records, or `None`."""
    try:
        with PIL.Image.open(path) as image:
            return json.loads(image.text.get(METADATA_KEY, "null"))
    except (OSError, ValueError, AttributeError):
        return None


def check_row_inputs(row: Row, vae_scale_factor: int, default_size: tuple[int, int], lgp_config=None) -> None:
    """Read the row's sketch (or other guidance map, prepared as the LGP's config says) and mask now, so that a bad
    one fails its row, not the batch it would have joined."""
    height, width = row.settings.get("height", default_size[0]), row.settings.get("width", default_size[1])
    options = (
        ()
        if lgp_config is None
        else (
            lgp_config.map_kind,
            lgp_config.sketch_polarity,
            lgp_config.map_normalization,
            row.settings.get("invert_map", False),
        )
    )
    try:
        if "sketch" in row.settings:
            prepare_map(row.settings["sketch"], height, width, *options)
        if "sketch_mask" in row.settings:
            prepare_sketch_mask(row.settings["sketch_mask"], height // vae_scale_factor, width // vae_scale_factor)
        if "sketch_fill" in row.settings:
            if "sketch" not in row.settings:
                raise ValueError("`sketch_fill` says which side of a sketch's lines is the shape: give the `sketch`")
            if row.fill_kind() == "image":
                prepare_map(row.settings["sketch_fill"], height, width, "silhouette")
        if "mask_image" in row.settings and "image" not in row.settings:
            raise ValueError("`mask_image` says which part of an `image` to repaint: give the `image` too")
        if "strength" in row.settings and "image" not in row.settings:
            raise ValueError("`strength` says how much of an `image` is redrawn: give the `image` too")
        for name in ("image", "mask_image"):
            if name in row.settings:
                with PIL.Image.open(row.settings[name]) as image:
                    image.verify()
    except (ValueError, TypeError, OSError) as error:
        row.status, row.error = "failed", " ".join(str(error).split())


def batches(rows: list[Row], batch_size: int) -> Iterable[list[Row]]:
    """Rows that can share a pipeline call, `batch_size` at a time, in manifest order within each group."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group_key(), []).append(row)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def generate_batch(
    pipe, rows: list[Row], save: Callable[[PIL.Image.Image, Path, dict], None], context: dict[str, Any]
) -> None:
    """One pipeline call for `rows` (same shared settings), each image with its own prompt, sketch and seed."""
    first = rows[0].settings
    shared = {k: v for k, v in first.items() if k not in PER_IMAGE_FIELDS}
    kwargs = dict(shared)
    pipe = loading.editing_pipeline(pipe, image="image" in first, mask="mask_image" in first)
    if "image" in first:
        images = [PIL.Image.open(row.settings["image"]).convert("RGB") for row in rows]
        if "height" not in inspect.signature(type(pipe).__call__).parameters:
            # Image-to-image makes images of the image's size: a row's height and width resize its image.
            height, width = kwargs.pop("height", None), kwargs.pop("width", None)
            images = [image.resize((width or image.width, height or image.height)) for image in images]
        kwargs["image"] = images
    if "mask_image" in first:
        kwargs["mask_image"] = [PIL.Image.open(row.settings["mask_image"]).convert("L") for row in rows]
    if "sketch" in first:
        kwargs["sketch"] = [row.settings["sketch"] for row in rows]
    if "sketch_mask" in first:
        kwargs["sketch_mask"] = [row.settings["sketch_mask"] for row in rows]
    if rows[0].fill_kind() == "auto":
        kwargs["sketch_fill"] = "auto"
    elif rows[0].fill_kind() == "image":
        kwargs["sketch_fill"] = [row.settings["sketch_fill"] for row in rows]
    negative = [row.settings.get("negative_prompt", "") for row in rows]
    start = time.perf_counter()
    images = pipe(
        [row.settings["prompt"] for row in rows],
        negative_prompt=negative if any(negative) else None,
        generator=[torch.Generator("cpu").manual_seed(row.settings["seed"]) for row in rows],
        **kwargs,
    ).images
    seconds = (time.perf_counter() - start) / len(rows)
    for row, image in zip(rows, images, strict=True):
        save(image, row.output, {**row.settings, **context})
        row.status, row.seconds = "done", round(seconds, 3)


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)


def process_state():
    """accelerate's state of this process: one of several under `accelerate launch` (on GPUs, or on CPUs when the
    launcher sets ACCELERATE_USE_CPU, which `PartialState` reads only when told), else the only one."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def save_png(image: PIL.Image.Image, path: Path, settings: dict[str, Any]) -> None:
    """Write `image` to `path` atomically (`saving.save_image`), with `settings` in its PNG metadata: the generators'
    `parameters` text, and the row under `METADATA_KEY` for resuming."""
    from .saving import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, str(path), settings, {METADATA_KEY: json.dumps(settings)})


def run_manifest(pipe, manifest: str | os.PathLike, out_dir: str | os.PathLike, **options) -> BatchSummary:
    """Generate every row of `manifest` into `out_dir` (see the module's docstring); returns the counts and rows.
    `options` are those of `run_rows`."""
    return run_rows(pipe, read_manifest(manifest), Path(manifest).resolve().parent, out_dir, **options)


def run_rows(
    pipe,
    raw_rows: list[dict[str, Any]],
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    save: Callable[[PIL.Image.Image, Path, dict], None] = save_png,
    batch_size: int = 4,
    defaults: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Generate `raw_rows` (manifest rows, paths relative to `base_dir`) into `out_dir`; returns the counts and rows.

    `save(image, path, settings)` writes one image (atomically, recording `settings`: the row's, with `context`, such
    as the model's name, so that a row is made again when either changes). Under `accelerate launch` each
    process takes its share of the rows (`PartialState.split_between_processes`) and writes `results.<rank>.jsonl`;
    the main process merges them into `results.jsonl` once all have finished.
    """
    from tqdm.auto import tqdm

    state, context = process_state(), context or {}
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:  # each process would make every row, and they would overwrite each other
        raise RuntimeError(
            f"accelerate launched {launched} processes but this one sees {state.num_processes}: they did not connect."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [parse_row(i, raw, Path(base_dir), out_dir, defaults or {}) for i, raw in enumerate(raw_rows)]
    outputs: dict[Path, int] = {}
    for row in rows:
        if row.error is None and row.output in outputs:
            row.status, row.error = "failed", f"same `output` as row {outputs[row.output]}"
        outputs.setdefault(row.output, row.index)

    default_size = pipe.sketch_size(None, None, None)  # the image size the pipeline makes by default
    with state.split_between_processes(rows) as mine:
        mine = list(mine)
        for row in mine:
            if row.status == "pending" and recorded_settings(row.output) == {**row.settings, **context}:
                row.status = "skipped"
            elif row.status == "pending":
                lgp_config = None if getattr(pipe, "lgp", None) is None else pipe.lgp.config
                check_row_inputs(row, pipe.vae_scale_factor, default_size, lgp_config)
        todo = [row for row in mine if row.status == "pending"]
        with tqdm(total=len(todo), unit="image", desc="sketch-guided batch", disable=not progress) as bar:
            for group in batches(todo, batch_size):
                try:
                    generate_batch(pipe, group, save, context)
                except Exception as error:  # one batch's failure (a bad value for the pipeline) must not stop the run
                    for row in group:
                        row.status, row.error = "failed", f"{type(error).__name__}: {' '.join(str(error).split())}"
                bar.update(len(group))
        part = out_dir / f"results.{state.process_index}.jsonl"
        part.write_text("".join(json.dumps(row.result()) + "\n" for row in mine), encoding="utf-8")

    state.wait_for_everyone()
    summary = BatchSummary()
    if state.is_main_process:
        merged = []
        for index in range(state.num_processes):
            part = out_dir / f"results.{index}.jsonl"
            merged += [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines() if line.strip()]
            part.unlink()
        merged.sort(key=lambda result: result["row"])
        temporary = out_dir / (RESULTS_FILE + ".tmp")
        temporary.write_text("".join(json.dumps(result) + "\n" for result in merged), encoding="utf-8")
        os.replace(temporary, out_dir / RESULTS_FILE)
        summary.rows = merged
        for result in merged:
            setattr(summary, result["status"], getattr(summary, result["status"]) + 1)
    state.wait_for_everyone()
    return summary


def contact_sheet(results: list[dict[str, Any]], path: str | os.PathLike, tile: int = 128) -> None:
    """The finished images of `results` in a near-square grid."""
    images = [Path(r["output"]) for r in results if r["status"] in ("done", "skipped") and Path(r["output"]).is_file()]
    if not images:
        return
    columns = math.ceil(math.sqrt(len(images)))
    sheet = PIL.Image.new("RGB", (columns * tile, math.ceil(len(images) / columns) * tile), "white")
    for index, image_path in enumerate(images):
        with PIL.Image.open(image_path) as image:
            sheet.paste(image.convert("RGB").resize((tile, tile)), (index % columns * tile, index // columns * tile))
    sheet.save(path)
