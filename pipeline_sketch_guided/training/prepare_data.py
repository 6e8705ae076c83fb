"""Prepare an LGP training set: (image, caption, edge map) triplets at one resolution, written to a folder.

Sources:
- a folder of images with captions, in the diffusers ImageFolder convention: a `metadata.jsonl` whose lines hold
  `file_name` and `text` (another caption key with `--caption_column`), or one `.txt` file of the same name beside
  each image;
- a Hugging Face `datasets` dataset (`--dataset_name`) with an image column and a text column.

Every image, whatever its mode and size, is resized and centre-cropped to `--resolution`; its edge map comes from
Canny (OpenCV, offline, the default) or from a learned detector (`hed` or `pidinet`, through `controlnet_aux`, whose
weights are downloaded from the Hub). Edge maps are saved as light strokes on a dark background, the convention of
edge detectors and the LGP's default `sketch_polarity`. A file that cannot be read is skipped, counted and named in
`report.json`; it never stops the run.

Output folder:
    images/000000.png ...   the resized RGB images
    edges/000000.png ...    their edge maps (grayscale, white edges on black)
    metadata.jsonl          {"file_name", "edge_file_name", "text", "source"} per example
    report.json             counts, settings, and every skipped file with the reason

    python -m pipeline_sketch_guided.training.prepare_data --input_dir my_photos --output_dir data/lgp --resolution 512
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
    parser.add_argument("--edge_detector", type=str, default="canny", choices=EDGE_DETECTORS)
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


# ---------------------------------------------------------------------------------------------------------------------
# The prepared set


def prepare_dataset(
    examples: list[SourceExample],
    output_dir: str,
    resolution: int,
    edge_detector: Callable[[PIL.Image.Image], PIL.Image.Image],
    skipped: list[Skipped] | None = None,
    max_samples: int | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the training set to `output_dir` and return the report (also written to `report.json`).

    The metadata is written to a temporary file and renamed at the end, so a folder with a `metadata.jsonl` is always
    a complete prepared set.
    """
    from tqdm.auto import tqdm

    skipped = list(skipped or [])
    out = Path(output_dir)
    for folder in ("images", "edges"):
        shutil.rmtree(out / folder, ignore_errors=True)
        (out / folder).mkdir(parents=True)
    (out / METADATA_FILE).unlink(missing_ok=True)
    temporary_metadata = out / (METADATA_FILE + ".tmp")

    written = 0
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
            image = resize_and_center_crop(image, resolution)
            edges = edge_detector(image)
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
    yield f"Wrote {report['written']} examples; skipped {report['skipped']}."
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
    detector = make_edge_detector(
        args.edge_detector, args.resolution, args.canny_low, args.canny_high, args.annotator_repo
    )
    settings = {"edge_detector": args.edge_detector, "source": args.input_dir or args.dataset_name}
    if args.edge_detector == "canny":
        settings.update(canny_low=args.canny_low, canny_high=args.canny_high)
    report = prepare_dataset(
        examples, args.output_dir, args.resolution, detector, skipped, args.max_samples, settings=settings
    )
    for line in iter_report_lines(report):
        logger.info(line)
    if report["written"] == 0:
        raise SystemExit(f"No usable example in the input; see {os.path.join(args.output_dir, REPORT_FILE)}.")
    return report


if __name__ == "__main__":
    main()
