"""What the editing pipelines share (img2img, inpainting, ControlNet; pipeline_img2img.py and its siblings): one
`__call__` that takes every argument of the diffusers parent plus the sketch arguments, and the size of the images they
make, which comes from the input image rather than from `height` and `width` alone.

Each editing pipeline is its parent with `SketchGuidanceMixin` mixed in and this `__call__`; the guided step is the one
of every other pipeline (guidance.py). The guided range counts the steps the parent actually runs: img2img and
inpainting at `strength` < 1 start part-way down the schedule and run about `strength` x `num_inference_steps` steps,
so `sketch_guidance_end=0.3` guides the first 30% of those.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from .guidance import DEFAULT_SKETCH_FILL_SCALE, DEFAULT_SKETCH_GUIDANCE_END, DEFAULT_SKETCH_GUIDANCE_SCALE


@dataclass
class SketchGuidedEditingPipelineOutput(StableDiffusionPipelineOutput):
    """
    Output of the SD 1.x/2.x editing pipelines: the parent's `images` and `nsfw_content_detected`, and with
    `return_edge_maps=True` the LGP's predicted maps at the last guided step (`edge_maps`, else `None`).
    """

    edge_maps: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


@dataclass
class SketchGuidedEditingXLPipelineOutput(StableDiffusionXLPipelineOutput):
    """
    Output of the SDXL editing pipelines: the parent's `images`, and with `return_edge_maps=True` the LGP's predicted
    maps at the last guided step (`edge_maps`, else `None`).
    """

    edge_maps: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


# The sketch arguments every sketch-guided pipeline's `__call__` takes, with their defaults (documented in
# `SketchGuidedStableDiffusionPipeline.__call__`).
SKETCH_ARGUMENTS = {
    "sketch": None,
    "sketch_mask": None,
    "sketch_guidance_scale": DEFAULT_SKETCH_GUIDANCE_SCALE,
    "sketch_guidance_start": 0.0,
    "sketch_guidance_end": DEFAULT_SKETCH_GUIDANCE_END,
    "sketch_guidance_interval": 1,
    "sketch_guidance_recurrence": 1,
    "return_edge_maps": False,
    "guidance_map": None,
    "invert_map": False,
}
# Fill guidance's arguments (with the pipeline's `fill_lgp`).
FILL_ARGUMENTS = {"sketch_fill": None, "sketch_fill_scale": DEFAULT_SKETCH_FILL_SCALE}


def sketch_guided_signature(parent_call) -> inspect.Signature:
    """The parent's `__call__` signature with the sketch arguments and fill guidance's added as keyword-only
    parameters."""
    signature = inspect.signature(parent_call)
    parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    variadic = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default in {**SKETCH_ARGUMENTS, **FILL_ARGUMENTS}.items()
    ]
    return signature.replace(parameters=[*parameters, *added, *variadic])


class SketchGuidedEditingMixin:
    """The `__call__` of the editing pipelines (`sketch_guided_call`): the parent's arguments (by position or name,
    with its defaults), then the sketch arguments and fill guidance's. Mix in before `SketchGuidanceMixin`.

    Each class's `__call__` has the parent's own signature plus the sketch arguments (`sketch_guided_signature`), rather
    than a copy of diffusers' long argument lists in each of five files, which would drift from the installed
    diffusers.
    """

    # Ours: the parent's output fields and `edge_maps`.
    output_class: type
    # Whether the images take the input image's size (img2img, ControlNet's condition image) or `height` and `width`,
    # else the UNet's sample size, as text-to-image does (inpainting, which resizes the image and mask to that).
    size_from_image: bool = True
    _sketch_call_image = None

    def sketch_guided_call(self, *args, **kwargs):
        """The body of each editing pipeline's `__call__`."""
        arguments = {**SKETCH_ARGUMENTS, **FILL_ARGUMENTS}
        guidance = {name: kwargs.pop(name, default) for name, default in arguments.items()}
        named_return_dict = kwargs.pop("return_dict", None)
        parent_call = self._parent_call()
        parent_signature = inspect.signature(parent_call)
        bound = parent_signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        return_dict = bound.arguments.get("return_dict", True) if named_return_dict is None else named_return_dict
        # `return_dict` is the guidance core's to pass (it needs the parent's output object).
        parent_kwargs = {name: value for name, value in bound.arguments.items() if name not in ("self", "return_dict")}
        for name, parameter in parent_signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                parent_kwargs.update(parent_kwargs.pop(name, {}))
        if guidance["sketch"] is not None or guidance["guidance_map"] is not None:
            self.check_editing_inputs(parent_kwargs, guidance)
        output, edge_maps = self.generate_with_sketch(
            lambda **call_kwargs: parent_call(self, **call_kwargs), parent_kwargs, guidance
        )
        fields = {field.name: getattr(output, field.name) for field in dataclasses.fields(output)}
        if not return_dict:
            return tuple(fields.values()) + ((edge_maps,) if guidance["return_edge_maps"] else ())
        return self.output_class(**fields, edge_maps=edge_maps)

    def _parent_call(self):
        """The `__call__` of the diffusers pipeline this class extends (the first base after the mixins)."""
        for base in type(self).__mro__[1:]:
            if base.__module__.startswith("diffusers.") and "__call__" in base.__dict__:
                return base.__dict__["__call__"]
        raise TypeError(f"{type(self).__name__} has no diffusers pipeline among its bases.")

    def check_editing_inputs(self, parent_kwargs: dict[str, Any], guidance: dict[str, Any]) -> None:
        """Refuse what a sketch cannot be combined with yet."""
        if parent_kwargs.get("padding_mask_crop") is not None:
            raise ValueError(
                "`padding_mask_crop` crops the image around the mask before generating, so a sketch drawn on the whole"
                " image would not line up with it. Pass no `padding_mask_crop` with a sketch (or crop the image, the"
                " mask and the sketch alike beforehand)."
            )

    def sketch_size(self, height, width, latents) -> tuple[int, int]:
        """The size of the images this call makes: with `size_from_image`, the input image's as the parent computes it
        (`get_default_height_width`: its size rounded down to the VAE's factor) unless `height` and `width` are given;
        otherwise as for text-to-image."""
        image = self._sketch_call_image
        if not self.size_from_image or image is None or (height is not None and width is not None):
            return super().sketch_size(height, width, latents)
        first = image[0] if isinstance(image, list) else image
        default_height, default_width = self.image_processor.get_default_height_width(first, height, width)
        return (height or default_height, width or default_width)

    def generate_with_sketch(self, parent_call, parent_kwargs, guidance):
        # The image whose size the output takes: img2img's and inpainting's `image`, ControlNet's condition image.
        self._sketch_call_image = parent_kwargs.get("image")
        if guidance.get("sketch_mask") is None and parent_kwargs.get("mask_image") is not None:
            # Inpainting: by default the sketch guides where the image is repainted, and only there.
            has_sketch = guidance.get("sketch") is not None or guidance.get("guidance_map") is not None
            if has_sketch:
                guidance = {**guidance, "sketch_mask": parent_kwargs["mask_image"]}
        try:
            return super().generate_with_sketch(parent_call, parent_kwargs, guidance)
        finally:
            self._sketch_call_image = None
