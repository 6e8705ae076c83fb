"""SketchGuidedStableDiffusion3Pipeline: Stable Diffusion 3 / 3.5 steered by a sketch through a Latent Guidance
Predictor that reads the image tokens of the MMDiT's blocks.

Loadable as a package module or as a diffusers custom pipeline (this file, with its sibling modules). The guided step is
in guidance.py, shared with the UNet pipelines: the same LGP method on a flow-matching transformer, whose velocity
prediction gives the noise estimate the LGP's noise-level input needs (epsilon = x_t + (1 - sigma) v).
"""

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.utils import replace_example_docstring
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

# diffusers copies a local custom pipeline's modules by this file's own relative imports: each module is imported here.
from .capture import capture_activations  # noqa: F401
from .fill import fill_sketch  # noqa: F401
from .guidance import (
    DEFAULT_SKETCH_FILL_SCALE,
    DEFAULT_SKETCH_GUIDANCE_END,
    DEFAULT_SKETCH_GUIDANCE_SCALE,
    SketchGuidanceMixin,
)
from .lgp import LGPModel
from .sketch import SketchInput

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from pipeline_sketch_guided import LGPModel, SketchGuidedStableDiffusion3Pipeline

        >>> lgp = LGPModel.from_pretrained("path/or/hub-id-of-an-sd3-lgp")
        >>> pipe = SketchGuidedStableDiffusion3Pipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-3.5-medium", lgp=lgp, torch_dtype=torch.bfloat16
        ... ).to("cuda")
        >>> image = pipe("a cozy cabin in the woods", sketch="cabin_sketch.png").images[0]
        >>> image.save("cabin.png")
        ```
"""


@dataclass
class SketchGuidedStableDiffusion3PipelineOutput(StableDiffusion3PipelineOutput):
    """
    Output of [`SketchGuidedStableDiffusion3Pipeline`].

    Args:
        images: the generated images, as for `StableDiffusion3Pipeline`.
        edge_maps: with `return_edge_maps=True`, the LGP's prediction of each image's map at the last guided step, in
            the same `output_type` as the images; otherwise `None`.
    """

    edge_maps: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


class SketchGuidedStableDiffusion3Pipeline(SketchGuidanceMixin, StableDiffusion3Pipeline):
    r"""
    Stable Diffusion 3 / 3.5 text-to-image generation that follows a sketch: the method of "Sketch-Guided Text-to-Image
    Diffusion Models" (Voynov et al., 2023) on SD3's MMDiT. The LGP reads the image tokens of some of the transformer's
    blocks (`LGPModel.from_transformer`), laid out on their patch grid.

    Everything of [`StableDiffusion3Pipeline`] works as usual; without a sketch the output is exactly its output. With
    one, its own denoising loop runs, and each guided step adds the sketch gradient's step. Classifier-free guidance
    stacks both branches in one transformer call, as in the UNet pipelines (`guided_step_mode` applies); with
    `skip_guidance_layers` the extra call of each step runs unguided.

    Args:
        transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3,
        image_encoder, feature_extractor: as for [`StableDiffusion3Pipeline`].
        lgp ([`LGPModel`], *optional*):
            The Latent Guidance Predictor trained for this `transformer`, checked against it when set.
        fill_lgp ([`LGPModel`], *optional*):
            An LGP trained on filled silhouettes for this `transformer` (`map_kind="silhouette"`), for fill guidance
            (`sketch_fill`): guided with the region the sketch's outlines enclose, alongside `lgp`, it says which side
            of the lines is the shape. It reads the same blocks' tokens in the same pass.
    """

    _optional_components = [*StableDiffusion3Pipeline._optional_components, "lgp", "fill_lgp"]
    denoiser_name = "transformer"
    denoiser_sample_argument = "hidden_states"

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
        image_encoder: SiglipVisionModel = None,
        feature_extractor: SiglipImageProcessor = None,
        lgp: LGPModel | None = None,
        fill_lgp: LGPModel | None = None,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_modules(lgp=lgp, fill_lgp=fill_lgp)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        sketch: SketchInput | list[SketchInput] | None = None,
        sketch_mask: SketchInput | list[SketchInput] | None = None,
        sketch_guidance_scale: float = DEFAULT_SKETCH_GUIDANCE_SCALE,
        sketch_guidance_start: float = 0.0,
        sketch_guidance_end: float = DEFAULT_SKETCH_GUIDANCE_END,
        sketch_guidance_interval: int = 1,
        sketch_guidance_recurrence: int = 1,
        return_edge_maps: bool = False,
        guidance_map: SketchInput | list[SketchInput] | None = None,
        invert_map: bool = False,
        sketch_fill: SketchInput | list[SketchInput] | str | None = None,
        sketch_fill_scale: float = DEFAULT_SKETCH_FILL_SCALE,
    ):
        r"""
        Generate images from a prompt, following a sketch.

        Every argument of [`StableDiffusion3Pipeline.__call__`] means the same here; see its documentation. The sketch
        arguments (`sketch`, `sketch_mask`, `sketch_guidance_scale`, `sketch_guidance_start`, `sketch_guidance_end`,
        `sketch_guidance_interval`, `sketch_guidance_recurrence`, `return_edge_maps`, `guidance_map`,
        `invert_map`, `sketch_fill`, `sketch_fill_scale`) mean what they mean for
        [`SketchGuidedStableDiffusionPipeline.__call__`]; the fractions of the schedule count SD3's steps.

        Examples:

        Returns:
            [`SketchGuidedStableDiffusion3PipelineOutput`] or `tuple`: the images and, with `return_edge_maps=True`,
            the predicted maps.
        """
        parent_kwargs = {
            "prompt": prompt,
            "prompt_2": prompt_2,
            "prompt_3": prompt_3,
            "height": height,
            "width": width,
            "num_inference_steps": num_inference_steps,
            "sigmas": sigmas,
            "guidance_scale": guidance_scale,
            "negative_prompt": negative_prompt,
            "negative_prompt_2": negative_prompt_2,
            "negative_prompt_3": negative_prompt_3,
            "num_images_per_prompt": num_images_per_prompt,
            "generator": generator,
            "latents": latents,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
            "ip_adapter_image": ip_adapter_image,
            "ip_adapter_image_embeds": ip_adapter_image_embeds,
            "output_type": output_type,
            "joint_attention_kwargs": joint_attention_kwargs,
            "clip_skip": clip_skip,
            "callback_on_step_end": callback_on_step_end,
            "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
            "max_sequence_length": max_sequence_length,
            "skip_guidance_layers": skip_guidance_layers,
            "skip_layer_guidance_scale": skip_layer_guidance_scale,
            "skip_layer_guidance_stop": skip_layer_guidance_stop,
            "skip_layer_guidance_start": skip_layer_guidance_start,
            "mu": mu,
        }
        guidance = {
            "sketch": sketch,
            "sketch_mask": sketch_mask,
            "sketch_guidance_scale": sketch_guidance_scale,
            "sketch_guidance_start": sketch_guidance_start,
            "sketch_guidance_end": sketch_guidance_end,
            "sketch_guidance_interval": sketch_guidance_interval,
            "sketch_guidance_recurrence": sketch_guidance_recurrence,
            "return_edge_maps": return_edge_maps,
            "guidance_map": guidance_map,
            "invert_map": invert_map,
            "sketch_fill": sketch_fill,
            "sketch_fill_scale": sketch_fill_scale,
        }
        output, edge_maps = self.generate_with_sketch(super().__call__, parent_kwargs, guidance)
        if not return_dict:
            return (output.images,) + ((edge_maps,) if return_edge_maps else ())
        return SketchGuidedStableDiffusion3PipelineOutput(images=output.images, edge_maps=edge_maps)
