"""Publishing an LGP: the model card, the Hub repo folder, and loading that folder as a custom pipeline.

Everything runs offline: the Hub repo is built as a local folder, which diffusers loads exactly as it loads a
downloaded repo (`custom_pipeline=` and `AutoModel.from_pretrained` both accept a folder).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import draw_square
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard

import pipeline_sketch_guided
from pipeline_sketch_guided import LGPModel, SketchGuidedStableDiffusionPipeline
from pipeline_sketch_guided import hub as hub_module
from pipeline_sketch_guided.cli import main as cli_main
from pipeline_sketch_guided.convert import SKETCH2IMG_SD15, SKETCH_GUIDED_SD_SD15
from pipeline_sketch_guided.hub import (
    LGP_AUTO_MAP,
    PACKAGE_DIR,
    build_model_card,
    export_hub_folder,
    hub_code_files,
    infer_block_preset,
    push_lgp_to_hub,
)
from pipeline_sketch_guided.testing import random_lgp, tiny_components

REPO_ID = "someone/sketch-lgp-sd15"
HUB_CODE_FILES = hub_code_files()


def sd15_lgp(fmt=SKETCH2IMG_SD15) -> LGPModel:
    """An LGP with the config of a converted community LGP, narrow hidden layers to stay small."""
    torch.manual_seed(0)
    return LGPModel(**fmt.lgp_config(hidden_dims=[32, 16], out_channels=4)).eval()


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```py\n(.*?)```", markdown, flags=re.DOTALL)


def test_card_has_the_metadata_and_a_working_snippet(tmp_path):
    figure = tmp_path / "sweep.png"
    PIL.Image.new("RGB", (8, 8)).save(figure)
    card = build_model_card(
        sd15_lgp(),
        REPO_ID,
        training_data="3000 COCO images with Canny edges, timesteps 0..999.",
        training_details="20000 steps, batch 8, final loss 0.21.",
        datasets=["someone/coco-edges"],
        figures=[figure],
    )
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.library_name == "diffusers"
    assert card.data.license == "apache-2.0"
    assert card.data.datasets == ["someone/coco-edges"]
    assert {"sketch-to-image", "stable-diffusion", "latent-guidance-predictor"} <= set(card.data.tags)

    text = card.text
    assert "| Block preset | sketch2img |" in text
    assert "| Classifier-free guidance branch | conditional |" in text
    assert "| Map it predicts | edges, trained as dark on light |" in text
    assert "# Sketch-guidance LGP for" in text and 'sketch="sketch.png"' in text
    assert "| Input width | 9320 =" in text
    assert "- `mid_block.attentions.0`: 1280" in text
    assert "3000 COCO images with Canny edges" in text and "20000 steps" in text
    assert "![](figures/sweep.png)" in text
    assert "## Source" not in text  # our own LGP: nothing to credit

    snippets = python_blocks(text)
    assert len(snippets) == 2
    for snippet in snippets:
        ast.parse(snippet)  # valid Python after rendering
    assert f'LGPModel.from_pretrained("{REPO_ID}")' in snippets[0]
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in snippets[1]
    assert f'custom_pipeline="{REPO_ID}"' in snippets[1] and "lgp=lgp" in snippets[1]

    # What the Hub reads: the YAML header survives a save and load.
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()


def test_card_of_an_lgp_for_another_map_names_it_and_passes_guidance_map():
    torch.manual_seed(0)
    config = SKETCH2IMG_SD15.lgp_config(hidden_dims=[32, 16], out_channels=4)
    lgp = LGPModel(**config, map_kind="depth", map_normalization="minmax").eval()
    text = build_model_card(lgp, REPO_ID).text
    assert "# Depth-guidance LGP for" in text and "depth-guided text-to-image" in text
    assert "| Map it predicts | depth (minmax normalisation) |" in text
    use_it = text.split("## Use it")[1].split("## What it reads")[0]
    assert "light is near" in use_it and "sketch=" not in use_it and "dark strokes" not in use_it
    for snippet in python_blocks(text):
        ast.parse(snippet)
        assert 'guidance_map="depth.png"' in snippet
    assert "fill LGP" not in text
    silhouette = LGPModel(**config, map_kind="silhouette").eval()
    assert "it is also a fill LGP (`pipe.fill_lgp = " in build_model_card(silhouette, REPO_ID).text


def test_card_names_what_the_lgp_predicts():
    torch.manual_seed(0)
    config = SKETCH2IMG_SD15.lgp_config(hidden_dims=[32, 16], out_channels=4)
    paper = build_model_card(LGPModel(**config).eval(), REPO_ID).text
    assert '| Target | the VAE latent of the map (`target="vae_latent"`, the paper\'s) |' in paper
    own = LGPModel(**{**config, "out_channels": 4}, target="map", target_scale=2).eval()
    assert '| Target | the map itself (`target="map"`), area-averaged to 2x the latent resolution |' in (
        build_model_card(own, REPO_ID).text
    )
    blurred = LGPModel(**{**config, "out_channels": 4}, target="map", target_scale=2, target_blur=1.5).eval()
    assert (
        "area-averaged to 2x the latent resolution, blurred by a Gaussian of 1.5 pixels there (`target_blur=1.5`)"
        in (build_model_card(blurred, REPO_ID).text)
    )


def test_card_of_converted_weights_credits_the_source():
    card = build_model_card(sd15_lgp(SKETCH_GUIDED_SD_SD15), REPO_ID, license="other", source=SKETCH_GUIDED_SD_SD15)
    assert card.data.license == "other"
    assert "| Block preset | down-up |" in card.text
    assert "| Classifier-free guidance branch | unconditional |" in card.text
    assert "## Source" in card.text
    assert "`SDv1.5-trained_LGP.pt` of" in card.text
    assert "https://huggingface.co/ogkalu/Stable-Diffusion-Latent-Guidance-Predictor" in card.text
    assert "PiDiNet" in card.text  # the source's training data stands in when none is given


def test_card_leaves_a_local_base_model_out_of_the_metadata(tmp_path):
    card = build_model_card(sd15_lgp(), REPO_ID, base_model=str(tmp_path))
    assert card.data.base_model is None
    assert str(tmp_path) in card.text


def test_infer_block_preset():
    tiny_unet = tiny_components()["unet"]
    with torch.device("meta"):
        sd15_unet = UNet2DConditionModel()
    for unet in (tiny_unet, sd15_unet):
        for preset in ("sketch2img", "down-up"):
            assert infer_block_preset(LGPModel.from_unet(unet, preset=preset).config.blocks) == preset
    assert infer_block_preset(["down_blocks.1", "up_blocks.0"]) is None
    assert infer_block_preset(list(reversed(SKETCH2IMG_SD15.blocks))) is None


def test_hub_code_files_are_the_pipeline_and_its_direct_imports():
    assert HUB_CODE_FILES[0] == "pipeline.py"
    assert {"lgp.py", "capture.py", "sketch.py"} <= set(HUB_CODE_FILES)
    # For a local folder diffusers copies only pipeline.py's direct relative imports: each must be one.
    pipeline_source = (PACKAGE_DIR / "pipeline.py").read_text()
    for name in HUB_CODE_FILES[1:]:
        assert re.search(rf"^from \.{name[:-3]} import", pipeline_source, flags=re.MULTILINE), name


def test_export_hub_folder(tmp_path):
    lgp = sd15_lgp()
    figure = tmp_path / "fig.png"
    PIL.Image.new("RGB", (8, 8)).save(figure)
    folder = export_hub_folder(lgp, tmp_path / "repo", REPO_ID, figures=[figure], training_data="Canny edges.")

    names = {path.name for path in folder.iterdir()}
    assert names == {"README.md", "config.json", "diffusion_pytorch_model.safetensors", "figures", *HUB_CODE_FILES}
    assert (folder / "figures" / "fig.png").read_bytes() == figure.read_bytes()
    for name in HUB_CODE_FILES:
        assert (folder / name).read_text() == (PACKAGE_DIR / name).read_text()
    assert json.loads((folder / "config.json").read_text())["auto_map"] == LGP_AUTO_MAP
    assert ModelCard.load(folder / "README.md").data.library_name == "diffusers"

    reloaded = LGPModel.from_pretrained(folder)
    assert reloaded.config.blocks == lgp.config.blocks
    for key, value in lgp.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_push_uploads_the_exported_folder(monkeypatch):
    calls = {}

    class FakeHfApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            calls["create_repo"] = (repo_id, private, exist_ok, repo_type)

        def upload_folder(self, repo_id, folder_path, commit_message):
            # The folder is temporary: check what would be uploaded while it exists.
            calls["uploaded"] = sorted(os.listdir(folder_path))
            calls["card"] = ModelCard.load(os.path.join(folder_path, "README.md"))
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(hub_module, "HfApi", FakeHfApi)
    url = push_lgp_to_hub(sd15_lgp(), REPO_ID, private=True, token="hf_test", base_model="my/base-model")
    assert url == f"https://huggingface.co/{REPO_ID}/commit/abc"
    assert calls["token"] == "hf_test"
    assert calls["create_repo"] == (REPO_ID, True, True, "model")
    assert calls["uploaded"] == sorted(
        ["README.md", "config.json", "diffusion_pytorch_model.safetensors", *HUB_CODE_FILES]
    )
    assert calls["card"].data.base_model == "my/base-model"


def test_cli_push_dry_run_builds_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_module, "HfApi", None)  # a dry run must not touch the Hub
    sd15_lgp(SKETCH_GUIDED_SD_SD15).save_pretrained(tmp_path / "lgp")
    out = tmp_path / "repo"
    args = ["push", str(tmp_path / "lgp"), REPO_ID, "--converted-from", "sketch-guided-stable-diffusion"]
    assert cli_main([*args, "--output-dir", str(out), "--dry-run"]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "other"  # converted weights are not relicensed
    assert "ogkalu/Stable-Diffusion-Latent-Guidance-Predictor" in card.text
    assert {"pipeline.py", "config.json"} <= set(os.listdir(out))
    with pytest.raises(SystemExit, match="--output-dir"):
        cli_main([*args, "--dry-run"])


# Run in a fresh interpreter: `-I` ignores PYTHONPATH and the current folder, and the finder below makes
# `pipeline_sketch_guided` unimportable even though it is installed (editable) in this environment, so the only code
# of ours that can run is what diffusers copies from the repo folder.
NO_PACKAGE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class HidePackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "pipeline_sketch_guided":
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None


    sys.meta_path.insert(0, HidePackage())
    try:
        import pipeline_sketch_guided  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("pipeline_sketch_guided is still importable")

    import numpy as np
    import PIL.Image
    import torch
    from diffusers import AutoModel, DiffusionPipeline

    repo, base, sketch, out = sys.argv[1:5]
    try:
        DiffusionPipeline.from_pretrained(base, custom_pipeline=repo)
    except ValueError as error:
        assert "trust_remote_code=True" in str(error), error
    else:
        raise SystemExit("custom code loaded without trust_remote_code=True")

    lgp = AutoModel.from_pretrained(repo, trust_remote_code=True)
    pipe = DiffusionPipeline.from_pretrained(base, custom_pipeline=repo, trust_remote_code=True, lgp=lgp)
    assert type(pipe).__name__ == "SketchGuidedStableDiffusionPipeline", type(pipe)
    assert type(pipe).__module__.startswith("diffusers_modules."), type(pipe).__module__
    assert type(pipe.lgp).__module__.startswith("diffusers_modules."), type(pipe.lgp).__module__
    assert not any(name.startswith("pipeline_sketch_guided") for name in sys.modules)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "a red square",
        sketch=PIL.Image.open(sketch),
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    np.save(out, images)
    """
)


def test_custom_pipeline_from_a_hub_folder_without_the_package(tmp_path):
    components = tiny_components()
    base = tmp_path / "base"
    StableDiffusionPipeline(**components).save_pretrained(base)
    repo = export_hub_folder(random_lgp(components["unet"]), tmp_path / "repo", REPO_ID)
    sketch = tmp_path / "sketch.png"
    draw_square(32).save(sketch)
    script = tmp_path / "load_without_package.py"
    script.write_text(NO_PACKAGE_SCRIPT)
    out = tmp_path / "images.npy"

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),  # diffusers copies the repo's code here
        "DIFFUSERS_VERBOSITY": "error",
    }
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(repo), str(base), str(sketch), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "hf_modules" / "diffusers_modules" / "local" / "pipeline.py").is_file()

    # The same pipeline with the package installed gives the same images: the copied code is this package's code.
    pipe = SketchGuidedStableDiffusionPipeline.from_pretrained(base, lgp=LGPModel.from_pretrained(repo))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        "a red square",
        sketch=PIL.Image.open(sketch),
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)


def test_an_sdxl_lgp_repo_carries_the_sdxl_pipeline(tmp_path):
    from pipeline_sketch_guided.testing import tiny_sdxl_components

    lgp = random_lgp(tiny_sdxl_components()["unet"])
    base = "stabilityai/stable-diffusion-xl-base-1.0"
    repo = export_hub_folder(lgp, tmp_path / "repo", REPO_ID, base_model=base)
    package = Path(pipeline_sketch_guided.__file__).parent
    assert (repo / "pipeline.py").read_text() == (package / "pipeline_xl.py").read_text()
    assert {"guidance.py", "lgp.py", "capture.py", "sketch.py"} <= {p.name for p in repo.iterdir()}
    card = (repo / "README.md").read_text()
    assert "SketchGuidedStableDiffusionXLPipeline.from_pretrained" in card and f'"{base}"' in card
