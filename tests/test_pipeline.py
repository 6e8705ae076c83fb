import numpy as np
import pytest
import torch
from conftest import draw_square
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from pipeline_sketch_guided import SketchGuidedStableDiffusionPipeline, prepare_sketch
from pipeline_sketch_guided.pipeline import guided_step_indices, is_guided_step, sketch_guidance_step
from pipeline_sketch_guided.testing import random_lgp

PROMPT = "a red star on the grey background"


def generate(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "np")
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs)


def sketch_loss(pipe, latents, sketch) -> torch.Tensor:
    """The LGP's loss against `sketch` for final (clean) latents, per image, read at a low-noise timestep with DDIM,
    so that the same measure serves every scheduler."""
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        prompt_embeds = torch.cat(pipe.encode_prompt(PROMPT, "cpu", latents.shape[0], True)[::-1])
        target = pipe.prepare_sketch_latents(sketch, latents.shape[0], 32, 32, "cpu")
        pipe._guidance_scale = 7.5
        unet_kwargs = {"timestep_cond": None, "cross_attention_kwargs": None, "added_cond_kwargs": None}
        model_input = torch.cat([latents] * 2)  # the loop's CFG batch; DDIM does not scale its input
        *_, edge_latents = pipe.noise_and_sketch_gradient(
            model_input, torch.tensor(50), prompt_embeds, {**unet_kwargs, "return_dict": False}, target
        )
    finally:
        pipe.scheduler = scheduler
    return (edge_latents - target).square().flatten(1).sum(1)


def test_without_sketch_output_is_bit_for_bit_stable_diffusion(components, pipe):
    reference = StableDiffusionPipeline(**components)
    reference.set_progress_bar_config(disable=True)
    expected = generate(reference).images
    assert np.array_equal(generate(pipe).images, expected)
    assert np.array_equal(generate(pipe, sketch=draw_square(), sketch_guidance_scale=0.0).images, expected)


def test_unguided_steps_of_a_guided_run_are_stable_diffusion_steps(components, pipe):
    """The guided loop's own unguided steps (here the first half) match StableDiffusionPipeline exactly."""

    def recorder(store):
        def callback(pipeline, step, timestep, callback_kwargs):
            store.append(callback_kwargs["latents"].clone())
            return callback_kwargs

        return callback

    expected, found = [], []
    reference = StableDiffusionPipeline(**components)
    reference.set_progress_bar_config(disable=True)
    generate(reference, callback_on_step_end=recorder(expected))
    generate(
        pipe,
        sketch=draw_square(),
        sketch_guidance_start=0.5,
        sketch_guidance_end=1.0,
        callback_on_step_end=recorder(found),
    )
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])
    assert not torch.allclose(found[3], expected[3])  # the guided second half does move the latents


@pytest.mark.parametrize(
    "scheduler_class", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler]
)
def test_guidance_lowers_the_sketch_loss(pipe, scheduler_class):
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    sketch = draw_square()
    kwargs = {"output_type": "latent", "sketch_guidance_end": 1.0, "num_inference_steps": 8}
    unguided = generate(pipe, **kwargs).images
    guided = generate(pipe, sketch=sketch, sketch_guidance_scale=1.0, **kwargs).images
    assert torch.isfinite(guided).all()
    loss_unguided, loss_guided = sketch_loss(pipe, unguided, sketch), sketch_loss(pipe, guided, sketch)
    assert (loss_guided < 0.8 * loss_unguided).all(), (loss_guided, loss_unguided)


def test_guidance_step_size_is_relative_to_the_denoising_step_per_image():
    latents = torch.zeros(2, 4, 2, 2)
    next_latents = torch.ones(2, 4, 2, 2) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)  # step norms 4 and 12
    gradient = torch.randn(2, 4, 2, 2) * torch.tensor([1e-3, 1e3]).view(2, 1, 1, 1)
    moved = sketch_guidance_step(latents, next_latents, gradient, scale=0.5)
    shift = (next_latents - moved).flatten(1).norm(dim=1)
    assert torch.allclose(shift, torch.tensor([2.0, 6.0]))
    direction = torch.nn.functional.cosine_similarity((next_latents - moved).flatten(1), gradient.flatten(1))
    assert torch.allclose(direction, torch.ones(2))


def test_guided_range_follows_control_guidance_rule():
    assert [is_guided_step(i, 10, 0.0, 0.5) for i in range(10)] == [True] * 5 + [False] * 5
    assert [is_guided_step(i, 4, 0.25, 1.0) for i in range(4)] == [False, True, True, True]


def test_callback_on_step_end_sees_and_changes_the_latents(pipe):
    steps = []

    def callback(pipeline, step, timestep, callback_kwargs):
        steps.append(step)
        assert callback_kwargs["prompt_embeds"].shape[0] == 2  # [negative, positive], as in StableDiffusionPipeline
        if step == 3:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    out = generate(
        pipe,
        sketch=draw_square(),
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    assert steps == [0, 1, 2, 3]
    assert torch.count_nonzero(out.images) == 0


def test_images_per_prompt_with_one_sketch_and_with_one_sketch_per_image(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    square, star = draw_square(), draw_square(dark_on_light=False).rotate(30, fillcolor=0)
    kwargs = {"output_type": "latent", "num_images_per_prompt": 2}
    both = generate(pipe, sketch=[square, star], latents=latents, **kwargs).images
    shared = generate(pipe, sketch=square, latents=latents, **kwargs).images
    assert both.shape == shared.shape == (2, 4, 8, 8)
    # Each image follows its own sketch, and its guidance does not depend on the other images of the batch.
    alone = generate(pipe, sketch=star, latents=latents[1:], output_type="latent").images
    assert torch.allclose(both[1], alone[0], atol=1e-4)
    assert torch.allclose(both[0], shared[0], atol=1e-4)
    assert not torch.allclose(both[1], shared[1], atol=1e-3)


def test_prompt_batch_with_one_sketch_per_prompt(pipe):
    out = pipe(
        [PROMPT, "a blue circle"],
        sketch=[draw_square(), draw_square(dark_on_light=False)],
        num_images_per_prompt=2,
        num_inference_steps=2,
        output_type="np",
    )
    assert out.images.shape == (4, 32, 32, 3)


def test_edge_maps_are_returned_on_request(pipe):
    out = generate(pipe, sketch=draw_square(), return_edge_maps=True)
    assert out.edge_maps.shape == out.images.shape == (1, 32, 32, 3)
    images, nsfw, edge_maps = generate(pipe, sketch=draw_square(), return_edge_maps=True, return_dict=False)
    assert np.array_equal(edge_maps, out.edge_maps)
    assert generate(pipe, sketch=draw_square()).edge_maps is None


def test_batchnorm_is_in_eval_mode_while_sampling(pipe):
    pipe.lgp.train()
    seen = []
    pipe.lgp.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    generate(pipe, sketch=draw_square())
    assert seen and not any(seen)


def test_save_and_load_the_whole_pipeline(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "lgp" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SketchGuidedStableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.lgp is not None and loaded.lgp.config.blocks == pipe.lgp.config.blocks
    sketch = draw_square()
    assert np.array_equal(generate(loaded, sketch=sketch).images, generate(pipe, sketch=sketch).images)


def test_custom_pipeline_from_the_module_file(tmp_path, components):
    from pathlib import Path

    from diffusers import DiffusionPipeline

    import pipeline_sketch_guided

    StableDiffusionPipeline(**components).save_pretrained(tmp_path)
    pipeline_file = Path(pipeline_sketch_guided.__file__).parent / "pipeline.py"
    pipe = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(pipeline_file), trust_remote_code=True)
    assert type(pipe).__name__ == "SketchGuidedStableDiffusionPipeline" and pipe.lgp is None
    pipe.set_progress_bar_config(disable=True)
    pipe.lgp = random_lgp(pipe.unet)
    assert generate(pipe, sketch=draw_square()).images.shape == (1, 32, 32, 3)


def test_lgp_pipeline_from_pipe(pipe):
    other = SketchGuidedStableDiffusionPipeline.from_pipe(pipe)
    assert other.lgp is pipe.lgp


# Bad input: each error names the argument and what to do.


def test_sketch_without_lgp(components):
    pipe = SketchGuidedStableDiffusionPipeline(**components)
    with pytest.raises(ValueError, match=r"no LGP.*LGPModel.from_pretrained"):
        generate(pipe, sketch=draw_square())


def test_mismatched_lgp_is_rejected_when_set(components, pipe):
    from diffusers import UNet2DConditionModel

    wide = UNet2DConditionModel(**{**components["unet"].config, "block_out_channels": (32, 96)})
    with pytest.raises(ValueError, match="'mid_block.attentions.0'"):
        pipe.lgp = random_lgp(wide)
    with pytest.raises(ValueError, match="'mid_block.attentions.0'"):
        SketchGuidedStableDiffusionPipeline(**components, lgp=random_lgp(wide))


def test_blank_sketch(pipe):
    with pytest.raises(ValueError, match="blank"):
        generate(pipe, sketch=np.full((32, 32), 255, dtype=np.uint8))


@pytest.mark.parametrize("scale", [-0.1, "strong", float("nan"), float("inf"), 1e9, True, torch.tensor(2.5)])
def test_bad_guidance_scale_is_refused_with_the_sensible_range(pipe, scale):
    with pytest.raises(ValueError, match=r"sketch_guidance_scale.*About 1 to 4"):
        generate(pipe, sketch=draw_square(), sketch_guidance_scale=scale)


@pytest.mark.parametrize("scale", [np.float32(2.5), np.float64(2.5), 2.5, np.int64(2)])
def test_any_real_number_is_a_guidance_scale(pipe, scale):
    images = generate(pipe, sketch=draw_square(), sketch_guidance_scale=scale, output_type="latent").images
    assert torch.isfinite(images).all()


@pytest.mark.parametrize(
    "num_steps, start, end, interval, expected",
    [
        (10, 0.0, 0.3, 1, [0, 1, 2]),
        (10, 0.0, 0.5, 2, [0, 2, 4]),
        # Every step of the first 10% computes its gradient, then every k-th onwards from the last of them.
        (30, 0.0, 0.5, 2, [0, 1, 2, 4, 6, 8, 10, 12, 14]),
        (50, 0.0, 0.5, 3, [0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22]),
        (30, 0.2, 0.5, 2, [6, 8, 10, 12, 14]),  # a range that starts later has no leading steps
        (30, 0.0, 0.05, 2, [0]),
        (3, 0.0, 0.3, 1, [0]),  # no step lies in the range: the first is guided anyway
        (2, 0.0, 0.3, 1, [0]),
        (4, 0.6, 0.7, 1, [3]),  # the first step at or after start
        (1, 0.0, 0.3, 1, [0]),
    ],
)
def test_guided_step_indices(num_steps, start, end, interval, expected):
    assert guided_step_indices(num_steps, start, end, interval) == expected


def test_a_sketch_guides_even_when_no_step_lies_in_the_range(pipe):
    kwargs = {"num_inference_steps": 2, "output_type": "np"}
    guided = generate(pipe, sketch=draw_square(), return_edge_maps=True, **kwargs)
    assert guided.edge_maps is not None and guided.edge_maps.shape == (1, 32, 32, 3)
    assert not np.allclose(guided.images, generate(pipe, **kwargs).images)


@pytest.mark.parametrize("start, end", [(0.0, 1.5), (-0.1, 0.5), (0.6, 0.4), (0.5, 0.5)])
def test_guided_range_outside_the_schedule(pipe, start, end):
    with pytest.raises(ValueError, match="sketch_guidance_start"):
        generate(pipe, sketch=draw_square(), sketch_guidance_start=start, sketch_guidance_end=end)


def test_number_of_sketches_that_fits_neither_one_nor_the_batch(pipe):
    with pytest.raises(ValueError, match="Got 3 sketches for 1 prompts and 2 images"):
        generate(pipe, sketch=[draw_square()] * 3, num_images_per_prompt=2)


def test_half_precision_on_cpu_is_a_clear_error(pipe):
    pipe.to(torch.float16)
    with pytest.raises(ValueError, match="float16 on the CPU"):
        generate(pipe, sketch=draw_square())


def test_unconditional_lgp_needs_classifier_free_guidance(components):
    pipe = SketchGuidedStableDiffusionPipeline(
        **components, lgp=random_lgp(components["unet"], feature_branch="unconditional")
    )
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="guidance_scale"):
        generate(pipe, sketch=draw_square(), guidance_scale=1.0)
    assert generate(pipe, sketch=draw_square()).images.shape == (1, 32, 32, 3)


def test_edge_maps_without_sketch(pipe):
    with pytest.raises(ValueError, match="return_edge_maps"):
        generate(pipe, return_edge_maps=True)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_epsilon_is_recovered_from_any_prediction_type(pipe, prediction_type):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    clean, noise, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([300])
    noisy = pipe.scheduler.add_noise(clean, noise, t)
    output = {"epsilon": noise, "v_prediction": pipe.scheduler.get_velocity(clean, noise, t), "sample": clean}
    alpha_bar = pipe.scheduler.alphas_cumprod[300]
    epsilon = pipe.predict_noise_epsilon(output[prediction_type], noisy, alpha_bar)
    assert torch.allclose(epsilon, noise, atol=1e-4)


def test_v_prediction_model_is_guided(pipe):
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    out = generate(pipe, sketch=draw_square(), output_type="latent")
    assert torch.isfinite(out.images).all()
    assert not torch.equal(out.images, generate(pipe, output_type="latent").images)


def test_non_finite_gradient_skips_that_steps_guidance_with_a_warning(pipe, caplog):
    # An LGP that blows up on the second image only: its guidance is skipped, the first image's is not.
    def explode_second_image(module, args, output):
        return output * torch.tensor([1.0, float("inf")]).view(2, 1, 1, 1)  # keeps the gradient path, makes it inf

    pipe.lgp.register_forward_hook(explode_second_image)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = {"output_type": "latent", "num_images_per_prompt": 2, "latents": latents}
    with caplog.at_level("WARNING"):
        guided = generate(pipe, sketch=draw_square(), **kwargs).images
    assert "not finite" in caplog.text
    assert torch.isfinite(guided).all()
    unguided = generate(pipe, **kwargs).images
    assert torch.allclose(guided[1], unguided[1], atol=1e-4)
    assert not torch.allclose(guided[0], unguided[0], atol=1e-3)


def test_the_lgps_sketch_polarity_can_be_overridden_and_is_saved(pipe, tmp_path):
    assert pipe.lgp.config.sketch_polarity == "light_on_dark"
    before = pipe.prepare_sketch_latents(draw_square(), 1, 32, 32, "cpu")
    pipe.set_sketch_polarity("dark_on_light")
    inverted = pipe.prepare_sketch_latents(draw_square(), 1, 32, 32, "cpu")
    # The same drawing, now turned into dark strokes on light paper: the VAE sees the inverse image.
    expected = pipe.vae.encode(-prepare_sketch(draw_square(), 32, 32)).latent_dist.mean * pipe.vae.config.scaling_factor
    assert torch.allclose(inverted, expected, atol=1e-5) and not torch.allclose(inverted, before, atol=1e-2)
    pipe.save_pretrained(tmp_path)
    assert SketchGuidedStableDiffusionPipeline.from_pretrained(tmp_path).lgp.config.sketch_polarity == "dark_on_light"
    with pytest.raises(ValueError, match="polarity"):
        pipe.set_sketch_polarity("white")


def test_an_encoded_sketch_is_reused_for_the_next_calls(pipe, monkeypatch):
    encoded = []
    encode = pipe.encode_to_latents
    monkeypatch.setattr(pipe, "encode_to_latents", lambda images: encoded.append(1) or encode(images))
    first = generate(pipe, sketch=draw_square(), output_type="latent", seed=0).images
    generate(pipe, sketch=draw_square(), output_type="latent", seed=1)  # another seed, the same sketch
    assert len(encoded) == 1
    generate(pipe, sketch=draw_square(dark_on_light=False), output_type="latent")  # the same strokes, other paper
    assert len(encoded) == 1  # turned into the same image for the LGP, so the same latents
    generate(pipe, sketch=draw_square().rotate(20, fillcolor=255), output_type="latent")
    assert len(encoded) == 2
    # The same result as without the cache, which a new VAE (or size 0) empties or turns off.
    pipe.sketch_cache_size = 0
    pipe.vae = pipe.vae
    assert torch.equal(generate(pipe, sketch=draw_square(), output_type="latent", seed=0).images, first)
    assert len(encoded) == 3


def test_gradient_reuse_guides_the_steps_between_computed_ones_at_no_extra_gradient(pipe, monkeypatch):
    computed = []
    compute = pipe.noise_and_sketch_gradient

    def counting(*args, **kwargs):
        computed.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(pipe, "noise_and_sketch_gradient", counting)
    kwargs = {"sketch": draw_square(), "output_type": "latent", "sketch_guidance_end": 1.0, "num_inference_steps": 6}
    pipe.sketch_gradient_reuse = False
    every_2 = generate(pipe, sketch_guidance_interval=2, **kwargs).images
    assert len(computed) == 3
    pipe.sketch_gradient_reuse = True  # the default
    reused = generate(pipe, sketch_guidance_interval=2, **kwargs).images
    assert len(computed) == 6  # the same three gradients computed
    assert not torch.allclose(reused, every_2)  # and three more guidance steps taken along them
    # With every step computed there is nothing to reuse: the exact method.
    assert torch.equal(generate(pipe, **kwargs).images, generate(pipe, sketch_guidance_interval=1, **kwargs).images)
