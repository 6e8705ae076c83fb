"""SketchGuidedStableDiffusionXLPipeline: Stable Diffusion XL steered by a sketch through a Latent Guidance Predictor.

Loadable as a package module or as a diffusers custom pipeline (this file, with its sibling modules). The guided step is
in guidance.py, shared with the SD 1.x/2.x pipeline: the same LGP method, on SDXL's UNet, with SDXL's added
conditioning (`text_embeds`, `time_ids`, IP-Adapter embeddings) given to each classifier-free guidance branch.
"""

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import replace_example_docstring
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
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
        >>> from pipeline_sketch_guided import LGPModel, SketchGuidedStableDiffusionXLPipeline

        >>> lgp = LGPModel.from_pretrained("path/or/hub-id-of-an-sdxl-lgp")
        >>> pipe = SketchGuidedStableDiffusionXLPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", lgp=lgp, torch_dtype=torch.float16
        ... ).to("cuda")
        >>> image = pipe("a cozy cabin in the woods", sketch="cabin_sketch.png").images[0]
        >>> image.save("cabin.png")
        ```
"""


@dataclass
class SketchGuidedStableDiffusionXLPipelineOutput(StableDiffusionXLPipelineOutput):
    """
    Output of [`SketchGuidedStableDiffusionXLPipeline`].

    Args:
        images: the generated images, as for `StableDiffusionXLPipeline`.
        edge_maps: with `return_edge_maps=True`, the LGP's prediction of each image's edge map at the last guided
            step, decoded by the VAE, in the same `output_type` as the images; otherwise `None`.
    """

    edge_maps: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


class SketchGuidedStableDiffusionXLPipeline(SketchGuidanceMixin, StableDiffusionXLPipeline):
    r"""
    Stable Diffusion XL text-to-image generation that follows a sketch ("Sketch-Guided Text-to-Image Diffusion
    Models", Voynov, Aberman, Cohen-Or, SIGGRAPH 2023), with no weight of the diffusion model changed.

    Everything of [`StableDiffusionXLPipeline`] works as usual; without a sketch the output is exactly its output. With
    one, its own denoising loop runs and each guided step adds the sketch gradient's step. The VAE's `force_upcast`
    (SDXL's VAE overflows in float16) is honoured when the sketch is encoded and the edge maps decoded, as the parent
    does for its images. `pipe.unet.enable_gradient_checkpointing()` cuts the memory of the guided steps' backward at
    1024x1024; `pipe.guided_step_mode` chooses how a guided step runs the two guidance branches.

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder, feature_extractor,
        force_zeros_for_empty_prompt, add_watermarker: as for [`StableDiffusionXLPipeline`].
        lgp ([`LGPModel`], *optional*):
            The Latent Guidance Predictor trained for this `unet` (`LGPModel.from_unet(unet)` reads down blocks 0-1,
            the mid block and up blocks 0-1 of SDXL's UNet). Needed only to generate with a sketch; it is checked
            against the UNet when set.
        fill_lgp ([`LGPModel`], *optional*):
            An LGP trained on filled silhouettes for this `unet` (`map_kind="silhouette"`), for fill guidance
            (`sketch_fill`), as in [`SketchGuidedStableDiffusionPipeline`]. Checked against the UNet when set.
    """

    # The LGP stays out of the offload chain: it runs between UNet calls (see SketchGuidedStableDiffusionPipeline).
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    _optional_components = [*StableDiffusionXLPipeline._optional_components, "lgp", "fill_lgp"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        lgp: LGPModel | None = None,
        fill_lgp: LGPModel | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_modules(lgp=lgp, fill_lgp=fill_lgp)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
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
        **kwargs,
    ):
        r"""
        Generate images from a prompt, following a sketch.

        Every argument of [`StableDiffusionXLPipeline.__call__`] means the same here; see its documentation. The new
        ones are those of [`SketchGuidedStableDiffusionPipeline.__call__`]:

        Args:
            sketch (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str` path, or a list of them, *optional*):
                The drawing to follow, either polarity, any size (fitted to the output, never stretched); one for all
                images, one per prompt, or one per image. `None` generates exactly as `StableDiffusionXLPipeline`.
                For an LGP trained on another kind of map (silhouettes, depth, colour maps), that map, prepared as the
                LGP's config says (see [`SketchGuidedStableDiffusionPipeline.__call__`]).
            guidance_map (same types as `sketch`, *optional*):
                Another name for `sketch`, which reads better for maps that are not sketches; pass one or the other.
            sketch_mask (same types as `sketch`, *optional*):
                Where the sketch applies: white where it is an instruction, black where the prompt alone decides.
            sketch_guidance_scale (`float`, *optional*, defaults to 2.5):
                beta of the paper: the size of each guidance step relative to the denoising step it follows.
            sketch_guidance_start (`float`, *optional*, defaults to 0.0):
                Fraction of the steps after which guidance starts.
            sketch_guidance_end (`float`, *optional*, defaults to 0.3):
                Fraction of the steps after which guidance stops (at least one step is guided).
            sketch_guidance_interval (`int`, *optional*, defaults to 1):
                Compute the sketch gradient on every k-th step of the guided part (and on each of its steps in the
                first 10% of the schedule), reusing the last one between: faster, approximate; 1 is the exact method.
            return_edge_maps (`bool`, *optional*, defaults to `False`):
                Also return the LGP's predicted edge maps at the last guided step (`edge_maps` of the output; the last
                element of the tuple when `return_dict=False`).
            invert_map (`bool`, *optional*, defaults to `False`):
                For a depth LGP: the map is dark where near (a distance map), so turn it round; the LGP reads light as
                near. Sketches and silhouettes need no flag (their paper is found, either way round).
            sketch_fill (`"auto"`, or the same types as `sketch`, *optional*):
                Fill guidance with the pipeline's `fill_lgp`, as in [`SketchGuidedStableDiffusionPipeline.__call__`]:
                by default (`None`) each sketch's own fill when the pipeline has a `fill_lgp`, none otherwise.
            sketch_fill_scale (`float`, *optional*, defaults to 0.125):
                The weight of the fill's error against the sketch's in the guidance loss; 0 turns fill guidance off.

        Examples:

        Returns:
            [`SketchGuidedStableDiffusionXLPipelineOutput`] or `tuple`: the images and, with `return_edge_maps=True`,
            the predicted edge maps.
        """
        parent_kwargs = {
            "prompt": prompt,
            "prompt_2": prompt_2,
            "height": height,
            "width": width,
            "num_inference_steps": num_inference_steps,
            "timesteps": timesteps,
            "sigmas": sigmas,
            "denoising_end": denoising_end,
            "guidance_scale": guidance_scale,
            "negative_prompt": negative_prompt,
            "negative_prompt_2": negative_prompt_2,
            "num_images_per_prompt": num_images_per_prompt,
            "eta": eta,
            "generator": generator,
            "latents": latents,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
            "ip_adapter_image": ip_adapter_image,
            "ip_adapter_image_embeds": ip_adapter_image_embeds,
            "output_type": output_type,
            "cross_attention_kwargs": cross_attention_kwargs,
            "guidance_rescale": guidance_rescale,
            "original_size": original_size,
            "crops_coords_top_left": crops_coords_top_left,
            "target_size": target_size,
            "negative_original_size": negative_original_size,
            "negative_crops_coords_top_left": negative_crops_coords_top_left,
            "negative_target_size": negative_target_size,
            "clip_skip": clip_skip,
            "callback_on_step_end": callback_on_step_end,
            "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
            **kwargs,
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
        return SketchGuidedStableDiffusionXLPipelineOutput(images=output.images, edge_maps=edge_maps)
