"""Put the trained demo model and its LGP inside the package, in float16, as one diffusers pipeline folder; or put
another demo LGP (one trained on another kind of map) beside it.

    python -m pipeline_sketch_guided.training.ship_demo_model --model outputs/demo-sd/pipeline --lgp outputs/demo-lgp
    python -m pipeline_sketch_guided.training.ship_demo_model --lgp outputs/demo-lgp-silhouette --map silhouette
    # a candidate beside the shipped demo, to measure before shipping:
    python -m pipeline_sketch_guided.training.ship_demo_model --model outputs/demo-v2/sd-fp16 \
        --lgp outputs/demo-v2/lgp --target outputs/demo-v2/candidate

`pipeline_sketch_guided.load_demo_pipeline()` loads the result (and upcasts it to float32 for the CPU), with the
silhouette LGP as its `fill_lgp` where one is shipped; `load_demo_pipeline(map="silhouette")` the pipeline with the
silhouette LGP as its `lgp`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from pipeline_sketch_guided import LGPModel, SketchGuidedStableDiffusionPipeline
from pipeline_sketch_guided.demo import DEMO_LGP_FOLDERS, DEMO_MODEL_DIR
from pipeline_sketch_guided.training.train_demo_model import atomic_save
from pipeline_sketch_guided.utils import dtype_kwargs

MAX_SHIPPED_BYTES = 25 * 2**20  # the package must stay small: the whole demo, weights and all, under 25 MiB


def register_fill_lgp(folder: Path) -> None:
    """Name the silhouette LGP beside the pipeline in `folder` as its `fill_lgp` component in `model_index.json`, so
    that loading the demo brings it for fill guidance."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["fill_lgp"] = ["pipeline_sketch_guided.lgp", "LGPModel"]
    temporary = index_path.with_name(index_path.name + ".tmp")
    temporary.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    temporary.replace(index_path)


def ship(model: Path, lgp: Path, target: Path = DEMO_MODEL_DIR, notes: dict | None = None) -> int:
    """Write the float16 pipeline (with `lgp/`) to `target`; return its size in bytes. A silhouette LGP already
    shipped in `target` stays beside it, as its `fill_lgp`."""
    base = StableDiffusionPipeline.from_pretrained(model)
    pipe = SketchGuidedStableDiffusionPipeline.from_pipe(base, lgp=LGPModel.from_pretrained(lgp))
    pipe.to(torch.float16)

    def write(folder: Path) -> None:
        pipe.save_pretrained(folder)
        for extra in DEMO_LGP_FOLDERS.values():  # the other maps' demo LGPs stay beside the new model
            if extra != "lgp" and (target / extra).is_dir():
                shutil.copytree(target / extra, folder / extra)
        if (folder / DEMO_LGP_FOLDERS["silhouette"]).is_dir():
            register_fill_lgp(folder)
        if notes:
            (folder / "training.json").write_text(json.dumps(notes, indent=2) + "\n")
        size = folder_size(folder)
        if size > MAX_SHIPPED_BYTES:  # checked before the rename, so a shipped model is never replaced by a bad one
            shutil.rmtree(folder)
            limit = MAX_SHIPPED_BYTES / 2**20
            raise ValueError(f"The demo model would be {size / 2**20:.1f} MiB, over the {limit:.0f} MiB limit.")

    atomic_save(write, target)
    return folder_size(target)


def ship_lgp(lgp: Path, map_name: str, target: Path = DEMO_MODEL_DIR, notes: dict | None = None) -> int:
    """Write the float16 LGP of demo map `map_name` to its folder in `target` (`DEMO_LGP_FOLDERS`), beside the shipped
    model it was trained for; return the whole demo's size in bytes."""
    if map_name not in DEMO_LGP_FOLDERS or DEMO_LGP_FOLDERS[map_name] == "lgp":
        others = sorted(name for name, folder in DEMO_LGP_FOLDERS.items() if folder != "lgp")
        raise ValueError(f"`--map {map_name}` is not another demo map; choose one of {others}.")
    if not (target / "model_index.json").is_file():
        raise ValueError(f"No demo model in {target} to put the LGP beside; ship the model first (--model, --lgp).")
    model = LGPModel.from_pretrained(lgp, **dtype_kwargs(torch.float16))

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if notes:
            (folder / "training.json").write_text(json.dumps(notes, indent=2) + "\n")

    atomic_save(write, target / DEMO_LGP_FOLDERS[map_name])
    size = folder_size(target)
    if size > MAX_SHIPPED_BYTES:
        shutil.rmtree(target / DEMO_LGP_FOLDERS[map_name])
        raise ValueError(
            f"The demo would be {size / 2**20:.1f} MiB, over the {MAX_SHIPPED_BYTES / 2**20:.0f} MiB limit."
        )
    if map_name == "silhouette":
        register_fill_lgp(target)
    return size


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="the trained StableDiffusionPipeline folder")
    parser.add_argument("--lgp", type=Path, required=True, help="the trained LGP folder")
    parser.add_argument(
        "--map",
        type=str,
        default="edges",
        choices=sorted(DEMO_LGP_FOLDERS),
        help="the map the LGP was trained on: edges (with --model, the whole demo) or another, shipped beside it",
    )
    parser.add_argument("--notes", type=Path, nargs="*", default=[], help="JSON reports to keep beside the weights")
    parser.add_argument(
        "--target",
        type=Path,
        default=DEMO_MODEL_DIR,
        help="where to write it (default: inside the package, replacing the shipped demo); another folder makes a"
        " candidate to measure first (benchmarks.efficacy --model FOLDER)",
    )
    args = parser.parse_args(argv)
    notes = {path.stem: json.loads(path.read_text()) for path in args.notes}
    if args.map != "edges":
        if args.model is not None:
            parser.error("--model ships the whole demo with its edge LGP; leave it out with --map " + args.map)
        size = ship_lgp(args.lgp, args.map, target=args.target, notes=notes)
        folder = args.target / DEMO_LGP_FOLDERS[args.map]
        print(f"Shipped the {args.map} LGP to {folder} (the demo is now {size / 2**20:.1f} MiB).")
        return
    if args.model is None:
        parser.error("--model is needed to ship the demo model with its edge LGP")
    size = ship(args.model, args.lgp, target=args.target, notes=notes)
    print(f"Shipped {args.target} ({size / 2**20:.1f} MiB).")


if __name__ == "__main__":
    main()
