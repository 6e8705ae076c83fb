"""Screening of ways to turn the LGP's gradient into a guidance step, none of them in the pipeline: the efficacy
benchmark with one such change applied for the whole run.

Each variant keeps the LGP and the step-size rule (alpha = beta ||z_t - z_{t-1}|| / ||g||) and changes one thing:

- `gradient_blur:SIGMA`: g blurred per channel by a Gaussian of SIGMA latent pixels before the step, so that guidance
  moves the latents in broad strokes only;
- `error_blur:SIGMA`: the loss taken between the LGP's prediction and the target both blurred by a Gaussian of SIGMA
  pixels of the target's resolution, L = sum (G * (LGP(F) - E(s)))^2: a prediction some pixels off a stroke still
  sees a slope towards it (a guidance-time widening of `target_blur`; the edge maps returned are the blurred ones);
- `detach:BLOCK[,BLOCK...]`: no gradient through the LGP's reading of the named UNet blocks (the LGP still reads
  them); g then reaches the latents only through the other blocks' features (and through these blocks inside the
  UNet, on the way to the deeper ones);
- `schedule:linear`: beta over the guided steps falling linearly from 2 x 9/10 beta at the first (of 9) to 2 x 1/10 at
  the last, with the same mean;
- `schedule:front3`: 2 x beta on the first 3 guided steps and beta / 2 after (the same mean over 9 guided steps);
- `schedule:front3_plus`: 2 x beta on the first 3 guided steps and beta after;
- `relu_temperature:T`: the gradient taken through the LGP's ReLUs softened to a softplus of width T instead of the
  pipeline's 0.02 (`LGPModel.smooth_relu_gradients`): the LGP's predictions are unchanged, its gradient is that of a
  smoother network, the smoother the wider T.

Results and reasons are in docs/fidelity.md ("Shaping the gradient"; the ReLU width under "What did not help").
Everything after `--` goes to the efficacy benchmark:

    python -m benchmarks.guidance_variants --variant error_blur:1 -- --placement inside --num_cases 24 --seeds 0 1 \\
        --scales 2.5 --ends 0.3 --max_end 0.3 --threads 2 --timing_runs 0 --validation_samples 0 \\
        --output_dir outputs/variants/error_blur_1_inside
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from unittest import mock

from benchmarks import efficacy
from pipeline_sketch_guided import guidance as guidance_module
from pipeline_sketch_guided.lgp import LGPModel, gaussian_blur

SCHEDULES = ("linear", "front3", "front3_plus")
KINDS = ("gradient_blur", "error_blur", "detach", "schedule", "relu_temperature")


def schedule_weight(schedule: str, position: int, num_guided: int) -> float:
    """The factor on beta at the `position`-th (from 0) of `num_guided` guided steps."""
    if schedule == "linear":
        return 2 * (num_guided - position) / (num_guided + 1)
    if schedule == "front3":
        return 2.0 if position < 3 else 0.5
    if schedule == "front3_plus":
        return 2.0 if position < 3 else 1.0
    raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}.")


def parse_variant(spec: str) -> tuple[str, Any]:
    """("gradient_blur" | "error_blur", sigma), ("detach", block names), ("schedule", name) or ("relu_temperature",
    width) from "KIND:VALUE"."""
    kind, _, value = spec.partition(":")
    if kind not in KINDS or not value:
        raise ValueError(f"A variant is KIND:VALUE with KIND one of {KINDS}, got {spec!r}.")
    if kind == "schedule":
        if value not in SCHEDULES:
            raise ValueError(f"A schedule is one of {SCHEDULES}, got {value!r}.")
        return kind, value
    if kind == "detach":
        return kind, tuple(value.split(","))
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        what = "a softplus width" if kind == "relu_temperature" else "a standard deviation in pixels"
        raise ValueError(f"{kind}'s value is {what} above 0, got {value!r}.")
    return kind, number


@contextlib.contextmanager
def guidance_variant(spec: str) -> Iterator[None]:
    """Inside the context, every sketch-guided pipeline guides with the variant `spec` (see the module's doc)."""
    kind, value = parse_variant(spec)
    with contextlib.ExitStack() as stack:
        if kind == "gradient_blur":
            step = guidance_module.sketch_guidance_step

            def blurred_step(latents, next_latents, gradient, scale):
                return step(latents, next_latents, gaussian_blur(gradient.float(), value), scale)

            stack.enter_context(mock.patch.object(guidance_module, "sketch_guidance_step", blurred_step))
        elif kind == "error_blur":
            # Blurring both sides of the error is blurring the prediction and the target: (G*p - G*t) = G*(p - t).
            lgp_forward = LGPModel.forward
            prepare = guidance_module.SketchGuidanceMixin.prepare_sketch_latents

            def blurred_forward(self, *args, **kwargs):
                return gaussian_blur(lgp_forward(self, *args, **kwargs).float(), value)

            def blurred_target(self, *args, **kwargs):
                return gaussian_blur(prepare(self, *args, **kwargs).float(), value)

            stack.enter_context(mock.patch.object(LGPModel, "forward", blurred_forward))
            stack.enter_context(
                mock.patch.object(guidance_module.SketchGuidanceMixin, "prepare_sketch_latents", blurred_target)
            )
        elif kind == "detach":
            lgp_forward = LGPModel.forward

            def forward_without(self, features, noise_level):
                unknown = set(value) - set(self.config.blocks)
                if unknown:
                    raise ValueError(f"This LGP reads no block {sorted(unknown)}; it reads {self.config.blocks}.")
                if isinstance(features, Mapping):
                    features = [features[name] for name in self.config.blocks]
                read = [f.detach() if n in value else f for n, f in zip(self.config.blocks, features, strict=True)]
                return lgp_forward(self, read, noise_level)

            stack.enter_context(mock.patch.object(LGPModel, "forward", forward_without))
        elif kind == "relu_temperature":
            smooth = LGPModel.smooth_relu_gradients

            def smoother(self, temperature=None):
                return smooth(self, value)

            stack.enter_context(mock.patch.object(LGPModel, "smooth_relu_gradients", smoother))
        else:
            scheduler_step = guidance_module.GuidedCall.scheduler_step

            def scheduled_step(self, *args, **kwargs):
                base = self.scale
                if self.step_call is not None:
                    guided = sorted(self.guided_steps)
                    self.scale = base * schedule_weight(value, guided.index(self.step_call[0]), len(guided))
                try:
                    return scheduler_step(self, *args, **kwargs)
                finally:
                    self.scale = base

            stack.enter_context(mock.patch.object(guidance_module.GuidedCall, "scheduler_step", scheduled_step))
        yield


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", required=True, help="KIND:VALUE, see above")
    parser.add_argument("efficacy_args", nargs=argparse.REMAINDER, help="-- then the efficacy benchmark's arguments")
    args = parser.parse_args(argv)
    rest = args.efficacy_args[1:] if args.efficacy_args[:1] == ["--"] else args.efficacy_args
    with guidance_variant(args.variant):  # parses the variant first: a bad one fails before the pipeline loads
        return efficacy.main(rest)


if __name__ == "__main__":
    main()
