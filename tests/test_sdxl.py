"""SketchGuidedStableDiffusionXLPipeline on a tiny SDXL built from configs: the same guidance core as the SD pipeline,
with SDXL's two text encoders, pooled embeddings and size conditioning."""

import numpy as np
import pytest
import torch
from conftest import draw_square
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

from benchmarks.models import SDXL_UNET
from pipeline_sketch_guided import LGPModel, SketchGuidedStableDiffusionXLPipeline
from pipeline_sketch_guided.guidance import frozen_parameters
from pipeline_sketch_guided.pipeline_xl import __file__ as PIPELINE_XL_FILE
from pipeline_sketch_guided.testing import random_lgp, tiny_components, tiny_sdxl_components

PROMPT = "a red star on the grey background"


@pytest.fixture
def sdxl_components() -> dict:
    return tiny_sdxl_components()


@pytest.fixture
def pipe(sdxl_components) -> SketchGuidedStableDiffusionXLPipeline:
    pipe = SketchGuidedStableDiffusionXLPipeline(**sdxl_components, lgp=random_lgp(sdxl_components["unet"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "np")
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs)


def lgp_loss(pipe, latents: torch.Tensor, sketch) -> torch.Tensor:
    """The LGP's loss against `sketch` for final latents, per image, read on the conditional branch at a low-noise
    DDIM timestep with SDXL's added conditioning, so that one measure serves every scheduler."""
    count = latents.shape[0]
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=count)
    projection = pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), embeds.dtype, projection).repeat(count, 1)
    kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}, "return_dict": False}
    target = pipe.prepare_sketch_latents(sketch, count, 32, 32, "cpu")
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        with torch.enable_grad(), frozen_parameters(pipe.unet, pipe.lgp):
            *_, edge_latents = pipe.sketch_loss(latents, torch.tensor(50), embeds, kwargs, target)
    finally:
        pipe.scheduler = scheduler
    return (edge_latents.detach() - target).square().flatten(1).sum(1)


def test_without_sketch_output_is_bit_for_bit_stable_diffusion_xl(sdxl_components, pipe):
    reference = StableDiffusionXLPipeline(**sdxl_components)
    reference.set_progress_bar_config(disable=True)
    expected = generate(reference).images
    assert np.array_equal(generate(pipe).images, expected)
    assert np.array_equal(generate(pipe, sketch=draw_square(), sketch_guidance_scale=0.0).images, expected)


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
    loss_unguided, loss_guided = lgp_loss(pipe, unguided, sketch), lgp_loss(pipe, guided, sketch)
    assert (loss_guided < 0.8 * loss_unguided).all(), (loss_guided, loss_unguided)


def test_each_branch_gets_its_own_added_conditioning(pipe):
    """Split and batched guided steps give the same images only if each branch's UNet call gets that branch's
    `text_embeds` and `time_ids` (a swapped or unsplit half would change the images or fail); the negative size
    conditioning makes the two branches' differ, and does change the images."""
    kwargs = {"sketch": draw_square(), "output_type": "latent", "sketch_guidance_end": 1.0, "num_images_per_prompt": 2}
    negative = {"negative_original_size": (16, 16), "negative_target_size": (24, 24)}
    pipe.guided_step_mode = "split"
    split = generate(pipe, **kwargs, **negative).images
    pipe.guided_step_mode = "batched"
    batched = generate(pipe, **kwargs, **negative).images
    assert torch.allclose(split, batched, atol=1e-4)
    assert not torch.allclose(split, generate(pipe, **kwargs).images, atol=1e-3)


def test_edge_maps_and_the_float16_vae_upcast(pipe):
    out = generate(pipe, sketch=draw_square(), return_edge_maps=True)
    assert out.edge_maps.shape == (1, 32, 32, 3) and np.isfinite(out.edge_maps).all()
    # SDXL's VAE overflows in float16 (`force_upcast`): the sketch is encoded and the edge map decoded in float32, and
    # the VAE is left in float16, as StableDiffusionXLPipeline does for its images.
    reference = pipe.prepare_sketch_latents(draw_square(), 1, 32, 32, "cpu")
    pipe.vae.register_to_config(force_upcast=True)
    pipe.vae.to(torch.float16)
    upcast = pipe.prepare_sketch_latents(draw_square(), 1, 32, 32, "cpu")
    assert upcast.dtype == torch.float32 and pipe.vae.dtype == torch.float16
    assert torch.allclose(upcast, reference, atol=2e-2)  # float16-rounded weights, float32 arithmetic
    out = generate(pipe, sketch=draw_square(), return_edge_maps=True)
    assert np.isfinite(out.images).all() and np.isfinite(out.edge_maps).all() and pipe.vae.dtype == torch.float16


def test_sdxl_block_preset_and_a_mismatched_lgp(pipe):
    with torch.device("meta"):  # SDXL's real UNet structure, without allocating its 2.6 billion parameters
        sdxl_unet = UNet2DConditionModel(**SDXL_UNET)
    lgp = LGPModel.from_unet(sdxl_unet)
    assert list(lgp.config.blocks) == [
        "down_blocks.0",
        "down_blocks.1",
        "mid_block.attentions.0",
        "mid_block.resnets.0",
        "mid_block.resnets.1",
        "up_blocks.0",
        "up_blocks.1",
    ]
    assert list(lgp.config.block_channels) == [320, 640, 1280, 1280, 1280, 1280, 640]
    sd_lgp = random_lgp(tiny_components()["unet"])
    with pytest.raises(ValueError, match="down_blocks.0|mid_block|up_blocks"):
        pipe.lgp = sd_lgp.__class__(**{**sd_lgp.config, "block_channels": [8] * len(sd_lgp.config.blocks)})


def test_saved_and_loaded_and_as_a_custom_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = SketchGuidedStableDiffusionXLPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    expected = generate(pipe, sketch=draw_square()).images
    np.testing.assert_allclose(generate(loaded, sketch=draw_square()).images, expected, atol=1e-6)

    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(tmp_path / "base")
    custom = DiffusionPipeline.from_pretrained(
        tmp_path / "base", custom_pipeline=PIPELINE_XL_FILE, lgp=pipe.lgp, trust_remote_code=True
    )
    custom.set_progress_bar_config(disable=True)
    assert type(custom).__name__ == "SketchGuidedStableDiffusionXLPipeline"
    np.testing.assert_allclose(generate(custom, sketch=draw_square()).images, expected, atol=1e-6)


def test_a_fill_lgp_guides_sdxl_by_default_and_is_saved_with_it(pipe, tmp_path):
    """Fill guidance works in SDXL as in SD 1.x/2.x (the same guidance core): with a `fill_lgp` each sketch is guided
    with its own fill by default ("auto"), `sketch_fill_scale=0` is the sketch alone, bit for bit, and the fill LGP is
    saved and loaded with the pipeline."""
    latent = {"sketch": draw_square(), "output_type": "latent"}
    alone = generate(pipe, **latent).images
    pipe.fill_lgp = random_lgp(pipe.unet, seed=1, map_kind="silhouette")
    assert pipe.fills_by_default
    by_default = generate(pipe, **latent).images
    assert not torch.allclose(by_default, alone)
    torch.testing.assert_close(generate(pipe, sketch_fill="auto", **latent).images, by_default, rtol=0, atol=0)
    torch.testing.assert_close(generate(pipe, sketch_fill_scale=0.0, **latent).images, alone, rtol=0, atol=0)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = SketchGuidedStableDiffusionXLPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(generate(loaded, **latent).images, by_default, rtol=1e-5, atol=1e-6)


def test_sketch_mask_restricts_the_loss_to_its_region(pipe):
    """A mask over the left half weighs the loss there only (at latent resolution), and changes what guidance does; a
    black mask, or a mask without a sketch, is refused."""
    sketch = draw_square()
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255
    weights = pipe.prepare_sketch_masks(mask, 1, 32, 32, "cpu")
    assert weights.shape == (1, 1, 16, 16)
    assert torch.equal(weights[..., :8], torch.ones(1, 1, 16, 8)) and not weights[..., 8:].any()
    masked = generate(pipe, sketch=sketch, sketch_mask=mask, output_type="latent", sketch_guidance_end=1.0).images
    whole = generate(pipe, sketch=sketch, output_type="latent", sketch_guidance_end=1.0).images
    assert torch.isfinite(masked).all() and not torch.allclose(masked, whole)
    with pytest.raises(ValueError, match="black everywhere"):
        generate(pipe, sketch=sketch, sketch_mask=np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="needs a `sketch`"):
        generate(pipe, sketch_mask=mask)
