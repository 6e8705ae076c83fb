"""LGP training, offline on the CPU: data preparation, the trainer (loss, checkpoints, resume, several processes), and
loading the result into the pipeline. A tiny base model is saved in a temporary folder and loaded as users' are."""

from __future__ import annotations

import importlib
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline

from pipeline_sketch_guided import BLOCK_PRESETS, LGPModel, SketchGuidedStableDiffusionPipeline
from pipeline_sketch_guided.testing import tiny_components
from pipeline_sketch_guided.training import prepare_data, train_lgp
from pipeline_sketch_guided.training.denoisers import UNetDenoiser, inpainting_mask
from pipeline_sketch_guided.training.train_lgp import (
    epoch_batches,
    last_block_to_run,
    last_up_block_read,
    latest_checkpoint,
    lgp_loss,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32
NUM_IMAGES = 12


def draw_example(index: int) -> tuple[PIL.Image.Image, str]:
    """A filled rectangle on grey, in a mode and size that vary with `index`."""
    rng = np.random.default_rng(index)
    height, width = (40, 56) if index % 2 else (64, 48)
    array = np.full((height, width, 3), 200, dtype=np.uint8)
    top, left = rng.integers(12, 20, size=2)
    colour = ("red", (230, 30, 30)) if index % 3 else ("blue", (30, 30, 230))
    array[top : top + 16, left : left + 16] = colour[1]
    image = PIL.Image.fromarray(array)
    image = [image, image.convert("L"), image.convert("RGBA"), image.convert("P")][index % 4]
    return image, f"a {colour[0]} square on the grey background"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("base")
    StableDiffusionPipeline(**tiny_components()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """ImageFolder convention: images and a metadata.jsonl, plus a corrupt file and a truncated PNG."""
    folder = tmp_path_factory.mktemp("images")
    rows = []
    for index in range(NUM_IMAGES):
        image, caption = draw_example(index)
        name = f"shape_{index}.{'jpg' if image.mode == 'L' else 'png'}"
        image.save(folder / name)
        rows.append({"file_name": name, "text": caption})
    (folder / "corrupt.png").write_bytes(b"this is not an image")
    draw_example(0)[0].save(folder / "whole.png")
    whole = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "whole.png").unlink()
    rows += [{"file_name": "corrupt.png", "text": "a cat"}, {"file_name": "truncated.png", "text": "a cat"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def prepared(image_folder, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("prepared")
    report = prepare_data.main(
        ["--input_dir", str(image_folder), "--output_dir", str(output), "--resolution", str(RESOLUTION), "--overwrite"]
    )
    return output, report


def train_args(base_model: str, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        base_model,
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(output),
        "--hidden_dims",
        "32",
        "16",
        "--train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Data preparation


def test_prepare_data_skips_and_reports_corrupt_images(prepared, image_folder):
    output, report = prepared
    assert report["written"] == NUM_IMAGES
    skipped = {Path(entry["source"]).name: entry["reason"] for entry in report["skipped_files"]}
    assert set(skipped) == {"corrupt.png", "truncated.png"}
    assert all("unreadable" in reason for reason in skipped.values())
    assert json.loads((output / "report.json").read_text())["skipped"] == 2

    examples = prepare_data.load_prepared_dataset(str(output))
    assert len(examples) == NUM_IMAGES
    assert examples[0].caption == draw_example(0)[1]
    for example in examples:
        with PIL.Image.open(example.image_path) as image, PIL.Image.open(example.edge_path) as edges:
            assert (image.mode, image.size) == ("RGB", (RESOLUTION, RESOLUTION))
            assert (edges.mode, edges.size) == ("L", (RESOLUTION, RESOLUTION))
            values = np.unique(np.asarray(edges))
        # Canny: white edges on black, and every picture here has a square to find.
        assert set(values.tolist()) == {0, 255}


def test_prepare_data_reads_sidecar_captions_and_skips_uncaptioned(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for index in range(3):
        image, caption = draw_example(index)
        image.save(source / f"{index}.png")
        if index != 2:
            (source / f"{index}.txt").write_text(caption + "\n")
    output = tmp_path / "out"
    report = prepare_data.main(["--input_dir", str(source), "--output_dir", str(output), "--resolution", "16"])
    assert report["written"] == 2
    assert [(Path(e["source"]).name, e["reason"]) for e in report["skipped_files"]] == [("2.png", "no caption")]
    rows = [json.loads(line) for line in (output / "metadata.jsonl").read_text().splitlines()]
    assert [row["text"] for row in rows] == [draw_example(0)[1], draw_example(1)[1]]
    with pytest.raises(ValueError, match="--overwrite"):
        prepare_data.main(["--input_dir", str(source), "--output_dir", str(output)])


def test_prepare_data_centre_crops_any_mode():
    tall = PIL.Image.new("LA", (20, 60))
    tall.paste((255, 255), (0, 20, 20, 40))  # opaque white band in the middle third
    result = prepare_data.resize_and_center_crop(tall, 10)
    assert (result.mode, result.size) == ("RGB", (10, 10))
    # The crop keeps the middle (the opaque band); transparency elsewhere would have turned white too.
    assert np.asarray(result).min() > 200


# ---------------------------------------------------------------------------------------------------------------------
# The trainer


def test_trainer_rejects_bad_arguments_up_front(base_model, prepared, image_folder, tmp_path):
    data, _ = prepared
    args = train_args(base_model, data, tmp_path / "out")
    with pytest.raises(ValueError, match="learning_rate"):
        train_lgp.parse_args([*args, "--learning_rate", "0"])
    with pytest.raises(ValueError, match="validation sketches"):
        sketch = str(data / "edges" / "000000.png")
        train_lgp.parse_args([*args, "--validation_prompts", "a", "b", "c", "--validation_sketches", sketch, sketch])
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        train_lgp.parse_args([*args, "--resume_from_checkpoint", str(tmp_path)])
    with pytest.raises(ValueError, match="hub_model_id"):
        train_lgp.parse_args([*args, "--push_to_hub"])
    # A raw image folder instead of a prepared one: told how to prepare it.
    with pytest.raises(ValueError, match="pipeline_sketch_guided.training.prepare_data"):
        train_lgp.main(train_args(base_model, image_folder, tmp_path / "raw", "--max_train_steps", "1"))
    with pytest.raises(ValueError, match="fewer than one step"):
        train_lgp.main([*args, "--train_batch_size", "64", "--max_train_steps", "1"])


def test_epoch_batches_are_reproducible_and_split_between_processes():
    first = epoch_batches(10, 2, epoch=3, seed=7, process_index=0, num_processes=2)
    second = epoch_batches(10, 2, epoch=3, seed=7, process_index=1, num_processes=2)
    assert first == epoch_batches(10, 2, epoch=3, seed=7, process_index=0, num_processes=2)
    assert len(first) == len(second) == 2  # 5 examples each, so 2 full batches of 2
    seen = [i for batch in first + second for i in batch]
    assert len(set(seen)) == len(seen) == 8
    assert first != epoch_batches(10, 2, epoch=4, seed=7, process_index=0, num_processes=2)


def test_unet_forward_stops_after_the_last_captured_block(components):
    unet = components["unet"]
    lgp = LGPModel.from_unet(unet, hidden_dims=[8])
    embeds = torch.randn(2, 16, 32)
    latents = torch.randn(2, 4, 16, 16)
    last = last_block_to_run(unet, lgp.config.blocks, lambda: unet(latents[:1], 0, encoder_hidden_states=embeds[:1]))
    assert last == "up_blocks.0"  # sketch2img leaves out the last up block

    calls = []
    handle = unet.conv_out.register_forward_hook(lambda *args: calls.append(1))
    base = SketchGuidedStableDiffusionPipeline(**components)
    denoiser = UNetDenoiser(base, 32)
    conditioning = {"encoder_hidden_states": embeds}
    arguments = (denoiser, lgp, lgp.config, latents, torch.randn(2, 4, 16, 16), conditioning, torch.tensor([10, 900]))
    noise = torch.randn(2, 4, 16, 16)
    try:
        early = lgp_loss(*arguments, noise, stop_block=unet.get_submodule(last))
        assert calls == []
        full = lgp_loss(*arguments, noise, stop_block=None)
        assert calls == [1]
    finally:
        handle.remove()
    torch.testing.assert_close(early, full)


def test_training_loss_falls_and_the_result_drives_the_pipeline(base_model, prepared, tmp_path, monkeypatch):
    data, _ = prepared
    output = tmp_path / "run"
    sketch = str(data / "edges" / "000000.png")
    result = train_lgp.main(
        train_args(
            base_model,
            data,
            output,
            "--max_train_steps",
            "24",
            "--cache_latents",
            "--validation_prompts",
            "a red square",
            "--validation_sketches",
            sketch,
            "--validation_steps",
            "24",
            "--num_validation_inference_steps",
            "4",
        )
    )
    assert result.global_step == 24 and len(result.losses) == 24
    assert np.mean(result.losses[-4:]) < 0.6 * np.mean(result.losses[:4])
    assert (output / "validation" / "step-000024" / "00_image.png").is_file()

    lgp = LGPModel.from_pretrained(output)
    assert list(lgp.config.hidden_dims) == [32, 16]
    base = StableDiffusionPipeline.from_pretrained(base_model)
    pipe = SketchGuidedStableDiffusionPipeline(**base.components, lgp=lgp)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 4, "output_type": "np"}
    guided = pipe("a red square", sketch=sketch, generator=torch.Generator().manual_seed(0), **kwargs).images
    plain = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert guided.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(guided).all()
    assert not np.allclose(guided, plain)

    # --push_to_hub publishes through pipeline_sketch_guided.hub: card, weights, the last validation images.
    hub = pytest.importorskip("pipeline_sketch_guided.hub")
    uploaded = {}

    def fake_upload(folder, repo_id, **kwargs):
        files = {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()}
        uploaded.update(repo_id=repo_id, files=files, card=Path(folder, "README.md").read_text())
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(hub, "upload_hub_folder", fake_upload)
    args = train_lgp.parse_args(train_args(base_model, data, output, "--push_to_hub", "--hub_model_id", "me/tiny-lgp"))
    args.resolution = RESOLUTION
    train_lgp.push_lgp_to_hub(lgp, args, result)
    assert uploaded["repo_id"] == "me/tiny-lgp"
    assert {"config.json", "diffusion_pytorch_model.safetensors", "figures/00_image.png"} <= uploaded["files"]
    assert "24 steps" in uploaded["card"] and f"{NUM_IMAGES} captioned images" in uploaded["card"]


def test_killed_run_resumes_from_its_last_complete_checkpoint(base_model, prepared, tmp_path, monkeypatch):
    data, _ = prepared
    steps = ["--max_train_steps", "6", "--checkpointing_steps", "3"]
    uninterrupted = train_lgp.main(train_args(base_model, data, tmp_path / "whole", *steps))

    # Kill the second run while it writes checkpoint-6: after the files are written, before the rename.
    output = tmp_path / "killed"
    rename = train_lgp.replace_directory

    def killed_at_step_6(source, target):
        if target.endswith("checkpoint-6"):
            raise KeyboardInterrupt
        rename(source, target)

    monkeypatch.setattr(train_lgp, "replace_directory", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_lgp.main(train_args(base_model, data, output, *steps))
    monkeypatch.undo()
    assert (output / "checkpoint-6.tmp").is_dir() and not (output / "checkpoint-6").exists()
    assert latest_checkpoint(str(output)) == str(output / "checkpoint-3")
    LGPModel.from_pretrained(output / "checkpoint-3" / "lgp")  # the last good checkpoint loads

    resumed = train_lgp.main(train_args(base_model, data, output, *steps, "--resume_from_checkpoint", "latest"))
    assert resumed.global_step == 6 and len(resumed.losses) == 3
    assert not (output / "checkpoint-6.tmp").exists()
    # Same optimizer state, data order and noise: the resumed run ends exactly where the uninterrupted one did.
    assert resumed.losses == uninterrupted.losses[3:]
    expected = LGPModel.from_pretrained(tmp_path / "whole").state_dict()
    for name, value in LGPModel.from_pretrained(output).state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)

    # Resuming with another LGP shape is refused, naming the difference.
    with pytest.raises(ValueError, match="hidden_dims"):
        args = train_args(base_model, data, output, *steps, "--resume_from_checkpoint", "latest")
        train_lgp.main([*args, "--hidden_dims", "8"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not installed")
def test_two_processes_with_accelerate_launch(base_model, prepared, tmp_path):
    # accelerate's `--cpu` launcher starts one process unless MPI is set up; its torchrun launcher (`--multi_gpu`)
    # with ACCELERATE_USE_CPU starts several CPU processes that talk over gloo.
    data, _ = prepared
    output = tmp_path / "ddp"
    command = [
        shutil.which("accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
        "training/train_lgp.py",  # the checkout's script, as the README launches it
        *train_args(base_model, data, output, "--max_train_steps", "2", "--train_batch_size", "2"),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stderr
    checkpoint = output / "checkpoint-2"
    assert (checkpoint / "rng_state_0.pt").is_file() and (checkpoint / "rng_state_1.pt").is_file()
    assert json.loads((checkpoint / "training_state.json").read_text())["global_step"] == 2
    LGPModel.from_pretrained(output)


# ---------------------------------------------------------------------------------------------------------------------
# Runs that cannot mix, from anywhere


def test_a_new_run_into_the_folder_of_another_is_refused_unless_overwritten(base_model, prepared, tmp_path):
    data, _ = prepared
    output = tmp_path / "run"
    train_lgp.main(train_args(base_model, data, output, "--max_train_steps", "3", "--checkpointing_steps", "3"))
    assert (output / "checkpoint-3").is_dir()
    again = train_args(base_model, data, output, "--max_train_steps", "2", "--checkpointing_steps", "2")
    with pytest.raises(ValueError, match="already holds a run .*resume_from_checkpoint latest.*overwrite_output_dir"):
        train_lgp.main(again)
    train_lgp.main([*again, "--overwrite_output_dir"])
    # Only the new run's checkpoint is left, so `latest` cannot resume the old run's later step.
    assert latest_checkpoint(str(output)) == str(output / "checkpoint-2")
    assert not (output / "checkpoint-3").exists()


def test_checkpoints_total_limit_keeps_the_newest_three_by_default(base_model, prepared, tmp_path):
    data, _ = prepared
    output = tmp_path / "run"
    train_lgp.main(train_args(base_model, data, output, "--max_train_steps", "5", "--checkpointing_steps", "1"))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]


def test_images_without_a_metadata_row_are_named_in_the_report(tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    for index in range(3):
        draw_example(index)[0].convert("RGB").save(source / f"{index}.png")
    (source / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a red square"}) + "\n")
    report = prepare_data.main(
        ["--input_dir", str(source), "--output_dir", str(tmp_path / "out"), "--resolution", str(RESOLUTION)]
    )
    assert report["written"] == 1 and report["skipped"] == 2
    reasons = {Path(entry["source"]).name: entry["reason"] for entry in report["skipped_files"]}
    assert set(reasons) == {"1.png", "2.png"} and "not in any metadata.jsonl" in reasons["1.png"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["skipped_files"] == report["skipped_files"]


TRAINING_PROGRAMS = ["prepare_data", "train_lgp", "evaluate", "train_controlnet", "shapes"]


@pytest.mark.parametrize("module", TRAINING_PROGRAMS)
def test_training_programs_run_as_the_checkouts_scripts_and_as_modules(module, monkeypatch, capsys):
    # One copy of each: the layout's `training/` folder is the installed `pipeline_sketch_guided.training`.
    script = REPO_ROOT / "training" / f"{module}.py"
    assert script.samefile(importlib.import_module(f"pipeline_sketch_guided.training.{module}").__file__)
    # Run as a script of the checkout (as `accelerate launch training/train_lgp.py` does) and as a module
    # (`python -m pipeline_sketch_guided.training.<module>`), in-process: a subprocess each would cost seconds.
    for run in (
        lambda: runpy.run_path(str(script), run_name="__main__"),
        lambda: runpy.run_module(f"pipeline_sketch_guided.training.{module}", run_name="__main__"),
    ):
        monkeypatch.setattr(sys, "argv", [module, "--help"])
        with pytest.raises(SystemExit) as exit_:
            run()
        assert exit_.value.code == 0 and "--output_dir" in capsys.readouterr().out


def test_the_installed_command_runs_a_training_program_from_any_folder(tmp_path):
    command = [shutil.which("sketch-guided") or pytest.fail("sketch-guided is not installed"), "train", "train_lgp"]
    completed = subprocess.run([*command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "--pretrained_model_name_or_path" in completed.stdout


def test_an_unknown_training_program_is_refused_with_the_list(capsys):
    from pipeline_sketch_guided.cli import main

    with pytest.raises(SystemExit) as error:
        main(["train", "train_everything"])
    assert error.value.code == 2
    assert "invalid choice: 'train_everything'" in capsys.readouterr().err


def test_train_lgp_trains_a_map_target_with_stroke_weights_a_conv_head_and_blur_and_resumes_exactly(
    base_model, prepared, tmp_path
):
    data, _ = prepared
    extra = ["--target", "map", "--target_scale", "2", "--stroke_weight", "4", "--checkpointing_steps", "2"]
    extra += ["--head", "conv", "--target_blur", "1"]
    whole = train_lgp.main(train_args(base_model, data, tmp_path / "whole", "--max_train_steps", "4", *extra))
    lgp = LGPModel.from_pretrained(tmp_path / "whole")
    assert (lgp.config.target, lgp.config.target_scale, lgp.config.out_channels) == ("map", 2, 4)
    assert (lgp.config.head, lgp.config.target_blur) == ("conv", 1.0) and lgp.spatial[2].weight.abs().sum() > 0
    # Stopped after 2 steps and resumed: the same losses as the run that was not stopped.
    train_lgp.main(train_args(base_model, data, tmp_path / "parts", "--max_train_steps", "2", *extra))
    resumed = train_lgp.main(
        train_args(base_model, data, tmp_path / "parts", "--max_train_steps", "4", *extra)
        + ["--resume_from_checkpoint", "latest"]
    )
    assert np.allclose(resumed.losses, whole.losses[2:], rtol=1e-5)
    with pytest.raises(ValueError, match="--target_scale"):
        train_lgp.main(train_args(base_model, data, tmp_path / "bad", "--target_scale", "2"))


def test_the_trainers_targets_are_the_pipelines_targets(base_model, prepared):
    data, _ = prepared
    base = train_lgp.load_base(base_model, torch.float32)
    lgp = LGPModel.from_unet(base.unet, target="map", target_scale=2)
    dataset = train_lgp.EdgeDataset(prepare_data.load_prepared_dataset(str(data)), RESOLUTION)
    edges = dataset[0]["edge_values"][None]
    base.lgp = lgp  # the frozen base is a sketch-guided pipeline, as users guide with
    # An edge map handed to the pipeline as a sketch becomes exactly the target the LGP was trained on.
    sketch = PIL.Image.fromarray(((edges[0, 0].numpy() + 1) * 127.5).round().astype(np.uint8))
    expected = base.prepare_sketch_latents(sketch, 1, RESOLUTION, RESOLUTION, "cpu")
    assert torch.allclose(train_lgp.lgp_targets(base, lgp, edges), expected)


# ---------------------------------------------------------------------------------------------------------------------
# SDXL


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> str:
    from diffusers import StableDiffusionXLPipeline

    from pipeline_sketch_guided.testing import tiny_sdxl_components

    folder = tmp_path_factory.mktemp("sdxl_base")
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(folder)
    return str(folder)


def test_an_sdxl_lgp_trains_resumes_and_drives_the_sdxl_pipeline(sdxl_base, prepared, tmp_path):
    from pipeline_sketch_guided import SketchGuidedStableDiffusionXLPipeline

    data, _ = prepared
    steps = ["--checkpointing_steps", "2", "--cache_latents"]
    whole = train_lgp.main(train_args(sdxl_base, data, tmp_path / "whole", "--max_train_steps", "4", *steps))
    assert np.mean(whole.losses[-2:]) < np.mean(whole.losses[:2])
    # Two steps, then the same run resumed to four: the same LGP as the uninterrupted run.
    train_lgp.main(train_args(sdxl_base, data, tmp_path / "resumed", "--max_train_steps", "2", *steps))
    resumed_args = ["--max_train_steps", "4", *steps, "--resume_from_checkpoint", "latest"]
    resumed = train_lgp.main(train_args(sdxl_base, data, tmp_path / "resumed", *resumed_args))
    assert resumed.losses == whole.losses[2:]
    expected = LGPModel.from_pretrained(tmp_path / "whole").state_dict()
    for name, value in LGPModel.from_pretrained(tmp_path / "resumed").state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)

    lgp = LGPModel.from_pretrained(tmp_path / "whole")
    pipe = SketchGuidedStableDiffusionXLPipeline.from_pretrained(sdxl_base, lgp=lgp)
    pipe.set_progress_bar_config(disable=True)
    sketch = str(data / "edges" / "000000.png")
    kwargs = {"num_inference_steps": 4, "output_type": "np", "height": RESOLUTION, "width": RESOLUTION}
    guided = pipe("a red square", sketch=sketch, generator=torch.Generator().manual_seed(0), **kwargs).images
    plain = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.isfinite(guided).all() and not np.allclose(guided, plain)


def test_reading_the_last_up_block_is_warned_about(base_model, prepared, tmp_path, components, caplog):
    """The last up block's features let an LGP predict well and guide badly (docs/fidelity.md): the trainer says so
    when the blocks read include it, and not for the default set."""
    unet = components["unet"]
    last = f"up_blocks.{len(unet.up_blocks) - 1}"
    assert last_up_block_read(unet, BLOCK_PRESETS["down-up"](unet)) == last
    assert last_up_block_read(unet, BLOCK_PRESETS["sketch2img"](unet)) is None
    assert last_up_block_read(torch.nn.Linear(2, 2), ["up_blocks.0"]) is None  # no up blocks: a transformer

    data, _ = prepared
    with caplog.at_level("WARNING"):
        train_lgp.main(train_args(base_model, data, tmp_path / "default", "--max_train_steps", "1"))
    assert "last up block" not in caplog.text
    with caplog.at_level("WARNING"):
        train_lgp.main(
            train_args(base_model, data, tmp_path / "down-up", "--max_train_steps", "1", "--block_preset", "down-up")
        )
    assert f"reads {last!r}, the UNet's last up block" in caplog.text


def test_the_base_model_loads_without_notices(base_model, prepared, tmp_path, caplog):
    """A base saved as a sketch-guided pipeline (with an `lgp` entry, as the demo model is) loads for training without
    diffusers' notices about unexpected components or the safety checker."""
    data, _ = prepared
    pipe = SketchGuidedStableDiffusionPipeline.from_pretrained(base_model, lgp=None)
    pipe.lgp = LGPModel.from_unet(pipe.unet, hidden_dims=[8])
    pipe.save_pretrained(tmp_path / "with_lgp")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            train_lgp.main(train_args(str(tmp_path / "with_lgp"), data, tmp_path / "run", "--max_train_steps", "1"))
    finally:
        diffusers_logging.disable_propagation()
    assert "not expected" not in caplog.text and "safety checker" not in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# SD3 and FLUX


@pytest.fixture(scope="module", params=["sd3", "flux"])
def transformer_base(request, tmp_path_factory) -> tuple[str, str]:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from pipeline_sketch_guided.testing import tiny_flux_components, tiny_sd3_components

    parent, components = {
        "sd3": (StableDiffusion3Pipeline, tiny_sd3_components),
        "flux": (FluxPipeline, tiny_flux_components),
    }[request.param]
    folder = tmp_path_factory.mktemp(f"{request.param}_base")
    parent(**components()).save_pretrained(folder)
    return request.param, str(folder)


def test_a_transformer_lgp_trains_resumes_and_drives_its_pipeline(transformer_base, prepared, tmp_path):
    """On SD3 and FLUX: the loss falls, a run resumed from its checkpoint ends with the uninterrupted run's LGP, and the
    LGP guides the family's sketch-guided pipeline (FLUX's from the unpacked latents' resolution)."""
    from pipeline_sketch_guided.loading import pipeline_class_for

    family, base = transformer_base
    data, _ = prepared
    steps = ["--checkpointing_steps", "2", "--cache_latents", "--max_sequence_length", "16", "--target", "map"]
    whole = train_lgp.main(train_args(base, data, tmp_path / "whole", "--max_train_steps", "4", *steps))
    assert np.mean(whole.losses[-2:]) < np.mean(whole.losses[:2])
    train_lgp.main(train_args(base, data, tmp_path / "resumed", "--max_train_steps", "2", *steps))
    resumed_args = ["--max_train_steps", "4", *steps, "--resume_from_checkpoint", "latest"]
    resumed = train_lgp.main(train_args(base, data, tmp_path / "resumed", *resumed_args))
    assert resumed.losses == whole.losses[2:]
    expected = LGPModel.from_pretrained(tmp_path / "whole").state_dict()
    for name, value in LGPModel.from_pretrained(tmp_path / "resumed").state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)

    lgp = LGPModel.from_pretrained(tmp_path / "whole")
    assert lgp.config.tuple_output_index == 1 and lgp.config.latent_channels == 4
    pipe = pipeline_class_for(base).from_pretrained(base, lgp=lgp)
    assert (
        type(pipe).__name__
        == {"sd3": "SketchGuidedStableDiffusion3Pipeline", "flux": "SketchGuidedFluxPipeline"}[family]
    )
    pipe.set_progress_bar_config(disable=True)
    sketch = str(data / "edges" / "000000.png")
    kwargs = {"num_inference_steps": 4, "output_type": "np", "height": RESOLUTION, "width": RESOLUTION}
    kwargs["max_sequence_length"] = 16
    guided = pipe("a red square", sketch=sketch, generator=torch.Generator().manual_seed(0), **kwargs).images
    plain = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.isfinite(guided).all() and not np.allclose(guided, plain)


def test_flux_training_refuses_the_unconditional_branch(prepared, tmp_path, tmp_path_factory):
    from diffusers import FluxPipeline

    from pipeline_sketch_guided.testing import tiny_flux_components

    folder = tmp_path_factory.mktemp("flux_refusal")
    FluxPipeline(**tiny_flux_components()).save_pretrained(folder)
    data, _ = prepared
    extra = ["--max_train_steps", "1", "--feature_branch", "unconditional", "--max_sequence_length", "16"]
    with pytest.raises(ValueError, match="FLUX has no unconditional branch"):
        train_lgp.main(train_args(str(folder), data, tmp_path / "run", *extra))


# ---------------------------------------------------------------------------------------------------------------------
# Inpainting UNets


def test_an_inpainting_unet_reads_each_examples_mask_and_masked_image_and_its_lgp_guides_inpainting(
    prepared, tmp_path, monkeypatch
):
    """A 9-channel UNet gets, after z_t, the example's repaint mask at the latents' size and the latents of the image
    with the masked pixels zeroed, the same with and without `--cache_latents`; the LGP guides inpainting."""
    from diffusers import StableDiffusionInpaintPipeline

    from pipeline_sketch_guided.pipeline_inpaint import SketchGuidedStableDiffusionInpaintPipeline
    from pipeline_sketch_guided.testing import tiny_unet

    data, _ = prepared
    base = tmp_path / "inpainting-base"
    components = {**tiny_components(), "unet": tiny_unet(in_channels=9)}
    StableDiffusionInpaintPipeline(**components).save_pretrained(base)
    seen = []
    forward = UNetDenoiser.forward

    def spy(self, noisy, timesteps, conditioning, inpainting=None):
        if len(noisy) > 1:  # not the one-image probe that finds the last block
            seen.append(inpainting.detach().clone())
        return forward(self, noisy, timesteps, conditioning, inpainting)

    monkeypatch.setattr(UNetDenoiser, "forward", spy)
    for name, extra in (("uncached", []), ("cached", ["--cache_latents"])):
        arguments = train_args(str(base), data, tmp_path / name, "--max_train_steps", "1", "--seed", "3", *extra)
        train_lgp.main(arguments)
    uncached, cached = seen
    assert torch.allclose(uncached, cached, atol=1e-5)

    first_batch = epoch_batches(NUM_IMAGES, 4, 0, 3)[0]
    dataset = train_lgp.EdgeDataset(prepare_data.load_prepared_dataset(str(data)), RESOLUTION, mask_seed=3)
    vae = components["vae"]
    for row, index in enumerate(first_batch):
        item = dataset[index]
        mask = item["mask"]
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() >= (RESOLUTION // 4) ** 2
        latent_mask = torch.nn.functional.interpolate(mask[None], size=(16, 16))[0]
        assert torch.equal(uncached[row, :1], latent_mask)
        with torch.no_grad():
            masked = vae.encode((item["pixel_values"] * (1 - mask))[None]).latent_dist.mean * vae.config.scaling_factor
        assert torch.allclose(uncached[row, 1:], masked[0], atol=1e-4)
    masks = [inpainting_mask(index, RESOLUTION, 3) for index in range(200)]
    whole = np.mean([bool(mask.all()) for mask in masks])
    assert 0.15 < whole < 0.35 and any(0 < mask.mean() < 0.5 for mask in masks)

    pipe = SketchGuidedStableDiffusionInpaintPipeline(
        **components, lgp=LGPModel.from_pretrained(tmp_path / "cached")
    ).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    photo = PIL.Image.new("RGB", (32, 32), (200, 200, 200))
    mask_image = PIL.Image.new("L", (32, 32), 255)
    sketch = PIL.Image.new("L", (32, 32), 0)
    sketch.paste(255, (8, 8, 24, 10))

    def inpaint(**guidance):
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a red square", image=photo, mask_image=mask_image, num_inference_steps=4, generator=generator,
            output_type="np", **guidance,
        ).images[0]  # fmt: skip

    assert np.abs(inpaint(sketch=sketch, sketch_guidance_scale=8.0) - inpaint()).max() > 1e-4


def test_train_lgp_refuses_a_unet_that_is_neither_plain_nor_inpainting_and_validation_on_inpainting(prepared, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    from pipeline_sketch_guided.testing import tiny_unet

    data, _ = prepared
    odd = tmp_path / "odd"
    StableDiffusionPipeline(**{**tiny_components(), "unet": tiny_unet(in_channels=5)}).save_pretrained(odd)
    with pytest.raises(ValueError, match="takes 5 input channels.*inpainting UNets that take 9"):
        train_lgp.main(train_args(str(odd), data, tmp_path / "out-odd", "--max_train_steps", "1"))
    inpainting = tmp_path / "inpainting"
    StableDiffusionInpaintPipeline(**{**tiny_components(), "unet": tiny_unet(in_channels=9)}).save_pretrained(
        inpainting
    )
    sketch = tmp_path / "sketch.png"
    PIL.Image.new("L", (32, 32), 0).save(sketch)
    validation = ["--validation_prompts", "a red square", "--validation_sketches", str(sketch)]
    with pytest.raises(ValueError, match="leave out `--validation_prompts`"):
        train_lgp.main(
            train_args(str(inpainting), data, tmp_path / "out-inpainting", "--max_train_steps", "1", *validation)
        )
    assert not (tmp_path / "out-inpainting" / "checkpoint-1").exists()


def test_lgp_loss_benchmark_ranks_a_trained_lgp_below_an_untrained_one_on_the_same_noise(
    base_model, prepared, tmp_path, capsys
):
    from benchmarks import lgp_loss

    data, _ = prepared
    trained, untrained = tmp_path / "trained", tmp_path / "untrained"
    target = ("--target", "map", "--cache_latents")
    train_lgp.main(train_args(base_model, data, trained, "--max_train_steps", "48", *target))
    # One step at a learning rate that moves nothing: the same initialisation, saved as a trained LGP is.
    unchanged = ("--max_train_steps", "1", "--learning_rate", "1e-12")
    train_lgp.main(train_args(base_model, data, untrained, *unchanged, *target))
    output = tmp_path / "loss.json"
    # Batches of 5 over 12 examples: the last is partial.
    arguments = ["--model", base_model, "--data", str(data), "--batch_size", "5", "--min_timestep", "0"]
    rows = lgp_loss.main([*arguments, "--lgp", str(trained), str(untrained), str(trained), "--output", str(output)])
    assert [row["examples"] for row in rows] == [NUM_IMAGES] * 3
    trained_loss, untrained_loss, again = (row["loss"] for row in rows)
    assert trained_loss == again  # every LGP sees each example at the same timestep and noise
    assert trained_loss < 0.8 * untrained_loss
    assert json.loads(output.read_text())["rows"] == rows
    assert f"| {trained} | {data} | {NUM_IMAGES} |" in capsys.readouterr().out
    # --num_examples: the set's first examples only.
    first = lgp_loss.main([*arguments, "--lgp", str(trained), "--num_examples", "5"])
    assert first[0]["examples"] == 5 and first[0]["loss"] != trained_loss

    with pytest.raises(SystemExit):
        lgp_loss.main([*arguments[:2], "--data", str(tmp_path), "--lgp", str(trained)])  # not a prepared set
    with pytest.raises(ValueError, match="below the base model's"):
        lgp_loss.main([*arguments, "--lgp", str(trained), "--max_timestep", "5000"])


def test_lgp_loss_benchmark_gives_an_inpainting_unet_its_masks(prepared, tmp_path, monkeypatch):
    from diffusers import StableDiffusionInpaintPipeline

    from benchmarks import lgp_loss
    from pipeline_sketch_guided.testing import tiny_unet

    data, _ = prepared
    base = tmp_path / "inpainting-base"
    StableDiffusionInpaintPipeline(**{**tiny_components(), "unet": tiny_unet(in_channels=9)}).save_pretrained(base)
    train_lgp.main(train_args(str(base), data, tmp_path / "lgp", "--max_train_steps", "1"))
    seen = []
    forward = UNetDenoiser.forward

    def spy(self, noisy, timesteps, conditioning, inpainting=None):
        seen.append((tuple(noisy.shape), None if inpainting is None else tuple(inpainting.shape)))
        return forward(self, noisy, timesteps, conditioning, inpainting)

    monkeypatch.setattr(UNetDenoiser, "forward", spy)
    arguments = ["--model", str(base), "--lgp", str(tmp_path / "lgp"), "--data", str(data), "--batch_size", "8"]
    rows = lgp_loss.main(arguments)
    assert rows[0]["examples"] == NUM_IMAGES and np.isfinite(rows[0]["loss"])
    # For each batch (8, then the last 4): the mask and the masked image's 4 latent channels, at the latents' size.
    assert [noisy[0] for noisy, _ in seen] == [8, 4]
    assert all(inpainting == (noisy[0], 5, *noisy[2:]) for noisy, inpainting in seen)
