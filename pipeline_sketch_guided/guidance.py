"""Sketch guidance, shared by every sketch-guided pipeline (Stable Diffusion 1.x/2.x, SDXL, SD3 and FLUX).

A pipeline mixes in `SketchGuidanceMixin` and runs its parent's own `__call__` inside `self.sketch_guidance(...)`. For
that call the denoiser's forward (the UNet's, or the transformer's) and the scheduler's step are wrapped
(`GuidedCall`), so that each guided step of the parent's denoising loop does what DESIGN.md's method says, and nothing
else in the loop changes:

1. the denoiser runs on the branch the LGP reads with autograd (through the capture hooks the same forward gives the
   LGP's features), `sketch_loss` compares the LGP's prediction with the sketch's target, and g = dL/dz_t;
2. the loop combines the predictions (classifier-free guidance) and the scheduler steps from z_t to z_{t-1};
3. z_{t-1} <- z_{t-1} - alpha * g, with alpha = beta * ||z_t - z_{t-1}|| / ||g|| (`sketch_guidance_step`).

The guided step reads top to bottom in `GuidedCall.denoiser_forward`, `SketchGuidanceMixin.sketch_loss` and
`GuidedCall.scheduler_step`. What differs between the UNet and the transformer pipelines (the argument names, FLUX's
packed latents, the flow-matching schedule) is in the mixin's "denoiser" methods, which a pipeline overrides.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .capture import capture_activations, resolve_blocks
from .fill import fill_sketch
from .lgp import noise_level_map
from .sketch import SKETCH_POLARITIES, SketchInput, prepare_map, prepare_sketch_mask, sketch_list

logger = logging.get_logger(__name__)

# Chosen by `python -m benchmarks.efficacy --max_end 0.3` on the demo model (docs/demo_model.md): the highest
# sketch agreement whose prompt colour agreement stays within 5 points of unguided, among settings that guide at most
# 30% of the steps. That cost limit keeps a whole SD1.5 generation on a CPU within 1.25x of an unguided one
# (docs/cost.md). The paper's sample files use beta = 1.6, and the community guides the first half of the steps; sweep
# your own base model and LGP with the same benchmark. With the map-target LGP shipped since, the rule picks beta 4
# (IoU 0.760 against 0.746); 2.5 stays, since beta 4 drew one shape in 77-81% of the other sets' images
# (docs/fidelity.md).
DEFAULT_SKETCH_GUIDANCE_SCALE = 2.5
DEFAULT_SKETCH_GUIDANCE_END = 0.3
# The weight of fill guidance's loss against the sketch's (`sketch_fill_scale`), chosen on the demo model by
# `python -m benchmarks.efficacy --fill_lgp FOLDER --sketch_fill_scale S` over four seeds: of 0.0625, 0.125, 0.25 and
# 0.5, 0.125 followed every set at least as closely as the others (docs/fidelity.md, "Fill guidance"). The losses are
# sums over each LGP's map, so a pair with other targets or sizes weighs them otherwise: sweep it for your own pair.
DEFAULT_SKETCH_FILL_SCALE = 0.125
# Far above the useful range (about 1 to 4) a guidance step outweighs the denoising step many times over and the image
# turns to noise or black: a larger scale is a mistake, refused with the sensible range.
MAX_SKETCH_GUIDANCE_SCALE = 50.0

# How a guided step runs the classifier-free guidance branches. "split": the LGP's branch with autograd, the other
# without (the backward goes through one half only). "batched": one UNet call on the batch of 2 with autograd, as the
# unguided step runs it (the backward goes through both halves, but one batched forward replaces two). Which is faster
# depends on the device, measured by `benchmarks/gpu_check.py` and `benchmarks/guided_sampling.py` (docs/cost.md): on
# an H100 (SD1.5 architecture, 512x512, float16) a batched guided step takes 0.68x the split one's time, a whole
# generation guided at the defaults 0.87x; on a 2-core CPU (SD1.5 architecture, 256x256, float32) the batched step
# takes 1.45x the split one's time, since there a batch of 2 costs nearly two batches of 1.
GUIDED_STEP_MODES = ("split", "batched")
DEFAULT_GUIDED_STEP_MODES = {"cpu": "split", "cuda": "batched"}

# With `sketch_guidance_interval` k > 1, the steps in this first fraction of the schedule still compute their own
# gradient, and every k-th step after them does. There the latents change most from step to step, so a gradient from
# the step before points elsewhere: on demo model v2, guiding half of 30 steps with every 2nd gradient computed from the
# first step followed the sketch with IoU 0.653; with the first 3 steps (10%) computed and every 2nd after them, 0.719,
# as much as computing every gradient (0.712), for 9 backward passes instead of 15 (docs/cost.md).
EVERY_STEP_FRACTION = 0.1
# With `sketch_guidance_recurrence` N > 1, the guided steps in this first fraction of the schedule (3 of 30 steps) are
# each run N times: there the layout forms, and there a repeat moved the demo model's images most toward the sketch
# (docs/fidelity.md, "Guidance dynamics").
RECURRENCE_FRACTION = 0.1

# diffusers' memory savers whose hooks swap each layer's weights in place after its forward (`param.data = ...`): to
# float8 storage (layerwise casting) or to the offload device (group offloading). Autograd keeps the parameter, not a
# copy, so the backward of a guided step finds the swapped weights: "expected scalar type BFloat16 but found
# Float8_e4m3fn". Refused before any work. (`enable_model_cpu_offload` and accelerate's sequential offload replace
# parameters instead of mutating them, and guide as usual.)
BACKWARD_UNSAFE_HOOKS = {
    "layerwise_casting": "layerwise casting (`enable_layerwise_casting`)",
    "group_offloading": "group offloading (`enable_group_offload`)",
}


def is_finite_number(value: Any) -> bool:
    """A real number (Python's or numpy's, not a bool) that is finite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_guided_step(step_index: int, num_steps: int, start: float, end: float) -> bool:
    """Whether step `step_index` of `num_steps` lies in the guided fraction [start, end] of the schedule.

    The same rule as diffusers' `control_guidance_start` / `control_guidance_end`.
    """
    return not (step_index / num_steps < start or (step_index + 1) / num_steps > end)


def guided_step_indices(num_steps: int, start: float, end: float, interval: int = 1) -> list[int]:
    """The steps that compute a sketch gradient: every step of the guided fraction [start, end] (`interval` 1, the
    exact method), or with `interval` k every step of it in the first `EVERY_STEP_FRACTION` of the schedule and then
    every k-th; never none.

    When no step lies in the range (few steps: 3 steps at the default end 0.3), the first step at or after `start` is
    guided anyway: a user who passes a sketch means it to count, and models that sample in 1-4 steps (turbo, LCM) have
    no other way to follow one.
    """
    in_range = [i for i in range(num_steps) if is_guided_step(i, num_steps, start, end)]
    if not in_range:
        return [min(math.ceil(start * num_steps), num_steps - 1)]
    leading = [i for i in in_range if i / num_steps < EVERY_STEP_FRACTION]
    if interval == 1 or not leading:
        return in_range[::interval]
    # Every k-th step onwards from the last leading one.
    return leading + in_range[len(leading) - 1 + interval :: interval]


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
    return (next_latents.float() - alpha.view(-1, *[1] * (gradient.ndim - 1)) * gradient).to(next_latents.dtype)


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


def with_signature_of(original: Callable[..., Any], replacement: Callable[..., Any]) -> Callable[..., Any]:
    """`replacement`, as a function that `inspect.signature` and the loop's checks read as `original`."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return replacement(*args, **kwargs)

    return wrapper


def branch_inputs(value: Any, index: int, num_branches: int, batch: int) -> Any:
    """The `index`-th classifier-free guidance branch of a UNet argument stacked like the loop's CFG batch: every
    tensor whose first dimension is the whole batch (`batch` = num_branches x images) is split, recursively through
    dicts, lists and tuples (SDXL's `text_embeds` and `time_ids`, IP-Adapter's `image_embeds`, ControlNet residuals);
    anything else is shared by the branches."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.chunk(num_branches)[index]
    if isinstance(value, dict):
        return {key: branch_inputs(item, index, num_branches, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(branch_inputs(item, index, num_branches, batch) for item in value)
    return value


def backward_unsafe_memory_saver(model: torch.nn.Module) -> str | None:
    """The first of `BACKWARD_UNSAFE_HOOKS` enabled on `model` (a UNet), named for a message, or `None`."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook, name in BACKWARD_UNSAFE_HOOKS.items():
            if registry.get_hook(hook) is not None:
                return name
    return None


def _finite_or_skipped(gradient: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The gradient, with a zero (no guidance at this step) for each image whose gradient is not finite."""
    finite = torch.isfinite(gradient).flatten(1).all(dim=1)
    if not finite.all():
        logger.warning(
            f"The sketch gradient at timestep {float(torch.as_tensor(t).flatten()[0]):g} is not finite for"
            f" {int((~finite).sum())} image(s), whose"
            " guidance is skipped at this step. In float16, bfloat16 often avoids this."
        )
        gradient = torch.where(finite.view(-1, *[1] * (gradient.ndim - 1)), gradient, torch.zeros_like(gradient))
    return gradient


@dataclass
class FillGuidance:
    """Fill guidance for one call: a second LGP, trained on filled silhouettes (`map_kind="silhouette"`), reads the
    same denoiser pass as the edge LGP, and its squared error against `latents` (the filled sketch's target, one per
    image) enters the sketch loss with the weight `scale`: L = L_sketch + scale * L_fill. It tells the image which
    side of each line is the shape (docs/guidance.md, "Fill guidance")."""

    lgp: torch.nn.Module
    latents: torch.Tensor
    scale: float


class GuidedCall:
    """One pipeline call's sketch guidance, run inside the pipeline's own denoising loop.

    `denoiser_forward` stands in for the denoiser's forward (the UNet's or the transformer's): at the first call of a
    guided step it runs `SketchGuidanceMixin.noise_and_sketch_gradient` (the prediction the loop asked for, and the
    gradient g); every other call runs the denoiser as it is (the second call of a step where the loop makes two: FLUX's
    negative prompt with `true_cfg_scale`, SD3's skip-layer guidance). `scheduler_step` stands in for the scheduler's
    step and, after a guided step, moves z_{t-1} down g; every diffusers loop steps the scheduler once per step, so its
    calls count the steps.
    """

    def __init__(
        self,
        pipe: SketchGuidanceMixin,
        sketch_latents: torch.Tensor,
        sketch_mask: torch.Tensor | None,
        scale: float,
        start: float,
        end: float,
        interval: int,
        denoiser_forward: Callable[..., Any],
        scheduler_step: Callable[..., Any],
        recurrence: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        fill: FillGuidance | None = None,
    ):
        self.pipe, self.sketch_latents, self.sketch_mask, self.fill = pipe, sketch_latents, sketch_mask, fill
        self.scale, self.start, self.end, self.interval = scale, start, end, interval
        self.recurrence, self.generator = recurrence, generator
        self.original_forward, self.original_scheduler_step = denoiser_forward, scheduler_step
        self.step_index = 0
        self.step_started = False  # whether the denoiser has run in the current step
        self.guided_steps: set[int] | None = None
        self.reused_steps: set[int] = set()  # steps between guided ones that reuse the last gradient
        self.gradient: torch.Tensor | None = None
        self.last_gradient: torch.Tensor | None = None
        self.edge_latents: torch.Tensor | None = None
        # The guided call of this step: (step index, model input, timestep, encoder_hidden_states, other kwargs)
        self.step_call: tuple | None = None

    def denoiser_forward(self, *args, **kwargs):
        if self.guided_steps is None:  # the loop's length is known once it runs (SDXL's denoising_end shortens it)
            num_steps = self.pipe.num_timesteps
            self.guided_steps = set(guided_step_indices(num_steps, self.start, self.end, self.interval))
            if self.pipe.sketch_gradient_reuse:
                in_range = guided_step_indices(num_steps, self.start, self.end, 1)
                self.reused_steps = {i for i in in_range if i > min(self.guided_steps)} - self.guided_steps
        first_call, self.step_started = not self.step_started, True
        if not first_call or self.step_index not in self.guided_steps:
            if first_call and self.step_index in self.reused_steps and self.last_gradient is not None:
                self.gradient = self.last_gradient  # applied by scheduler_step, scaled to this step's size
            return self.original_forward(*args, **kwargs)

        return_dict = kwargs.pop("return_dict", True)
        sample, timestep, encoder_hidden_states, kwargs = self.pipe.denoiser_call_arguments(args, kwargs)
        kwargs["return_dict"] = False
        self.step_call = (self.step_index, sample, timestep, encoder_hidden_states, kwargs)
        prediction, self.last_gradient, self.edge_latents = self.pipe.noise_and_sketch_gradient(
            sample,
            timestep,
            encoder_hidden_states,
            kwargs,
            self.sketch_latents,
            self.sketch_mask,
            forward=self.original_forward,
            fill=self.fill,
        )
        self.gradient = self.last_gradient
        return self.pipe.denoiser_output(prediction, return_dict)

    def scheduler_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, **kwargs):
        self.step_index, self.step_started = self.step_index + 1, False
        recurs = (
            self.recurrence > 1
            and self.step_call is not None
            and self.step_call[0] / self.pipe.num_timesteps < RECURRENCE_FRACTION
        )
        state = self._scheduler_state() if recurs else None
        output = self.original_scheduler_step(model_output, timestep, sample, *args, **kwargs)
        if self.gradient is None:
            self.step_call = None
            return output
        gradient, self.gradient = self.gradient, None
        next_latents = output[0] if isinstance(output, tuple) else output.prev_sample
        guided = sketch_guidance_step(sample, next_latents, gradient, self.scale)
        if recurs:
            guided = self.recur(guided, timestep, state, self.recurrence - 1, args, kwargs)
        self.step_call = None
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.prev_sample = guided
        return output

    def _scheduler_state(self) -> dict[str, Any]:
        return copy.deepcopy({k: v for k, v in self.pipe.scheduler.__dict__.items() if k != "step"})

    def recur(
        self, latents: torch.Tensor, timestep, state: dict[str, Any], times: int, step_args: tuple, step_kwargs: dict
    ) -> torch.Tensor:
        """Recurrence (Bansal et al., "Universal Guidance for Diffusion Models", 2023): `times` more times, take the
        guided z_{t-1} back to the noise level of t with fresh noise (the call's `generator`), and run the guided step
        again from there: the denoiser with its sketch gradient, the branches combined, the scheduler's step (from its
        state before the first pass), the guidance step. The repeats combine the branches with the standard
        classifier-free guidance formula (and `guidance_rescale`); FLUX's `true_cfg_scale` and SD3's skip-layer
        guidance act on the first pass only."""
        scheduler, pipe = self.pipe.scheduler, self.pipe
        step_index, model_input, denoiser_timestep, states, denoiser_kwargs = self.step_call
        num_branches = model_input.shape[0] // latents.shape[0]
        # An inpainting UNet's mask and masked-image channels, read after the latents, go into each repeat unchanged.
        channels = pipe.latents_part(model_input).shape[1]
        extra = model_input[:, channels:] if model_input.shape[1] > channels else None
        keep, fresh = self.renoise_coefficients(timestep, state)
        for _ in range(times):
            noise = randn_tensor(latents.shape, generator=self.generator, device=latents.device, dtype=torch.float32)
            sample = (keep * latents.float() + fresh * noise).to(latents.dtype)
            scheduler.__dict__.update(copy.deepcopy(state))
            repeated = torch.cat([sample] * num_branches)
            if hasattr(scheduler, "scale_model_input"):
                repeated = scheduler.scale_model_input(repeated, timestep)
            if extra is not None:
                repeated = torch.cat([repeated, extra], dim=1)
            prediction, gradient, self.edge_latents = pipe.noise_and_sketch_gradient(
                repeated,
                denoiser_timestep,
                states,
                denoiser_kwargs,
                self.sketch_latents,
                self.sketch_mask,
                forward=self.original_forward,
                fill=self.fill,
            )
            if num_branches > 1:
                unconditional, text = prediction.chunk(2)
                prediction = unconditional + pipe.guidance_scale * (text - unconditional)
                if getattr(pipe, "guidance_rescale", 0.0) > 0:
                    prediction = rescale_noise_cfg(prediction, text, guidance_rescale=pipe.guidance_rescale)
            output = self.original_scheduler_step(prediction, timestep, sample, *step_args, **step_kwargs)
            next_latents = output[0] if isinstance(output, tuple) else output.prev_sample
            latents = sketch_guidance_step(sample, next_latents, gradient, self.scale)
        return latents

    def renoise_coefficients(self, timestep, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with z_t = a z_{t-1} + b epsilon taking latents at the next step's noise level back to this step's,
        as the forward process would: on a flow, x_t = (1 - s) x_0 + s e; for schedulers that scale their input by
        sigma (Euler, Heun, LMS, EDM: x_t = x_0 + s e); otherwise on the DDPM schedule (DDIM, DPM-Solver, UniPC)."""
        scheduler = self.pipe.scheduler
        index = state.get("_step_index")
        if index is None:
            index = state.get("_begin_index") or 0
        sigmas = getattr(scheduler, "sigmas", None)
        flow = self.pipe.is_flow_matching()
        if flow or (sigmas is not None and float(scheduler.init_noise_sigma) > 1):
            now, after = (float(sigmas[index]), float(sigmas[index + 1]) if index + 1 < len(sigmas) else 0.0)
            if flow:
                ratio = (1 - now) / (1 - after)
                return torch.tensor(ratio), torch.tensor(max(now**2 - (ratio * after) ** 2, 0.0) ** 0.5)
            return torch.tensor(1.0), torch.tensor(max(now**2 - after**2, 0.0) ** 0.5)
        alphas = scheduler.alphas_cumprod
        timesteps = scheduler.timesteps
        matches = (timesteps == timestep).nonzero()
        position = int(matches[0]) if len(matches) else self.step_call[0]
        alpha_now = alphas[int(timestep)]
        final = getattr(scheduler, "final_alpha_cumprod", alphas[0])
        alpha_next = alphas[int(timesteps[position + 1])] if position + 1 < len(timesteps) else final
        ratio = (alpha_now / alpha_next).float()
        return ratio.sqrt(), (1 - ratio).clamp_min(0).sqrt()


class SketchGuidanceMixin:
    """What every sketch-guided pipeline adds to its diffusers parent: an `lgp` component, the sketch arguments'
    checks and preparation, and the guided step. Mix it in before the parent (`class P(SketchGuidanceMixin,
    StableDiffusionPipeline)`)."""

    # None: the measured default for the device (DEFAULT_GUIDED_STEP_MODES); or one of GUIDED_STEP_MODES.
    guided_step_mode: str | None = None
    # With `sketch_guidance_interval` > 1, the steps of the guided range between two computed gradients take a guidance
    # step along the last one (sized by their own denoising step) instead of none. On demo model v2, guiding half of 30
    # steps with `sketch_guidance_interval=2`: IoU 0.719 with reuse, 0.669 without, 0.712 with every gradient computed
    # (docs/cost.md). False gives the plain interval mode.
    sketch_gradient_reuse: bool = True
    # Encoded sketches kept for the next calls (trying seeds or prompts with one sketch pays its VAE encode once: 2-3 s
    # at 256x256 on a CPU); 0 keeps none. Each is one latent image (64 KiB at 512x512 in float32).
    sketch_cache_size: int = 16

    def __setattr__(self, name: str, value: Any) -> None:
        # Check when the LGP or the denoiser is set, before it is, so that a mismatch names the block now (not in a
        # matmul later) and leaves the pipeline as it was. (Read from __dict__: while a module is being registered,
        # getattr would find it in the config instead.)
        if name in ("lgp", "fill_lgp", self.denoiser_name):
            denoiser = value if name == self.denoiser_name else self.__dict__.get(self.denoiser_name)
            for lgp_name in ("lgp", "fill_lgp") if name == self.denoiser_name else (name,):
                lgp = value if name == lgp_name else self.__dict__.get(lgp_name)
                if isinstance(lgp, torch.nn.Module) and isinstance(denoiser, torch.nn.Module):
                    lgp.check_unet(denoiser)
            if name == "fill_lgp" and isinstance(value, torch.nn.Module) and value.config.map_kind != "silhouette":
                raise ValueError(
                    "`fill_lgp` must be an LGP trained on filled silhouettes (`map_kind='silhouette'`, as"
                    " `sketch-guided train train_lgp --map_kind silhouette` trains one); this one reads"
                    f" {value.config.map_kind} maps. Set it as `pipe.lgp` to guide with those maps instead."
                )
        super().__setattr__(name, value)
        if name == "vae":  # encoded sketches belong to the VAE that encoded them
            self.__dict__.pop("_sketch_cache", None)
        config = self.__dict__.get("_internal_dict") or {}
        if name in ("lgp", "fill_lgp") and name in config and (value is None) != (config[name][0] is None):
            # diffusers' own `__setattr__` keeps a component that was None as `[null, null]` in the config, so that
            # `save_pretrained` would leave out an LGP set as `pipe.lgp = ...`: register it (which sets it again).
            self.register_modules(**{name: value})

    # -----------------------------------------------------------------------------------------------------------------
    # The denoiser: what the UNet pipelines and the transformer pipelines call differently

    # The component that predicts the noise (or the velocity), and the name of its forward's first argument.
    denoiser_name: str = "unet"
    denoiser_sample_argument: str = "sample"

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet, or the transformer of a transformer pipeline."""
        return getattr(self, self.denoiser_name)

    def denoiser_call_arguments(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any, Any, dict[str, Any]]:
        """(sample, timestep, encoder_hidden_states, the other keyword arguments) of a call the loop made."""
        names = (self.denoiser_sample_argument, "timestep", "encoder_hidden_states")
        kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
        return kwargs.pop(names[0]), kwargs.pop("timestep"), kwargs.pop("encoder_hidden_states", None), kwargs

    def call_denoiser(self, forward: Callable[..., Any], sample, timestep, encoder_hidden_states, kwargs) -> Any:
        """`forward` (the denoiser's) on the arguments `denoiser_call_arguments` took apart."""
        arguments = {self.denoiser_sample_argument: sample, "timestep": timestep}
        return forward(**arguments, encoder_hidden_states=encoder_hidden_states, **kwargs)

    def denoiser_output(self, prediction: torch.Tensor, return_dict: bool) -> Any:
        """The prediction as the denoiser returns it."""
        if return_dict:
            return (UNet2DConditionOutput if self.denoiser_name == "unet" else Transformer2DModelOutput)(prediction)
        return (prediction,)

    @property
    def denoiser_branches(self) -> int:
        """How many classifier-free guidance branches one denoiser call of the loop stacks in its batch."""
        return 2 if self.do_classifier_free_guidance else 1

    def latents_part(self, model_input: torch.Tensor) -> torch.Tensor:
        """The latents in the denoiser's input: all of it, but the first channels of an inpainting UNet's, which reads
        the mask and the masked image's latents after them."""
        channels = self.lgp.config.latent_channels
        if model_input.ndim == 4 and model_input.shape[1] > channels:
            return model_input[:, :channels]
        return model_input

    def latents_to_spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as `(B, C, h, w)` maps (FLUX's packed latents are unpacked); the LGP's noise level input."""
        return latents

    def is_flow_matching(self) -> bool:
        """Whether the scheduler samples a flow x_t = (1 - sigma) x_0 + sigma epsilon, the model predicting the
        velocity epsilon - x_0 (SD3, FLUX)."""
        config = self.scheduler.config
        return getattr(config, "prediction_type", None) == "flow_prediction" or (
            "FlowMatch" in type(self.scheduler).__name__
        )

    def set_sketch_polarity(self, polarity: str) -> None:
        """Say how the LGP's training edge maps looked, `"light_on_dark"` or `"dark_on_light"`, where its recorded
        polarity is wrong or unsure (the converted sketch2img LGP: docs/polarity.md). Sketches of either look
        are still accepted; this sets what they are turned into. It is stored in the LGP's config, so
        `save_pretrained` keeps it."""
        if polarity not in SKETCH_POLARITIES:
            raise ValueError(f"`polarity` must be one of {SKETCH_POLARITIES}, got {polarity!r}.")
        if self.lgp is None:
            raise ValueError("This pipeline has no LGP whose sketch polarity could be set.")
        self.lgp.register_to_config(sketch_polarity=polarity)

    # -----------------------------------------------------------------------------------------------------------------
    # Checking and preparing the sketch arguments

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
        sketch_mask=None,
        sketch_guidance_recurrence: int = 1,
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
        for name, value in (
            ("sketch_guidance_interval", sketch_guidance_interval),
            ("sketch_guidance_recurrence", sketch_guidance_recurrence),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if sketch is None:
            if return_edge_maps:
                raise ValueError("`return_edge_maps=True` needs a `sketch`: edge maps are predicted while guiding.")
            if sketch_mask is not None:
                raise ValueError("`sketch_mask` needs a `sketch`: it says where the sketch applies.")
            return
        if self.lgp is None:
            raise ValueError(
                "A `sketch` was given but this pipeline has no LGP. Load one with"
                " `pipe.lgp = LGPModel.from_pretrained(<LGP repo id or folder>)`, or pass `lgp=` to `from_pretrained`."
            )
        for name, value in (("sketches", sketch), ("sketch masks", sketch_mask)):
            count = len(sketch_list(value)) if value is not None else 1
            if count not in (1, batch_size, num_images):
                raise ValueError(
                    f"Got {count} {name} for {batch_size} prompts and {num_images} images: pass one for all, one per"
                    " prompt, or one per image."
                )
        if not hasattr(self.scheduler, "alphas_cumprod") and not hasattr(self.scheduler, "sigmas"):
            raise ValueError(
                "Sketch guidance needs the noise level of each step for the LGP's input: a scheduler with a DDPM"
                f" noise schedule (`alphas_cumprod`) or noise levels (`sigmas`); {type(self.scheduler).__name__} has"
                " neither."
            )
        if self.lgp.config.feature_branch == "unconditional" and self.denoiser_branches == 1:
            raise ValueError(
                "This LGP reads the unconditional branch, which runs in this pipeline's batch only with"
                " classifier-free guidance: use `guidance_scale` > 1 (FLUX has no such branch: use an LGP trained on"
                " the conditional one)."
            )
        name = "UNet" if self.denoiser_name == "unet" else "transformer"
        unsafe = backward_unsafe_memory_saver(self.denoiser)
        if unsafe is not None:
            raise ValueError(
                f"Sketch guidance back-propagates through the {name}, and {unsafe} puts other weights in place of the"
                f" ones the backward needs. Load the {name} without it to guide with a sketch"
                " (enable_model_cpu_offload() saves memory and works with guidance), or pass no sketch."
            )
        if self._execution_device.type == "cpu" and self.denoiser.dtype == torch.float16:
            raise ValueError(
                f"Sketch guidance back-propagates through the {name}, which is not supported in float16 on the CPU."
                " Use float32 or bfloat16 on the CPU, or float16 on a GPU."
            )

    @property
    def fills_by_default(self) -> bool:
        """Whether a sketch is guided with its own fill when `sketch_fill` is left out: the pipeline has a `fill_lgp`
        and its `lgp` reads sketches (edge maps). Another map (a silhouette, a depth map) has no outline to fill."""
        return getattr(self, "fill_lgp", None) is not None and self.lgp.config.map_kind == "edges"

    def check_fill_inputs(self, sketch, sketch_fill, sketch_fill_scale: float, num_images: int, batch_size: int):
        """Check fill guidance's arguments (after `check_sketch_inputs`); return whether this call guides with a fill:
        with an explicit `sketch_fill`, or by default (`None`) when the pipeline has a `fill_lgp` and its `lgp` reads
        sketches (edge maps)."""
        if not is_finite_number(sketch_fill_scale) or not 0 <= sketch_fill_scale <= MAX_SKETCH_GUIDANCE_SCALE:
            raise ValueError(
                f"`sketch_fill_scale` must be a number from 0 (no fill guidance) to {MAX_SKETCH_GUIDANCE_SCALE}, got"
                f" {sketch_fill_scale!r} (default {DEFAULT_SKETCH_FILL_SCALE})."
            )
        fill_lgp = getattr(self, "fill_lgp", None)
        if sketch_fill is None:
            if sketch is None or not self.fills_by_default:
                return False
        else:
            if sketch is not None and self.lgp.config.map_kind != "edges":
                raise ValueError(
                    f"`sketch_fill` fills a sketch's outlines, and this LGP reads {self.lgp.config.map_kind} maps, not"
                    " sketches: leave `sketch_fill` out."
                )
            if sketch is None:
                raise ValueError(
                    "`sketch_fill` needs a `sketch`: the fill says which side of the sketch's lines is the shape. To"
                    " guide with a silhouette alone, set a silhouette LGP as `pipe.lgp` and pass it as `sketch`."
                )
            if fill_lgp is None:
                raise ValueError(
                    "`sketch_fill` needs a fill LGP (one trained on filled silhouettes for this base model), and this"
                    " pipeline has none: set `pipe.fill_lgp = LGPModel.from_pretrained(<its repo id or folder>)`."
                )
            if not (isinstance(sketch_fill, str) and sketch_fill == "auto"):
                count = len(sketch_list(sketch_fill))
                if count not in (1, batch_size, num_images):
                    raise ValueError(
                        f"Got {count} fills for {batch_size} prompts and {num_images} images: pass one for all, one"
                        ' per prompt, or one per image (or "auto", each sketch\'s own).'
                    )
        if sketch_fill_scale == 0:
            return False
        for key in ("feature_branch", "tuple_output_index"):
            if getattr(fill_lgp.config, key) != getattr(self.lgp.config, key):
                raise ValueError(
                    f"The fill LGP's `{key}` is {getattr(fill_lgp.config, key)!r} and the LGP's"
                    f" {getattr(self.lgp.config, key)!r}; both read the same denoiser pass, so they must read it the"
                    " same way (the same branch). Use a fill LGP trained like the LGP, or `sketch_fill_scale=0` to"
                    " guide without it."
                )
        return True

    def sketch_size(self, height: int | None, width: int | None, latents: torch.Tensor | None) -> tuple[int, int]:
        """The size of the images this call makes, as the parent pipeline will choose it: the latents' size when they
        are given, else `height` x `width`, else the UNet's sample size."""
        if latents is not None:
            return tuple(size * self.vae_scale_factor for size in latents.shape[-2:])
        sample_size = getattr(self, "default_sample_size", None) or self.denoiser.config.sample_size
        default = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        return (height or default[0] * self.vae_scale_factor, width or default[1] * self.vae_scale_factor)

    def prepare_sketch_latents(
        self,
        sketch: SketchInput | list[SketchInput],
        num_images: int,
        height: int,
        width: int,
        device,
        invert_map: bool = False,
    ) -> torch.Tensor:
        """The guidance target E(s): each sketch (or other map) prepared as the LGP's config says (`map_kind`: an edge
        map's or silhouette's polarity, a depth map's normalisation, a colour map's channels, see `prepare_map`) and
        encoded by the VAE (its mean, or the latents of VAEs without a distribution, such as `AutoencoderTiny`); an
        LGP with `target="map"` is given the prepared map itself at its output resolution."""
        sketches = sketch_list(sketch)
        config = self.lgp.config
        options = (config.map_kind, config.sketch_polarity, config.map_normalization, invert_map)
        maps = [prepare_map(s, height, width, *options) for s in sketches]
        # One sketch for all images, or one per prompt (repeated for its images), or one per image.
        return self._map_targets(self.lgp, maps, height, width, device).repeat_interleave(
            num_images // len(sketches), dim=0
        )

    def prepare_fill_latents(
        self, sketch, sketch_fill, num_images: int, height: int, width: int, device
    ) -> torch.Tensor:
        """The fill LGP's target: each fill (`"auto"`: each sketch's own, `fill_sketch`) as a silhouette map, light on
        dark, encoded as the fill LGP's config says (as `prepare_sketch_latents` does for the LGP)."""
        config = self.fill_lgp.config
        if isinstance(sketch_fill, str) and sketch_fill == "auto":
            fills = [fill_sketch(s, height, width) for s in sketch_list(sketch)]
            # Built as they are: `prepare_map` would tell the paper by the border's tone, which a fill that covers
            # most of the frame's edge would turn round.
            maps = [
                torch.from_numpy(np.asarray(f, dtype=np.float32) / 127.5 - 1.0).expand(1, 3, height, width).contiguous()
                for f in fills
            ]
        else:
            fills = sketch_list(sketch_fill)
            maps = [prepare_map(f, height, width, "silhouette", config.sketch_polarity) for f in fills]
        return self._map_targets(self.fill_lgp, maps, height, width, device).repeat_interleave(
            num_images // len(fills), dim=0
        )

    def _map_targets(self, lgp, maps: list[torch.Tensor], height: int, width: int, device) -> torch.Tensor:
        """`lgp`'s targets for prepared maps: the maps at its output resolution (`target="map"`), else their VAE
        latents."""
        if lgp.config.target == "map":
            latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
            return lgp.target_from_map(torch.cat(maps), latent_size).to(device)
        return torch.cat([self._encoded_sketch(image, device) for image in maps])

    def _encoded_sketch(self, image: torch.Tensor, device) -> torch.Tensor:
        """E(s) of one prepared sketch, from the cache when the same image (its content, size and polarity, all in
        `image`) was encoded by the same VAE, in the same dtype, on the same device."""
        key = (
            hashlib.sha1(image.numpy().tobytes()).hexdigest(),
            tuple(image.shape),
            id(self.vae),
            self.vae.dtype,
            str(device),
        )
        cache = self.__dict__.setdefault("_sketch_cache", OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        latents = self.encode_to_latents(image.to(device))
        if self.sketch_cache_size > 0:
            cache[key] = latents
            while len(cache) > self.sketch_cache_size:
                cache.popitem(last=False)
        return latents

    def prepare_sketch_masks(self, sketch_mask, num_images: int, height: int, width: int, device) -> torch.Tensor:
        """Where the sketch applies, per pixel of the LGP's output in [0, 1]: `(num_images, 1, height / f, width / f)`
        (times `target_scale` for an LGP that predicts its map above the latent resolution)."""
        masks = sketch_list(sketch_mask)
        scale = self.lgp.config.target_scale
        size = (height // self.vae_scale_factor * scale, width // self.vae_scale_factor * scale)
        weights = torch.cat([prepare_sketch_mask(mask, *size) for mask in masks]).to(device)
        return weights.repeat_interleave(num_images // len(masks), dim=0)

    @contextmanager
    def _vae_in(self, dtype: torch.dtype) -> Iterator[None]:
        """The VAE in `dtype` inside the context (SDXL's VAE overflows in float16: its config says `force_upcast`)."""
        previous = self.vae.dtype
        if previous == dtype:
            yield
            return
        self.vae.to(dtype=dtype)
        try:
            yield
        finally:
            self.vae.to(dtype=previous)

    def _vae_dtype(self) -> torch.dtype:
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        return torch.float32 if upcast else self.vae.dtype

    def _latents_mean_std(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is None or std is None:
            return None
        return tuple(torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype) for v in (mean, std))

    def encode_to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the latents the UNet works in, as the parent pipelines' img2img encodes them."""
        dtype = self._vae_dtype()
        with self._vae_in(dtype):
            encoded = retrieve_latents(self.vae.encode(images.to(dtype)), sample_mode="argmax")
        statistics = self._latents_mean_std(encoded)
        if statistics is not None:
            return (encoded - statistics[0]) * self.vae.config.scaling_factor / statistics[1]
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (encoded - shift) * self.vae.config.scaling_factor

    def decode_edge_maps(self, edge_latents: torch.Tensor, output_type: str):
        """The LGP's predicted edge latents as images, decoded like the pipeline's images (an LGP with
        `target="map"` predicts the map itself, shown at the image's size)."""
        if output_type == "latent":
            return edge_latents
        if self.lgp.config.target == "map":
            size = [side * self.vae_scale_factor // self.lgp.config.target_scale for side in edge_latents.shape[-2:]]
            maps = torch.nn.functional.interpolate(edge_latents.float(), size=size, mode="nearest")
            maps = maps.expand(-1, 3, -1, -1) if maps.shape[1] == 1 else maps
            return self.image_processor.postprocess(maps.clamp(-1, 1), output_type=output_type)
        dtype = self._vae_dtype()
        statistics = self._latents_mean_std(edge_latents)
        if statistics is not None:
            latents = edge_latents * statistics[1] / self.vae.config.scaling_factor + statistics[0]
        else:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            latents = edge_latents / self.vae.config.scaling_factor + shift
        with self._vae_in(dtype):
            images = self.vae.decode(latents.to(dtype), return_dict=False)[0]
        return self.image_processor.postprocess(images, output_type=output_type)

    # -----------------------------------------------------------------------------------------------------------------
    # The guided call

    def generate_with_sketch(
        self, parent_call: Callable[..., Any], parent_kwargs: dict[str, Any], guidance: dict[str, Any]
    ) -> tuple[Any, Any]:
        """The parent pipeline's `__call__` (`parent_call`, with `parent_kwargs`), guided by the sketch arguments in
        `guidance` (`sketch`, `sketch_mask`, `sketch_guidance_scale`, `..._start`, `..._end`, `..._interval`,
        `..._recurrence` (1 where absent, as in pipeline files written before it), `return_edge_maps`, `invert_map`,
        `guidance_map` (another name for `sketch`), `sketch_fill` and `sketch_fill_scale`): checked and prepared first,
        then the parent's own loop with `sketch_guidance`.

        Returns:
            (the parent's output, as with `return_dict=True`; the decoded edge maps, or `None`)
        """
        prompt, prompt_embeds = parent_kwargs.get("prompt"), parent_kwargs.get("prompt_embeds")
        if isinstance(prompt, list):
            batch_size = len(prompt)
        elif prompt is None and prompt_embeds is not None:
            batch_size = prompt_embeds.shape[0]
        else:
            batch_size = 1
        num_images = batch_size * (parent_kwargs.get("num_images_per_prompt") or 1)
        self._guidance_scale = parent_kwargs["guidance_scale"]  # do_classifier_free_guidance, for the checks
        sketch, sketch_mask, scale = guidance["sketch"], guidance["sketch_mask"], guidance["sketch_guidance_scale"]
        if guidance.get("guidance_map") is not None:
            if sketch is not None:
                raise ValueError("Pass the map as `sketch` or as `guidance_map` (the same argument), not both.")
            sketch = guidance["guidance_map"]
        start, end = guidance["sketch_guidance_start"], guidance["sketch_guidance_end"]
        interval, return_edge_maps = guidance["sketch_guidance_interval"], guidance["return_edge_maps"]
        recurrence = guidance.get("sketch_guidance_recurrence", 1)
        sketch_fill = guidance.get("sketch_fill")
        fill_scale = guidance.get("sketch_fill_scale", DEFAULT_SKETCH_FILL_SCALE)
        self.check_sketch_inputs(
            sketch, scale, start, end, return_edge_maps, num_images, batch_size, interval, sketch_mask, recurrence
        )
        with_fill = self.check_fill_inputs(sketch, sketch_fill, fill_scale, num_images, batch_size)
        if sketch is None or scale == 0:
            # Unguided: exactly the parent pipeline, at exactly its cost.
            return parent_call(**parent_kwargs, return_dict=True), None

        height, width = self.sketch_size(
            parent_kwargs.get("height"), parent_kwargs.get("width"), parent_kwargs.get("latents")
        )
        self._sketch_image_size = (height, width)  # for `latents_to_spatial` (FLUX unpacks its latents by it)
        device = self._execution_device
        invert = bool(guidance.get("invert_map", False))
        sketch_latents = self.prepare_sketch_latents(sketch, num_images, height, width, device, invert)
        masks = (
            None if sketch_mask is None else self.prepare_sketch_masks(sketch_mask, num_images, height, width, device)
        )
        fill = None
        if with_fill:
            fill_latents = self.prepare_fill_latents(
                sketch, "auto" if sketch_fill is None else sketch_fill, num_images, height, width, device
            )
            fill = FillGuidance(self.fill_lgp, fill_latents, float(fill_scale))
        generator = parent_kwargs.get("generator")
        with self.sketch_guidance(
            sketch_latents, masks, float(scale), start, end, interval, int(recurrence), generator, fill
        ) as call:
            output = parent_call(**parent_kwargs, return_dict=True)
        edge_maps = None
        if return_edge_maps:
            edge_maps = self.decode_edge_maps(call.edge_latents, parent_kwargs.get("output_type") or "pil")
            self.maybe_free_model_hooks()
        return output, edge_maps

    # -----------------------------------------------------------------------------------------------------------------
    # The guided step

    def resolve_guided_step_mode(self) -> str:
        """How this call's guided steps run the two classifier-free guidance branches: `guided_step_mode` if set,
        else the faster one measured for the execution device (`DEFAULT_GUIDED_STEP_MODES`)."""
        if self.guided_step_mode is not None:
            return self.guided_step_mode
        return DEFAULT_GUIDED_STEP_MODES.get(self._execution_device.type, "split")

    @contextmanager
    def sketch_guidance(
        self,
        sketch_latents: torch.Tensor,
        sketch_mask: torch.Tensor | None = None,
        scale: float = DEFAULT_SKETCH_GUIDANCE_SCALE,
        start: float = 0.0,
        end: float = DEFAULT_SKETCH_GUIDANCE_END,
        interval: int = 1,
        recurrence: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        fill: FillGuidance | None = None,
    ) -> Iterator[GuidedCall]:
        """Inside the context, the pipeline's own `__call__` generates with sketch guidance (see `GuidedCall`; with
        `fill`, fill guidance too); the context yields the `GuidedCall`, whose `edge_latents` hold the LGP's last
        prediction afterwards."""
        denoiser, scheduler = self.denoiser, self.scheduler
        # The instances' own attributes, if any (accelerate's offload hooks put a `forward` there), to restore after.
        saved_forward, saved_step = denoiser.__dict__.get("forward"), scheduler.__dict__.get("step")
        call = GuidedCall(
            self,
            sketch_latents,
            sketch_mask,
            scale,
            start,
            end,
            interval,
            denoiser.forward,
            scheduler.step,
            recurrence,
            generator,
            fill,
        )
        lgps = [self.lgp] if fill is None else [self.lgp, fill.lgp]
        # BatchNorm must use its running statistics while sampling.
        for lgp in lgps:
            lgp.eval()
        # Frozen for the whole loop (toggling ~700 flags per step would cost milliseconds), so that gradient
        # checkpointing's recomputation in a backward sees the same flags as the forward did.
        with frozen_parameters(denoiser, *lgps):
            # With the originals' signatures (`functools.wraps`): the loop inspects the scheduler's step to decide
            # whether to pass it `generator` and `eta`, which ancestral and DDPM-like schedulers draw their noise with.
            denoiser.forward = with_signature_of(call.original_forward, call.denoiser_forward)
            scheduler.step = with_signature_of(call.original_scheduler_step, call.scheduler_step)
            try:
                yield call
            finally:
                for obj, attr, saved in ((denoiser, "forward", saved_forward), (scheduler, "step", saved_step)):
                    if saved is None:
                        del obj.__dict__[attr]
                    else:
                        obj.__dict__[attr] = saved

    def noise_and_sketch_gradient(
        self,
        model_input: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        unet_kwargs: dict[str, Any],
        sketch_latents: torch.Tensor,
        sketch_mask: torch.Tensor | None = None,
        forward: Callable[..., Any] | None = None,
        fill: FillGuidance | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One guided step's model work: the UNet's noise prediction for the loop's input, and g = dL/dz_t.

        `model_input` and the other arguments are the UNet call the loop makes (the latents, scaled by the scheduler,
        stacked [unconditional, conditional] with classifier-free guidance). g is taken with respect to the scaled
        latents; the scheduler's scaling is one number per step, which the step-size rule divides out. In "batched"
        mode one UNet call with autograd serves both branches; in "split" mode the LGP's branch runs with autograd and
        the other without, so the gradient flows through one half only.

        Returns:
            (the noise prediction, as the UNet would have returned it; the gradient, one per image; the LGP's
            predicted edge latents)
        """
        forward = forward or self.denoiser
        read = self.lgp.config.feature_branch
        num_branches = self.denoiser_branches
        cfg = num_branches == 2
        branch = ("unconditional", "conditional").index(read) if cfg else 0
        target = (sketch_latents, sketch_mask)
        if not cfg or self.resolve_guided_step_mode() == "batched":
            with torch.enable_grad():
                loss, leaf, prediction, edge_latents = self.sketch_loss(
                    model_input, t, encoder_hidden_states, unet_kwargs, *target, branch, num_branches, forward, fill
                )
                (gradient,) = torch.autograd.grad(loss, leaf)
            return prediction, _finite_or_skipped(self.latents_part(gradient), t), edge_latents.detach()

        def inputs(index: int):
            arguments = (model_input, t, encoder_hidden_states, unet_kwargs)
            return [branch_inputs(value, index, 2, model_input.shape[0]) for value in arguments]

        with torch.enable_grad():
            loss, leaf, branch_prediction, edge_latents = self.sketch_loss(
                *inputs(branch), *target, forward=forward, fill=fill
            )
            (gradient,) = torch.autograd.grad(loss, leaf)
        other_input, other_t, other_states, other_kwargs = inputs(1 - branch)
        other_prediction = self.call_denoiser(forward, other_input, other_t, other_states, other_kwargs)[0]
        halves = [other_prediction, branch_prediction] if branch else [branch_prediction, other_prediction]
        return torch.cat(halves), _finite_or_skipped(self.latents_part(gradient), t), edge_latents.detach()

    def sketch_loss(
        self,
        model_input: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        unet_kwargs: dict[str, Any],
        sketch_latents: torch.Tensor,
        sketch_mask: torch.Tensor | None = None,
        branch: int = 0,
        num_branches: int = 1,
        forward: Callable[..., Any] | None = None,
        fill: FillGuidance | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The denoiser with autograd on the branch the LGP reads, and the sketch loss
        L = sum m * (LGP(F(z_t)) - E(s))^2 (with `fill`, plus `fill.scale` times the fill LGP's summed squared error
        against `fill.latents`, from the same features).

        `model_input` holds `num_branches` branches (stacked as the loop stacks them; `encoder_hidden_states` and
        `unet_kwargs` likewise) and the LGP reads the `branch`-th, the only one the leaf enters. m is `sketch_mask`
        (1 everywhere without one). Autograd records nothing after the last block the LGP reads. Run it with gradients
        enabled; inside `frozen_parameters(self.denoiser, self.lgp)`, as `sketch_guidance` does, it also keeps nothing
        for weight gradients.

        Returns:
            (L summed over the images, the LGP's branch of `model_input` as the leaf to differentiate L by, the
            denoiser's prediction for all branches (detached), the LGP's predicted edge latents)
        """
        forward = forward or self.denoiser
        parts = list(model_input.detach().chunk(num_branches))
        leaf = parts[branch].requires_grad_(True)
        alpha_bar = self.noise_level_alpha_bar(t, model_input.device)
        blocks, output_index = list(self.lgp.config.blocks), self.lgp.config.tuple_output_index
        if fill is not None:
            blocks += [name for name in fill.lgp.config.blocks if name not in blocks]
        denoiser = self.denoiser
        with capture_activations(denoiser, blocks, output_index) as features, autograd_until(denoiser, blocks):
            prediction = self.call_denoiser(forward, torch.cat(parts), t, encoder_hidden_states, unet_kwargs)[0]
        if num_branches > 1:
            features = {name: feature.chunk(num_branches)[branch] for name, feature in features.items()}
        # The noise level is conditioning for the LGP, not something to optimise: no gradient through it.
        branch_prediction = prediction.detach().chunk(num_branches)[branch]
        sample = self.latents_part(leaf.detach())
        epsilon = self.predict_noise_epsilon(branch_prediction.float(), sample.float(), alpha_bar)
        noise_level = noise_level_map(self.latents_to_spatial(epsilon), alpha_bar)
        with self.lgp.smooth_relu_gradients():
            edge_latents = self.lgp(features, noise_level)
        error = (edge_latents.float() - sketch_latents.float()).square()
        if sketch_mask is not None:
            error = error * sketch_mask
        # Summed per image, so each image's gradient is its own; the loss is in float32 whatever the UNet's dtype.
        loss = error.sum()
        if fill is not None:
            with fill.lgp.smooth_relu_gradients():
                fill_latents = fill.lgp(features, noise_level)
            fill_error = (fill_latents.float() - fill.latents.float()).square()
            if sketch_mask is not None:  # where the sketch applies, its fill does
                fill_error = fill_error * torch.nn.functional.interpolate(
                    sketch_mask, size=fill_error.shape[-2:], mode="area"
                )
            loss = loss + fill.scale * fill_error.sum()
        return loss, leaf, prediction.detach(), edge_latents

    def noise_level_alpha_bar(self, t: torch.Tensor, device) -> torch.Tensor:
        """alphabar of the current step, for the LGP's noise-level input: from the scheduler's DDPM schedule; for
        flow matching, 1 - sigma^2 (so that sqrt(1 - alphabar) epsilon = sigma epsilon is the noise in the sample, as
        on a DDPM schedule); for other schedulers without one (EDM), from the noise level sigma as 1 / (1 + sigma^2).
        Call it after the step's `scale_model_input`, which sets a sigma scheduler's step index."""
        if self.is_flow_matching():
            scheduler = self.scheduler
            # Before the loop's first step, FLUX's and SD3's schedulers have a begin index but no step index.
            index = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
            sigma = scheduler.sigmas[index].to(device=device, dtype=torch.float32)
            return 1.0 - sigma**2
        if hasattr(self.scheduler, "alphas_cumprod"):
            return self.scheduler.alphas_cumprod[int(torch.as_tensor(t).flatten()[0].round())].to(device)
        sigma = self.scheduler.sigmas[self.scheduler.step_index].to(device=device, dtype=torch.float32)
        return 1.0 / (1.0 + sigma**2)

    def predict_noise_epsilon(self, model_output: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor):
        """The denoiser's estimate of epsilon, whatever it predicts (`prediction_type` of the scheduler; a flow
        matching model's velocity v = epsilon - x_0, from which epsilon = x_t + (1 - sigma) v)."""
        if self.is_flow_matching():
            return sample + (1 - (1 - alpha_bar).sqrt()) * model_output
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return model_output
        if prediction_type == "v_prediction":
            return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * sample
        if prediction_type == "sample":
            return (sample - alpha_bar.sqrt() * model_output) / (1 - alpha_bar).sqrt()
        raise ValueError(f"Sketch guidance does not support prediction_type={prediction_type!r}.")
