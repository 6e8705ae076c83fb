"""SketchGuidedFluxPipeline: FLUX.1 steered by a sketch through a Latent Guidance Predictor that reads the image tokens
of the transformer's blocks.

Loadable as a package module or as a diffusers custom pipeline (this file, with its sibling modules). The guided step is
in guidance.py, shared with the other pipelines. What FLUX changes: its latents are packed (each token holds a 2x2
patch of the VAE's latents), so the LGP predicts at the unpacked latents' resolution and the sketch gradient reaches
the packed latents through the unpacking; and it is guidance-distilled, so one transformer call per step holds one
branch (with `true_cfg_scale` > 1 the negative prompt's call comes second and runs unguided).
"""

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils import replace_example_docstring
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
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
        >>> from pipeline_sketch_guided import LGPModel, SketchGuidedFluxPipeline

        >>> lgp = LGPModel.from_pretrained("path/or/hub-id-of-a-flux-lgp")
        >>> pipe = SketchGuidedFluxPipeline.from_pretrained(
        ...     "black-forest-labs/FLUX.1-dev", lgp=lgp, torch_dtype=torch.bfloat16
        ... ).to("cuda")
        >>> image = pipe("a cozy cabin in the woods", sketch="cabin_sketch.png").images[0]
        >>> image.save("cabin.png")
        ```
"""


@dataclass
class SketchGuidedFluxPipelineOutput(FluxPipelineOutput):
    """
    Output of [`SketchGuidedFluxPipeline`].

    Args:
        images: the generated images, as for `FluxPipeline`.
        edge_maps: with `return_edge_maps=True`, the LGP's prediction of each image's map at the last guided step, in
            the same `output_type` as the images; otherwise `None`.
    """

    edge_maps: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


class SketchGuidedFluxPipeline(SketchGuidanceMixin, FluxPipeline):
    r"""
    FLUX.1 (dev, schnell, and their fine-tunes) text-to-image generation that follows a sketch: the method of
    "Sketch-Guided Text-to-Image Diffusion Models" (Voynov et al., 2023) on FLUX's transformer. The LGP reads the image
    tokens of some of its double- and single-stream blocks (`LGPModel.from_transformer`), laid out on their grid.

    Everything of [`FluxPipeline`] works as usual; without a sketch the output is exactly its output. With one, its own
    denoising loop runs, and each guided step adds the sketch gradient's step. The LGP reads the prompt's call (FLUX's
    only one, unless `true_cfg_scale` > 1); an LGP trained on an unconditional branch is refused.

    Args:
        scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer, image_encoder,
        feature_extractor: as for [`FluxPipeline`].
        lgp ([`LGPModel`], *optional*):
            The Latent Guidance Predictor trained for this `transformer`, checked against it when set.
        fill_lgp ([`LGPModel`], *optional*):
            An LGP trained on filled silhouettes for this `transformer` (`map_kind="silhouette"`), for fill guidance
            (`sketch_fill`): guided with the region the sketch's outlines enclose, alongside `lgp`, it says which side
            of the lines is the shape. It reads the same blocks' tokens in the same pass.
    """

    _optional_components = [*FluxPipeline._optional_components, "lgp", "fill_lgp"]
    denoiser_name = "transformer"
    denoiser_sample_argument = "hidden_states"

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        lgp: LGPModel | None = None,
        fill_lgp: LGPModel | None = None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_modules(lgp=lgp, fill_lgp=fill_lgp)

    @property
    def denoiser_branches(self) -> int:
        return 1  # guidance-distilled: each call holds one prompt's branch

    def latents_to_spatial(self, latents: torch.Tensor) -> torch.Tensor:
        return self._unpack_latents(latents, *self._sketch_image_size, self.vae_scale_factor)

    def sketch_size(self, height: int | None, width: int | None, latents: torch.Tensor | None) -> tuple[int, int]:
        # FLUX's latents are packed in 2x2 patches: its images are a multiple of twice the VAE's factor, rounded down
        # as FluxPipeline rounds them (`prepare_latents`).
        multiple = self.vae_scale_factor * 2
        default = self.default_sample_size * self.vae_scale_factor
        return tuple((int(side or default) // multiple) * multiple for side in (height, width))

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image=None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
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

        Every argument of [`FluxPipeline.__call__`] means the same here; see its documentation. The sketch arguments
        (`sketch`, `sketch_mask`, `sketch_guidance_scale`, `sketch_guidance_start`, `sketch_guidance_end`,
        `sketch_guidance_interval`, `sketch_guidance_recurrence`, `return_edge_maps`, `guidance_map`,
        `invert_map`, `sketch_fill`, `sketch_fill_scale`) mean what they mean for
        [`SketchGuidedStableDiffusionPipeline.__call__`]; the fractions of the schedule count FLUX's steps.

        Examples:

        Returns:
            [`SketchGuidedFluxPipelineOutput`] or `tuple`: the images and, with `return_edge_maps=True`, the predicted
            maps.
        """
        parent_kwargs = {
            "prompt": prompt,
            "prompt_2": prompt_2,
            "negative_prompt": negative_prompt,
            "negative_prompt_2": negative_prompt_2,
            "true_cfg_scale": true_cfg_scale,
            "height": height,
            "width": width,
            "num_inference_steps": num_inference_steps,
            "sigmas": sigmas,
            "guidance_scale": guidance_scale,
            "num_images_per_prompt": num_images_per_prompt,
            "generator": generator,
            "latents": latents,
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "ip_adapter_image": ip_adapter_image,
            "ip_adapter_image_embeds": ip_adapter_image_embeds,
            "negative_ip_adapter_image": negative_ip_adapter_image,
            "negative_ip_adapter_image_embeds": negative_ip_adapter_image_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
            "output_type": output_type,
            "joint_attention_kwargs": joint_attention_kwargs,
            "callback_on_step_end": callback_on_step_end,
            "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
            "max_sequence_length": max_sequence_length,
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
        return SketchGuidedFluxPipelineOutput(images=output.images, edge_maps=edge_maps)
