"""Prepare an LGP training set: (image, caption, map) triplets at one resolution, written to a folder.

Sources:
- a folder of images with captions, in the diffusers ImageFolder convention: a `metadata.jsonl` whose lines hold
  `file_name` and `text` (another caption key with `--caption_column`), or one `.txt` file of the same name beside
  each image;
- a Hugging Face `datasets` dataset (`--dataset_name`) with an image column and a text column.

Every image, whatever its mode and size, is resized and centre-cropped to `--resolution`. Its map (`--map`, the kind
of spatial map the LGP will learn to predict and users will guide with) is one of:
- `canny` (the default): Canny edges (OpenCV, offline);
- `hed`, `pidinet`: a learned edge detector through `controlnet_aux`, whose weights are downloaded from the Hub;
- `depth`: a monocular depth estimate from transformers' `pipeline("depth-estimation")` with the model
  `--map_model` (a Hub id such as depth-anything/Depth-Anything-V2-Small-hf or Intel/dpt-hybrid-midas, or a folder),
  stretched to the full 0..255 range per image (light is near);
- `folder:DIR`: the user's own maps, one per image, found in DIR by file name (the image's path inside `--input_dir`
  without its extension, or its bare name): segmentation colour maps, normal maps, silhouettes, anything
  image-shaped, cropped exactly as the image is. `--map_kind` says what they are (`color` keeps their three channels,
  the default; `silhouette` and `depth` read one grey channel, `depth` stretched to the full range; `edges`).
Edge maps are saved as light strokes on a dark background, the convention of edge detectors and the LGP's default
`sketch_polarity`. A file that cannot be read, or an image without a map, is skipped, counted and named in
`report.json`; it never stops the run. The report's `map_kind` and `map_normalization` become the trained LGP's config.

Output folder:
    images/000000.png ...   the resized RGB images
    edges/000000.png ...    their maps (the folder keeps its historical name whatever the map: edge maps as white
                            edges on black, grey maps in mode L, colour maps in RGB)
    metadata.jsonl          {"file_name", "edge_file_name", "text", "source"} per example
    report.json             counts, settings, and every skipped file with the reason

    python -m pipeline_sketch_guided.training.prepare_data --input_dir my_photos --output_dir data/lgp --resolution 512
    python -m pipeline_sketch_guided.training.prepare_data --input_dir my_photos --output_dir data/lgp-depth \
        --map depth --map_model depth-anything/Depth-Anything-V2-Small-hf
    python -m pipeline_sketch_guided.training.prepare_data --input_dir my_photos --output_dir data/lgp-seg \
        --map folder:my_segmentations --map_kind color
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILE = "metadata.jsonl"
REPORT_FILE = "report.json"
EDGE_DETECTORS = ("canny", "hed", "pidinet")
MAPS = (*EDGE_DETECTORS, "depth", "folder:DIR")
FOLDER_MAP_PREFIX = "folder:"
# The map kinds (`LGPModel`'s `map_kind`) and how each kind's maps are normalised (`map_normalization`).
MAP_NORMALIZATION_OF_KIND = {"edges": "none", "silhouette": "none", "depth": "minmax", "color": "none"}
# A small, well-kept depth estimator; `--map_model` names another (any transformers depth-estimation model).
DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
# Maps of a user's folder whose aspect differs from their image's by more than this (relative) do not belong to it.
MAP_ASPECT_TOLERANCE = 0.02
# What PIL raises for a file it cannot decode: OSError for truncated data, UnidentifiedImageError (an OSError) for
# non-images, SyntaxError and ValueError for some malformed headers, DecompressionBombError for absurd sizes.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)
# OpenCV Canny hysteresis thresholds on 8-bit gray: the values the ControlNet Canny models were trained with.
DEFAULT_CANNY_LOW, DEFAULT_CANNY_HIGH = 100, 200
# The repository that controlnet_aux loads its HED and PiDiNet weights from.
DEFAULT_ANNOTATOR_REPO = "lllyasviel/Annotators"


@dataclass
class SourceExample:
    """One input example: `load()` returns the image (and may raise for a corrupt file), `source` names it."""

    source: str
    caption: str | None
    load: Callable[[], PIL.Image.Image]


@dataclass
class Skipped:
    source: str
    reason: str


class MissingMap(Exception):
    """Raised by a map maker for an image that has no map (a `folder:` map that is not there or does not fit)."""


# A map maker: (the resized image, the original image, its source example) -> its map at the resized image's size.
MapMaker = Callable[[PIL.Image.Image, PIL.Image.Image, SourceExample], PIL.Image.Image]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input_dir", type=str, help="Folder of images with metadata.jsonl or .txt captions.")
    source.add_argument("--dataset_name", type=str, help="A Hugging Face `datasets` dataset (Hub id or local path).")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="Configuration of `--dataset_name`.")
    parser.add_argument("--split", type=str, default="train", help="Split of `--dataset_name`.")
    parser.add_argument("--image_column", type=str, default="image", help="Image column of `--dataset_name`.")
    parser.add_argument(
        "--caption_column", type=str, default="text", help="Caption key in metadata.jsonl or the dataset."
    )
    parser.add_argument("--output_dir", type=str, required=True, help="Where the prepared training set is written.")
    parser.add_argument("--resolution", type=int, default=512, help="Side of the square training images.")
    parser.add_argument(
        "--map",
        type=str,
        default=None,
        help=f"The map to train on: {', '.join(MAPS)} (default canny; see the module's help).",
    )
    parser.add_argument(
        "--edge_detector", type=str, default=None, choices=EDGE_DETECTORS, help="The same as --map for edge maps."
    )
    parser.add_argument(
        "--map_model",
        type=str,
        default=DEFAULT_DEPTH_MODEL,
        help="Hub id or folder of the transformers depth-estimation model, for --map depth.",
    )
    parser.add_argument(
        "--map_kind",
        type=str,
        default="color",
        choices=sorted(MAP_NORMALIZATION_OF_KIND),
        help="What the maps of --map folder:DIR are: color (three channels kept, the default), silhouette or depth"
        " (one grey channel; depth stretched to the full range), or edges.",
    )
    parser.add_argument("--canny_low", type=int, default=DEFAULT_CANNY_LOW, help="Canny's lower threshold (0-255).")
    parser.add_argument("--canny_high", type=int, default=DEFAULT_CANNY_HIGH, help="Canny's upper threshold (0-255).")
    parser.add_argument(
        "--annotator_repo",
        type=str,
        default=DEFAULT_ANNOTATOR_REPO,
        help="Hub repository of the HED / PiDiNet weights (for --edge_detector hed or pidinet).",
    )
    parser.add_argument("--max_samples", type=int, default=None, help="Stop after this many examples are written.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a prepared set already in --output_dir.")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.input_dir is not None and not os.path.isdir(args.input_dir):
        raise ValueError(f"`--input_dir` {args.input_dir!r} is not a folder.")
    if args.map is not None and args.edge_detector is not None and args.map != args.edge_detector:
        raise ValueError(f"`--map {args.map}` and `--edge_detector {args.edge_detector}` disagree; pass only --map.")
    args.map = args.map or args.edge_detector or "canny"
    if args.map.startswith(FOLDER_MAP_PREFIX):
        folder = args.map[len(FOLDER_MAP_PREFIX) :]
        if not os.path.isdir(folder):
            raise ValueError(f"`--map {args.map}`: {folder!r} is not a folder; name the folder that holds your maps.")
        if args.input_dir is None:
            raise ValueError("`--map folder:DIR` pairs maps with image files by name, so it needs `--input_dir`.")
    elif args.map not in (*EDGE_DETECTORS, "depth"):
        raise ValueError(f"Unknown `--map {args.map}`; choose one of {', '.join(MAPS)} (DIR: your folder of maps).")
    if args.resolution < 8 or args.resolution % 8 != 0:
        raise ValueError(f"`--resolution` must be a positive multiple of 8 (the VAE's factor), got {args.resolution}.")
    if not 0 <= args.canny_low <= args.canny_high <= 255:
        raise ValueError(
            f"Canny thresholds must satisfy 0 <= --canny_low <= --canny_high <= 255, got {args.canny_low} and"
            f" {args.canny_high}."
        )
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"`--max_samples` must be at least 1, got {args.max_samples}.")
    if os.path.exists(os.path.join(args.output_dir, METADATA_FILE)) and not args.overwrite:
        raise ValueError(
            f"{args.output_dir!r} already holds a prepared training set; pass --overwrite to replace it, or choose"
            " another --output_dir."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Reading the sources


def _open_image(path_or_file) -> PIL.Image.Image:
    with PIL.Image.open(path_or_file) as image:
        image.load()  # decode now: a truncated or corrupt file raises here, not later
        return image.copy()


def folder_examples(input_dir: str, caption_column: str = "text") -> tuple[list[SourceExample], list[Skipped]]:
    """The examples of an ImageFolder-style folder, and the entries already known to be unusable."""
    root = Path(input_dir)
    examples: list[SourceExample] = []
    skipped: list[Skipped] = []
    metadata_files = sorted(root.rglob(METADATA_FILE))
    if metadata_files:
        for metadata_file in metadata_files:
            lines = metadata_file.read_text(encoding="utf-8", errors="replace").splitlines()
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{metadata_file}:{line_number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    skipped.append(Skipped(where, f"not valid JSON ({error.msg})"))
                    continue
                if not isinstance(row, dict) or "file_name" not in row:
                    skipped.append(Skipped(where, "no `file_name`"))
                    continue
                path = metadata_file.parent / str(row["file_name"])
                caption = row.get(caption_column)
                examples.append(SourceExample(str(path), None if caption is None else str(caption), _loader(path)))
        # Images that no metadata row names would be left out without a word: name each in the report.
        listed = {os.path.normpath(example.source) for example in examples}
        for path in _image_files(root):
            if os.path.normpath(path) not in listed:
                skipped.append(Skipped(str(path), f"not in any {METADATA_FILE}, so it has no caption"))
        return examples, skipped

    for path in _image_files(root):
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.is_file() else None
        examples.append(SourceExample(str(path), caption, _loader(path)))
    if not examples:
        raise ValueError(
            f"No images found in {input_dir!r}: expected image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) with a"
            f" {METADATA_FILE} or .txt captions."
        )
    return examples, skipped


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _loader(path: Path) -> Callable[[], PIL.Image.Image]:
    return lambda: _open_image(path)


def hub_dataset_examples(
    dataset_name: str, config_name: str | None, split: str, image_column: str, caption_column: str
) -> list[SourceExample]:
    """The examples of a `datasets` dataset; images are decoded one at a time so that a corrupt one can be skipped."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("`--dataset_name` needs the `datasets` library: pip install datasets") from error
    dataset = datasets.load_dataset(dataset_name, config_name, split=split)
    for column in (image_column, caption_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"{dataset_name!r} has no column {column!r}; its columns: {', '.join(dataset.column_names)}."
            )
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))

    def loader(index: int) -> Callable[[], PIL.Image.Image]:
        def load() -> PIL.Image.Image:
            value = dataset[index][image_column]
            if value.get("bytes") is not None:
                return _open_image(io.BytesIO(value["bytes"]))
            return _open_image(value["path"])

        return load

    captions = dataset[caption_column]
    return [
        SourceExample(
            f"{dataset_name}[{index}]", None if captions[index] is None else str(captions[index]), loader(index)
        )
        for index in range(len(dataset))
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Images and edge maps


def resize_and_center_crop(image: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """Any mode and size -> RGB `resolution` x `resolution`: EXIF rotation applied, transparency on white, the shorter
    side scaled to `resolution`, the longer one centre-cropped."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    return PIL.ImageOps.fit(image, (resolution, resolution), method=PIL.Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def canny_edges(image: PIL.Image.Image, low: int = DEFAULT_CANNY_LOW, high: int = DEFAULT_CANNY_HIGH) -> np.ndarray:
    """Canny edges of an RGB image: `uint8` (H, W), 255 on edges and 0 elsewhere.

    Run on the colour image (OpenCV takes the strongest gradient of the three channels), not on its brightness: a
    border between two colours of the same brightness, a red shape on grey, is an edge a person would draw.
    """
    import cv2

    return cv2.Canny(np.ascontiguousarray(np.asarray(image.convert("RGB"))), low, high)


def make_edge_detector(
    name: str,
    resolution: int,
    canny_low: int = DEFAULT_CANNY_LOW,
    canny_high: int = DEFAULT_CANNY_HIGH,
    annotator_repo: str = DEFAULT_ANNOTATOR_REPO,
) -> Callable[[PIL.Image.Image], PIL.Image.Image]:
    """A function from an RGB image to its edge map: a grayscale image of the same size, light edges on dark."""
    if name == "canny":
        return lambda image: PIL.Image.fromarray(canny_edges(image, canny_low, canny_high))
    if name not in ("hed", "pidinet"):
        raise ValueError(f"Unknown edge detector {name!r}; choose one of {EDGE_DETECTORS}.")
    try:
        from controlnet_aux import HEDdetector, PidiNetDetector
    except ImportError as error:
        raise ImportError(
            f"--edge_detector {name} needs controlnet_aux (pip install controlnet_aux); Canny works without it."
        ) from error
    detector_class = HEDdetector if name == "hed" else PidiNetDetector
    detector = detector_class.from_pretrained(annotator_repo)

    def detect(image: PIL.Image.Image) -> PIL.Image.Image:
        edges = detector(image, detect_resolution=resolution, image_resolution=resolution)
        return edges.convert("L").resize(image.size, resample=PIL.Image.Resampling.BILINEAR)

    return detect


def make_depth_estimator(model: str) -> MapMaker:
    """Depth maps from transformers' depth-estimation pipeline with `model`: grey, stretched to 0..255 per image (the
    LGP's `map_normalization="minmax"`), light where the model's output is high (near, for relative-depth models)."""
    import torch
    from transformers import pipeline

    try:
        estimator = pipeline("depth-estimation", model=model, device=0 if torch.cuda.is_available() else -1)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot load the depth estimator {model!r} for --map depth: {' '.join(str(error).split())[:300]}. Name a"
            f" transformers depth-estimation model (Hub id or folder) with --map_model, e.g. {DEFAULT_DEPTH_MODEL}."
        ) from error

    def estimate(image: PIL.Image.Image, original: PIL.Image.Image, example: SourceExample) -> PIL.Image.Image:
        with torch.no_grad():
            depth = estimator(image)["predicted_depth"].float().reshape(-1, *image.size[::-1]).mean(0).cpu().numpy()
        return PIL.Image.fromarray(normalize_to_uint8(depth, example.source))

    return estimate


def normalize_to_uint8(values: np.ndarray, source: str = "map") -> np.ndarray:
    """`values` stretched to 0..255 (min-max); a flat map cannot be, and raises `MissingMap`."""
    low, high = float(values.min()), float(values.max())
    if not np.isfinite([low, high]).all() or high - low <= 1e-6 * max(abs(low), abs(high)):
        raise MissingMap(f"the map of {source} is one flat value (or not finite), so it carries no spatial guidance")
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def make_folder_maps(map_dir: str, input_dir: str, map_kind: str, resolution: int) -> MapMaker:
    """The user's maps in `map_dir`, one per image, found by the image's path inside `input_dir` without its extension
    (`sub/cat.jpg` -> `map_dir/sub/cat.<any image extension>`), else by its bare name (`map_dir/cat.*`).

    A map is turned the same way up and cropped to the same square as its image; `color` maps keep three channels
    and are resized with nearest-neighbour sampling (segmentation colours stay exact), grey kinds are read as one
    channel (`depth` stretched to 0..255 per map). A map of another aspect than its image, or none, is `MissingMap`.
    """
    by_relative: dict[str, Path] = {}
    by_name: dict[str, list[Path]] = {}
    for path in _image_files(Path(map_dir)):
        by_relative[path.relative_to(map_dir).with_suffix("").as_posix()] = path
        by_name.setdefault(path.stem, []).append(path)
    mode = "RGB" if map_kind == "color" else "L"
    resample = PIL.Image.Resampling.NEAREST if map_kind == "color" else PIL.Image.Resampling.BICUBIC

    def find(source: str) -> Path:
        try:
            relative = Path(source).relative_to(input_dir).with_suffix("").as_posix()
        except ValueError:
            relative = Path(source).stem
        if relative in by_relative:
            return by_relative[relative]
        candidates = by_name.get(Path(source).stem, [])
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            raise MissingMap(
                f"{len(candidates)} maps in {map_dir} are named {Path(source).stem}.*; which one is meant?"
            )
        raise MissingMap(f"no map for it in {map_dir} (looked for {relative}.* and {Path(source).stem}.*)")

    def load(image: PIL.Image.Image, original: PIL.Image.Image, example: SourceExample) -> PIL.Image.Image:
        path = find(example.source)
        try:
            guidance_map = PIL.ImageOps.exif_transpose(_open_image(path))
        except UNREADABLE_IMAGE_ERRORS as error:
            raise MissingMap(f"its map {path} is unreadable ({type(error).__name__}: {error})") from error
        width, height = PIL.ImageOps.exif_transpose(original).size
        if abs(guidance_map.width * height / (guidance_map.height * width) - 1) > MAP_ASPECT_TOLERANCE:
            raise MissingMap(
                f"its map {path} is {guidance_map.width}x{guidance_map.height}, another aspect than the image's"
                f" {width}x{height}, so the two cannot be cropped alike"
            )
        if guidance_map.mode in ("RGBA", "LA", "PA") or "transparency" in guidance_map.info:
            rgba = guidance_map.convert("RGBA")  # transparent is background: black
            guidance_map = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        guidance_map = guidance_map.convert(mode).resize((width, height), resample=resample)
        guidance_map = PIL.ImageOps.fit(guidance_map, (resolution, resolution), method=resample, centering=(0.5, 0.5))
        if map_kind == "depth":
            return PIL.Image.fromarray(normalize_to_uint8(np.asarray(guidance_map, dtype=np.float32), str(path)))
        return guidance_map

    return load


def make_map_maker(args: argparse.Namespace) -> tuple[MapMaker, dict[str, Any]]:
    """The map maker that `args.map` names, and the settings it adds to the report (`map`, `map_kind`,
    `map_normalization`, and the detector's own)."""
    if args.map.startswith(FOLDER_MAP_PREFIX):
        map_dir = args.map[len(FOLDER_MAP_PREFIX) :]
        maker = make_folder_maps(map_dir, args.input_dir, args.map_kind, args.resolution)
        return maker, {
            "map": args.map,
            "map_kind": args.map_kind,
            "map_normalization": MAP_NORMALIZATION_OF_KIND[args.map_kind],
        }
    if args.map == "depth":
        settings = {"map": "depth", "map_kind": "depth", "map_normalization": "minmax", "map_model": args.map_model}
        return make_depth_estimator(args.map_model), settings
    detector = make_edge_detector(args.map, args.resolution, args.canny_low, args.canny_high, args.annotator_repo)
    settings = {"map": args.map, "map_kind": "edges", "map_normalization": "none", "edge_detector": args.map}
    if args.map == "canny":
        settings.update(canny_low=args.canny_low, canny_high=args.canny_high)
    return (lambda image, original, example: detector(image)), settings


# ---------------------------------------------------------------------------------------------------------------------
# The prepared set


def prepare_dataset(
    examples: list[SourceExample],
    output_dir: str,
    resolution: int,
    map_maker: MapMaker,
    skipped: list[Skipped] | None = None,
    max_samples: int | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the training set to `output_dir` and return the report (also written to `report.json`).

    `map_maker` makes each image's map (`make_map_maker`); an image it has none for (`MissingMap`) is skipped and
    counted in the report's `without_map`. The metadata is written to a temporary file and renamed at the end, so a
    folder with a `metadata.jsonl` is always a complete prepared set.
    """
    from tqdm.auto import tqdm

    skipped = list(skipped or [])
    out = Path(output_dir)
    for folder in ("images", "edges"):
        shutil.rmtree(out / folder, ignore_errors=True)
        (out / folder).mkdir(parents=True)
    (out / METADATA_FILE).unlink(missing_ok=True)
    temporary_metadata = out / (METADATA_FILE + ".tmp")

    written = without_map = 0
    with open(temporary_metadata, "w", encoding="utf-8") as metadata:
        for example in tqdm(examples, desc="Preparing", unit="image", disable=not progress):
            if max_samples is not None and written >= max_samples:
                break
            if example.caption is None:
                skipped.append(Skipped(example.source, "no caption"))
                continue
            try:
                image = example.load()
            except FileNotFoundError:
                skipped.append(Skipped(example.source, "file not found"))
                continue
            except (
                OSError,
                ValueError,
                SyntaxError,
                PIL.UnidentifiedImageError,
                PIL.Image.DecompressionBombError,
            ) as e:
                # PIL raises OSError for truncated files, UnidentifiedImageError for non-images, SyntaxError for
                # some malformed headers, DecompressionBombError for absurd sizes.
                skipped.append(Skipped(example.source, f"unreadable image ({type(e).__name__}: {e})"))
                continue
            resized = resize_and_center_crop(image, resolution)
            try:
                edges = map_maker(resized, image, example)
            except MissingMap as missing:
                skipped.append(Skipped(example.source, f"no map: {missing}"))
                without_map += 1
                continue
            image = resized
            name = f"{written:06d}.png"
            image.save(out / "images" / name)
            edges.save(out / "edges" / name)
            row = {
                "file_name": f"images/{name}",
                "edge_file_name": f"edges/{name}",
                "text": example.caption,
                "source": example.source,
            }
            metadata.write(json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
    os.replace(temporary_metadata, out / METADATA_FILE)

    report = {
        "written": written,
        "skipped": len(skipped),
        "without_map": without_map,
        "resolution": resolution,
        **(settings or {}),
        "skipped_files": [{"source": s.source, "reason": s.reason} for s in skipped],
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


@dataclass
class PreparedExample:
    image_path: str
    edge_path: str
    caption: str


def load_prepared_dataset(folder: str) -> list[PreparedExample]:
    """Read a folder written by `prepare_dataset`, checking that every listed file is there."""
    metadata_file = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(metadata_file):
        raise ValueError(
            f"{folder!r} is not a prepared training set (no {METADATA_FILE}). Prepare one first:"
            f" python -m pipeline_sketch_guided.training.prepare_data --input_dir <images> --output_dir {folder}"
        )
    examples = []
    with open(metadata_file, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "edge_file_name" not in row:
                raise ValueError(
                    f"{metadata_file}:{line_number} has no `edge_file_name`: this looks like a raw image folder."
                    " Prepare it first: python -m pipeline_sketch_guided.training.prepare_data"
                    f" --input_dir {folder} --output_dir <new folder>"
                )
            example = PreparedExample(
                os.path.join(folder, row["file_name"]), os.path.join(folder, row["edge_file_name"]), row["text"]
            )
            for path in (example.image_path, example.edge_path):
                if not os.path.isfile(path):
                    raise ValueError(f"{metadata_file}:{line_number} lists {path!r}, which does not exist.")
            examples.append(example)
    if not examples:
        raise ValueError(f"The prepared training set {folder!r} is empty.")
    return examples


def iter_report_lines(report: dict[str, Any], max_listed: int = 20) -> Iterator[str]:
    without_map = f" ({report['without_map']} of them without a map)" if report.get("without_map") else ""
    yield f"Wrote {report['written']} examples; skipped {report['skipped']}{without_map}."
    for entry in report["skipped_files"][:max_listed]:
        yield f"  skipped {entry['source']}: {entry['reason']}"
    if report["skipped"] > max_listed:
        yield f"  ... and {report['skipped'] - max_listed} more, listed in {REPORT_FILE}."


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    args = parse_args(argv)
    if args.input_dir is not None:
        examples, skipped = folder_examples(args.input_dir, args.caption_column)
    else:
        examples = hub_dataset_examples(
            args.dataset_name, args.dataset_config_name, args.split, args.image_column, args.caption_column
        )
        skipped = []
    map_maker, map_settings = make_map_maker(args)
    settings = {**map_settings, "source": args.input_dir or args.dataset_name}
    report = prepare_dataset(
        examples, args.output_dir, args.resolution, map_maker, skipped, args.max_samples, settings=settings
    )
    for line in iter_report_lines(report):
        logger.info(line)
    if report["written"] == 0:
        raise SystemExit(f"No usable example in the input; see {os.path.join(args.output_dir, REPORT_FILE)}.")
    return report


if __name__ == "__main__":
    main()
