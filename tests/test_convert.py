"""Converting the community SD1.5 LGPs: the converted `LGPModel` must compute what the original MLP computed.

The original files cannot be downloaded here, so each test builds a randomly initialised MLP of the original structure
(written below from the published description, not imported from our package), saves it the way the original trainer
did, converts the file and compares outputs on the same features.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

from pipeline_sketch_guided import LGPModel
from pipeline_sketch_guided.cli import main as cli_main
from pipeline_sketch_guided.convert import (
    COMMUNITY_FORMATS,
    SKETCH2IMG_SD15,
    SKETCH_GUIDED_SD_SD15,
    convert_community_lgp,
    lgp_from_community_state_dict,
    load_community_state_dict,
)

LATENT_SIZE = 16  # a 128x128 image; the published LGPs saw 64x64 latents, the function is per pixel either way
# Output size of each SD1.5 block relative to the latent (down blocks halve after their resnets, up blocks double).
BLOCK_SCALE = {
    "down_blocks.0": 2,
    "down_blocks.1": 4,
    "down_blocks.2": 8,
    "down_blocks.3": 8,
    "mid_block.attentions.0": 8,
    "mid_block.resnets.0": 8,
    "mid_block.resnets.1": 8,
    "up_blocks.0": 4,
    "up_blocks.1": 2,
    "up_blocks.2": 1,
    "up_blocks.3": 1,
}


class CommunityMLP(nn.Module):
    """The community LGP: Linear, then (ReLU, BatchNorm1d, Linear) per hidden width; input [features | n | sin(...)]."""

    def __init__(self, in_features: int, hidden_dims=(512, 256, 128, 64), out_features: int = 4, num_encodings=9):
        super().__init__()
        self.num_encodings = num_encodings
        widths = [in_features, *hidden_dims]
        layers = [nn.Linear(widths[0], widths[1])]
        for width_in, width_out in zip(widths[1:], [*hidden_dims[1:], out_features], strict=True):
            layers += [nn.ReLU(), nn.BatchNorm1d(width_in), nn.Linear(width_in, width_out)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """features `(B, C, h, w)` already resized and concatenated, noise_level `(B, 4, h, w)` -> `(B, 4, h, w)`."""
        encoding = [torch.sin(2 * math.pi * noise_level * 2.0**-level) for level in range(self.num_encodings)]
        x = torch.cat([features, noise_level, *encoding], dim=1)
        batch, _, height, width = x.shape
        out = self.layers(x.permute(0, 2, 3, 1).reshape(batch * height * width, -1))
        return out.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


def random_community_mlp(in_features: int, seed: int = 0, **kwargs) -> CommunityMLP:
    """Random weights and non-trivial BatchNorm statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    mlp = CommunityMLP(in_features, **kwargs)
    for module in mlp.layers:
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
            module.num_batches_tracked.fill_(1234)
    # Outputs of order 1, like VAE latents, so that the 1e-5 tolerance below is a strict test.
    mlp.layers[-1].weight.data.mul_(10)
    return mlp.eval()


def save_in_original_format(mlp: CommunityMLP, fmt, path) -> None:
    if fmt.container == "state_dict":  # sketch2img: accelerator.save(edge_predictor.state_dict(), ...)
        torch.save(mlp.state_dict(), path)
        return
    # Sketch-Guided-Stable-Diffusion: the MLP beside a real Adam state and the last loss.
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-4)
    state = {name: value.clone() for name, value in mlp.state_dict().items()}
    mlp.train()
    loss = mlp.layers(torch.randn(8, mlp.layers[0].in_features)).square().mean()
    loss.backward()
    optimizer.step()
    mlp.load_state_dict(state)  # keep the weights the test compares against
    mlp.eval()
    torch.save(
        {"model_state_dict": mlp.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "loss": loss}, path
    )


def random_features(fmt, batch: int = 2, seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = []
    for block, channels in zip(fmt.blocks, fmt.block_channels, strict=True):
        size = LATENT_SIZE // BLOCK_SCALE[block]
        features.append(torch.randn(batch, channels, size, size, generator=generator))
    noise_level = 0.8 * torch.randn(batch, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    return features, noise_level


def original_output(mlp: CommunityMLP, features: list[torch.Tensor], noise_level: torch.Tensor) -> torch.Tensor:
    # Both trainers resize with F.interpolate(mode="bilinear") and its default align_corners=False.
    size = noise_level.shape[-2:]
    resized = [F.interpolate(feature, size=size, mode="bilinear") for feature in features]
    return mlp(torch.cat(resized, dim=1), noise_level)


@pytest.mark.parametrize("fmt", [SKETCH2IMG_SD15, SKETCH_GUIDED_SD_SD15], ids=lambda f: f.name)
def test_formats_are_the_sd15_block_presets(fmt):
    # UNet2DConditionModel() with default arguments is the SD1.5 architecture; on the meta device it costs no memory.
    with torch.device("meta"):
        unet = UNet2DConditionModel()
        preset = {"sketch2img": "sketch2img", "sketch-guided-stable-diffusion": "down-up"}[fmt.name]
        from_unet = LGPModel.from_unet(unet, preset=preset)
    assert tuple(from_unet.config.blocks) == fmt.blocks
    assert tuple(from_unet.config.block_channels) == fmt.block_channels
    assert (
        from_unet.in_features
        == fmt.in_features
        == {"sketch2img": 9320, "sketch-guided-stable-diffusion": 7080}[fmt.name]
    )


@pytest.mark.parametrize("fmt", [SKETCH2IMG_SD15, SKETCH_GUIDED_SD_SD15], ids=lambda f: f.name)
def test_converted_model_computes_the_original_function(fmt, tmp_path):
    mlp = random_community_mlp(fmt.in_features)
    checkpoint = tmp_path / fmt.filename
    save_in_original_format(mlp, fmt, checkpoint)

    lgp = convert_community_lgp(checkpoint, output_dir=tmp_path / "converted")

    assert lgp.config.feature_branch == fmt.feature_branch
    assert lgp.config.sketch_polarity == fmt.sketch_polarity
    assert list(lgp.config.hidden_dims) == [512, 256, 128, 64]
    assert not lgp.training
    features, noise_level = random_features(fmt)
    with torch.no_grad():
        expected = original_output(mlp, features, noise_level)
        assert expected.abs().mean() > 0.5  # a test on near-zero outputs would prove little
        torch.testing.assert_close(lgp(features, noise_level), expected, atol=1e-5, rtol=1e-5)
        # The saved diffusers folder (config.json + safetensors) loads back to the same function.
        saved = tmp_path / "converted"
        assert {p.name for p in saved.iterdir()} >= {"config.json", "diffusion_pytorch_model.safetensors"}
        reloaded = LGPModel.from_pretrained(saved).eval()
        torch.testing.assert_close(reloaded(features, noise_level), expected, atol=1e-5, rtol=1e-5)
        # Features given by block name, as the pipeline's capture fills them, are put in the trained order.
        by_name = dict(reversed(list(zip(fmt.blocks, features, strict=True))))
        torch.testing.assert_close(lgp(by_name, noise_level), expected, atol=1e-5, rtol=1e-5)


def test_order_of_blocks_matters(tmp_path):
    # Guards the test above: with two same-width blocks swapped, the outputs must differ.
    fmt = SKETCH2IMG_SD15
    mlp = random_community_mlp(fmt.in_features)
    lgp = lgp_from_community_state_dict(mlp.state_dict())
    features, noise_level = random_features(fmt)
    swapped = list(features)
    swapped[3], swapped[4] = features[4], features[3]  # mid_block.attentions.0 <-> mid_block.resnets.0
    with torch.no_grad():
        assert not torch.allclose(lgp(swapped, noise_level), original_output(mlp, features, noise_level), atol=1e-3)


def test_hidden_widths_are_read_from_the_weights_and_extra_entries_are_dropped(tmp_path):
    fmt = SKETCH_GUIDED_SD_SD15
    mlp = random_community_mlp(fmt.in_features, hidden_dims=(32, 16))
    checkpoint = tmp_path / "narrow.pt"
    torch.save({"model_state_dict": mlp.state_dict(), "epoch": 3, "note": "anything else is dropped"}, checkpoint)
    state_dict = load_community_state_dict(checkpoint)
    assert all(key.startswith("layers.") for key in state_dict)
    lgp = lgp_from_community_state_dict(state_dict)
    assert list(lgp.config.hidden_dims) == [32, 16]
    features, noise_level = random_features(fmt)
    with torch.no_grad():
        torch.testing.assert_close(lgp(features, noise_level), original_output(mlp, features, noise_level))


def test_data_parallel_prefix_and_safetensors_are_accepted(tmp_path):
    fmt = SKETCH2IMG_SD15
    mlp = random_community_mlp(fmt.in_features, hidden_dims=(32, 16))
    checkpoint = tmp_path / "edge_predictor.safetensors"
    save_file({f"module.{key}": value.contiguous() for key, value in mlp.state_dict().items()}, checkpoint)
    lgp = convert_community_lgp(checkpoint)
    features, noise_level = random_features(fmt)
    with torch.no_grad():
        torch.testing.assert_close(lgp(features, noise_level), original_output(mlp, features, noise_level))


def test_cli_convert_writes_a_diffusers_folder(tmp_path):
    fmt = SKETCH_GUIDED_SD_SD15
    mlp = random_community_mlp(fmt.in_features, hidden_dims=(32, 16))
    checkpoint = tmp_path / fmt.filename
    save_in_original_format(mlp, fmt, checkpoint)
    out = tmp_path / "lgp"
    assert cli_main(["convert", str(checkpoint), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "LGPModel"
    assert config["feature_branch"] == "unconditional"
    assert config["blocks"] == list(fmt.blocks)
    features, noise_level = random_features(fmt)
    with torch.no_grad():
        torch.testing.assert_close(
            LGPModel.from_pretrained(out)(features, noise_level), original_output(mlp, features, noise_level)
        )


def test_cli_convert_reports_errors_without_a_traceback(tmp_path):
    checkpoint = tmp_path / "other.pt"
    torch.save({"epoch": 3}, checkpoint)
    with pytest.raises(SystemExit, match="sketch-guided convert: error: .*not a community LGP checkpoint"):
        cli_main(["convert", str(checkpoint), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# Errors: each names what was found and what was expected.


def test_error_for_a_file_of_neither_format(tmp_path):
    checkpoint = tmp_path / "other.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 3}, checkpoint)
    with pytest.raises(ValueError, match=r"found a dict with keys 'state_dict', 'epoch'.*expected.*layers\.0\.weight"):
        convert_community_lgp(checkpoint)

    torch.save(torch.zeros(3), checkpoint)
    with pytest.raises(ValueError, match="holds a Tensor; expected a dict"):
        convert_community_lgp(checkpoint)


class RunsCode:
    """Unpickling this object calls os.system: what a malicious checkpoint does."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("empty.pt", lambda path: path.write_bytes(b""), r"is empty \(0 bytes\), not a checkpoint"),
        ("notes.pt", lambda path: path.write_text("some text\n"), r"is not a PyTorch file \(it starts with b'some'"),
        (
            "truncated.pt",
            lambda path: path.write_bytes(path.with_name("whole.pt").read_bytes()[:200]),
            "is a damaged or truncated PyTorch file",
        ),
        ("code.pt", lambda path: torch.save({"x": RunsCode()}, path), "holds a posix.system object: loading it could"),
        ("module.pt", lambda path: torch.save(nn.Linear(3, 4), path), "holds a torch.nn.modules.linear.Linear object"),
        (
            "bad.safetensors",
            lambda path: path.write_bytes(b"\x08" + b"\0" * 7 + b"{}junk"),
            "not a readable safetensors",
        ),
    ],
)
def test_unreadable_files_get_one_line_saying_what_they_are_not(tmp_path, name, write, message, monkeypatch):
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "whole.pt")
    checkpoint = tmp_path / name
    write(checkpoint)
    monkeypatch.setattr(os, "system", lambda command: pytest.fail(f"the checkpoint ran {command!r}"))
    with pytest.raises(SystemExit) as raised:
        cli_main(["convert", str(checkpoint), str(tmp_path / "out")])
    text = str(raised.value)
    assert re.search(message, text), text
    assert "\n" not in text and "weights_only=False" not in text
    assert "A convertible file is a community LGP checkpoint" in text
    assert not (tmp_path / "out").exists()


def test_error_for_a_wrong_input_width(tmp_path):
    checkpoint = tmp_path / "wide.pt"
    torch.save(random_community_mlp(1000, hidden_dims=(32, 16)).state_dict(), checkpoint)
    with pytest.raises(ValueError, match=r"takes 1000 inputs; expected 9320 \(sketch2img.*\) or 7080 \(sketch-guided"):
        convert_community_lgp(checkpoint)


def test_error_for_a_format_that_does_not_fit(tmp_path):
    state_dict = random_community_mlp(SKETCH2IMG_SD15.in_features, hidden_dims=(32, 16)).state_dict()
    with pytest.raises(ValueError, match="takes 9320 inputs, but the sketch-guided-stable-diffusion format has 7080"):
        lgp_from_community_state_dict(state_dict, source_format="sketch-guided-stable-diffusion")
    with pytest.raises(ValueError, match="Unknown LGP format 'sgsd'"):
        lgp_from_community_state_dict(state_dict, source_format="sgsd")


def test_error_for_wrong_shapes_and_keys():
    state_dict = random_community_mlp(SKETCH2IMG_SD15.in_features, hidden_dims=(32, 16)).state_dict()
    bad_norm = {**state_dict, "layers.2.running_mean": torch.zeros(100)}
    with pytest.raises(
        ValueError, match=r"layers\.2\.running_mean has shape \(100,\) in the checkpoint; expected \(32,\)"
    ):
        lgp_from_community_state_dict(bad_norm)

    missing = {key: value for key, value in state_dict.items() if key != "layers.6.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['layers\.6\.bias'\]"):
        lgp_from_community_state_dict(missing)

    extra = {**state_dict, "layers.7.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected keys \['layers\.7\.weight'\]"):
        lgp_from_community_state_dict(extra)

    gap = {key.replace("layers.3.", "layers.4."): value for key, value in state_dict.items()}
    with pytest.raises(
        ValueError, match=r"Found Linear weights at layers \[0, 4, 6\]; expected them at layers \[0, 3, 6\]"
    ):
        lgp_from_community_state_dict(gap)


def test_error_for_an_unknown_source_names_the_known_repos(tmp_path):
    with pytest.raises(ValueError, match="neither a local file nor a Hub repo whose LGP file is known"):
        convert_community_lgp("someone/some-lgp")
    with pytest.raises(ValueError, match="is a folder"):
        convert_community_lgp(tmp_path)


def test_known_sources():
    assert {f.repo_id: f.filename for f in COMMUNITY_FORMATS.values()} == {
        "nyanko7/sketch2img-edge-predictor-train": "edge_predictor.pt",
        "ogkalu/Stable-Diffusion-Latent-Guidance-Predictor": "SDv1.5-trained_LGP.pt",
    }


def test_cli_convert_sketch_polarity_overrides_the_formats_recorded_one(tmp_path):
    fmt = SKETCH2IMG_SD15
    checkpoint = tmp_path / fmt.filename
    save_in_original_format(random_community_mlp(fmt.in_features, hidden_dims=(32, 16)), fmt, checkpoint)
    cli_main(["convert", str(checkpoint), str(tmp_path / "recorded")])
    assert LGPModel.from_pretrained(tmp_path / "recorded").config.sketch_polarity == "dark_on_light"
    cli_main(["convert", str(checkpoint), str(tmp_path / "light"), "--sketch-polarity", "light_on_dark"])
    assert LGPModel.from_pretrained(tmp_path / "light").config.sketch_polarity == "light_on_dark"
