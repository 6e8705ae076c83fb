"""What the subcommands share: the model arguments and the checks that run before anything is loaded, so that a mistake
costs a second, not a model load and a generation."""

from __future__ import annotations

import argparse
import os

DTYPES = ("auto", "float32", "float16", "bfloat16")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --lgp, --fill-lgp, --demo-map, --device, --dtype, --threads: what runs, and where."""
    parser.add_argument(
        "--model", help="base model: a Hub repo id or a folder (default: the shipped demo model, offline)"
    )
    parser.add_argument("--lgp", help="LGP: a Hub repo id or a folder (default: the one saved with --model, if any)")
    parser.add_argument(
        "--fill-lgp",
        help="fill LGP (trained on filled silhouettes for --model), which guides each sketch's filled outline too: a"
        " Hub repo id or a folder (default: the one saved with --model, if any; the demo model has one)",
    )
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


def check_model_arguments(args: argparse.Namespace) -> None:
    """`add_model_arguments`' model sources, checked before anything is loaded."""
    if args.demo_map is not None and (args.model is not None or args.lgp is not None):
        raise UsageError("--demo-map picks one of the demo model's LGPs: use it without --model and --lgp.")
    check_model_source(args.model, "--model", "model's")
    check_model_source(args.lgp, "--lgp", "LGP's")
    check_model_source(args.fill_lgp, "--fill-lgp", "fill LGP's")


def load_model(args: argparse.Namespace, device: str, dtype):
    """The pipeline that `add_model_arguments` name, on `device` in `dtype`. A fill LGP that the pipeline refuses (one
    of another map kind, or made for another base model) is reported as --fill-lgp's error."""
    from .. import loading

    pipe = loading.load_pipeline(args.model, args.lgp, device, dtype, demo_map=args.demo_map)
    if args.fill_lgp is not None:
        try:
            loading.load_fill_lgp(pipe, args.fill_lgp, dtype)
        except ValueError as error:
            raise UsageError(f"--fill-lgp {args.fill_lgp}: {error}") from None
    return pipe


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
