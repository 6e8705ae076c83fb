"""`sketch_guidance_recurrence`: the early guided steps taken again from re-noised latents, on every kind of scheduler;
and the guided loop's scheduler step keeping the original's signature, so that the call's generator seeds the noise of
ancestral schedulers."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import draw_square
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from pipeline_sketch_guided.testing import tiny_random_pipeline, tiny_random_sd3_pipeline

PROMPT = "a red star on the grey background"


@pytest.fixture
def pipe():
    pipe = tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 20)
    kwargs.setdefault("output_type", "np")
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), sketch=draw_square(), **kwargs).images


def test_one_is_the_method_as_it_was_and_two_repeats_the_first_tenth(pipe):
    """1 gives the images of a call without the argument; 2 runs the LGP once more on each guided step of the first
    10% of the schedule (3 of 30 steps: 9 + 3 LGP calls), and makes other, reproducible images."""
    np.testing.assert_array_equal(generate(pipe, sketch_guidance_recurrence=1), generate(pipe))
    calls = []
    handle = pipe.lgp.register_forward_hook(lambda *args: calls.append(1))
    try:
        twice = generate(pipe, num_inference_steps=30, sketch_guidance_recurrence=2)
    finally:
        handle.remove()
    assert len(calls) == 9 + 3
    np.testing.assert_array_equal(twice, generate(pipe, num_inference_steps=30, sketch_guidance_recurrence=2))
    assert not np.array_equal(twice, generate(pipe, num_inference_steps=30))


@pytest.mark.parametrize(
    "scheduler_class",
    [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler],
)
def test_every_kind_of_scheduler_recurs_reproducibly(pipe, scheduler_class):
    """DDPM-schedule (DDIM, DPM-Solver's multistep history restored between passes), sigma-scaled (Euler) and ancestral
    schedulers: finite, the same images for the same seed, other images than without repeats."""
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    twice = generate(pipe, sketch_guidance_recurrence=2)
    assert np.isfinite(twice).all()
    np.testing.assert_array_equal(twice, generate(pipe, sketch_guidance_recurrence=2))
    assert not np.array_equal(twice, generate(pipe))


def test_a_flow_matching_transformer_recurs():
    pipe = tiny_random_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"height": 32, "width": 32, "max_sequence_length": 16}
    twice = generate(pipe, sketch_guidance_recurrence=2, **kwargs)
    assert np.isfinite(twice).all() and not np.array_equal(twice, generate(pipe, **kwargs))
    np.testing.assert_array_equal(twice, generate(pipe, sketch_guidance_recurrence=2, **kwargs))


@pytest.mark.parametrize("value", [0, 1.5, True, "2"])
def test_a_recurrence_that_is_no_count_is_refused(pipe, value):
    with pytest.raises(ValueError, match="`sketch_guidance_recurrence` must be an integer >= 1"):
        generate(pipe, sketch_guidance_recurrence=value)


def test_ancestral_noise_comes_from_the_calls_generator_while_guiding(pipe):
    """The guided loop's scheduler step shows the original's signature, so the pipeline hands it `generator` (and
    `eta`): an ancestral scheduler's guided images are the same for the same seed, and differ for another."""
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    seen = {}
    original = pipe.prepare_extra_step_kwargs

    def recording(generator, eta):
        seen["step accepts generator"] = "generator" in inspect.signature(pipe.scheduler.step).parameters
        return original(generator, eta)

    pipe.prepare_extra_step_kwargs = recording
    first = generate(pipe)
    assert seen["step accepts generator"]
    np.testing.assert_array_equal(first, generate(pipe))
    assert not np.array_equal(first, generate(pipe, seed=1))
