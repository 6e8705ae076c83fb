"""The `sketch-guided` command line: the top of the package, which nothing below imports. Each subcommand is a module
here with an `add_<name>_parser(subparsers)` and a `run_<name>(args)`; the modules import the libraries only when they
run, so that `--help` starts at once and the libraries can be quieted first."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence

from .batch import add_batch_parser
from .common import default_threads
from .demo import add_demo_parser
from .generate import add_generate_parser
from .hub import add_convert_parser, add_push_parser
from .train import add_train_parser
from .ui import add_ui_parser

__all__ = ["build_parser", "default_threads", "main"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

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
    add_train_parser(subparsers)
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
