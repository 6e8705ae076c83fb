import pytest
import torch

from pipeline_sketch_guided import capture_activations
from pipeline_sketch_guided.testing import tiny_components


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


@pytest.fixture(scope="module")
def unet():
    return tiny_components()["unet"]


def run(unet, batch=1):
    with torch.no_grad():
        return unet(torch.randn(batch, 4, 16, 16), 10, encoder_hidden_states=torch.randn(batch, 5, 32)).sample


def test_captures_the_named_blocks_outputs_and_removes_its_hooks(unet):
    blocks = ["down_blocks.0", "mid_block.attentions.0", "mid_block.resnets.1", "up_blocks.1"]
    with capture_activations(unet, blocks) as features:
        run(unet, batch=2)
    assert set(features) == set(blocks)
    # Tuple outputs (down blocks, transformers) give their first element: the hidden states.
    assert features["down_blocks.0"].shape == (2, 32, 8, 8)
    assert features["mid_block.attentions.0"].shape == (2, 64, 8, 8)
    assert features["up_blocks.1"].shape == (2, 32, 16, 16)
    assert hook_count(unet) == 0


def test_hooks_are_removed_when_the_forward_raises(unet):
    with pytest.raises(RuntimeError):
        with capture_activations(unet, ["down_blocks.0"]):
            unet(torch.randn(1, 3, 16, 16), 10, encoder_hidden_states=torch.randn(1, 5, 32))  # wrong channels
    assert hook_count(unet) == 0


def test_only_forwards_inside_the_context_are_recorded(unet):
    with capture_activations(unet, ["down_blocks.0"]) as features:
        pass
    run(unet)
    assert features == {}


def test_unknown_block_is_a_clear_error_and_places_no_hook(unet):
    with pytest.raises(ValueError, match=r"no block 'mid_block.resnets.5'.*mid_block.resnets.0, mid_block.resnets.1"):
        with capture_activations(unet, ["down_blocks.0", "mid_block.resnets.5"]):
            pass
    assert hook_count(unet) == 0
