"""The GPU check: what a user of one NVIDIA GPU cares about, measured in one run with no Hub access.

1. The GPU tests (`pytest -m gpu`): float16 and bfloat16 guided generation stays finite and close to float32, model CPU
   offload with a sketch, gradient checkpointing, the two guided-step modes.
2. Precision: the demo model's guided and unguided images in float16 and bfloat16 against float32.
3. Cost on Stable Diffusion 1.5's architecture (random weights) at 512x512 in float16, by `benchmarks.guided_sampling`:
   whole generations unguided and guided at the defaults and at guided fraction 0.5, the parts of a guided step, the
   split and batched guided steps side by side (`pipe.guided_step_mode`), peak `max_memory_allocated` with and without
   gradient checkpointing.
4. LGP training throughput (`benchmarks.train_throughput`): the demo-size LGP for a few hundred steps, and an SD1.5 LGP
   at 512 px in float16.
5. The transformers (`benchmarks.transformer_cost`): SD3 medium's and FLUX.1 dev's architectures at full size with
   random weights, 1024x1024 in bfloat16: unguided and guided generations, SD3's split and batched guided steps, peak
   memory. It runs in a process of its own, last (FLUX.1 dev alone holds 24 GB of weights).

It writes `gpu_check.json` and `gpu_check.md` (the tables in docs/cost.md) to `--output_dir`, and exits non-zero if a
test or a section failed (each section runs even when one before it failed).

    bash benchmarks/gpu_check.sh                      # on the GPU machine, a few minutes
    python -m benchmarks.gpu_check --dry-run          # the same machinery on the CPU, tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable

import diffusers
import numpy as np
import torch

from pipeline_sketch_guided.demo import demo_sketches, load_demo_pipeline

# How much farther from float32 (mean |difference|, images in [0, 1]) guided generation on the demo model may lie than
# unguided generation does, in the GPU tests. float16 keeps 10 bits of mantissa and bfloat16 7.
HALF_PRECISION_TOLERANCE = {torch.float16: 0.01, torch.bfloat16: 0.02}


def demo_images(pipe, guided: bool, steps: int = 30, output_type: str = "np"):
    """The demo model's built-in sketches and prompts in one batch, a seed per image, with or without the sketch."""
    prompts, sketches = zip(*demo_sketches(), strict=True)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in range(len(prompts))]
    return pipe(
        list(prompts),
        sketch=list(sketches) if guided else None,
        num_inference_steps=steps,
        generator=generators,
        output_type=output_type,
    ).images


# ---------------------------------------------------------------------------------------------------------------------
# Sections: each returns what it measured, as JSON-ready values.


def gpu_tests(output_dir: Path) -> dict[str, Any]:
    """`pytest -m gpu` in a child process (a failed test is a result, not a crash of the check)."""
    report = output_dir / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"]
    completed = subprocess.run([*command, f"--junitxml={report}"], capture_output=True, text=True)
    outcomes: dict[str, str] = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        outcomes[case.get("name")] = outcome
        if outcome == "failed":
            print(f"GPU test failed: {case.get('name')}", file=sys.stderr)
    if completed.returncode not in (0, 1, 5):
        tail = completed.stdout[-3000:] + completed.stderr[-3000:]
        raise RuntimeError(f"pytest exited {completed.returncode}:\n{tail}")
    counts = {kind: sum(outcome == kind for outcome in outcomes.values()) for kind in ("passed", "failed", "skipped")}
    return {"counts": counts, "tests": outcomes, "output_tail": completed.stdout[-3000:]}


def precision(device: str, dtypes: list[torch.dtype], steps: int) -> dict[str, Any]:
    """How far each dtype's demo latents and images lie from float32's on the CPU, guided and unguided; float32 on
    `device` too (on a GPU it differs from the CPU: other kernels, TF32 convolutions)."""
    references = {}
    for output_type in ("latent", "np"):
        pipe = load_demo_pipeline()
        references[output_type] = {
            guided: _as_array(demo_images(pipe, guided, steps, output_type)) for guided in (False, True)
        }
    figures = {}
    for dtype in [torch.float32, *dtypes] if device != "cpu" else dtypes:
        pipe = load_demo_pipeline(dtype).to(device)
        for guided in (False, True):
            name = f"{str(dtype).removeprefix('torch.')} on {device}, {'guided' if guided else 'unguided'}"
            latents = _as_array(demo_images(pipe, guided, steps, "latent"))
            images = _as_array(demo_images(pipe, guided, steps))
            difference = np.abs(images - references["np"][guided])
            figures[name] = {
                "finite": bool(np.isfinite(images).all() and np.isfinite(latents).all()),
                "mean": float(difference.mean()),
                "max": float(difference.max()),
                "per_image_mean": [round(float(value), 5) for value in difference.reshape(len(images), -1).mean(1)],
                "latents_mean": float(np.abs(latents - references["latent"][guided]).mean()),
            }
    return figures


def _as_array(images) -> np.ndarray:
    return images.float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, dtype=np.float32)


def sampling_cost(dry_run: bool, device: str, output_dir: Path) -> dict[str, Any]:
    from benchmarks.guided_sampling import parse_args, run_benchmark, without_nan

    if dry_run:
        common = ["--model", "tiny", "--steps", "4", "--repeats", "1", "--warmup", "0", "--device", device]
    else:
        common = ["--model", "sd15-random", "--resolution", "512", "--steps", "30", "--dtype", "float16"]
        common += ["--repeats", "5", "--device", device]
    half = [*common, "--guided_fraction", "0.5", "--phases", "generation"]
    records = {"defaults": run_benchmark(parse_args(common)), "guided fraction 0.5": run_benchmark(parse_args(half))}
    if dry_run:
        sdxl = ["--model", "tiny-sdxl", "--steps", "4", "--repeats", "1", "--warmup", "0", "--device", device]
    else:
        sdxl = ["--model", "sdxl-random", "--resolution", "1024", "--steps", "30", "--dtype", "float16"]
        sdxl += ["--repeats", "3", "--device", device]
    records["sdxl"] = run_benchmark(parse_args([*sdxl, "--phases", "generation", "--checkpointing"]))
    records = without_nan(records)
    (output_dir / "guided_sampling.json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return records


def training_throughput(dry_run: bool) -> dict[str, Any]:
    """`benchmarks.train_throughput`, each run in a process of its own (accelerate's state is one per process)."""
    from pipeline_sketch_guided.demo import DEMO_MODEL_DIR

    if dry_run:
        runs = {"tiny": ["--model", "tiny", "--steps", "2", "--warmup_steps", "1"]}
    else:
        demo = ["--model", str(DEMO_MODEL_DIR), "--resolution", "64", "--batch_size", "32", "--steps", "300"]
        sd15 = ["--model", "sd15-random", "--resolution", "512", "--batch_size", "8", "--mixed_precision", "fp16"]
        runs = {
            "demo-size LGP, 64 px, batch 32, float32": demo,
            "SD1.5 LGP (sketch2img blocks), 512 px, batch 8, fp16": [*sd15, "--steps", "20"],
        }
    results = {}
    for name, arguments in runs.items():
        command = [sys.executable, "-m", "benchmarks.train_throughput", *arguments]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr[-3000:]}")
        results[name] = json.loads(completed.stdout[completed.stdout.index("{") :])
    return results


def transformer_cost(dry_run: bool, output_dir: Path) -> dict[str, Any]:
    """`benchmarks.transformer_cost` in a process of its own, so that its models' memory is given back after it."""
    output = output_dir / "transformer_cost.json"
    if dry_run:
        arguments = [
            "--resolution",
            "32",
            "--steps",
            "2",
            "--sd3_layers",
            "1",
            "--flux_layers",
            "1",
            "1",
            "--runs",
            "1",
        ]
    else:
        arguments = ["--device", "cuda", "--dtype", "bfloat16", "--resolution", "1024", "--steps", "28", "--runs", "2"]
    command = [sys.executable, "-m", "benchmarks.transformer_cost", *arguments, "--output", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr[-3000:]}")
    return json.loads(output.read_text())


# ---------------------------------------------------------------------------------------------------------------------
# The report


def markdown(report: dict[str, Any]) -> str:
    """The figures as the Markdown tables of docs/cost.md."""
    env = report["environment"]
    lines = [
        f"GPU check on {env['device']}: torch {env['torch']}, diffusers {env['diffusers']}, {env['date']}"
        f" (`{env['command']}`, {report['seconds']:.0f} s).",
        "",
    ]
    sections = report["sections"]
    if "tests" in sections:
        counts = sections["tests"]["counts"]
        failed = [name for name, outcome in sections["tests"]["tests"].items() if outcome == "failed"]
        lines += [
            f"GPU tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
            + (f" (failed: {', '.join(failed)})" if failed else "")
            + ".",
            "",
        ]
    if "precision" in sections:
        lines += ["| demo model, against float32 | finite | mean abs difference | largest |", "|---|---|---:|---:|"]
        for name, value in sections["precision"].items():
            lines.append(f"| {name} | {value['finite']} | {value['mean']:.4f} | {value['max']:.3f} |")
        lines.append("")
    if "sampling" in sections:
        lines += sampling_tables(sections["sampling"])
    if "transformers" in sections:
        lines += [sections["transformers"]["table"], ""]
    if "training" in sections:
        lines += ["| LGP training | s / step | images / s | peak MiB |", "|---|---:|---:|---:|"]
        for name, value in sections["training"].items():
            lines.append(
                f"| {name} | {value['seconds_per_step']:.4f} | {value['images_per_second']:.1f}"
                f" | {value['peak_memory_mib']} |"
            )
        lines.append("")
    for name, error in report["errors"].items():
        lines.append(f"Section {name} failed: {error.splitlines()[-1]}")
    return "\n".join(lines).rstrip() + "\n"


def sampling_tables(records: dict[str, Any]) -> list[str]:
    defaults, half = records["defaults"], records["guided fraction 0.5"]
    config = defaults["config"]
    seconds = {name: value["median"] for name, value in defaults["seconds"].items()}
    peak = {name: value["peak"] for name, value in defaults["memory_mib"].items()}
    unguided = seconds["generation, unguided"]
    lines = [
        f"{config['model']} ({config['unet_parameters_millions']}M UNet parameters), {config['resolution']}x"
        f"{config['resolution']}, {config['dtype']}, {config['steps']} steps of {config['scheduler']}, median of"
        f" {config['repeats']}:",
        "",
        "| whole generation | seconds | / unguided | peak MiB |",
        "|---|---:|---:|---:|",
        f"| unguided | {unguided:.3f} | 1.00 | {peak['generation, unguided']:.0f} |",
    ]
    for record, fraction in ((defaults, config["guided_fraction"]), (half, half["config"]["guided_fraction"])):
        guided_steps = record["config"]["guided_steps"]
        for mode in ("split", "batched"):
            name = "generation, guided" + (", batched" if mode == "batched" else "")
            value = record["seconds"][name]["median"]
            lines.append(
                f"| guided {guided_steps} of {config['steps']} steps (fraction {fraction:g}), {mode} | {value:.3f}"
                f" | {value / record['seconds']['generation, unguided']['median']:.2f}"
                f" | {record['memory_mib'][name]['peak']:.0f} |"
            )
    lines += ["", "| one step | seconds | peak MiB |", "|---|---:|---:|"]
    for name, value in seconds.items():
        if not name.startswith("generation"):
            lines.append(f"| {name.strip()} | {value:.4f} | {peak[name]:.0f} |")
    if "sdxl" in records:
        sdxl = records["sdxl"]
        sdxl_config = sdxl["config"]
        unguided_xl = sdxl["seconds"]["generation, unguided"]["median"]
        lines += [
            "",
            f"{sdxl_config['model']} ({sdxl_config['unet_parameters_millions']}M UNet parameters),"
            f" {sdxl_config['resolution']}x{sdxl_config['resolution']}, {sdxl_config['dtype']}, {sdxl_config['steps']}"
            f" steps of {sdxl_config['scheduler']}, {sdxl_config['guided_steps']} guided, median of"
            f" {sdxl_config['repeats']}:",
            "",
            "| whole generation | seconds | / unguided | peak MiB |",
            "|---|---:|---:|---:|",
        ]
        for name, value in sdxl["seconds"].items():
            if name.startswith("generation"):
                seconds_xl = value["median"]
                lines.append(
                    f"| {name.removeprefix('generation, ')} | {seconds_xl:.3f} | {seconds_xl / unguided_xl:.2f}"
                    f" | {sdxl['memory_mib'][name]['peak']:.0f} |"
                )
    lines += ["", "| ratio | |", "|---|---:|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in defaults["ratios"].items()]
    saved = defaults.get("saved_for_backward_mib", {})
    if saved:
        lines += ["", "| kept for the backward of a guided step | MiB |", "|---|---:|"]
        lines += [f"| {name} | {value['total']:.0f} |" for name, value in saved.items()]
    return [*lines, ""]


def run_section(report: dict[str, Any], name: str, work: Callable[[], Any]) -> None:
    print(f"== {name}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        report["sections"][name] = work()
    except Exception:  # noqa: BLE001 - one section's failure must not lose the others' figures
        report["errors"][name] = traceback.format_exc()
        print(report["errors"][name], file=sys.stderr)
    report["section_seconds"][name] = round(time.perf_counter() - start, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="gpu_check", help="Where to write gpu_check.json and gpu_check.md.")
    parser.add_argument("--dry-run", action="store_true", help="On the CPU with tiny sizes: checks the machinery.")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["tests", "precision", "sampling", "training", "transformers"],
        choices=["tests", "precision", "sampling", "training", "transformers"],
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU here: run it on a GPU machine, or with --dry-run to check it on the CPU.")
    device = "cpu" if args.dry_run else "cuda"
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "environment": {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "date": datetime.date.today().isoformat(),
            "command": "python -m benchmarks.gpu_check" + (" --dry-run" if args.dry_run else ""),
        },
        "sections": {},
        "errors": {},
        "section_seconds": {},
    }
    # float16 cannot back-propagate on the CPU (the pipeline refuses it there); a dry run checks bfloat16 only.
    dtypes = [torch.bfloat16] if args.dry_run else [torch.float16, torch.bfloat16]
    sections = {
        "tests": lambda: gpu_tests(output_dir),
        "precision": lambda: precision(device, dtypes, steps=4 if args.dry_run else 30),
        "sampling": lambda: sampling_cost(args.dry_run, device, output_dir),
        "training": lambda: training_throughput(args.dry_run),
        "transformers": lambda: transformer_cost(args.dry_run, output_dir),
    }
    for name in args.sections:
        run_section(report, name, sections[name])
    report["seconds"] = time.perf_counter() - start
    (output_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    (output_dir / "gpu_check.md").write_text(table, encoding="utf-8")
    print(table)
    failed_tests = report["sections"].get("tests", {}).get("counts", {}).get("failed", 0)
    return 1 if report["errors"] or failed_tests else 0


if __name__ == "__main__":
    raise SystemExit(main())
