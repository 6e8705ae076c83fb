"""The shipped demo model: it loads offline, the command line draws with it, and its guidance follows sketches."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from benchmarks.efficacy import generate, held_out_cases, measure_image
from pipeline_sketch_guided import LGPModel, SketchGuidedStableDiffusionPipeline
from pipeline_sketch_guided.cli import main as cli
from pipeline_sketch_guided.demo import DEMO_MODEL_DIR, demo_sketches, load_demo_pipeline
from pipeline_sketch_guided.testing import random_lgp, tiny_components


@pytest.fixture(scope="module")
def demo_pipe():
    return load_demo_pipeline()


def test_demo_pipeline_loads_offline_with_its_lgp(demo_pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(demo_pipe, SketchGuidedStableDiffusionPipeline)
    assert isinstance(demo_pipe.lgp, LGPModel)
    assert demo_pipe.unet.dtype == torch.float32 and demo_pipe.device.type == "cpu"
    image = demo_pipe("a red star on a white background", num_inference_steps=4).images[0]
    assert image.size == (64, 64)


def test_loading_passes_the_dtype_under_the_keyword_diffusers_takes():
    # diffusers >= 0.40 warns on `torch_dtype`; older releases know nothing else. Either way, no deprecation warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_demo_pipeline(torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.lgp.dtype == torch.bfloat16
    assert not [w for w in caught if "dtype" in str(w.message) and issubclass(w.category, FutureWarning)]


def test_demo_model_is_small_enough_to_ship():
    size = sum(path.stat().st_size for path in DEMO_MODEL_DIR.rglob("*") if path.is_file())
    assert size < 25 * 2**20


def test_cli_generate_writes_an_image_of_the_model_size(tmp_path):
    sketch = tmp_path / "sketch.png"
    demo_sketches()[0][1].save(sketch)
    out, edges = tmp_path / "star.png", tmp_path / "edges.png"
    cli(
        ["generate", "--prompt", "a red star on a white background", "--sketch", str(sketch), "--out", str(out)]
        + ["--steps", "4", "--edge-map-out", str(edges)]
    )
    assert PIL.Image.open(out).size == (64, 64) and PIL.Image.open(edges).size == (64, 64)


def test_cli_generate_rejects_a_blank_sketch_with_a_message(tmp_path):
    blank = tmp_path / "blank.png"
    PIL.Image.new("L", (64, 64), 255).save(blank)
    with pytest.raises(SystemExit, match="blank"):
        cli(["generate", "--prompt", "a red star", "--sketch", str(blank), "--out", str(tmp_path / "x.png")])


def test_cli_generate_with_a_saved_model_and_a_separate_lgp(tmp_path):
    components = tiny_components()
    SketchGuidedStableDiffusionPipeline(**components).save_pretrained(tmp_path / "model")
    random_lgp(components["unet"]).save_pretrained(tmp_path / "lgp")
    sketch = tmp_path / "sketch.png"
    demo_sketches()[0][1].save(sketch)
    out = tmp_path / "out.png"
    args = ["generate", "--prompt", "a red star", "--sketch", str(sketch), "--out", str(out), "--steps", "2"]
    args += ["--model", str(tmp_path / "model")]
    # The model alone has no LGP: a sketch needs one, and the message says how to give it.
    with pytest.raises(SystemExit, match="no LGP"):
        cli(args)
    cli([*args, "--lgp", str(tmp_path / "lgp")])
    # The tiny model's own size (32x32), not the demo model's.
    assert PIL.Image.open(out).size == (32, 32)


def test_cli_demo_writes_the_sheet(tmp_path):
    out = tmp_path / "demo.png"
    cli(["demo", "--out", str(out), "--steps", "4", "--scale", "2"])
    sheet = PIL.Image.open(out)
    assert sheet.size == (3 * 128, 14 + len(demo_sketches()) * 128)
    # The unguided and guided columns hold different pictures: the sketch changed something.
    pixels = np.asarray(sheet.convert("RGB")).astype(int)
    unguided, guided = pixels[14:, 128:256], pixels[14:, 256:384]
    assert np.abs(unguided - guided).mean() > 1


def test_guidance_raises_sketch_agreement_for_the_same_seeds(demo_pipe):
    cases = held_out_cases(num_cases=4)
    unguided = generate(demo_pipe, cases, seed=0, image_size=64, num_inference_steps=10)
    guided = generate(demo_pipe, cases, seed=0, image_size=64, num_inference_steps=10, guidance={})
    iou_unguided = np.mean([measure_image(image, case)["iou"] for image, case in zip(unguided, cases, strict=True)])
    iou_guided = np.mean([measure_image(image, case)["iou"] for image, case in zip(guided, cases, strict=True)])
    assert iou_guided > iou_unguided + 0.1, (iou_guided, iou_unguided)
