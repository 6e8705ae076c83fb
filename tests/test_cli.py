"""The command line as a new user meets it: mistakes are one line before any work, the output says how it was made."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from pipeline_sketch_guided import cli, loading
from pipeline_sketch_guided.demo import demo_sketches

PROMPT = "a red star on a white background"


@pytest.fixture
def sketch(tmp_path) -> str:
    path = tmp_path / "star.png"
    demo_sketches()[0][1].save(path)
    return str(path)


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the command gets as far as loading a model."""
    monkeypatch.setattr(loading, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded a model"))


def generate_args(out, *extra) -> list[str]:
    return ["generate", "--prompt", PROMPT, "--out", str(out), "--steps", "4", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "cuda"], "--device cuda: torch sees no CUDA GPU|--device cuda: this torch was built without"),
        (["--device", "gpu0"], "--device gpu0: not a device"),
        (["--sketch-guidance-scale", "nan"], r"--sketch-guidance-scale nan: must be from 0"),
        (["--sketch-guidance-scale", "1e9"], "must be from 0 .no guidance. to 50"),
        (["--sketch-guidance-start", "0.5", "--sketch-guidance-end", "0.2"], "need 0 <= start < end <= 1"),
        (["--height", "100"], "multiples of 8"),
        (["--lgp", "outputs/my-lgp-typo"], "--lgp outputs/my-lgp-typo: no such folder"),
        (["--lgp", "./my-lgp"], "--lgp ./my-lgp: no such folder"),
        (["--model", "/no/such/model"], "--model /no/such/model: no such folder"),
        (["--sketch", "missing.png"], "--sketch missing.png: no such file"),
        (["--edge-map-out", "edges.png"], "--edge-map-out needs --sketch"),
        (["--sketch-fill", "auto"], "--sketch-fill needs --sketch"),
        (["--sketch-fill-scale", "-1"], "--sketch-fill-scale -1.0: must be from 0"),
        (["--fill-lgp", "./no-fill-lgp"], "--fill-lgp ./no-fill-lgp: no such folder"),
    ],
)
def test_bad_arguments_are_one_line_before_any_loading(tmp_path, monkeypatch, no_loading, extra, message):
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as raised:
        cli.main(generate_args("out.png", *extra))
    text = str(raised.value)
    assert text.startswith("sketch-guided generate: error: ") and "\n" not in text
    assert re.search(message, text), text


@pytest.mark.parametrize(
    "out, message",
    [("no/such/folder/out.png", "the folder .* does not exist"), ("out", "no extension is not an image format")],
)
def test_an_output_that_cannot_be_written_is_refused_before_generating(tmp_path, monkeypatch, no_loading, out, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        cli.main(generate_args(out))


def test_a_hub_id_offline_is_refused_at_once(tmp_path, monkeypatch, no_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no such folder here, and the Hub is off"):
        cli.main(generate_args("out.png", "--lgp", "someone/an-lgp"))


@pytest.mark.parametrize("command", ["generate", "batch", "ui"])
def test_every_command_takes_a_fill_lgp_and_refuses_one_of_another_map(tmp_path, monkeypatch, command):
    """--fill-lgp is read by each command that loads a model. The demo's edge LGP given there is refused when it is
    set on the pipeline, before any image is made, and the message names the flag and says what a fill LGP is."""
    from pipeline_sketch_guided.demo import DEMO_LGP_FOLDERS, DEMO_MODEL_DIR

    edge_lgp = str(DEMO_MODEL_DIR / DEMO_LGP_FOLDERS["edges"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": PROMPT, "output": "row.png"}) + "\n")
    argv = {
        "generate": generate_args("out.png"),
        "batch": ["batch", "rows.jsonl", "--out", "batch"],
        "ui": ["ui", "--output-dir", "canvas"],
    }[command]
    with pytest.raises(SystemExit) as raised:
        cli.main([*argv, "--fill-lgp", edge_lgp])
    expected = f"sketch-guided {command}: error: --fill-lgp {edge_lgp}: `fill_lgp` must be an LGP trained on filled"
    assert str(raised.value).startswith(expected), str(raised.value)
    assert not list(tmp_path.rglob("*.png"))


def test_steps_must_be_positive(tmp_path, capsys, no_loading):
    with pytest.raises(SystemExit) as raised:
        cli.main(generate_args(tmp_path / "out.png", "--steps", "0"))
    assert raised.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_any_error_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")

    monkeypatch.setattr(loading, "load_pipeline", broken)
    with pytest.raises(SystemExit) as raised:
        cli.main(generate_args(tmp_path / "out.png"))
    assert str(raised.value) == (
        "sketch-guided generate: error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (run with --debug"
        " for the traceback)"
    )
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(["--debug", *generate_args(tmp_path / "out.png")])


def test_many_images_a_grid_and_each_image_with_its_settings(tmp_path, sketch):
    out = tmp_path / "stars.png"
    cli.main(generate_args(out, "--sketch", sketch, "--num-images", "3", "--seed", "7", "--threads", "1"))
    grid = PIL.Image.open(out)
    assert grid.size == (2 * 64, 2 * 64)  # 3 images in 2 columns
    images = [PIL.Image.open(tmp_path / f"stars-{k}.png") for k in range(3)]
    settings = [json.loads(image.text["sketch_guided"]) for image in images]
    assert [s["seed"] for s in settings] == [7, 8, 9]
    assert settings[0]["prompt"] == PROMPT and settings[0]["sketch_guidance_scale"] == 2.5
    with open(sketch, "rb") as file:
        assert settings[0]["sketch_sha256"] == hashlib.sha256(file.read()).hexdigest()
    assert images[1].text["parameters"].startswith(f"{PROMPT}\nsteps: 4, ")
    # The metadata is enough to make the image again: seed 8 alone gives the second image of the batch.
    again = tmp_path / "again.png"
    cli.main(generate_args(again, "--sketch", sketch, "--seed", "8", "--threads", "1"))
    difference = np.abs(np.asarray(PIL.Image.open(again), int) - np.asarray(images[1], int))
    assert difference.max() <= 1  # rounding to 8 bits on either side of a tie


def test_guidance_start_interval_scheduler_and_negative_prompt_reach_the_pipeline(tmp_path, sketch, monkeypatch):
    calls = {}
    load = loading.load_pipeline

    def recording_load(*args, **kwargs):
        pipe = load(*args, **kwargs)
        original = pipe.__call__

        def call(*call_args, **call_kwargs):
            calls.update(call_kwargs, scheduler=type(pipe.scheduler).__name__)
            return original(*call_args, **call_kwargs)

        monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **k: call(*a, **k))
        return pipe

    monkeypatch.setattr(loading, "load_pipeline", recording_load)
    extra = ["--sketch", sketch, "--sketch-guidance-start", "0.1", "--sketch-guidance-interval", "2"]
    extra += ["--sketch-guidance-recurrence", "2"]
    extra += ["--scheduler", "euler_a", "--negative-prompt", "a blue circle", "--dtype", "bfloat16"]
    cli.main(generate_args(tmp_path / "out.png", *extra))
    assert calls["sketch_guidance_start"] == 0.1 and calls["sketch_guidance_interval"] == 2
    assert calls["sketch_guidance_recurrence"] == 2
    assert calls["negative_prompt"] == "a blue circle" and calls["scheduler"] == "EulerAncestralDiscreteScheduler"


def test_free_cores_set_the_default_threads(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (1.7, 1.0, 1.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert cli.default_threads() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 1.0, 1.0))
    assert cli.default_threads() == 1


def test_unknown_words_for_the_demo_model_are_named(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        cli.main(
            ["generate", "--prompt", "a pink heart on a white background", "--out", str(tmp_path / "h.png")]
            + ["--steps", "2"]
        )
    assert "does not know 'pink', 'heart'" in caplog.text and "6 colours (red, green" in caplog.text


def test_the_installed_command_is_quiet_and_runs_as_a_module(tmp_path, sketch):
    command = [sys.executable, "-m", "pipeline_sketch_guided", *generate_args(tmp_path / "out.png", "--sketch", sketch)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"Wrote {tmp_path / 'out.png'} (64x64)."
    for noise in ("torchvision", "Warning", "Loading", "deprecated"):
        assert noise not in completed.stderr, completed.stderr
    version = subprocess.run(
        [sys.executable, "-m", "pipeline_sketch_guided", "--version"], capture_output=True, text=True
    )
    assert version.stdout.startswith("sketch-guided ")


def test_the_package_exports_resolve():
    import pipeline_sketch_guided

    for name in pipeline_sketch_guided.__all__:
        assert getattr(pipeline_sketch_guided, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pipeline_sketch_guided.nothing  # noqa: B018


def test_generate_picks_the_sdxl_pipeline_for_an_sdxl_model(tmp_path, sketch):
    from diffusers import StableDiffusionXLPipeline

    from pipeline_sketch_guided.testing import random_lgp, tiny_sdxl_components

    components = tiny_sdxl_components()
    StableDiffusionXLPipeline(**components).save_pretrained(tmp_path / "sdxl")
    random_lgp(components["unet"]).save_pretrained(tmp_path / "lgp")
    assert loading.pipeline_class_for(str(tmp_path / "sdxl")).__name__ == "SketchGuidedStableDiffusionXLPipeline"
    out = tmp_path / "out.png"
    cli.main(
        ["generate", "--prompt", "a red star", "--sketch", sketch, "--out", str(out), "--steps", "2"]
        + ["--model", str(tmp_path / "sdxl"), "--lgp", str(tmp_path / "lgp")]
    )
    assert PIL.Image.open(out).size == (32, 32)


def test_a_sketch_mask_reaches_the_pipeline_and_the_metadata(tmp_path, sketch):
    mask = tmp_path / "mask.png"
    PIL.Image.new("L", (64, 64), 255).save(mask)
    out = tmp_path / "out.png"
    cli.main(generate_args(out, "--sketch", sketch, "--sketch-mask", str(mask)))
    with open(mask, "rb") as file:
        assert (
            json.loads(PIL.Image.open(out).text["sketch_guided"])["sketch_mask_sha256"]
            == hashlib.sha256(file.read()).hexdigest()
        )
    # An all-white mask is the whole sketch: the same image as without a mask.
    plain = tmp_path / "plain.png"
    cli.main(generate_args(plain, "--sketch", sketch))
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(PIL.Image.open(plain)))
    with pytest.raises(SystemExit, match="--sketch-mask needs --sketch"):
        cli.main(generate_args(tmp_path / "x.png", "--sketch-mask", str(mask)))


def test_a_fill_lgp_guides_with_the_sketchs_fill_and_the_metadata_says_so(tmp_path, sketch):
    from pipeline_sketch_guided.demo import DEMO_LGP_FOLDERS, DEMO_MODEL_DIR
    from pipeline_sketch_guided.guidance import DEFAULT_SKETCH_FILL_SCALE

    silhouette_lgp = str(DEMO_MODEL_DIR / DEMO_LGP_FOLDERS["silhouette"])
    plain, filled, fill_off = tmp_path / "plain.png", tmp_path / "filled.png", tmp_path / "off.png"
    cli.main(generate_args(plain, "--sketch", sketch, "--sketch-fill-scale", "0"))
    cli.main(generate_args(filled, "--sketch", sketch, "--fill-lgp", silhouette_lgp))
    cli.main(generate_args(fill_off, "--sketch", sketch, "--fill-lgp", silhouette_lgp, "--sketch-fill-scale", "0"))
    settings = json.loads(PIL.Image.open(filled).text["sketch_guided"])
    assert settings["sketch_fill"] == "auto" and settings["sketch_fill_scale"] == DEFAULT_SKETCH_FILL_SCALE
    assert settings["fill_lgp"] == silhouette_lgp
    assert json.loads(PIL.Image.open(fill_off).text["sketch_guided"])["sketch_fill"] is None
    pixels = {path: np.asarray(PIL.Image.open(path)) for path in (plain, filled, fill_off)}
    assert not np.array_equal(pixels[filled], pixels[plain])
    assert np.array_equal(pixels[fill_off], pixels[plain])
    # Drawing into a photo (inpainting) guides with the fill as well, and says so.
    photo, mask, inpainted = tmp_path / "photo.png", tmp_path / "mask.png", tmp_path / "inpainted.png"
    PIL.Image.new("RGB", (64, 64), (150, 150, 150)).save(photo)
    PIL.Image.new("L", (64, 64), 255).save(mask)
    cli.main(generate_args(inpainted, "--sketch", sketch, "--image", str(photo), "--mask-image", str(mask)))
    settings = json.loads(PIL.Image.open(inpainted).text["sketch_guided"])
    assert settings["sketch_fill"] == "auto" and settings["mask_image_sha256"]


def test_the_command_line_is_the_top_of_the_house():
    # Nothing below the command line imports it: the pipelines, batch, the canvas, the training programs and the
    # benchmarks share what they need from modules below it (loading.py, saving.py).
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    below = [p for p in (root / "pipeline_sketch_guided").glob("*.py") if p.name != "__main__.py"]
    below += [*(root / "training").glob("*.py"), *(root / "benchmarks").glob("*.py")]
    offenders = []
    for path in below:
        package = "pipeline_sketch_guided" if path.parent.name == "pipeline_sketch_guided" else None
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level and package:
                    module = f"{package}.{module}" if module else package
                names = [f"{module}.{alias.name}" for alias in node.names] + [module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(
                name == "pipeline_sketch_guided.cli" or name.startswith("pipeline_sketch_guided.cli.") for name in names
            ):
                offenders.append(path.relative_to(root).as_posix())
    assert offenders == []
