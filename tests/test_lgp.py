import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from pipeline_sketch_guided import LGPModel, capture_activations, noise_level_map
from pipeline_sketch_guided.testing import random_lgp, tiny_components

SKETCH2IMG_BLOCKS = [
    "down_blocks.0",
    "down_blocks.1",
    "down_blocks.2",
    "mid_block.attentions.0",
    "mid_block.resnets.0",
    "mid_block.resnets.1",
    "up_blocks.0",
    "up_blocks.1",
    "up_blocks.2",
]


@pytest.fixture(scope="module")
def sd15_unet():
    # The SD 1.5 architecture (UNet2DConditionModel's defaults), on the meta device: structure without weights.
    with torch.device("meta"):
        return UNet2DConditionModel()


def test_default_preset_is_the_published_sketch2img_set_on_sd15(sd15_unet):
    lgp = LGPModel.from_unet(sd15_unet)
    assert lgp.config.blocks == SKETCH2IMG_BLOCKS
    assert lgp.config.block_channels == [320, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640]
    assert lgp.in_features == 9320  # nyanko7/sketch2img-edge-predictor-train
    assert lgp.layers[0].in_features == 9320
    assert lgp.config.feature_branch == "conditional"


def test_down_up_preset_matches_the_published_sgsd_width(sd15_unet):
    lgp = LGPModel.from_unet(sd15_unet, preset="down-up", feature_branch="unconditional")
    assert lgp.in_features == 7080  # ogkalu/Stable-Diffusion-Latent-Guidance-Predictor
    assert lgp.config.blocks == [f"down_blocks.{i}" for i in range(4)] + [f"up_blocks.{i}" for i in range(4)]


def test_state_dict_has_the_community_layout(sd15_unet):
    keys = {key.rsplit(".", 1)[0] for key in LGPModel.from_unet(sd15_unet).state_dict()}
    assert keys == {f"layers.{i}" for i in (0, 2, 3, 5, 6, 8, 9, 11, 12)}
    assert LGPModel.from_unet(sd15_unet).layers[12].out_features == 4


def test_unknown_preset_and_bad_config_are_clear_errors(sd15_unet):
    with pytest.raises(ValueError, match="Unknown block preset 'nope'"):
        LGPModel.from_unet(sd15_unet, preset="nope")
    with pytest.raises(ValueError, match="feature_branch"):
        LGPModel(blocks=["down_blocks.0"], block_channels=[320], feature_branch="text")
    with pytest.raises(ValueError, match="same length"):
        LGPModel(blocks=["down_blocks.0", "up_blocks.0"], block_channels=[320])


def test_forward_equals_the_mlp_on_the_concatenated_feature_map():
    """The per-block first layer is an optimisation: it must compute what the paper's concatenation computes."""
    unet = tiny_components()["unet"]
    lgp = random_lgp(unet)
    # Make BatchNorm's running statistics non-trivial, so that eval mode is really exercised.
    for module in lgp.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    latents = torch.randn(2, 4, 16, 16)
    with capture_activations(unet, lgp.config.blocks) as features, torch.no_grad():
        unet(latents, 500, encoder_hidden_states=torch.randn(2, 5, 32))
    noise_level = torch.randn(2, 4, 16, 16)

    resized = [F.interpolate(features[b], size=(16, 16), mode="bilinear") for b in lgp.config.blocks]
    frequencies = [torch.sin(2 * torch.pi * noise_level * 2.0**-level) for level in range(9)]
    wide = torch.cat([*resized, noise_level, *frequencies], dim=1)
    assert wide.shape[1] == lgp.in_features
    expected = lgp.layers(wide.permute(0, 2, 3, 1).reshape(-1, wide.shape[1]))
    expected = expected.reshape(2, 16, 16, 4).permute(0, 3, 1, 2)

    with torch.no_grad():
        assert torch.allclose(lgp(features, noise_level), expected, atol=1e-5)
        # Features may also come as a list in `blocks` order.
        assert torch.allclose(lgp([features[b] for b in lgp.config.blocks], noise_level), expected, atol=1e-5)


def test_noise_level_map_is_sqrt_one_minus_alphabar_times_noise():
    noise = torch.randn(2, 4, 3, 3)
    level = noise_level_map(noise, torch.tensor([0.36, 0.64]))
    assert torch.allclose(level[0], 0.8 * noise[0]) and torch.allclose(level[1], 0.6 * noise[1])


def test_save_and_load_round_trip(tmp_path):
    unet = tiny_components()["unet"]
    lgp = random_lgp(unet, seed=3)
    lgp.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LGPModel.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(lgp.config)
    assert not loaded.training
    features = {b: torch.randn(1, c, 8, 8) for b, c in zip(lgp.config.blocks, lgp.config.block_channels, strict=True)}
    noise_level = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(features, noise_level), lgp(features, noise_level))


def test_mismatched_unet_names_block_and_both_channel_counts():
    lgp = random_lgp(tiny_components()["unet"])
    other = UNet2DConditionModel(
        block_out_channels=(32, 48),
        layers_per_block=1,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=16,
        attention_head_dim=8,
    )
    with pytest.raises(ValueError, match=r"64 channels from UNet block 'mid_block.attentions.0'.*outputs 48"):
        lgp.check_unet(other)


def test_block_missing_from_unet_is_named(sd15_unet):
    lgp = LGPModel(blocks=["down_blocks.0", "down_blocks.7"], block_channels=[320, 320])
    with pytest.raises(ValueError, match=r"no block 'down_blocks.7'.*down_blocks.0, down_blocks.1"):
        lgp.check_unet(sd15_unet)


def test_corrupt_and_missing_weights_are_clear_errors(tmp_path):
    random_lgp(tiny_components()["unet"]).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        OSError, match="(?s)Cannot load an LGP from .*config.json and diffusion_pytorch_model.safetensors"
    ):
        LGPModel.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(OSError, match="Cannot load an LGP from"):
        LGPModel.from_pretrained(tmp_path)
