"""SketchGuidedStableDiffusionPipeline: Stable Diffusion steered by a sketch through a Latent Guidance Predictor.

Loadable as a package module or as a diffusers custom pipeline:
`DiffusionPipeline.from_pretrained(base, custom_pipeline="path/to/pipeline_sketch_guided", trust_remote_code=True)`.
"""

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging, replace_example_docstring
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .capture import capture_activations, resolve_blocks
from .lgp import LGPModel, noise_level_map
from .sketch import SKETCH_POLARITIES, SketchInput, prepare_sketch, sketch_list

logger = logging.get_logger(__name__)

# Chosen by `python -m benchmarks.efficacy --max_end 0.3` on the demo model (README, "The demo model"): the highest
# sketch agreement whose prompt colour agreement stays within 5 points of unguided, among settings that guide at most
# 30% of the steps. That cost limit keeps a whole SD1.5 generation on a CPU within 1.25x of an unguided one (README,
# "Cost"). The paper's sample files use beta = 1.6, and the community guides the first half of the steps; sweep your own
# base model and LGP with the same benchmark.
DEFAULT_SKETCH_GUIDANCE_SCALE = 2.5
DEFAULT_SKETCH_GUIDANCE_END = 0.3
# Far above the useful range (about 1 to 4) a guidance step outweighs the denoising step many times over and the image
# turns to noise or black: a larger scale is a mistake, refused with the sensible range.
MAX_SKETCH_GUIDANCE_SCALE = 50.0

# How a guided step runs the classifier-free guidance branches. "split": the LGP's branch with autograd, the other
# without (the backward goes through one half only). "batched": one UNet call on the batch of 2 with autograd, as the
# unguided step runs it (the backward goes through both halves, but one batched forward replaces two). Which is faster
# depends on the device, measured by `benchmarks/gpu_check.py` and `benchmarks/guided_sampling.py` (README, "Cost"): on
# an H100 (SD1.5 architecture, 512x512, float16) a batched guided step takes 0.63x the split one's time, a whole
# generation guided at the defaults 0.82x; on the CPU the split step is the faster.
GUIDED_STEP_MODES = ("split", "batched")
DEFAULT_GUIDED_STEP_MODES = {"cpu": "split", "cuda": "batched"}

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


def is_finite_number(value: Any) -> bool:
    """A real number (Python's or numpy's, not a bool) that is finite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_guided_step(step_index: int, num_steps: int, start: float, end: float) -> bool:
    """Whether step `step_index` of `num_steps` lies in the guided fraction [start, end] of the schedule.

    The same rule as diffusers' `control_guidance_start` / `control_guidance_end`.
    """
    return not (step_index / num_steps < start or (step_index + 1) / num_steps > end)


def guided_step_indices(num_steps: int, start: float, end: float, interval: int = 1) -> list[int]:
    """The steps that take sketch guidance: every `interval`-th step of the guided fraction [start, end] (from its
    first step), and never none.

    When no step lies in the range (few steps: 3 steps at the default end 0.3), the first step at or after `start` is
    guided anyway: a user who passes a sketch means it to count, and models that sample in 1-4 steps (turbo, LCM) have
    no other way to follow one.
    """
    in_range = [i for i in range(num_steps) if is_guided_step(i, num_steps, start, end)]
    if not in_range:
        return [min(math.ceil(start * num_steps), num_steps - 1)]
    return in_range[::interval]


def sketch_guidance_step(
    latents: torch.Tensor, next_latents: torch.Tensor, gradient: torch.Tensor, scale: float
) -> torch.Tensor:
    """z_{t-1} <- z_{t-1} - alpha * g, with alpha = beta * ||z_t - z_{t-1}|| / ||g|| for each image.

    Scaling the gradient step to the size of the denoising step makes `scale` (beta) mean the same thing for every
    scheduler and step count. Norms are taken per image, never over the batch, in float32.
    """
    step_norm = (latents.float() - next_latents.float()).flatten(1).norm(dim=1)
    gradient = gradient.float()
    gradient_norm = gradient.flatten(1).norm(dim=1)
    # A zero gradient (an image whose guidance was skipped) takes no step, rather than 0 * inf.
    alpha = torch.where(gradient_norm > 0, scale * step_norm / gradient_norm, torch.zeros_like(gradient_norm))
    return (next_latents.float() - alpha.view(-1, 1, 1, 1) * gradient).to(next_latents.dtype)


@contextmanager
def frozen_parameters(*modules: torch.nn.Module) -> Iterator[None]:
    """Parameters that need no gradient inside the context, restored on exit.

    diffusers loads models with `requires_grad=True`. Autograd then keeps every layer's input for a weight gradient that
    the sketch gradient never uses: memory held until the backward.
    """
    parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


@contextmanager
def autograd_until(unet: torch.nn.Module, blocks: Sequence[str]) -> Iterator[None]:
    """Record the autograd graph of a UNet forward run inside the context only until the last of `blocks` has run.

    The sketch loss depends on the UNet through those blocks' outputs alone; the layers after them (on SD 1.5 with the
    sketch2img blocks, the last up block at full latent resolution and the output convolution) need no graph.
    """
    pending = set(resolve_blocks(unet, blocks).values())
    grad_enabled = torch.is_grad_enabled()

    def hook(module: torch.nn.Module, args, output) -> None:
        pending.discard(module)
        if not pending:
            # Once only: gradient checkpointing may run a block again during the backward.
            for handle in handles:
                handle.remove()
            torch.set_grad_enabled(False)

    handles = [module.register_forward_hook(hook) for module in pending]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        torch.set_grad_enabled(grad_enabled)


class SketchGuidedStableDiffusionPipeline(StableDiffusionPipeline):
    r"""
    Stable Diffusion text-to-image generation that follows a sketch ("Sketch-Guided Text-to-Image Diffusion Models",
    Voynov, Aberman, Cohen-Or, SIGGRAPH 2023). No weight of the diffusion model changes: a small Latent Guidance
    Predictor (LGP) reads the UNet's activations, predicts the edge map of the image being made, and the gradient of its
    error against the sketch steers the latents during the early steps.

    Everything of [`StableDiffusionPipeline`] works as usual; without a sketch the output is exactly its output.

    A guided step adds one backward through the UNet's branch that the LGP reads. For large images,
    `pipe.unet.enable_gradient_checkpointing()` cuts the memory that backward needs (it acts only where gradients flow,
    so only on guided steps) for a recomputation of that branch's forward; the results are the same.
    `pipe.guided_step_mode = "split"` or `"batched"` chooses how a guided step runs the two classifier-free guidance
    branches (the same images within float tolerance); by default, the faster one measured for the device.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder,
        requires_safety_checker: as for [`StableDiffusionPipeline`].
        lgp ([`LGPModel`], *optional*):
            The Latent Guidance Predictor trained for this `unet`. Needed only to generate with a sketch; it is
            checked against the UNet when set.
    """

    # The LGP runs at every guided step between UNet calls, so it stays out of the chain (as ControlNets do): in it, its
    # call would offload the UNet in the middle of a guided step. Offloading gives it a hook of its own.
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    # None: the measured default for the device (DEFAULT_GUIDED_STEP_MODES); or one of GUIDED_STEP_MODES.
    guided_step_mode: str | None = None
    _optional_components = [*StableDiffusionPipeline._optional_components, "lgp"]

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
        self.register_modules(lgp=lgp)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # Check when the LGP or the UNet is set, so that a mismatch names the block now, not in a matmul later.
        # (Read from __dict__: while a module is being registered, getattr would find it in the config instead.)
        lgp, unet = self.__dict__.get("lgp"), self.__dict__.get("unet")
        if name in ("lgp", "unet") and lgp is not None and unet is not None:
            lgp.check_unet(unet)

    def set_sketch_polarity(self, polarity: str) -> None:
        """Say how the LGP's training edge maps looked, `"light_on_dark"` or `"dark_on_light"`, where its recorded
        polarity is wrong or unsure (the converted sketch2img LGP: README, "Which way round"). Sketches of either look
        are still accepted; this sets what they are turned into. It is stored in the LGP's config, so
        `save_pretrained` keeps it."""
        if polarity not in SKETCH_POLARITIES:
            raise ValueError(f"`polarity` must be one of {SKETCH_POLARITIES}, got {polarity!r}.")
        if self.lgp is None:
            raise ValueError("This pipeline has no LGP whose sketch polarity could be set.")
        self.lgp.register_to_config(sketch_polarity=polarity)

    def check_sketch_inputs(
        self,
        sketch,
        sketch_guidance_scale: float,
        sketch_guidance_start: float,
        sketch_guidance_end: float,
        return_edge_maps: bool,
        num_images: int,
        batch_size: int,
        sketch_guidance_interval: int = 1,
    ) -> None:
        if not is_finite_number(sketch_guidance_scale) or not 0 <= sketch_guidance_scale <= MAX_SKETCH_GUIDANCE_SCALE:
            raise ValueError(
                f"`sketch_guidance_scale` must be a number from 0 (no guidance) to {MAX_SKETCH_GUIDANCE_SCALE}, got"
                f" {sketch_guidance_scale!r}. About 1 to 4 follows a sketch (default {DEFAULT_SKETCH_GUIDANCE_SCALE};"
                " the paper's samples use 1.6); far above that the images fall apart."
            )
        if not (
            is_finite_number(sketch_guidance_start)
            and is_finite_number(sketch_guidance_end)
            and 0.0 <= sketch_guidance_start < sketch_guidance_end <= 1.0
        ):
            raise ValueError(
                "The guided part of the schedule must satisfy 0 <= `sketch_guidance_start` < `sketch_guidance_end`"
                f" <= 1 (fractions of the steps), got start={sketch_guidance_start!r}, end={sketch_guidance_end!r}."
            )
        if self.guided_step_mode not in (None, *GUIDED_STEP_MODES):
            raise ValueError(
                f"`guided_step_mode` must be None (the device's default) or one of {GUIDED_STEP_MODES}, got"
                f" {self.guided_step_mode!r}."
            )
        interval = sketch_guidance_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"`sketch_guidance_interval` must be an integer >= 1, got {sketch_guidance_interval!r}.")
        if sketch is None:
            if return_edge_maps:
                raise ValueError("`return_edge_maps=True` needs a `sketch`: edge maps are predicted while guiding.")
            return
        if self.lgp is None:
            raise ValueError(
                "A `sketch` was given but this pipeline has no LGP. Load one with"
                " `pipe.lgp = LGPModel.from_pretrained(<LGP repo id or folder>)`, or pass `lgp=` to `from_pretrained`."
            )
        num_sketches = len(sketch_list(sketch))
        if num_sketches not in (1, batch_size, num_images):
            raise ValueError(
                f"Got {num_sketches} sketches for {batch_size} prompts and {num_images} images: pass one sketch for"
                " all, one per prompt, or one per image."
            )
        if not hasattr(self.scheduler, "alphas_cumprod") and not hasattr(self.scheduler, "sigmas"):
            raise ValueError(
                "Sketch guidance needs the noise level of each step for the LGP's input: a scheduler with a DDPM"
                f" noise schedule (`alphas_cumprod`) or noise levels (`sigmas`); {type(self.scheduler).__name__} has"
                " neither."
            )
        if self.lgp.config.feature_branch == "unconditional" and not self.do_classifier_free_guidance:
            raise ValueError(
                "This LGP reads the UNet's unconditional branch, which runs only with classifier-free guidance:"
                " use `guidance_scale` > 1."
            )
        if self._execution_device.type == "cpu" and self.unet.dtype == torch.float16:
            raise ValueError(
                "Sketch guidance back-propagates through the UNet, which is not supported in float16 on the CPU."
                " Use float32 or bfloat16 on the CPU, or float16 on a GPU."
            )

    def prepare_sketch_latents(
        self, sketch: SketchInput | list[SketchInput], num_images: int, height: int, width: int, device
    ) -> torch.Tensor:
        """The guidance target E(s): each sketch normalised to the LGP's convention and encoded by the VAE (its mean,
        or the latents of VAEs without a distribution, such as `AutoencoderTiny`)."""
        sketches = sketch_list(sketch)
        polarity = self.lgp.config.sketch_polarity
        images = torch.cat([prepare_sketch(s, height, width, polarity) for s in sketches])
        images = images.to(device=device, dtype=self.vae.dtype)
        latents = retrieve_latents(self.vae.encode(images), sample_mode="argmax") * self.vae.config.scaling_factor
        # One sketch for all images, or one per prompt (repeated for its images), or one per image.
        return latents.repeat_interleave(num_images // len(sketches), dim=0)

    def noise_level_alpha_bar(self, t: torch.Tensor, device) -> torch.Tensor:
        """alphabar of the current step, for the LGP's noise-level input: from the scheduler's DDPM schedule, or, for
        schedulers that have none (EDM), from its noise level sigma as 1 / (1 + sigma^2). Call it after the step's
        `scale_model_input`, which sets a sigma scheduler's step index."""
        if hasattr(self.scheduler, "alphas_cumprod"):
            return self.scheduler.alphas_cumprod[int(torch.as_tensor(t).round())].to(device)
        sigma = self.scheduler.sigmas[self.scheduler.step_index].to(device=device, dtype=torch.float32)
        return 1.0 / (1.0 + sigma**2)

    def predict_noise_epsilon(self, model_output: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor):
        """The UNet's estimate of epsilon, whatever it predicts (`prediction_type` of the scheduler)."""
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return model_output
        if prediction_type == "v_prediction":
            return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * sample
        if prediction_type == "sample":
            return (sample - alpha_bar.sqrt() * model_output) / (1 - alpha_bar).sqrt()
        raise ValueError(f"Sketch guidance does not support prediction_type={prediction_type!r}.")

    def noise_and_sketch_gradient(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        sketch_latents: torch.Tensor,
        unet_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """One guided step's model work: the UNet on each CFG branch, and the sketch loss's gradient g = dL/dz_t.

        The branch the LGP reads runs with autograd and gives both its noise prediction and (through the hooks) the
        LGP's features; the other branch runs without. So the gradient flows through one half only.

        Returns:
            (noise prediction of the conditional branch, of the unconditional branch or `None` without CFG, the
            gradient, the LGP's predicted edge latents)
        """
        if self.do_classifier_free_guidance:
            embeds = dict(zip(("unconditional", "conditional"), prompt_embeds.chunk(2), strict=True))
            kwargs = {
                name: {**unet_kwargs, "added_cond_kwargs": self._branch_added_cond(unet_kwargs, index)}
                for index, name in enumerate(("unconditional", "conditional"))
            }
        else:
            embeds = {"conditional": prompt_embeds}
            kwargs = {"conditional": unet_kwargs}
        read = self.lgp.config.feature_branch
        if self.do_classifier_free_guidance and self.resolve_guided_step_mode() == "batched":
            # Both branches in one batch with autograd; the gradient enters through the LGP's half only.
            branch = ("unconditional", "conditional").index(read)
            with torch.enable_grad():
                loss, leaf, prediction, edge_latents = self.sketch_loss(
                    latents, t, prompt_embeds, unet_kwargs, sketch_latents, branch=branch, num_branches=2
                )
                (gradient,) = torch.autograd.grad(loss, leaf)
            noise_pred_uncond, noise_pred_text = prediction.chunk(2)
            return noise_pred_text, noise_pred_uncond, self._finite_or_skipped(gradient, t), edge_latents.detach()

        with torch.enable_grad():
            loss, leaf, prediction, edge_latents = self.sketch_loss(
                latents, t, embeds[read], kwargs[read], sketch_latents
            )
            (gradient,) = torch.autograd.grad(loss, leaf)

        predictions = {read: prediction}
        model_input = self.scheduler.scale_model_input(latents, t)
        for name in embeds.keys() - {read}:
            predictions[name] = self.unet(model_input, t, encoder_hidden_states=embeds[name], **kwargs[name])[0]
        gradient = self._finite_or_skipped(gradient, t)
        return predictions["conditional"], predictions.get("unconditional"), gradient, edge_latents.detach()

    @staticmethod
    def _finite_or_skipped(gradient: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The gradient, with a zero (no guidance at this step) for each image whose gradient is not finite."""
        finite = torch.isfinite(gradient).flatten(1).all(dim=1)
        if not finite.all():
            logger.warning(
                f"The sketch gradient at timestep {int(t)} is not finite for {int((~finite).sum())} image(s), whose"
                " guidance is skipped at this step. In float16, bfloat16 often avoids this."
            )
            gradient = torch.where(finite.view(-1, 1, 1, 1), gradient, torch.zeros_like(gradient))
        return gradient

    def sketch_loss(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        unet_kwargs: dict[str, Any],
        sketch_latents: torch.Tensor,
        branch: int = 0,
        num_branches: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The UNet with autograd on the branch the LGP reads, and the sketch loss L = ||LGP(F(z_t)) - E(s)||^2.

        With `num_branches=2` the UNet runs on the whole classifier-free guidance batch (`encoder_hidden_states` and
        `unet_kwargs` stacked as in the unguided step) and the LGP reads the `branch`-th half, the only one the leaf
        enters. Autograd records nothing after the last block the LGP reads. Run it with gradients enabled; inside
        `frozen_parameters(self.unet, self.lgp)`, as in the denoising loop, it also keeps nothing for weight gradients.

        Returns:
            (L summed over the images, z_t as the leaf to differentiate L by, the UNet's noise prediction for all its
            branches (detached), the LGP's predicted edge latents)
        """
        leaf = latents.detach().requires_grad_(True)
        model_input = torch.cat([leaf if index == branch else latents.detach() for index in range(num_branches)])
        model_input = self.scheduler.scale_model_input(model_input, t)
        alpha_bar = self.noise_level_alpha_bar(t, latents.device)
        blocks, output_index = self.lgp.config.blocks, self.lgp.config.tuple_output_index
        with capture_activations(self.unet, blocks, output_index) as features, autograd_until(self.unet, blocks):
            prediction = self.unet(model_input, t, encoder_hidden_states=encoder_hidden_states, **unet_kwargs)[0]
        if num_branches > 1:
            features = {name: feature.chunk(num_branches)[branch] for name, feature in features.items()}
        branch_prediction = prediction.detach().chunk(num_branches)[branch].float()
        branch_input = model_input.detach().chunk(num_branches)[branch].float()
        # The noise level is conditioning for the LGP, not something to optimise: no gradient through it.
        epsilon = self.predict_noise_epsilon(branch_prediction, branch_input, alpha_bar)
        with self.lgp.smooth_relu_gradients():
            edge_latents = self.lgp(features, noise_level_map(epsilon, alpha_bar))
        # Summed per image, so each image's gradient is its own; the loss is in float32 whatever the UNet's dtype.
        loss = (edge_latents.float() - sketch_latents.float()).square().sum()
        return loss, leaf, prediction.detach(), edge_latents

    def resolve_guided_step_mode(self) -> str:
        """How this call's guided steps run the two classifier-free guidance branches: `guided_step_mode` if set,
        else the faster one measured for the execution device (`DEFAULT_GUIDED_STEP_MODES`)."""
        if self.guided_step_mode is not None:
            return self.guided_step_mode
        return DEFAULT_GUIDED_STEP_MODES.get(self._execution_device.type, "split")

    @staticmethod
    def _branch_added_cond(unet_kwargs: dict[str, Any], index: int) -> dict[str, Any] | None:
        # IP-Adapter image embeddings are stacked [negative, positive] like the prompt embeddings.
        added = unet_kwargs.get("added_cond_kwargs")
        if added is None:
            return None
        return {"image_embeds": [embeds.chunk(2)[index] for embeds in added["image_embeds"]]}

    def combine_noise_predictions(self, noise_pred_text: torch.Tensor, noise_pred_uncond: torch.Tensor | None):
        """Classifier-free guidance and its rescaling, exactly as in `StableDiffusionPipeline`."""
        if not self.do_classifier_free_guidance:
            return noise_pred_text
        noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
        if self.guidance_rescale > 0.0:
            noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale)
        return noise_pred

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
        sketch_guidance_scale: float = DEFAULT_SKETCH_GUIDANCE_SCALE,
        sketch_guidance_start: float = 0.0,
        sketch_guidance_end: float = DEFAULT_SKETCH_GUIDANCE_END,
        sketch_guidance_interval: int = 1,
        return_edge_maps: bool = False,
        **kwargs,
    ):
        r"""
        Generate images from a prompt, following a sketch.

        Every argument of [`StableDiffusionPipeline.__call__`] means the same here; see its documentation. The new ones:

        Args:
            sketch (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str` path, or a list of them, *optional*):
                The drawing to follow: any size (resized to `height` x `width`), dark strokes on light paper or light on
                dark, modes 1, L, RGB or RGBA (transparency is paper). One sketch for all images, one per prompt, or one
                per image. `None` generates exactly as `StableDiffusionPipeline` does.
            sketch_guidance_scale (`float`, *optional*, defaults to 2.5):
                beta of the paper: the size of each guidance step relative to the denoising step it follows. Higher
                follows the sketch more closely at some cost in realism (and, on the demo model, in prompt colour); 0
                turns guidance off. The paper's sample files use 1.6.
            sketch_guidance_start (`float`, *optional*, defaults to 0.0):
                Fraction of the steps after which guidance starts.
            sketch_guidance_end (`float`, *optional*, defaults to 0.3):
                Fraction of the steps after which guidance stops. Guiding late makes the strokes appear literally.
            sketch_guidance_interval (`int`, *optional*, defaults to 1):
                Guide every this many steps of the guided part (its first step, then every k-th): a faster
                approximation, since each guided step adds a backward through the UNet. 1 is the exact method. Each
                guidance step keeps its size (`sketch_guidance_scale`), so fewer guided steps steer less.
            return_edge_maps (`bool`, *optional*, defaults to `False`):
                Also return the LGP's predicted edge maps at the last guided step (`edge_maps` of the output; the last
                element of the tuple when `return_dict=False`).

        Examples:

        Returns:
            [`SketchGuidedStableDiffusionPipelineOutput`] or `tuple`: the images, the safety checker's verdicts and,
            with `return_edge_maps=True`, the predicted edge maps.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0] if prompt_embeds is not None else 1
        num_images = batch_size * num_images_per_prompt
        self._guidance_scale = guidance_scale
        self.check_sketch_inputs(
            sketch,
            sketch_guidance_scale,
            sketch_guidance_start,
            sketch_guidance_end,
            return_edge_maps,
            num_images,
            batch_size,
            sketch_guidance_interval,
        )

        if sketch is None or sketch_guidance_scale == 0:
            # Unguided: exactly StableDiffusionPipeline, at exactly its cost.
            output = super().__call__(
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                timesteps=timesteps,
                sigmas=sigmas,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt,
                eta=eta,
                generator=generator,
                latents=latents,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                ip_adapter_image=ip_adapter_image,
                ip_adapter_image_embeds=ip_adapter_image_embeds,
                output_type=output_type,
                return_dict=return_dict,
                cross_attention_kwargs=cross_attention_kwargs,
                guidance_rescale=guidance_rescale,
                clip_skip=clip_skip,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                **kwargs,
            )
            if not return_dict:
                return output
            return SketchGuidedStableDiffusionPipelineOutput(
                images=output.images, nsfw_content_detected=output.nsfw_content_detected
            )

        if kwargs:
            raise TypeError(
                f"Unexpected arguments {sorted(kwargs)}. The deprecated `callback` and `callback_steps` do not work"
                " with a sketch: use `callback_on_step_end`."
            )

        # 0. Default height and width to unet
        if not height or not width:
            sample_size = self.unet.config.sample_size
            height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        # BatchNorm must use its running statistics while sampling.
        self.lgp.eval()

        # 2. Encode the prompt, stacked [negative, positive] with classifier-free guidance as in StableDiffusionPipeline
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        added_cond_kwargs = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, num_images, self.do_classifier_free_guidance
            )
            added_cond_kwargs = {"image_embeds": image_embeds}

        # 3. Timesteps, latents, the sketch target
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        latents = self.prepare_latents(
            num_images,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(num_images)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)
        unet_kwargs = {
            "timestep_cond": timestep_cond,
            "cross_attention_kwargs": self.cross_attention_kwargs,
            "added_cond_kwargs": added_cond_kwargs,
            "return_dict": False,
        }
        # At the size of the latents, which may have come from the user with a size of their own.
        sketch_height, sketch_width = (size * self.vae_scale_factor for size in latents.shape[-2:])
        sketch_latents = self.prepare_sketch_latents(sketch, num_images, sketch_height, sketch_width, device)

        # 4. Denoising loop: guided steps add the sketch gradient step after the scheduler's step
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        edge_latents = None
        guided_steps = set(
            guided_step_indices(len(timesteps), sketch_guidance_start, sketch_guidance_end, sketch_guidance_interval)
        )
        # Frozen for the whole loop (toggling ~700 flags per step would cost milliseconds), so that gradient
        # checkpointing's recomputation in a backward sees the same flags as the forward did.
        with self.progress_bar(total=num_inference_steps) as progress_bar, frozen_parameters(self.unet, self.lgp):
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                guided = i in guided_steps
                if guided:
                    noise_pred_text, noise_pred_uncond, gradient, edge_latents = self.noise_and_sketch_gradient(
                        latents, t, prompt_embeds, sketch_latents, unet_kwargs
                    )
                else:
                    latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                    noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, **unet_kwargs)[0]
                    noise_pred_uncond, noise_pred_text = (
                        noise_pred.chunk(2) if self.do_classifier_free_guidance else (None, noise_pred)
                    )
                noise_pred = self.combine_noise_predictions(noise_pred_text, noise_pred_uncond)

                previous_latents = latents
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if guided:
                    latents = sketch_guidance_step(previous_latents, latents, gradient, float(sketch_guidance_scale))

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 5. Decode
        edge_maps = None
        if output_type == "latent":
            image, has_nsfw_concept = latents, None
            edge_maps = edge_latents if return_edge_maps else None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
            if return_edge_maps and edge_latents is not None:
                edge_maps = self.vae.decode(
                    edge_latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False
                )[0]
                edge_maps = self.image_processor.postprocess(edge_maps, output_type=output_type)
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not x for x in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept, edge_maps) if return_edge_maps else (image, has_nsfw_concept)
        return SketchGuidedStableDiffusionPipelineOutput(
            images=image, nsfw_content_detected=has_nsfw_concept, edge_maps=edge_maps
        )
