"""SketchGuidedStableDiffusionPipeline: Stable Diffusion 1.x/2.x steered by a sketch through a Latent Guidance
Predictor.

Loadable as a package module or as a diffusers custom pipeline:
`DiffusionPipeline.from_pretrained(base, custom_pipeline="path/to/pipeline_sketch_guided", trust_remote_code=True)`.
The guided step itself is in guidance.py, shared with the SDXL pipeline.
"""

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import replace_example_docstring
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

# diffusers copies a local custom pipeline's modules by this file's own relative imports: each module is imported here.
from .capture import capture_activations  # noqa: F401
from .fill import fill_sketch  # noqa: F401
from .guidance import (  # noqa: F401 (the names that were public here before guidance.py)
    DEFAULT_SKETCH_FILL_SCALE,
    DEFAULT_SKETCH_GUIDANCE_END,
    DEFAULT_SKETCH_GUIDANCE_SCALE,
    MAX_SKETCH_GUIDANCE_SCALE,
    SketchGuidanceMixin,
    autograd_until,
    frozen_parameters,
    guided_step_indices,
    is_guided_step,
    sketch_guidance_step,
)
from .lgp import LGPModel
from .sketch import SketchInput

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from pipeline_sketch_guided import LGPModel, SketchGuidedStableDiffusionPipeline

        >>> lgp = LGPModel.from_pretrained("path/or/hub-id-of-an-lgp")
        >>> pipe = SketchGuidedStableDiffusionPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", lgp=lgp, torch_dtype=torch.float16
        ... ).to("cuda")
        >>> image = pipe("a cozy cabin in the woods", sketch="cabin_sketch.png").images[0]
        >>> image.save("cabin.png")
        ```
"""


@dataclass
class SketchGuidedStableDiffusionPipelineOutput(StableDiffusionPipelineOutput):
    """
    Output of [`SketchGuidedStableDiffusionPipeline`].

    Args:
        images: the generated images, as for `StableDiffusionPipeline`.
        nsfw_content_detected: the safety checker's verdicts, or `None`.
        edge_maps: with `return_edge_maps=True`, the LGP's prediction of each image's edge map at the last guided
            step, decoded by the VAE, in the same `output_type` as the images; otherwise `None`.
    """

    edge_maps: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


class SketchGuidedStableDiffusionPipeline(SketchGuidanceMixin, StableDiffusionPipeline):
    r"""
    Stable Diffusion text-to-image generation that follows a sketch ("Sketch-Guided Text-to-Image Diffusion Models",
    Voynov, Aberman, Cohen-Or, SIGGRAPH 2023). No weight of the diffusion model changes: a small Latent Guidance
    Predictor (LGP) reads the UNet's activations, predicts the edge map of the image being made, and the gradient of its
    error against the sketch steers the latents during the early steps.

    Everything of [`StableDiffusionPipeline`] works as usual; without a sketch the output is exactly its output. With
    one, `StableDiffusionPipeline`'s own denoising loop runs, and each guided step adds the sketch gradient's step
    (`SketchGuidanceMixin.sketch_guidance`).

    A guided step adds one backward through the UNet. For large images, `pipe.unet.enable_gradient_checkpointing()`
    cuts the memory that backward needs (it acts only where gradients flow, so only on guided steps) for a
    recomputation of the forward; the results are the same. `pipe.guided_step_mode = "split"` or `"batched"` chooses how
    a guided step runs the two classifier-free guidance branches (the same images within float tolerance); by default,
    the faster one measured for the device.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder,
        requires_safety_checker: as for [`StableDiffusionPipeline`].
        lgp ([`LGPModel`], *optional*):
            The Latent Guidance Predictor trained for this `unet`. Needed only to generate with a sketch; it is
            checked against the UNet when set.
        fill_lgp ([`LGPModel`], *optional*):
            An LGP trained on filled silhouettes for this `unet` (`map_kind="silhouette"`), for fill guidance
            (`sketch_fill`): guided with the region the sketch's outlines enclose, alongside `lgp`, it says which
            side of each line is the shape. Checked against the UNet when set.
    """

    # The LGP runs at every guided step between UNet calls, so it stays out of the chain (as ControlNets do): in it, its
    # call would offload the UNet in the middle of a guided step. Offloading gives it a hook of its own.
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = [*StableDiffusionPipeline._optional_components, "lgp", "fill_lgp"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = True,
        lgp: LGPModel | None = None,
        fill_lgp: LGPModel | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_modules(lgp=lgp, fill_lgp=fill_lgp)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
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

        Every argument of [`StableDiffusionPipeline.__call__`] means the same here; see its documentation. The new ones:

        Args:
            sketch (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str` path, or a list of them, *optional*):
                The drawing to follow, in diffusers' image conventions (a list, an array `(B, H, W, C)` or a tensor
                `(B, C, H, W)` for several): any size (fitted to `height` x `width`, never stretched), dark strokes on
                light paper or light on dark, modes 1, L, RGB or RGBA (transparency is paper). One sketch for all
                images, one per prompt, or one per image. `None` generates exactly as `StableDiffusionPipeline` does.
                For an LGP trained on another kind of map (its config's `map_kind`), that map: a silhouette (filled
                shapes, either way round: the paper is the tone of the map's border), a depth map (light is near,
                see `invert_map`; stretched to the full range where the LGP's training maps were), or a colour map
                (segmentation colours, normals) with its three channels kept; transparency and padding are
                background there.
            guidance_map (same types as `sketch`, *optional*):
                Another name for `sketch`, which reads better for maps that are not sketches; pass one or the other.
            sketch_mask (same types as `sketch`, *optional*):
                Where the sketch applies: white where its strokes and its blank paper are instructions, black where the
                prompt alone decides (grey between). By default all of it. One for all images, per prompt or per image.
            sketch_guidance_scale (`float`, *optional*, defaults to 2.5):
                beta of the paper: the size of each guidance step relative to the denoising step it follows. Higher
                follows the sketch more closely at some cost in realism (and, on the demo model, in prompt colour); 0
                turns guidance off. The paper's sample files use 1.6.
            sketch_guidance_start (`float`, *optional*, defaults to 0.0):
                Fraction of the steps after which guidance starts.
            sketch_guidance_end (`float`, *optional*, defaults to 0.3):
                Fraction of the steps after which guidance stops. Guiding late makes the strokes appear literally.
            sketch_guidance_interval (`int`, *optional*, defaults to 1):
                Compute the sketch gradient on every k-th step of the guided part (and on each of its steps in the
                first 10% of the schedule, where a gradient goes stale fastest): a faster approximation, since each
                gradient costs a backward through the UNet. 1 is the exact method. The steps between take a guidance
                step along the last gradient, sized by their own denoising step (`pipe.sketch_gradient_reuse = False`
                leaves them unguided). With 2 and `sketch_guidance_end=0.5`, half the steps are guided for the cost
                of the defaults (every gradient of the first 30% computed).
            sketch_guidance_recurrence (`int`, *optional*, defaults to 1):
                Run each guided step of the first 10% of the schedule this many times: after the guided step, the
                latents are noised back to the step's noise level (with `generator`) and the step is taken again, the
                sketch's gradient recomputed. 1 takes each step once (the paper's method). On the demo model, 2
                followed sketches much more closely for 3 more guided steps of 30 (docs/fidelity.md); each repeat
                costs a guided step.
            return_edge_maps (`bool`, *optional*, defaults to `False`):
                Also return the LGP's predicted edge maps at the last guided step (`edge_maps` of the output; the last
                element of the tuple when `return_dict=False`).
            invert_map (`bool`, *optional*, defaults to `False`):
                For a depth LGP: the map is dark where near (a distance map), so turn it round; the LGP reads light as
                near. Sketches and silhouettes need no flag (their paper is found, either way round).
            sketch_fill (`"auto"`, or the same types as `sketch`, *optional*):
                Fill guidance, with the pipeline's `fill_lgp`: the shape's filled region, which tells the image which
                side of the sketch's lines is the shape. `"auto"` fills what each sketch's outlines enclose (across
                small gaps; an outline the frame cuts is closed by the frame); or pass the fills (white shapes on
                black, or black on white), one for all images, per prompt or per image. By default (`None`), `"auto"`
                when the pipeline has a `fill_lgp`, none otherwise.
            sketch_fill_scale (`float`, *optional*, defaults to 0.125):
                The weight of the fill's error against the sketch's in the guidance loss; 0 turns fill guidance off.

        Examples:

        Returns:
            [`SketchGuidedStableDiffusionPipelineOutput`] or `tuple`: the images, the safety checker's verdicts and,
            with `return_edge_maps=True`, the predicted edge maps.
        """
        parent_kwargs = {
            "prompt": prompt,
            "height": height,
            "width": width,
            "num_inference_steps": num_inference_steps,
            "timesteps": timesteps,
            "sigmas": sigmas,
            "guidance_scale": guidance_scale,
            "negative_prompt": negative_prompt,
            "num_images_per_prompt": num_images_per_prompt,
            "eta": eta,
            "generator": generator,
            "latents": latents,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "ip_adapter_image": ip_adapter_image,
            "ip_adapter_image_embeds": ip_adapter_image_embeds,
            "output_type": output_type,
            "cross_attention_kwargs": cross_attention_kwargs,
            "guidance_rescale": guidance_rescale,
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
            return (output.images, output.nsfw_content_detected) + ((edge_maps,) if return_edge_maps else ())
        return SketchGuidedStableDiffusionPipelineOutput(
            images=output.images, nsfw_content_detected=output.nsfw_content_detected, edge_maps=edge_maps
        )
