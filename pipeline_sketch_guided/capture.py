"""Capture the activations of named blocks of a UNet or a diffusion transformer with forward hooks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def resolve_blocks(unet: nn.Module, blocks: Sequence[str]) -> dict[str, nn.Module]:
    """Map each module path (such as ``"down_blocks.1"`` or ``"mid_block.attentions.0"``) to its module.

    Raises:
        ValueError: naming the first path that the UNet does not have, and the paths it does have at that level.
    """
    modules = {}
    for name in blocks:
        try:
            modules[name] = unet.get_submodule(name)
        except AttributeError:
            parent_name = name.rpartition(".")[0]
            try:
                parent = unet.get_submodule(parent_name) if parent_name else unet
                available = [f"{parent_name}.{child}" if parent_name else child for child, _ in parent.named_children()]
            except AttributeError:
                available = [child for child, _ in unet.named_children()]
            raise ValueError(
                f"The {type(unet).__name__} has no block {name!r}. Blocks there: {', '.join(available)}."
            ) from None
    return modules


def block_output_channels(module: nn.Module) -> int:
    """The number of channels a UNet block outputs, read from its structure (no forward pass).

    Works for diffusers' down, mid and up blocks (their last resnet sets the width; down- and up-samplers keep it),
    for `ResnetBlock2D` and `Transformer2DModel`, and for the blocks of SD3's and FLUX's transformers.
    """
    resnets = getattr(module, "resnets", None)
    if resnets is not None and len(resnets) > 0:
        return int(resnets[-1].out_channels)
    out_channels = getattr(module, "out_channels", None)
    if isinstance(out_channels, int):
        return out_channels
    # A transformer block (SD3's JointTransformerBlock, FLUX's double and single blocks): its image tokens keep the
    # width its attention reads.
    query_dim = getattr(getattr(module, "attn", None), "query_dim", None)
    if isinstance(query_dim, int):
        return query_dim
    raise ValueError(
        f"Cannot tell how many channels {type(module).__name__} outputs; pass `block_channels` explicitly."
    )


def _first_tensor(output, index: int) -> torch.Tensor:
    # Blocks return a tensor, a tuple such as (hidden_states, residuals), or a diffusers BaseOutput.
    if isinstance(output, torch.Tensor):
        return output
    return output[index]


@contextmanager
def capture_activations(
    unet: nn.Module, blocks: Sequence[str], tuple_output_index: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named UNet blocks during the forward passes run inside the context.

    Only run the forward pass whose activations you want inside the context (in the pipeline: the classifier-free
    guidance branch the LGP was trained on); a later forward overwrites an earlier one. The hooks are removed when the
    context exits, also when the forward raises.

    Args:
        unet (`torch.nn.Module`): the UNet, usually a `UNet2DConditionModel`.
        blocks (`Sequence[str]`): module paths inside the UNet, validated before any hook is placed.
        tuple_output_index (`int`, defaults to 0): which element to keep where a block returns a tuple.

    Yields:
        `dict[str, torch.Tensor]`: filled with one activation per block name once a forward has run.
    """
    modules = resolve_blocks(unet, blocks)
    activations: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, args, output):
            activations[name] = _first_tensor(output, tuple_output_index)

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        yield activations
    finally:
        for handle in handles:
            handle.remove()
