"""diffusers' pipeline contract with a sketch: every VAE and scheduler diffusers ships for Stable Diffusion, sketches in
diffusers' image conventions, and a seed's image that does not depend on the batch or the attention kernel."""

import importlib.util

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import draw_square
from diffusers import (
    AsymmetricAutoencoderKL,
    AutoencoderTiny,
    ConsistencyDecoderVAE,
    DDIMScheduler,
)
from diffusers import schedulers as diffusers_schedulers
from diffusers.models.attention_processor import AttnProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from test_pipeline import generate, sketch_loss

from pipeline_sketch_guided.demo import demo_sketches, load_demo_pipeline


def tiny_vaes() -> dict:
    """Every VAE class StableDiffusionPipeline accepts besides AutoencoderKL, tiny, downsampling 2x as the tiny UNet's
    AutoencoderKL does."""
    torch.manual_seed(0)
    return {
        "AutoencoderTiny": AutoencoderTiny(
            encoder_block_out_channels=(32, 32),
            decoder_block_out_channels=(32, 32),
            num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 1),
        ),
        "AsymmetricAutoencoderKL": AsymmetricAutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2,
            down_block_out_channels=(32, 32),
            up_block_types=("UpDecoderBlock2D",) * 2,
            up_block_out_channels=(32, 32),
            norm_num_groups=16,
        ),
        "ConsistencyDecoderVAE": ConsistencyDecoderVAE(
            encoder_block_out_channels=(32, 32),
            encoder_down_block_types=("DownEncoderBlock2D",) * 2,
            encoder_layers_per_block=1,
            encoder_norm_num_groups=16,
            decoder_block_out_channels=(32, 64),
            decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2,
            decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2,
            decoder_layers_per_block=1,
            decoder_norm_num_groups=16,
        ),
    }


@pytest.mark.parametrize(
    "vae_name", ["AutoencoderKL", "AsymmetricAutoencoderKL", "AutoencoderTiny", "ConsistencyDecoderVAE"]
)
def test_guidance_works_with_every_vae_class(pipe, vae_name):
    if vae_name != "AutoencoderKL":
        pipe.vae = tiny_vaes()[vae_name]
    sketch = draw_square()
    guided = generate(pipe, sketch=sketch, num_inference_steps=2, return_edge_maps=True)
    unguided = generate(pipe, num_inference_steps=2).images
    assert guided.images.shape == unguided.shape == (1, 32, 32, 3)
    assert np.isfinite(guided.images).all() and not np.allclose(guided.images, unguided)
    assert guided.edge_maps.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("scheduler_name", [scheduler.name for scheduler in KarrasDiffusionSchedulers])
def test_every_karras_scheduler_is_guided_and_lowers_the_sketch_loss(pipe, scheduler_name):
    if scheduler_name == "DPMSolverSDEScheduler" and importlib.util.find_spec("torchsde") is None:
        pytest.skip("DPMSolverSDEScheduler needs torchsde (pip install torchsde)")
    scheduler_class = getattr(diffusers_schedulers, scheduler_name)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    sketch = draw_square()
    kwargs = {"output_type": "latent", "sketch_guidance_end": 1.0, "num_inference_steps": 8}
    unguided = generate(pipe, **kwargs).images
    guided = generate(pipe, sketch=sketch, sketch_guidance_scale=1.0, **kwargs).images
    assert torch.isfinite(guided).all()
    if scheduler_name == "EDMEulerScheduler":
        # Its latents live at another scale (EDM preconditioning), which the DDIM-read loss below does not measure;
        # that guidance ran and moved them is what holds for any UNet.
        assert not torch.allclose(guided, unguided)
        return
    loss_unguided, loss_guided = sketch_loss(pipe, unguided, sketch), sketch_loss(pipe, guided, sketch)
    assert (loss_guided < 0.8 * loss_unguided).all(), (loss_guided, loss_unguided)


def test_edm_noise_level_comes_from_sigma(pipe):
    pipe.scheduler = diffusers_schedulers.EDMEulerScheduler()
    pipe.scheduler.set_timesteps(4)
    pipe.scheduler.scale_model_input(torch.zeros(1, 4, 16, 16), pipe.scheduler.timesteps[1])
    sigma = pipe.scheduler.sigmas[1]
    alpha_bar = pipe.noise_level_alpha_bar(pipe.scheduler.timesteps[1], "cpu")
    assert torch.isclose(alpha_bar, 1 / (1 + sigma**2))
    pipe.scheduler = DDIMScheduler.from_config(pipe.components["scheduler"].config)
    assert torch.equal(pipe.noise_level_alpha_bar(torch.tensor(500), "cpu"), pipe.scheduler.alphas_cumprod[500])


def test_sketches_in_diffusers_image_conventions(pipe):
    square = np.asarray(draw_square().convert("RGB"))  # (H, W, 3) uint8
    other = np.asarray(draw_square(dark_on_light=False).rotate(30).convert("RGB"))
    expected = pipe.prepare_sketch_latents([PIL.Image.fromarray(square)], 1, 32, 32, "cpu")
    as_float = square.astype(np.float32) / 255
    as_tensor = torch.from_numpy(as_float).permute(2, 0, 1)  # (C, H, W) in [0, 1]
    for single in (square, as_float, as_float[None], as_tensor, as_tensor[None], [PIL.Image.fromarray(square)]):
        assert torch.allclose(pipe.prepare_sketch_latents(single, 1, 32, 32, "cpu"), expected, atol=1e-6)

    # A batch as one array (B, H, W, C) or one tensor (B, C, H, W) is one sketch per image.
    batch = np.stack([square, other])
    by_list = pipe.prepare_sketch_latents([PIL.Image.fromarray(a) for a in batch], 2, 32, 32, "cpu")
    assert torch.allclose(pipe.prepare_sketch_latents(batch, 2, 32, 32, "cpu"), by_list, atol=1e-6)
    tensor_batch = torch.from_numpy(batch.astype(np.float32) / 255).permute(0, 3, 1, 2)
    assert torch.allclose(pipe.prepare_sketch_latents(tensor_batch, 2, 32, 32, "cpu"), by_list, atol=1e-6)
    images = generate(pipe, sketch=batch, num_images_per_prompt=2, num_inference_steps=2).images
    assert images.shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="3 sketches"):
        generate(pipe, sketch=np.stack([square] * 3), num_images_per_prompt=2)


@pytest.fixture(scope="module")
def demo_pipe():
    return load_demo_pipeline()


def test_a_seeds_guided_image_does_not_depend_on_its_batch_or_attention_kernel(demo_pipe):
    """The demo model's circle: with the exact gradient of the LGP's ReLUs this image moved by 3.7e-2 between a batch
    of 1 and a batch of 3 (1e-6 unguided); the bound is diffusers' own for `test_inference_batch_single_identical`."""
    prompt, sketch = demo_sketches()[1]

    def images(count: int):
        generators = [torch.Generator().manual_seed(seed) for seed in range(count)]
        return demo_pipe(
            [prompt] * count, sketch=sketch, num_inference_steps=30, generator=generators, output_type="np"
        )

    alone = images(1).images[0]
    assert np.abs(images(3).images[0] - alone).max() < 1e-3
    processors = demo_pipe.unet.attn_processors
    try:
        demo_pipe.unet.set_attn_processor(AttnProcessor())  # classic attention instead of SDPA
        assert np.abs(images(1).images[0] - alone).max() < 1e-3
    finally:
        demo_pipe.unet.set_attn_processor(processors)


def test_guided_steps_split_and_batched_give_the_same_images(pipe):
    kwargs = {"sketch": draw_square(), "output_type": "latent", "sketch_guidance_end": 1.0}
    pipe.guided_step_mode = "split"
    split = generate(pipe, **kwargs).images
    pipe.guided_step_mode = "batched"
    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    batched = generate(pipe, **kwargs).images
    handle.remove()
    assert calls == [2] * 4  # one UNet call per step, on the CFG batch of 2
    assert torch.allclose(split, batched, atol=1e-4)
    pipe.guided_step_mode = "both"
    with pytest.raises(ValueError, match="guided_step_mode"):
        generate(pipe, **kwargs)


def test_a_stable_diffusion_2_model_is_guided_and_unguided_equal():
    """SD 2.x's differences from 1.x: linear projections in the transformers, 1024-wide text embeddings (OpenCLIP
    ViT-H), v-prediction. A tiny model with all three: without a sketch exactly StableDiffusionPipeline, with one the
    LGP's loss falls."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from pipeline_sketch_guided import SketchGuidedStableDiffusionPipeline
    from pipeline_sketch_guided.testing import random_lgp, tiny_components, tiny_text_config, tiny_unet

    components = tiny_components()
    components["unet"] = tiny_unet(cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=(2, 4))
    config = tiny_text_config(
        components["tokenizer"], hidden_size=1024, intermediate_size=64, num_attention_heads=8, num_hidden_layers=1
    )
    components["text_encoder"] = CLIPTextModel(config)
    components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config, prediction_type="v_prediction")
    reference = StableDiffusionPipeline(**components)
    pipe = SketchGuidedStableDiffusionPipeline(**components, lgp=random_lgp(components["unet"]))
    for p in (reference, pipe):
        p.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(pipe).images, generate(reference).images)
    sketch = draw_square()
    kwargs = {"output_type": "latent", "sketch_guidance_end": 1.0, "num_inference_steps": 8}
    unguided = generate(pipe, **kwargs).images
    guided = generate(pipe, sketch=sketch, sketch_guidance_scale=1.0, **kwargs).images
    assert torch.isfinite(guided).all()
    assert (sketch_loss(pipe, guided, sketch) < 0.8 * sketch_loss(pipe, unguided, sketch)).all()


# ---------------------------------------------------------------------------------------------------------------------
# diffusers' memory savers


def _layerwise_casting(pipe):
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


def _group_offloading(pipe):
    cpu = torch.device("cpu")
    pipe.unet.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize(
    "enable, named", [(_layerwise_casting, "layerwise casting"), (_group_offloading, "group offloading")]
)
def test_memory_savers_that_swap_weights_in_place_are_refused_before_any_work(family, enable, named):
    from pipeline_sketch_guided.testing import tiny_random_pipeline, tiny_random_sdxl_pipeline

    pipe = (tiny_random_pipeline if family == "sd" else tiny_random_sdxl_pipeline)()
    enable(pipe)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    sketch = demo_sketches()[0][1]
    with pytest.raises(ValueError, match=f"{named} .*Load the UNet without it") as error:
        pipe("a red star", sketch=sketch, num_inference_steps=2, output_type="np")
    assert calls == [] and "\n" not in str(error.value)
    # Without a sketch it is the parent pipeline, memory saver and all.
    assert pipe("a red star", num_inference_steps=2, output_type="np").images.shape[0] == 1


def test_sequential_offload_replaces_weights_and_guides_as_without_it():
    # accelerate's offload (enable_sequential_cpu_offload's hooks) loads each layer's weights as new tensors, so the
    # backward keeps what the forward used. Checked with the CPU as the execution device, the one this machine has.
    from accelerate import cpu_offload

    from pipeline_sketch_guided.testing import tiny_random_pipeline

    sketch = demo_sketches()[0][1]
    plain, offloaded = tiny_random_pipeline(), tiny_random_pipeline()
    cpu_offload(offloaded.unet, execution_device=torch.device("cpu"))
    images = [
        pipe(
            "a red star", sketch=sketch, num_inference_steps=3, output_type="np", generator=torch.manual_seed(0)
        ).images
        for pipe in (plain, offloaded)
    ]
    assert np.abs(images[0] - images[1]).max() < 1e-5
