"""Cost of sketch-guided sampling next to plain Stable Diffusion, measured in one run on one machine.

Times, `--repeats` times each after `--warmup` untimed runs, and reports medians:

- whole generations, from the prompt's text to a PIL image, as users run them: unguided (our pipeline without a
  sketch, which is exactly `StableDiffusionPipeline`) and guided (the first `--guided_fraction` of the steps; several
  fractions side by side), with split and batched guided steps (`--step_modes`), plus guided every k-th step for each
  `--intervals` k (the approximate mode, `sketch_guidance_interval`, reusing the last gradient between) and with each
  `--recurrences` N (`sketch_guidance_recurrence`: the first guided steps run N times), and with `--fill` fill
  guidance (a random silhouette LGP of the LGP's size as `fill_lgp`, guided with the sketch's own fill; the other
  guided generations then pass `sketch_fill_scale=0`);
- the fixed costs around the loop (prompt encoding, sketch encoding, VAE decoding), so that the loop's own ratio can be
  read off too;
- the parts of one step: an unguided classifier-free step and a guided one, and inside the guided step the UNet forward
  of the LGP's branch with autograd and the capture hooks, the backward to the latents, the LGP's forward and backward
  on its own, the other branch's forward, and the scheduler with the guidance update. Also the guided step with the
  UNet's gradient checkpointing (`pipe.unet.enable_gradient_checkpointing()`) and the backward with the UNet's weights
  frozen (`requires_grad_(False)`), to show what each changes.

Memory: on the CPU the peak resident memory (RSS) of each phase, sampled, and how far it rose above the memory held when
the phase began; on a GPU `torch.cuda.max_memory_allocated`. For a guided step also the activations that autograd keeps
for the backward (weights excluded), counted exactly.

    python -m benchmarks.guided_sampling --model tiny                                   # seconds, any machine
    python -m benchmarks.guided_sampling --model sd15-random --resolution 256 --steps 20 --repeats 3
    python -m benchmarks.guided_sampling --model demo --steps 30 --intervals 2 3 --efficacy   # + sketch agreement
    python -m benchmarks.guided_sampling --model sd15-random --resolution 256 --steps 10 --guided_fraction 0.3 0.5 \
        --intervals 2 --efficacy --phases generation        # every mode at two ranges: cost, and agreement on the demo

With `--efficacy` the sketch agreement of each mode is measured on the demo model's held-out cases (on `--model` itself
when it is a trained model with its LGP), and the report ends with the modes side by side: cost over unguided and
agreement, for each guided fraction.
    python -m benchmarks.guided_sampling --model <Hub id or folder of an SD model> --lgp <LGP folder or Hub id>

`sd15-random` is Stable Diffusion 1.5's architecture randomly initialised (nothing is downloaded: the cost of a step
does not depend on the weights) with an LGP of the published sketch2img size. Its tokenizer is the tiny test
tokenizer padded to CLIP's 77 tokens, so the text encoder does its real amount of work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import PIL.Image
import torch

from benchmarks.measuring import (
    count_saved_activations,
    gradient_checkpointing,
    guided_step_mode,
    measure,
    memory_kind,
    recurrence_fraction,
    schedule_fraction,
    synchronize,
    within,
    without_savings,
)
from benchmarks.models import build_pipeline
from pipeline_sketch_guided import LGPModel, capture_activations, loading, noise_level_map
from pipeline_sketch_guided import guidance as guidance_module
from pipeline_sketch_guided.capture import resolve_blocks
from pipeline_sketch_guided.demo import freehand_sketch
from pipeline_sketch_guided.guidance import (
    DEFAULT_SKETCH_GUIDANCE_END,
    DEFAULT_SKETCH_GUIDANCE_SCALE,
    is_guided_step,
    sketch_guidance_step,
)
from pipeline_sketch_guided.pipeline_xl import SketchGuidedStableDiffusionXLPipeline
from pipeline_sketch_guided.utils import device_name

# `--scheduler` takes the command line's names (`sketch-guided generate --scheduler`).
SCHEDULERS = {name: getattr(diffusers, class_name) for name, class_name in loading.SCHEDULERS.items()}
PROMPT = "a red star on a white background"


# ---------------------------------------------------------------------------------------------------------------------
# What is timed


def classifier_free_guidance(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The loop's combination of the [unconditional, conditional] noise predictions."""
    uncond, text = noise_pred.chunk(2)
    return uncond + guidance_scale * (text - uncond)


class GuidedStepParts:
    """One guided step of `pipe`, taken apart. Every callable returns the seconds of the part it names."""

    def __init__(self, pipe, sketch: PIL.Image.Image, resolution: int, steps: int, guidance_scale: float):
        self.pipe, self.steps, self.device = pipe, steps, pipe._execution_device
        self.guidance_scale = guidance_scale
        pipe._guidance_scale = guidance_scale
        pipe._guidance_rescale = 0.0
        negative, positive = pipe.encode_prompt(PROMPT, self.device, 1, True)[::-1]
        self.prompt_embeds = torch.cat([negative, positive])
        self.sketch_latents = pipe.prepare_sketch_latents(sketch, 1, resolution, resolution, self.device)
        latent_size = resolution // pipe.vae_scale_factor
        generator = torch.Generator().manual_seed(0)
        self.reset_scheduler()
        self.t = pipe.scheduler.timesteps[0]
        shape = (1, pipe.unet.config.in_channels, latent_size, latent_size)
        noise = torch.randn(shape, generator=generator).to(self.device, pipe.unet.dtype)
        self.latents = noise * pipe.scheduler.init_noise_sigma
        self.unet_kwargs = {"timestep_cond": None, "cross_attention_kwargs": None, "added_cond_kwargs": None}
        read = pipe.lgp.config.feature_branch
        self.branch_embeds = self.prompt_embeds.chunk(2)[1 if read == "conditional" else 0]
        self.other_embeds = self.prompt_embeds.chunk(2)[0 if read == "conditional" else 1]
        self.weights = {p.untyped_storage().data_ptr() for m in (pipe.unet, pipe.lgp) for p in m.parameters()}
        self.weights |= {b.untyped_storage().data_ptr() for m in (pipe.unet, pipe.lgp) for b in m.buffers()}

    def reset_scheduler(self) -> None:
        # Multistep schedulers keep state between steps; every timed step starts from the first one.
        self.pipe.scheduler.set_timesteps(self.steps, device=self.device)

    def _timed(self, work: Callable[[], Any]) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        work()
        synchronize(self.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def unguided_step(self) -> float:
        """Exactly the unguided step of the loop: the UNet on the CFG batch of 2, CFG, the scheduler."""
        pipe, t = self.pipe, self.t
        self.reset_scheduler()

        def work():
            model_input = pipe.scheduler.scale_model_input(torch.cat([self.latents] * 2), t)
            noise_pred = pipe.unet(model_input, t, encoder_hidden_states=self.prompt_embeds, return_dict=False)[0]
            noise_pred = classifier_free_guidance(noise_pred, self.guidance_scale)
            pipe.scheduler.step(noise_pred, t, self.latents, return_dict=False)

        return self._timed(work)

    @torch.no_grad()
    def guided_step(self) -> float:
        """Exactly the guided step of the loop: `noise_and_sketch_gradient`, CFG, the scheduler, the guidance update."""
        pipe, t = self.pipe, self.t
        self.reset_scheduler()

        def work():
            model_input = pipe.scheduler.scale_model_input(torch.cat([self.latents] * 2), t)
            noise_pred, gradient, _ = pipe.noise_and_sketch_gradient(
                model_input, t, self.prompt_embeds, {**self.unet_kwargs, "return_dict": False}, self.sketch_latents
            )
            noise_pred = classifier_free_guidance(noise_pred, self.guidance_scale)
            next_latents = pipe.scheduler.step(noise_pred, t, self.latents, return_dict=False)[0]
            sketch_guidance_step(self.latents, next_latents, gradient, DEFAULT_SKETCH_GUIDANCE_SCALE)

        # The loop freezes the weights once for all its steps.
        with guidance_module.frozen_parameters(pipe.unet, pipe.lgp):
            return self._timed(work)

    def _sketch_loss(self):
        """The pipeline's own forward of the LGP's branch: (loss, latents leaf, prediction, edge latents)."""
        kwargs = {**self.unet_kwargs, "return_dict": False}
        model_input = self.pipe.scheduler.scale_model_input(self.latents, self.t)
        return self.pipe.sketch_loss(model_input, self.t, self.branch_embeds, kwargs, self.sketch_latents)

    @torch.enable_grad()
    def branch_forward_with_grad(self) -> float:
        with guidance_module.frozen_parameters(self.pipe.unet, self.pipe.lgp):
            return self._timed(self._sketch_loss)

    @torch.no_grad()
    def other_branch_forward(self) -> float:
        pipe = self.pipe
        model_input = pipe.scheduler.scale_model_input(self.latents, self.t)
        return self._timed(
            lambda: pipe.unet(model_input, self.t, encoder_hidden_states=self.other_embeds, return_dict=False)
        )

    @torch.no_grad()
    def cfg_forward(self) -> float:
        """The unguided step's model work alone: the UNet on the CFG batch of 2."""
        pipe = self.pipe
        model_input = pipe.scheduler.scale_model_input(torch.cat([self.latents] * 2), self.t)
        return self._timed(
            lambda: pipe.unet(model_input, self.t, encoder_hidden_states=self.prompt_embeds, return_dict=False)
        )

    @torch.enable_grad()
    def backward_to_latents(self) -> float:
        """dL/dz_t through the LGP and the UNet (the forward before it is not timed)."""
        with guidance_module.frozen_parameters(self.pipe.unet, self.pipe.lgp):
            loss, latents, _, _ = self._sketch_loss()
            return self._timed(lambda: torch.autograd.grad(loss, latents))

    @torch.enable_grad()
    def lgp_forward_backward(self) -> float:
        """The LGP alone: its forward on captured features and its backward to them."""
        pipe = self.pipe
        if not hasattr(self, "_lgp_inputs"):
            model_input = pipe.scheduler.scale_model_input(self.latents, self.t)
            with torch.no_grad(), capture_activations(pipe.unet, pipe.lgp.config.blocks) as features:
                prediction = pipe.unet(model_input, self.t, self.branch_embeds, return_dict=False)[0]
            alpha_bar = pipe.scheduler.alphas_cumprod[int(self.t)].to(self.device)
            epsilon = pipe.predict_noise_epsilon(prediction.float(), model_input.float(), alpha_bar)
            self._lgp_inputs = ({name: f.detach() for name, f in features.items()}, noise_level_map(epsilon, alpha_bar))
        features, noise_level = self._lgp_inputs
        features = {name: feature.requires_grad_(True) for name, feature in features.items()}

        def work():
            with guidance_module.frozen_parameters(pipe.lgp):
                edge_latents = pipe.lgp(features, noise_level)
                loss = (edge_latents.float() - self.sketch_latents.float()).square().sum()
                torch.autograd.grad(loss, list(features.values()))

        return self._timed(work)

    @torch.no_grad()
    def scheduler_and_guidance_update(self) -> float:
        pipe, t = self.pipe, self.t
        self.reset_scheduler()
        noise_pred = torch.randn_like(self.latents)

        def work():
            next_latents = pipe.scheduler.step(noise_pred, t, self.latents, return_dict=False)[0]
            sketch_guidance_step(self.latents, next_latents, noise_pred, DEFAULT_SKETCH_GUIDANCE_SCALE)

        return self._timed(work)

    @torch.no_grad()
    def saved_activations_mib(self) -> dict[str, float]:
        """MiB that autograd keeps for the backward in the pipeline's guided step (weights and buffers excluded): in
        all, and after the last block the LGP reads has run (which the sketch loss does not depend on)."""
        blocks = resolve_blocks(self.pipe.unet, self.pipe.lgp.config.blocks).values()
        done: list[torch.nn.Module] = []
        handles = [block.register_forward_hook(lambda module, args, output: done.append(module)) for block in blocks]
        unet_done = self.pipe.unet.register_forward_hook(lambda module, args, output: done.append(module))
        after = len(handles)  # blocks done, the UNet not yet
        try:
            frozen = guidance_module.frozen_parameters(self.pipe.unet, self.pipe.lgp)
            with frozen, count_saved_activations(self.weights, after=lambda: len(done) == after) as saved:
                self.pipe.noise_and_sketch_gradient(
                    self.pipe.scheduler.scale_model_input(torch.cat([self.latents] * 2), self.t),
                    self.t,
                    self.prompt_embeds,
                    {**self.unet_kwargs, "return_dict": False},
                    self.sketch_latents,
                )
        finally:
            for handle in [*handles, unet_done]:
                handle.remove()
        return {"total": saved["total"] / 2**20, "after the last block read": saved["after"] / 2**20}


# ---------------------------------------------------------------------------------------------------------------------
# The run


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = build_pipeline(args.model, args.lgp, dtype, args.device).to(device)
    pipe.sketch_gradient_reuse = not args.no_gradient_reuse
    if args.fill:
        if "fill_lgp" not in pipe.components:
            raise SystemExit(f"--fill: fill guidance is in the SD 1.x/2.x pipeline, not {type(pipe).__name__}.")
        torch.manual_seed(1)
        fill_lgp = LGPModel.from_unet(pipe.unet, map_kind="silhouette", hidden_dims=list(pipe.lgp.config.hidden_dims))
        pipe.fill_lgp = fill_lgp.to(device, dtype).eval()
    if isinstance(pipe, SketchGuidedStableDiffusionXLPipeline) and "parts" in args.phases:
        raise SystemExit(f"--phases parts times the SD 1.x/2.x step; for {args.model} use --phases generation.")
    if args.scheduler:
        pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    sketch = freehand_sketch("star", (32, 32), 22, seed=0, wobble=0.05, size=resolution)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    record: dict[str, Any] = {
        "config": {
            "model": args.model,
            "unet_parameters_millions": round(unet_params / 1e6, 1),
            "lgp_in_features": pipe.lgp.in_features,
            "lgp_blocks": list(pipe.lgp.config.blocks),
            "resolution": resolution,
            "latent_size": resolution // pipe.vae_scale_factor,
            "steps": args.steps,
            "scheduler": type(pipe.scheduler).__name__,
            "guidance_scale": args.guidance_scale,
            "guided_fraction": args.guided_fractions[0],
            "guided_fractions": args.guided_fractions,
            "efficacy_steps": args.efficacy_steps or args.steps if args.efficacy else None,
            "efficacy_placement": args.efficacy_placement if args.efficacy else None,
            "guided_steps": None,
            "recurrence_fraction": guidance_module.RECURRENCE_FRACTION,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "dtype": args.dtype,
            "device": device_name(device),
            "threads": torch.get_num_threads(),
            "memory_kind": memory_kind(device),
        },
        "seconds": {},
        "memory_mib": {},
    }
    seconds, memory = record["seconds"], record["memory_mib"]

    def timed(runs: dict[str, Callable[[], float | None]]) -> None:
        print(f"timing {', '.join(name.strip() for name in runs)} ...", file=sys.stderr, flush=True)
        for name, result in measure(runs, args.repeats, args.warmup, device).items():
            seconds[name] = {"median": median(result["runs"]), "runs": result["runs"]}
            memory[name] = {"peak": result["peak"], "rise": result["rise"]}

    # Whole generations, from text to a PIL image.
    common = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "height": resolution}
    common["width"] = resolution

    def generate(**kwargs) -> None:
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **common, **kwargs)

    # Once, so that the first timed phase does not pay for the kernels' first use (forward and backward).
    print("warming up ...", file=sys.stderr, flush=True)
    pipe(
        PROMPT,
        sketch=sketch,
        num_inference_steps=2,
        guidance_scale=args.guidance_scale,
        height=resolution,
        width=resolution,
    )
    guided = guided_settings(args, args.guided_fractions[0], sketch)

    if "generation" in args.phases:
        generations = {"generation, unguided": generate}
        for fraction in args.guided_fractions:
            for name, settings, mode in timed_modes(args, fraction, sketch):
                generations[name] = within(
                    lambda mode=mode: guided_step_mode(pipe, mode), lambda settings=settings: generate(**settings)
                )
        if args.checkpointing:
            generations["generation, guided, gradient checkpointing"] = within(
                lambda: gradient_checkpointing(pipe.unet), lambda: generate(**guided)
            )
        timed(generations)

        # Fixed costs around the loop.
        latent_size = resolution // pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, latent_size, latent_size)
        some_latents = torch.randn(shape, device=device, dtype=dtype) / pipe.vae.config.scaling_factor
        with torch.no_grad():
            timed(
                {
                    "encode prompt": lambda: pipe.encode_prompt(
                        PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
                    ),
                    "encode sketch": lambda: pipe.prepare_sketch_latents(sketch, 1, resolution, resolution, device),
                    "decode image": lambda: pipe.image_processor.postprocess(
                        pipe.vae.decode(some_latents, return_dict=False)[0]
                    ),
                }
            )

    guided_steps = sum(is_guided_step(i, args.steps, 0.0, args.guided_fractions[0]) for i in range(args.steps))
    record["config"]["guided_steps"] = guided_steps
    if "parts" in args.phases:
        # One step, taken apart.
        parts = GuidedStepParts(pipe, sketch, resolution, args.steps, args.guidance_scale)
        timed(
            {
                "step, unguided": parts.unguided_step,
                "step, guided": within(lambda: guided_step_mode(pipe, "split"), parts.guided_step),
                "step, guided, batched": within(lambda: guided_step_mode(pipe, "batched"), parts.guided_step),
                "  UNet forward, CFG batch of 2 (unguided step)": parts.cfg_forward,
                "  UNet + LGP forward, LGP's branch, autograd": parts.branch_forward_with_grad,
                "  backward to the latents (LGP + UNet)": parts.backward_to_latents,
                "  LGP forward + backward alone": parts.lgp_forward_backward,
                "  UNet forward, other branch, no grad": parts.other_branch_forward,
                "  scheduler step + guidance update": parts.scheduler_and_guidance_update,
                "step, guided, without the pipeline's savings": within(without_savings, parts.guided_step),
                "step, guided, gradient checkpointing": within(
                    lambda: gradient_checkpointing(pipe.unet), parts.guided_step
                ),
            }
        )
        with guided_step_mode(pipe, "split"):
            saved = parts.saved_activations_mib()
        with without_savings():
            unsaved = parts.saved_activations_mib()
        with gradient_checkpointing(pipe.unet):
            checkpointed_saved = parts.saved_activations_mib()
        with guided_step_mode(pipe, "batched"):
            batched_saved = parts.saved_activations_mib()
        record["saved_for_backward_mib"] = {
            "guided step": saved,
            "guided step, batched": batched_saved,
            "without the pipeline's savings": unsaved,
            "gradient checkpointing": checkpointed_saved,
        }

    record["ratios"] = ratios(seconds, args, guided_steps)
    # Repetition by repetition (each pair ran back to back), to show how far a changing load moved the ratio.
    record["ratio_runs"] = {
        f"{a} / {b}": [x / y for x, y in zip(seconds[a]["runs"], seconds[b]["runs"], strict=True)]
        for a, b in [
            *((name, "generation, unguided") for name in seconds if name.startswith("generation, guided")),
            ("step, guided", "step, unguided"),
        ]
        if a in seconds and b in seconds
    }
    if args.efficacy:
        record["efficacy"] = efficacy(efficacy_pipeline(pipe, args), args)
        record["side_by_side"] = side_by_side(record, args)
    return record


def guided_settings(args: argparse.Namespace, fraction: float, sketch, interval: int = 1) -> dict[str, Any]:
    settings = {"sketch": sketch, "sketch_guidance_scale": args.sketch_guidance_scale, "sketch_guidance_end": fraction}
    if args.fill:  # fill guidance only where it is timed
        settings["sketch_fill_scale"] = 0.0
    if interval != 1:
        settings["sketch_guidance_interval"] = interval
    return settings


def mode_suffix(args: argparse.Namespace, fraction: float) -> str:
    """How a generation's name says its guided fraction: not at all when the run has one (the names stay those that
    `benchmarks.gpu_check` reads)."""
    return f" (end {fraction:g})" if len(args.guided_fractions) > 1 else ""


def generation_name(suffix: str, interval: int = 1, batched: bool = False) -> str:
    """The name a guided generation is timed under (`suffix`: `mode_suffix`)."""
    if interval != 1:
        return f"generation, guided every {interval} steps{suffix}"
    return "generation, guided" + (", batched" if batched else "") + suffix


def agreement_name(scale: float, suffix: str, interval: int = 1, reused: bool = True) -> str:
    """The name a mode's sketch agreement is recorded under (`suffix`: `mode_suffix`)."""
    if interval == 1:
        return f"exact, scale {scale:g}{suffix}"
    return f"every {interval}, {'reused' if reused else 'nothing'} between, scale {scale:g}{suffix}"


def timed_modes(args: argparse.Namespace, fraction: float, sketch) -> list[tuple[str, dict[str, Any], str | None]]:
    """(name, pipeline arguments, guided step mode) of each guided generation timed at `fraction`."""
    suffix = mode_suffix(args, fraction)
    modes = []
    for step_mode in args.step_modes:
        name = generation_name(suffix, batched=step_mode == "batched")
        modes.append((name, guided_settings(args, fraction, sketch), step_mode))
    for interval in args.intervals:
        modes.append((generation_name(suffix, interval), guided_settings(args, fraction, sketch, interval), None))
    for times in args.recurrences:
        settings = {**guided_settings(args, fraction, sketch), "sketch_guidance_recurrence": times}
        modes.append((f"generation, guided, recurrence {times}{suffix}", settings, None))
    if args.fill:
        fill_scale = guidance_module.DEFAULT_SKETCH_FILL_SCALE
        settings = {**guided_settings(args, fraction, sketch), "sketch_fill_scale": fill_scale}
        modes.append((f"generation, guided, fill{suffix}", settings, None))
    return modes


def efficacy_pipeline(pipe, args: argparse.Namespace):
    """The pipeline whose sketch agreement is measured: `--model` when it is trained, else the demo model."""
    from benchmarks.models import RANDOM_MODELS

    if args.model not in RANDOM_MODELS:
        return pipe
    print(f"efficacy on the demo model ({args.model} has random weights) ...", file=sys.stderr, flush=True)
    demo = build_pipeline("demo", None, torch.float32, "cpu")
    demo.sketch_gradient_reuse = pipe.sketch_gradient_reuse
    return demo


def ratios(seconds: dict[str, dict[str, Any]], args: argparse.Namespace, guided_steps: int) -> dict[str, float]:
    """The ratios that the figures of this run give (those whose parts were timed)."""
    s = {name: value["median"] for name, value in seconds.items()}
    formulas: dict[str, Callable[[], float]] = {
        "generation guided / unguided": lambda: s["generation, guided"] / s["generation, unguided"],
        # The denoising loop alone: whole generations less the work outside the loop (the sketch's encoding is guidance
        # work, so it stays in the guided loop's cost).
        "loop guided / unguided": lambda: (
            (s["generation, guided"] - s["encode prompt"] - s["decode image"])
            / (s["generation, unguided"] - s["encode prompt"] - s["decode image"])
        ),
        "step guided / unguided": lambda: s["step, guided"] / s["step, unguided"],
        # The two ways of running a guided step's branches (`pipe.guided_step_mode`): below 1, batching pays here.
        "step guided, batched / split": lambda: s["step, guided, batched"] / s["step, guided"],
        "generation guided, batched / split": lambda: s["generation, guided, batched"] / s["generation, guided"],
        # How much cheaper one forward on the CFG batch of 2 is than two forwards on one branch each: a guided step
        # runs its two branches apart (one with autograd), so the closer this is to 1, the dearer guidance is.
        "CFG batch of 2 / 2 one-branch forwards": lambda: (
            s["  UNet forward, CFG batch of 2 (unguided step)"] / (2 * s["  UNet forward, other branch, no grad"])
        ),
        # The exact method's floor on this machine (DESIGN.md, "Cost"): both branches' forwards plus one backward.
        "step floor (2 one-branch forwards + backward) / unguided": lambda: (
            (2 * s["  UNet forward, other branch, no grad"] + s["  backward to the latents (LGP + UNet)"])
            / s["step, unguided"]
        ),
        # What the step figures predict for a whole loop with `guided_steps` of `steps` guided.
        "loop predicted from steps": lambda: (
            1 + guided_steps / args.steps * (s["step, guided"] / s["step, unguided"] - 1)
        ),
        "LGP forward + backward / guided step": lambda: s["  LGP forward + backward alone"] / s["step, guided"],
        "backward / UNet forward, CFG batch of 2": lambda: (
            s["  backward to the latents (LGP + UNet)"] / s["  UNet forward, CFG batch of 2 (unguided step)"]
        ),
        "step guided, without savings / guided": lambda: (
            s["step, guided, without the pipeline's savings"] / s["step, guided"]
        ),
        "step guided, checkpointing / guided": lambda: s["step, guided, gradient checkpointing"] / s["step, guided"],
    }
    for interval in args.intervals:
        formulas[f"generation guided every {interval} / unguided"] = lambda k=interval: (
            s[f"generation, guided every {k} steps"] / s["generation, unguided"]
        )
    formulas["generation guided, fill / unguided"] = lambda: s["generation, guided, fill"] / s["generation, unguided"]
    formulas["generation guided, fill / guided"] = lambda: s["generation, guided, fill"] / s["generation, guided"]
    for times in args.recurrences:
        formulas[f"generation guided, recurrence {times} / unguided"] = lambda n=times: (
            s[f"generation, guided, recurrence {n}"] / s["generation, unguided"]
        )
    out = {}
    for name, formula in formulas.items():
        with contextlib.suppress(KeyError):
            out[name] = formula()
    return out


def efficacy(pipe, args: argparse.Namespace) -> dict[str, Any]:
    """Speed and sketch agreement of each mode on the held-out cases of the demo model's efficacy benchmark
    (`benchmarks.efficacy`), at `--sketch_guidance_scale` and each `--guided_fraction`: the exact method, and for each
    `--intervals` k the gradient every k-th step reused between (the pipeline's interval mode) and, for comparison, with
    nothing between, also at k times the scale (which gives back the summed size of the guidance steps left out)."""
    from benchmarks.efficacy import generate, held_out_cases, measure_image, native_image_size, summarize
    from pipeline_sketch_guided.training.evaluate import sketch_strokes

    image_size = native_image_size(pipe)
    cases = held_out_cases(args.efficacy_cases, image_size, placement=args.efficacy_placement)
    strokes = [sketch_strokes(case.sketch, image_size, image_size) for case in cases]
    beta = args.sketch_guidance_scale
    modes: list[tuple[str, dict[str, Any] | None, bool]] = [("unguided", None, True)]
    for fraction in args.guided_fractions:
        suffix = mode_suffix(args, fraction)
        modes.append((agreement_name(beta, suffix), guided_settings(args, fraction, None), True))
        for interval in args.intervals:
            settings = guided_settings(args, fraction, None, interval)
            modes.append((agreement_name(beta, suffix, interval), settings, True))
            for scale in sorted({beta, beta * interval}):
                plain = {**settings, "sketch_guidance_scale": scale}
                modes.append((agreement_name(scale, suffix, interval, reused=False), plain, False))

    results = {}
    reuse = pipe.sketch_gradient_reuse
    try:
        for name, guidance, gradient_reuse in modes:
            print(f"efficacy, {name} ...", file=sys.stderr, flush=True)
            pipe.sketch_gradient_reuse = gradient_reuse
            if guidance is not None:
                guidance = {key: value for key, value in guidance.items() if key != "sketch"}
            metrics, start = [], time.perf_counter()
            for seed in args.efficacy_seeds:
                steps = args.efficacy_steps or args.steps
                images = generate(pipe, cases, seed, image_size, steps, args.guidance_scale, guidance)
                metrics += [measure_image(im, case, s) for im, case, s in zip(images, cases, strokes, strict=True)]
            results[name] = {**summarize(metrics), "seconds": time.perf_counter() - start}
    finally:
        pipe.sketch_gradient_reuse = reuse
    return results


def side_by_side(record: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each mode at each guided fraction: its cost over unguided (timed on `--model`) and its sketch agreement (on
    the efficacy model), with the agreement as a fraction of the exact method's at the same range."""
    seconds = {name: value["median"] for name, value in record["seconds"].items()}
    scores = record["efficacy"]
    beta = args.sketch_guidance_scale
    unguided = seconds.get("generation, unguided")
    rows = [{"fraction": 0.0, "mode": "unguided", "cost": 1.0 if unguided else None, **pick(scores["unguided"])}]
    for fraction in args.guided_fractions:
        suffix = mode_suffix(args, fraction)
        exact = scores[agreement_name(beta, suffix)]
        entries = [("exact", generation_name(suffix), agreement_name(beta, suffix))]
        if "batched" in args.step_modes:
            entries.append(("exact, batched", generation_name(suffix, batched=True), agreement_name(beta, suffix)))
        for k in args.intervals:
            entries.append((f"every {k}, reused", generation_name(suffix, k), agreement_name(beta, suffix, k)))
            entries.append(
                (f"every {k}, nothing between", generation_name(suffix, k), agreement_name(beta, suffix, k, False))
            )
        for mode, timing, score in entries:
            cost = seconds[timing] / unguided if unguided and timing in seconds else None
            values = pick(scores[score])
            rows.append(
                {
                    "fraction": fraction,
                    "mode": mode,
                    "cost": cost,
                    **values,
                    "iou_of_exact": values["iou"] / exact["iou"],
                }
            )
    return rows


def pick(summary: dict[str, Any]) -> dict[str, float]:
    return {key: summary[key] for key in ("iou", "outline_f_score", "colour_agreement")}


# ---------------------------------------------------------------------------------------------------------------------
# Report


def format_table(record: dict[str, Any]) -> str:
    config = record["config"]
    lines = [
        f"{config['model']} ({config['unet_parameters_millions']}M UNet parameters), {config['resolution']}px"
        f" ({config['latent_size']}x{config['latent_size']} latents), {config['steps']} steps of"
        f" {config['scheduler']}, {config['guided_steps']} guided, {config['dtype']} on {config['device']}"
        f" ({config['threads']} threads); median of {config['repeats']} runs after {config['warmup']} warm-up",
        "",
        f"{'':<52}{'seconds':>10}{'peak MiB':>11}{'rise MiB':>11}",
    ]
    for name, value in record["seconds"].items():
        peak = record["memory_mib"][name]
        lines.append(f"{name:<52}{value['median']:>10.4f}{peak['peak']:>11.0f}{peak['rise']:>11.0f}")
    lines += ["", f"memory: {config['memory_kind']}"]
    if "saved_for_backward_mib" in record:
        lines.append("activations kept for the backward of a guided step (MiB):")
        for name, value in record["saved_for_backward_mib"].items():
            after = value["after the last block read"]
            lines.append(f"  {name:<50}{value['total']:>10.1f}  ({after:.1f} after the last block read)")
    if record["ratios"]:
        lines += ["", "ratios:"]
    lines += [f"  {name:<50}{value:>10.3f}" for name, value in record["ratios"].items()]
    for name, values in record["ratio_runs"].items():
        lines.append(f"  {name + ', each run':<50}  {' '.join(f'{value:.3f}' for value in values)}")
    if "efficacy" in record:
        lines += [
            "",
            f"sketch agreement on the demo's held-out cases:{'IoU':>10}{'outline F':>11}{'colour':>8}{'seconds':>9}",
        ]
        for mode, value in record["efficacy"].items():
            lines.append(
                f"  {mode:<44}{value['iou']:>10.3f}{value['outline_f_score']:>11.3f}"
                f"{value['colour_agreement']:>8.2f}{value['seconds']:>9.1f}"
            )
    if "side_by_side" in record:
        lines += ["", "| guided fraction | mode | cost over unguided | IoU | of exact | outline F | colour |"]
        lines.append("|---:|---|---:|---:|---:|---:|---:|")
        for row in record["side_by_side"]:
            cost = f"{row['cost']:.2f}x" if row["cost"] is not None else "-"
            of_exact = f"{row['iou_of_exact']:.0%}" if "iou_of_exact" in row else ""
            lines.append(
                f"| {row['fraction']:g} | {row['mode']} | {cost} | {row['iou']:.3f} | {of_exact} |"
                f" {row['outline_f_score']:.3f} | {row['colour_agreement']:.0%} |"
            )
    return "\n".join(lines)


def without_nan(value: Any) -> Any:
    """`value` with NaN (a measurement this machine cannot take) as `None`, which JSON can hold."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nan(item) for item in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny, tiny-sdxl, sd15-random, sdxl-random, demo, or a Hub id / folder of an SD or SDXL model.",
    )
    parser.add_argument("--lgp", default=None, help="LGP folder or Hub id; default: the model's own, else random.")
    parser.add_argument("--resolution", type=int, default=None, help="Image side; default: the model's.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="Default: the model's.")
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument(
        "--guided_fraction",
        "--guided_fractions",
        dest="guided_fractions",
        type=schedule_fraction,
        nargs="+",
        default=[DEFAULT_SKETCH_GUIDANCE_END],
        help="`sketch_guidance_end` (start is 0), one or several side by side; default: the pipeline's.",
    )
    parser.add_argument(
        "--step_modes",
        nargs="+",
        default=["split", "batched"],
        choices=["split", "batched"],
        help="Guided step modes to time for the exact method (`pipe.guided_step_mode`); default both.",
    )
    parser.add_argument("--intervals", type=int, nargs="*", default=[], help="Also guide every k-th step, each k.")
    parser.add_argument(
        "--recurrences",
        type=int,
        nargs="*",
        default=[],
        help="Also a guided generation with each `sketch_guidance_recurrence` N (timed; not in --efficacy).",
    )
    parser.add_argument(
        "--recurrence_fraction",
        type=schedule_fraction,
        default=None,
        help="For screening --recurrences: the first fraction of the schedule whose guided steps recur (default: the"
        " pipeline's RECURRENCE_FRACTION, 0.1).",
    )
    parser.add_argument(
        "--no_gradient_reuse",
        action="store_true",
        help="With --intervals: the plain interval mode (no guidance between computed gradients).",
    )
    parser.add_argument(
        "--checkpointing", action="store_true", help="Also a guided generation with gradient checkpointing."
    )
    parser.add_argument("--efficacy", action="store_true", help="Sketch agreement of each mode (needs a trained LGP).")
    parser.add_argument("--efficacy_cases", type=int, default=12, help="Held-out cases for --efficacy.")
    parser.add_argument("--efficacy_seeds", type=int, nargs="+", default=[0, 1], help="Seeds for --efficacy.")
    parser.add_argument(
        "--efficacy_placement",
        default="inside",
        choices=("inside", "anywhere", "freehand"),  # benchmarks.efficacy.PLACEMENTS, imported only with --efficacy
        help="Which held-out sketches for --efficacy (`benchmarks.efficacy --placement`).",
    )
    parser.add_argument("--efficacy_steps", type=int, default=None, help="Steps for --efficacy; default: --steps.")
    parser.add_argument(
        "--sketch_guidance_scale", type=float, default=DEFAULT_SKETCH_GUIDANCE_SCALE, help="Default: the pipeline's."
    )
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["generation", "parts"],
        choices=["generation", "parts"],
        help="What to time: whole generations (with the fixed costs around the loop), the parts of a step, or both.",
    )
    parser.add_argument(
        "--fill",
        action="store_true",
        help="Also a guided generation with fill guidance: a random silhouette LGP of the LGP's size as `fill_lgp`,"
        " the sketch's own fill, the default `sketch_fill_scale` (timed; not in --efficacy).",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's.")
    parser.add_argument("--output", default=None, help="Also write the JSON to this file.")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.steps < 1:
        parser.error("--repeats and --steps must be at least 1, --warmup at least 0.")
    if any(k < 1 for k in args.intervals):
        parser.error("--intervals must be at least 1.")
    if any(n < 2 for n in args.recurrences):
        parser.error("--recurrences must be at least 2 (1 is the plain guided generation).")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with recurrence_fraction(args.recurrence_fraction):
        record = run_benchmark(args)
    print(format_table(record))
    text = json.dumps(without_nan(record), indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return record


if __name__ == "__main__":
    main()
