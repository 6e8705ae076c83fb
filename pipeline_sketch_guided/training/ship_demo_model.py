"""Put the trained demo model and its LGP inside the package, in float16, as one diffusers pipeline folder.

    python -m pipeline_sketch_guided.training.ship_demo_model --model outputs/demo-sd/pipeline --lgp outputs/demo-lgp

`pipeline_sketch_guided.load_demo_pipeline()` loads the result (and upcasts it to float32 for the CPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from pipeline_sketch_guided import LGPModel, SketchGuidedStableDiffusionPipeline
from pipeline_sketch_guided.demo import DEMO_MODEL_DIR
from pipeline_sketch_guided.training.train_demo_model import atomic_save

MAX_SHIPPED_BYTES = 25 * 2**20  # the package must stay small: the whole demo, weights and all, under 25 MiB


def ship(model: Path, lgp: Path, target: Path = DEMO_MODEL_DIR, notes: dict | None = None) -> int:
    """Write the float16 pipeline (with `lgp/`) to `target`; return its size in bytes."""
    base = StableDiffusionPipeline.from_pretrained(model)
    pipe = SketchGuidedStableDiffusionPipeline.from_pipe(base, lgp=LGPModel.from_pretrained(lgp))
    pipe.to(torch.float16)

    def write(folder: Path) -> None:
        pipe.save_pretrained(folder)
        if notes:
            (folder / "training.json").write_text(json.dumps(notes, indent=2) + "\n")
        size = folder_size(folder)
        if size > MAX_SHIPPED_BYTES:  # checked before the rename, so a shipped model is never replaced by a bad one
            shutil.rmtree(folder)
            limit = MAX_SHIPPED_BYTES / 2**20
            raise ValueError(f"The demo model would be {size / 2**20:.1f} MiB, over the {limit:.0f} MiB limit.")

    atomic_save(write, target)
    return folder_size(target)


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the trained StableDiffusionPipeline folder")
    parser.add_argument("--lgp", type=Path, required=True, help="the trained LGP folder")
    parser.add_argument("--notes", type=Path, nargs="*", default=[], help="JSON reports to keep beside the weights")
    args = parser.parse_args(argv)
    notes = {path.stem: json.loads(path.read_text()) for path in args.notes}
    size = ship(args.model, args.lgp, notes=notes)
    print(f"Shipped {DEMO_MODEL_DIR} ({size / 2**20:.1f} MiB).")


if __name__ == "__main__":
    main()
