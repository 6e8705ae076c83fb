"""`sketch-guided train PROGRAM ...`: the training programs of `training/` from an installed package.

In a checkout they run as scripts, as diffusers' examples do (`accelerate launch training/train_lgp.py ...`); installed,
the same files are the package `pipeline_sketch_guided.training`, and this subcommand runs one of them with the
arguments that follow its name (`sketch-guided train train_lgp --help`). For many GPUs use accelerate with the module:
`accelerate launch -m pipeline_sketch_guided.training.train_lgp ...`.
"""

from __future__ import annotations

import argparse
import importlib

# Each program's module in `pipeline_sketch_guided.training`, with what it does.
TRAINING_PROGRAMS = {
    "prepare_data": "turn captioned images into (image, map, caption) training triplets",
    "train_lgp": "train an LGP for a base model (accelerate: CPU, one GPU or many)",
    "evaluate": "measure how well an LGP's guided images follow their sketches",
    "train_controlnet": "train a ControlNet on the same data, for the side-by-side comparison",
    "shapes": "render the demo model's shapes data",
    "train_demo_model": "train the demo model from scratch",
    "ship_demo_model": "write a trained demo model and its LGPs into the package",
}


def add_train_parser(subparsers) -> None:
    programs = "; ".join(f"{name}: {what}" for name, what in TRAINING_PROGRAMS.items())
    parser = subparsers.add_parser(
        "train",
        help="run a training program (prepare_data, train_lgp, evaluate, ...; needs the training extra)",
        description=(
            "Run one of the training programs with the arguments after its name (PROGRAM --help lists them). The same"
            f" programs are training/<PROGRAM>.py in a checkout. {programs}."
        ),
    )
    parser.add_argument("program", choices=list(TRAINING_PROGRAMS), help="the program to run")
    parser.add_argument("program_args", nargs=argparse.REMAINDER, help="its arguments")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module(f"pipeline_sketch_guided.training.{args.program}")
    except ImportError as error:
        raise ImportError(
            f'{error}. The training programs need the training extra: pip install "pipeline_sketch_guided[training]".'
        ) from None
    module.main(args.program_args)
    return 0
