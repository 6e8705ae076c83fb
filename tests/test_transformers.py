"""SketchGuidedStableDiffusion3Pipeline and SketchGuidedFluxPipeline on tiny models built from configs: the guidance
core on diffusion transformers with flow matching (SD3's classifier-free guidance batch, FLUX's packed latents and
single branch)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import draw_square
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from pipeline_sketch_guided import LGPModel, SketchGuidedFluxPipeline, SketchGuidedStableDiffusion3Pipeline
from pipeline_sketch_guided.fill import fill_sketch
from pipeline_sketch_guided.guidance import frozen_parameters
from pipeline_sketch_guided.lgp import spread_blocks, tokens_to_grid
from pipeline_sketch_guided.pipeline_flux import __file__ as PIPELINE_FLUX_FILE
from pipeline_sketch_guided.testing import (
    random_transformer_lgp,
    tiny_flux_components,
    tiny_sd3_components,
    tiny_t5_tokenizer,
)

PROMPT = "a red star on the grey background"
FAMILIES = {
    "sd3": (SketchGuidedStableDiffusion3Pipeline, StableDiffusion3Pipeline, tiny_sd3_components),
    "flux": (SketchGuidedFluxPipeline, FluxPipeline, tiny_flux_components),
}


def make_pipe(family: str, seed: int = 0, **lgp_kwargs):
    pipeline_class, _, components = FAMILIES[family]
    parts = components()
    pipe = pipeline_class(**parts, lgp=random_transformer_lgp(parts["transformer"], seed=seed, **lgp_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3():
    return make_pipe("sd3")


@pytest.fixture(scope="module")
def flux():
    return make_pipe("flux")


def generate(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("max_sequence_length", 16)
    return pipe(PROMPT, height=32, width=32, generator=torch.Generator().manual_seed(seed), **kwargs)


def lgp_loss(pipe, latents: torch.Tensor, sketch) -> torch.Tensor:
    """The LGP's loss against `sketch` for final latents (FLUX's packed), per image, read at a low noise level of a
    10-step schedule, so that one measure serves guided and unguided images alike."""
    count = latents.shape[0]
    target = pipe.prepare_sketch_latents(sketch, count, 32, 32, "cpu")
    pipe._sketch_image_size = (32, 32)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(10)
    scheduler._step_index = 8
    timestep = scheduler.timesteps[8].expand(count)
    if isinstance(pipe, FluxPipeline):
        embeds, pooled, text_ids = pipe.encode_prompt(
            PROMPT, None, device="cpu", num_images_per_prompt=count, max_sequence_length=16
        )
        image_ids = pipe._prepare_latent_image_ids(count, 8, 8, "cpu", embeds.dtype)
        kwargs = {"pooled_projections": pooled, "txt_ids": text_ids, "img_ids": image_ids}
        kwargs["guidance"], timestep = torch.full([count], 3.5), timestep / 1000
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPT,
            None,
            None,
            device="cpu",
            num_images_per_prompt=count,
            do_classifier_free_guidance=False,
            max_sequence_length=16,
        )
        kwargs = {"pooled_projections": pooled}
    try:
        with torch.enable_grad(), frozen_parameters(pipe.transformer, pipe.lgp):
            *_, edge_latents = pipe.sketch_loss(latents, timestep, embeds, {**kwargs, "return_dict": False}, target)
    finally:
        scheduler._step_index = None
    return (edge_latents.detach() - target).square().flatten(1).sum(1)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_without_sketch_output_is_bit_for_bit_the_parent(family, request):
    pipe = request.getfixturevalue(family)
    _, parent_class, components = FAMILIES[family]
    parent = parent_class(**components())
    parent.set_progress_bar_config(disable=True)
    extra = {"true_cfg_scale": 2.0, "negative_prompt": "blue"} if family == "flux" else {"skip_guidance_layers": [1]}
    for kwargs in ({}, extra):
        ours = generate(pipe, **kwargs).images
        theirs = parent(
            PROMPT,
            height=32,
            width=32,
            num_inference_steps=4,
            output_type="np",
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images
        np.testing.assert_array_equal(ours, theirs)
        # A sketch at scale 0 is no guidance: the parent's images too.
        np.testing.assert_array_equal(
            generate(pipe, sketch=draw_square(), sketch_guidance_scale=0, **kwargs).images, theirs
        )


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guidance_lowers_the_sketch_loss(family, request):
    pipe = request.getfixturevalue(family)
    sketch = draw_square()
    common = {"num_inference_steps": 10, "output_type": "latent", "num_images_per_prompt": 2}
    unguided = generate(pipe, **common).images
    guided = generate(pipe, sketch=sketch, sketch_guidance_scale=4.0, sketch_guidance_end=0.6, **common).images
    assert guided.shape == unguided.shape and torch.isfinite(guided).all()
    before, after = lgp_loss(pipe, unguided, sketch), lgp_loss(pipe, guided, sketch)
    assert (after < before).all(), (before, after)


def test_flux_guides_the_prompt_call_once_per_step_with_true_cfg(flux):
    """With `true_cfg_scale` > 1 FLUX calls the transformer twice a step; the LGP reads the first (the prompt's) call
    of each guided step only, and the guided images differ from the unguided ones."""
    calls = []
    handle = flux.lgp.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        kwargs = {"true_cfg_scale": 2.0, "negative_prompt": "blue", "num_inference_steps": 10}
        guided = generate(flux, sketch=draw_square(), sketch_guidance_end=0.5, **kwargs).images
    finally:
        handle.remove()
    assert len(calls) == 5  # steps 0-4 of 10
    assert not np.array_equal(guided, generate(flux, **kwargs).images)


def test_flux_refuses_an_lgp_of_the_unconditional_branch():
    pipe = make_pipe("flux", feature_branch="unconditional")
    with pytest.raises(ValueError, match="FLUX has no such branch"):
        generate(pipe, sketch=draw_square())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sketch_mask_and_edge_maps(family, request):
    """A mask over the left half weighs the loss there only and changes what guidance does; edge maps come back at
    the image's size."""
    pipe = request.getfixturevalue(family)
    sketch, mask = draw_square(), np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255
    masked = generate(pipe, sketch=sketch, sketch_mask=mask, output_type="latent", sketch_guidance_end=1.0).images
    whole = generate(pipe, sketch=sketch, output_type="latent", sketch_guidance_end=1.0, return_edge_maps=True)
    assert torch.isfinite(masked).all() and not torch.allclose(masked, whole.images)
    output = generate(pipe, sketch=sketch, return_edge_maps=True)
    assert output.edge_maps.shape == (1, 32, 32, 3) and np.isfinite(output.edge_maps).all()


def test_flow_matching_noise_estimate_and_level(sd3):
    """From a velocity v = epsilon - x_0 at x_t = (1 - sigma) x_0 + sigma epsilon the core recovers epsilon, and the
    LGP's noise-level input sqrt(1 - alphabar) epsilon is sigma epsilon."""
    scheduler = sd3.scheduler
    scheduler.set_timesteps(10)
    scheduler._step_index = 3
    try:
        sigma = scheduler.sigmas[3]
        alpha_bar = sd3.noise_level_alpha_bar(scheduler.timesteps[3], "cpu")
    finally:
        scheduler._step_index = None
    x0, epsilon = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sample = (1 - sigma) * x0 + sigma * epsilon
    torch.testing.assert_close(sd3.predict_noise_epsilon(epsilon - x0, sample, alpha_bar), epsilon)
    torch.testing.assert_close((1 - alpha_bar).sqrt(), sigma)


def test_spread_preset_on_full_size_block_counts():
    """The preset's blocks on SD3 medium's 24 blocks and FLUX.1's 19 double + 38 single blocks (narrow widths, the real
    depths), and the LGP built from them reads the blocks' widths and tuple's image tokens."""
    sd3 = SD3Transformer2DModel(
        num_layers=24,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        sample_size=8,
        pos_embed_max_size=8,
    )
    assert spread_blocks(sd3) == [f"transformer_blocks.{i}" for i in (4, 9, 13, 18)]
    flux = FluxTransformer2DModel(
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=[2, 2, 4],
    )
    assert spread_blocks(flux) == [
        "transformer_blocks.10",
        "single_transformer_blocks.3",
        "single_transformer_blocks.14",
        "single_transformer_blocks.26",
    ]
    lgp = LGPModel.from_transformer(flux)
    assert lgp.config.block_channels == [16] * 4 and lgp.config.tuple_output_index == 1
    assert lgp.config.latent_channels == 16  # FLUX's 64 packed input channels are 16 latent channels x 2 x 2


def test_tokens_to_grid_lays_tokens_out_row_by_row():
    tokens = torch.arange(2 * 12 * 3, dtype=torch.float32).reshape(2, 12, 3)
    grid = tokens_to_grid(tokens, 6, 8)  # 2x2 patches of 6x8 latents: a 3x4 grid
    assert grid.shape == (2, 3, 3, 4)
    torch.testing.assert_close(grid[1, :, 2, 1], tokens[1, 2 * 4 + 1])
    with pytest.raises(ValueError, match="do not tile"):
        tokens_to_grid(tokens, 6, 6)


def test_a_mismatched_lgp_is_refused_naming_the_block(sd3, flux):
    with pytest.raises(ValueError, match="transformer block 'transformer_blocks.0'"):
        SketchGuidedFluxPipeline(
            **tiny_flux_components(),
            lgp=random_transformer_lgp(
                SD3Transformer2DModel(
                    num_layers=2,
                    attention_head_dim=8,
                    num_attention_heads=5,
                    caption_projection_dim=8,
                    joint_attention_dim=8,
                    pooled_projection_dim=8,
                    sample_size=8,
                    pos_embed_max_size=8,
                ),
                blocks=["transformer_blocks.0"],
            ),
        )
    with pytest.raises(ValueError, match="no block 'single_transformer_blocks.0'"):
        sd3.lgp = flux.lgp


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_saved_and_loaded_with_its_lgp(family, request, tmp_path):
    pipe = request.getfixturevalue(family)
    pipe.save_pretrained(tmp_path)
    loaded = FAMILIES[family][0].from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.lgp, LGPModel) and loaded.lgp.config.blocks == pipe.lgp.config.blocks
    sketch = draw_square()
    np.testing.assert_allclose(generate(loaded, sketch=sketch).images, generate(pipe, sketch=sketch).images, atol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_fill_lgp_guides_by_default_and_is_saved_with_the_pipeline(family, tmp_path):
    """Fill guidance on a transformer, as on a UNet (the same guidance core): the fill LGP reads the same pass of the
    same blocks at every guided step; each sketch is guided with its own fill by default ("auto", the same as passing
    `fill_sketch`'s image), `sketch_fill_scale=0` is the sketch alone, bit for bit; the fill LGP is saved and loaded
    with the pipeline. On FLUX the fill's target lives at the unpacked latents' resolution, as the sketch's does."""
    pipe = make_pipe(family)
    sketch = draw_square()
    latent = {"sketch": sketch, "output_type": "latent", "sketch_guidance_end": 0.5}
    alone = generate(pipe, **latent).images
    pipe.fill_lgp = random_transformer_lgp(pipe.transformer, seed=1, map_kind="silhouette")
    assert pipe.fills_by_default
    calls = []
    handle = pipe.fill_lgp.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    try:
        by_default = generate(pipe, **latent).images
    finally:
        handle.remove()
    assert calls == [(1, 4, 16, 16)] * 2  # 2 guided steps of 4, on the (unpacked) latents' grid
    assert torch.isfinite(by_default).all() and not torch.allclose(by_default, alone)
    own = fill_sketch(sketch, 32, 32)
    torch.testing.assert_close(generate(pipe, sketch_fill=own, **latent).images, by_default, rtol=0, atol=0)
    torch.testing.assert_close(generate(pipe, sketch_fill_scale=0.0, **latent).images, alone, rtol=0, atol=0)
    pipe.save_pretrained(tmp_path)
    loaded = FAMILIES[family][0].from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.fill_lgp.config.map_kind == "silhouette"
    torch.testing.assert_close(generate(loaded, **latent).images, by_default, rtol=1e-5, atol=1e-6)


def test_flux_as_a_custom_pipeline(flux, tmp_path):
    flux.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=PIPELINE_FLUX_FILE, trust_remote_code=True)
    assert type(loaded).__name__ == "SketchGuidedFluxPipeline" and loaded.lgp is not None


def test_the_tiny_t5_tokenizer_keeps_words_whole_and_spells_the_rest():
    tokenizer = tiny_t5_tokenizer()
    ids = tokenizer("a red xy").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["\u2581a", "\u2581red", "\u2581", "x", "y", "</s>"]


# ---------------------------------------------------------------------------------------------------------------------
# The command line, batch runs and the Hub


@pytest.fixture(scope="module")
def saved_flux(tmp_path_factory) -> tuple[str, str]:
    """A tiny FLUX base model and an LGP for it, saved as users keep them."""
    folder = tmp_path_factory.mktemp("flux")
    components = tiny_flux_components()
    FluxPipeline(**components).save_pretrained(folder / "base")
    random_transformer_lgp(components["transformer"]).save_pretrained(folder / "lgp")
    return str(folder / "base"), str(folder / "lgp")


def test_generate_runs_flux_at_its_own_guidance_and_refuses_a_ddpm_sampler(saved_flux, tmp_path):
    import json

    import PIL.Image

    from pipeline_sketch_guided import cli

    base, lgp = saved_flux
    sketch = tmp_path / "sketch.png"
    draw_square().save(sketch)
    out = tmp_path / "out.png"
    command = ["generate", "--prompt", "a red star", "--sketch", str(sketch), "--out", str(out), "--steps", "2"]
    command += ["--model", base, "--lgp", lgp, "--threads", "1", "--height", "32", "--width", "32"]
    cli.main([*command, "--scheduler", "flow_euler"])
    settings = json.loads(PIL.Image.open(out).text["sketch_guided"])
    assert PIL.Image.open(out).size == (32, 32)
    assert settings["cfg_scale"] == 3.5 and settings["sampler"] == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(SystemExit, match="--scheduler ddim: .* samples with a flow-matching scheduler"):
        cli.main([*command, "--scheduler", "ddim"])


def test_batch_runs_flux_rows(saved_flux, tmp_path):
    import json

    from pipeline_sketch_guided import cli

    base, lgp = saved_flux
    draw_square().save(tmp_path / "square.png")
    rows = [
        {"prompt": "a red star", "sketch": "square.png", "seed": 1},
        {"prompt": "a blue circle", "sketch": "square.png", "seed": 2},
        {"prompt": "a red star", "seed": 1},
    ]
    for row in rows:
        row.update(height=32, width=32)  # FLUX's own default is 1024 x 1024 (here 256 x 256)
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    cli.main(
        ["batch", str(manifest), "--out", str(out), "--steps", "2", "--model", base, "--lgp", lgp, "--threads", "1"]
    )
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["status"] for row in results] == ["done"] * 3
    guided, unguided = (np.asarray(PIL_open(out / name)) for name in ("000000-seed1.png", "000002-seed1.png"))
    assert guided.shape == (32, 32, 3) and not np.array_equal(guided, unguided)


def PIL_open(path):
    import PIL.Image

    with PIL.Image.open(path) as image:
        return image.convert("RGB")


@pytest.mark.parametrize(
    "family, base_model", [("flux", "black-forest-labs/FLUX.1-dev"), ("sd3", "stabilityai/stable-diffusion-3.5-medium")]
)
def test_a_published_transformer_lgp_carries_its_pipeline(family, base_model, request, tmp_path):
    """The Hub folder holds the family's pipeline as pipeline.py, a card naming the transformer, and loads as a
    custom pipeline over a saved base model."""
    from pipeline_sketch_guided.hub import export_hub_folder

    pipe = request.getfixturevalue(family)
    folder = export_hub_folder(pipe.lgp, tmp_path / "repo", "someone/lgp", base_model=base_model)
    card = (folder / "README.md").read_text()
    assert FAMILIES[family][0].__name__ in card and "transformer blocks, in input order" in card
    assert "torch_dtype=torch.bfloat16" in card and "| Head | a per-pixel MLP" in card
    assert f"class {FAMILIES[family][0].__name__}(" in (folder / "pipeline.py").read_text()
    _, parent_class, components = FAMILIES[family]
    parent_class(**components()).save_pretrained(tmp_path / "base")
    # In a process of its own: diffusers caches every local custom pipeline as the same module, local/pipeline.py.
    load = (
        "from diffusers import AutoModel, DiffusionPipeline\n"
        f"lgp = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'base')!r}, custom_pipeline={str(folder)!r},"
        " trust_remote_code=True, lgp=lgp)\n"
        "print(type(pipe).__name__, type(pipe.lgp).__name__)\n"
    )
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=environment, check=True)
    assert result.stdout.split() == [FAMILIES[family][0].__name__, "LGPModel"]
