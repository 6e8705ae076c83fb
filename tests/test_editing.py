"""The editing pipelines (img2img, inpainting, ControlNet; SD and SDXL) on tiny models built from configs: each is its
diffusers parent bit for bit without a sketch, guides with one, and counts its guided range in the steps it runs."""

from __future__ import annotations

import inspect

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import draw_square
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from test_pipeline import sketch_loss

from pipeline_sketch_guided import SketchGuidedStableDiffusionPipeline
from pipeline_sketch_guided.editing import FILL_ARGUMENTS, SKETCH_ARGUMENTS
from pipeline_sketch_guided.fill import fill_sketch
from pipeline_sketch_guided.pipeline_controlnet import SketchGuidedStableDiffusionControlNetPipeline
from pipeline_sketch_guided.pipeline_img2img import SketchGuidedStableDiffusionImg2ImgPipeline
from pipeline_sketch_guided.pipeline_inpaint import SketchGuidedStableDiffusionInpaintPipeline
from pipeline_sketch_guided.pipeline_inpaint import __file__ as PIPELINE_INPAINT_FILE
from pipeline_sketch_guided.pipeline_xl_img2img import SketchGuidedStableDiffusionXLImg2ImgPipeline
from pipeline_sketch_guided.pipeline_xl_inpaint import SketchGuidedStableDiffusionXLInpaintPipeline
from pipeline_sketch_guided.testing import random_lgp, tiny_components, tiny_sdxl_components, tiny_unet

PROMPT = "a red star on the grey background"


def photo() -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))


def right_half_mask() -> PIL.Image.Image:
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 255
    return PIL.Image.fromarray(mask)


def tiny_controlnet(unet) -> ControlNetModel:
    torch.manual_seed(0)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))


def sd_components(unet_in_channels: int = 4) -> dict:
    components = tiny_components()
    if unet_in_channels != 4:
        components["unet"] = tiny_unet(in_channels=unet_in_channels)
    return components


def xl_components() -> dict:
    components = tiny_sdxl_components()
    components.pop("force_zeros_for_empty_prompt")
    return {**components, "requires_aesthetics_score": False, "force_zeros_for_empty_prompt": True}


# (ours, parent, components, the parent's inputs)
CASES = {
    "img2img": (
        SketchGuidedStableDiffusionImg2ImgPipeline,
        StableDiffusionImg2ImgPipeline,
        sd_components,
        lambda: {"image": photo(), "strength": 0.6},
    ),
    "inpaint": (
        SketchGuidedStableDiffusionInpaintPipeline,
        StableDiffusionInpaintPipeline,
        sd_components,
        lambda: {"image": photo(), "mask_image": right_half_mask(), "height": 32, "width": 32},
    ),
    "inpaint-9-channels": (
        SketchGuidedStableDiffusionInpaintPipeline,
        StableDiffusionInpaintPipeline,
        lambda: sd_components(unet_in_channels=9),
        lambda: {"image": photo(), "mask_image": right_half_mask(), "height": 32, "width": 32},
    ),
    "xl-img2img": (
        SketchGuidedStableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
        xl_components,
        lambda: {"image": photo(), "strength": 0.6},
    ),
    "xl-inpaint": (
        SketchGuidedStableDiffusionXLInpaintPipeline,
        StableDiffusionXLInpaintPipeline,
        xl_components,
        lambda: {"image": photo(), "mask_image": right_half_mask(), "height": 32, "width": 32},
    ),
    "controlnet": (
        SketchGuidedStableDiffusionControlNetPipeline,
        StableDiffusionControlNetPipeline,
        lambda: {**sd_components(), "controlnet": tiny_controlnet(tiny_unet())},
        lambda: {"image": photo()},
    ),
}


def make(case: str) -> tuple:
    ours_class, parent_class, components, inputs = CASES[case]
    parts = components()
    ours = ours_class(**parts, lgp=random_lgp(parts["unet"]))
    parent = parent_class(**parts)
    for pipe in (ours, parent):
        pipe.set_progress_bar_config(disable=True)
    return ours, parent, inputs()


def run(pipe, inputs: dict, seed: int = 0, **kwargs):
    kwargs.setdefault("num_inference_steps", 6)
    kwargs.setdefault("output_type", "np")
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **inputs, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_unguided_is_the_parent_bit_for_bit_and_a_sketch_guides(case):
    ours, parent, inputs = make(case)
    expected = run(parent, inputs).images
    np.testing.assert_array_equal(run(ours, inputs).images, expected)
    np.testing.assert_array_equal(run(ours, inputs, sketch=draw_square(), sketch_guidance_scale=0).images, expected)
    guided = run(ours, inputs, sketch=draw_square(), sketch_guidance_end=0.6, return_edge_maps=True)
    assert np.isfinite(guided.images).all() and not np.array_equal(guided.images, expected)
    assert guided.edge_maps.shape == (1, 32, 32, 3)
    as_tuple = run(ours, inputs, sketch=draw_square(), return_dict=False, return_edge_maps=True)
    assert len(as_tuple) == len(run(parent, inputs, return_dict=False)) + 1


@pytest.mark.parametrize("case", ["img2img", "inpaint", "xl-img2img", "xl-inpaint", "controlnet"])
def test_the_signature_is_the_parents_plus_the_sketch_arguments(case):
    ours_class, parent_class, *_ = CASES[case]
    ours, parents = inspect.signature(ours_class.__call__), inspect.signature(parent_class.__call__)
    for name, parameter in parents.parameters.items():
        assert ours.parameters[name].default == parameter.default, name
    for name, default in {**SKETCH_ARGUMENTS, **FILL_ARGUMENTS}.items():
        assert ours.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY and ours.parameters[name].default == default


def test_img2img_guides_the_steps_it_runs_and_lowers_the_sketch_loss():
    """At strength 0.5 of 10 steps img2img runs 5; `sketch_guidance_end=0.4` guides the first 2 of those."""
    ours, _, inputs = make("img2img")
    calls = []
    handle = ours.lgp.register_forward_hook(lambda *args: calls.append(1))
    try:
        run(ours, {**inputs, "strength": 0.5}, sketch=draw_square(), sketch_guidance_end=0.4, num_inference_steps=10)
    finally:
        handle.remove()
    assert len(calls) == 2
    sketch = draw_square()
    inputs = {**inputs, "strength": 0.8}
    common = {"output_type": "latent", "num_images_per_prompt": 2}
    plain = run(ours, inputs, **common).images
    guided = run(ours, inputs, sketch=sketch, sketch_guidance_scale=4.0, sketch_guidance_end=0.6, **common).images
    before, after = sketch_loss(ours, plain, sketch), sketch_loss(ours, guided, sketch)
    assert (after < before).all(), (before, after)


def test_inpainting_guides_inside_the_mask_and_keeps_the_rest():
    """The sketch mask defaults to the inpainting mask; with a 4-channel UNet the latents outside the mask come out as
    the unguided ones (diffusers blends the known region back after every step)."""
    ours, _, inputs = make("inpaint")
    sketch = draw_square()
    latent = {"output_type": "latent"}
    plain = run(ours, inputs, **latent).images
    by_default = run(ours, inputs, sketch=sketch, sketch_guidance_end=1.0, **latent).images
    explicit = run(ours, inputs, sketch=sketch, sketch_mask=inputs["mask_image"], sketch_guidance_end=1.0, **latent)
    torch.testing.assert_close(by_default, explicit.images, rtol=0, atol=0)
    torch.testing.assert_close(by_default[..., :8], plain[..., :8], rtol=0, atol=0)  # latent columns 0-7: kept
    assert not torch.equal(by_default[..., 8:], plain[..., 8:])
    everywhere = run(ours, inputs, sketch=sketch, sketch_mask=np.full((32, 32), 255, np.uint8), sketch_guidance_end=1.0)
    assert not np.array_equal(everywhere.images, run(ours, inputs, sketch=sketch, sketch_guidance_end=1.0).images)
    with pytest.raises(ValueError, match="padding_mask_crop"):
        run(ours, {**inputs, "padding_mask_crop": 4}, sketch=sketch)


def test_from_pipe_moves_between_text_to_image_and_editing_sharing_the_lgps():
    components = tiny_components()
    unet = components["unet"]
    fill_lgp = random_lgp(unet, seed=1, map_kind="silhouette")
    text_to_image = SketchGuidedStableDiffusionPipeline(**components, lgp=random_lgp(unet), fill_lgp=fill_lgp)
    img2img = SketchGuidedStableDiffusionImg2ImgPipeline.from_pipe(text_to_image)
    inpaint = SketchGuidedStableDiffusionInpaintPipeline.from_pipe(img2img)
    back = SketchGuidedStableDiffusionPipeline.from_pipe(inpaint)
    controlnet = SketchGuidedStableDiffusionControlNetPipeline.from_pipe(back, controlnet=tiny_controlnet(unet))
    assert img2img.lgp is inpaint.lgp is back.lgp is controlnet.lgp is text_to_image.lgp
    assert img2img.fill_lgp is inpaint.fill_lgp is back.fill_lgp is controlnet.fill_lgp is fill_lgp
    assert img2img.unet is text_to_image.unet


def test_an_editing_pipeline_loads_as_a_custom_pipeline_with_its_fill_lgp(tmp_path):
    ours, _, _ = make("inpaint")
    ours.fill_lgp = random_lgp(ours.unet, seed=1, map_kind="silhouette")
    ours.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=PIPELINE_INPAINT_FILE, trust_remote_code=True)
    assert type(loaded).__name__ == "SketchGuidedStableDiffusionInpaintPipeline" and loaded.lgp is not None
    assert loaded.fills_by_default
    for name, tensor in ours.fill_lgp.state_dict().items():
        assert torch.equal(loaded.fill_lgp.state_dict()[name], tensor)


@pytest.mark.parametrize("case", ["img2img", "inpaint", "xl-img2img", "xl-inpaint", "controlnet"])
def test_the_editing_pipelines_guide_with_the_sketchs_fill(case):
    """With a fill LGP, img2img, inpainting (SD 1.x/2.x and XL) and the ControlNet pipeline guide a sketch with its fill
    by default (the sketch's own, "auto"), as text-to-image does; `sketch_fill_scale=0` is the sketch alone, bit for
    bit. Inpainting's fill applies where the sketch does, the inpainting mask by default."""
    ours, _, inputs = make(case)
    sketch = draw_square()
    common = {"output_type": "latent", "sketch_guidance_end": 0.6}
    alone = run(ours, inputs, sketch=sketch, **common).images
    ours.fill_lgp = random_lgp(ours.unet, seed=1, map_kind="silhouette")
    assert ours.fills_by_default
    no_fill = run(ours, inputs, sketch=sketch, sketch_fill_scale=0.0, **common).images
    torch.testing.assert_close(no_fill, alone, rtol=0, atol=0)
    by_default = run(ours, inputs, sketch=sketch, **common).images
    assert not torch.allclose(by_default, alone)
    own = fill_sketch(sketch, 32, 32)
    torch.testing.assert_close(run(ours, inputs, sketch=sketch, sketch_fill=own, **common).images, by_default)
    if case.endswith("inpaint"):  # the sketch mask, the fill's too (`test_the_sketch_mask_applies_to_the_fill`)
        explicit = run(ours, inputs, sketch=sketch, sketch_mask=inputs["mask_image"], **common).images
        torch.testing.assert_close(explicit, by_default, rtol=0, atol=0)
        everywhere = run(ours, inputs, sketch=sketch, sketch_mask=np.full((32, 32), 255, np.uint8), **common).images
        assert not torch.equal(everywhere, by_default)


# ---------------------------------------------------------------------------------------------------------------------
# The command line and batch runs


@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory) -> tuple[str, str, str, str, str]:
    """A tiny SD base model, an LGP for it, a photo, a mask and a sketch, saved as files."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("editing")
    components = tiny_components()
    StableDiffusionPipeline(**components).save_pretrained(folder / "base")
    random_lgp(components["unet"]).save_pretrained(folder / "lgp")
    photo().save(folder / "photo.png")
    right_half_mask().save(folder / "mask.png")
    draw_square().save(folder / "sketch.png")
    return tuple(str(folder / name) for name in ("base", "lgp", "photo.png", "mask.png", "sketch.png"))


def test_generate_draws_into_a_photo(saved_sd, tmp_path):
    import json

    from pipeline_sketch_guided import cli

    base, lgp, photo_file, mask_file, sketch_file = saved_sd
    command = ["generate", "--prompt", "a red star", "--sketch", sketch_file, "--steps", "4", "--threads", "1"]
    command += ["--model", base, "--lgp", lgp, "--image", photo_file]
    cli.main([*command, "--mask-image", mask_file, "--strength", "0.9", "--out", str(tmp_path / "inpainted.png")])
    cli.main([*command, "--height", "48", "--width", "40", "--out", str(tmp_path / "img2img.png")])
    with PIL.Image.open(tmp_path / "inpainted.png") as image:
        settings = json.loads(image.text["sketch_guided"])
        assert image.size == (32, 32) and settings["strength"] == 0.9 and settings["mask_image_sha256"]
    with PIL.Image.open(tmp_path / "img2img.png") as image:
        assert image.size == (40, 48)  # image-to-image takes the (resized) photo's size
    for extra, message in (
        (["--mask-image", mask_file], "--mask-image needs --image"),
        (["--image", photo_file, "--strength", "0"], "--strength 0.0: must be above 0"),
    ):
        with pytest.raises(SystemExit, match=message):
            cli.main(["generate", "--prompt", "a red star", "--out", str(tmp_path / "x.png"), *extra])


def test_batch_rows_draw_into_photos(saved_sd, tmp_path):
    import json

    from pipeline_sketch_guided import cli

    base, lgp, photo_file, mask_file, sketch_file = saved_sd
    rows = [
        {"prompt": "a red star", "sketch": sketch_file, "image": photo_file, "strength": 0.7, "seed": 1},
        {"prompt": "a red star", "sketch": sketch_file, "image": photo_file, "mask_image": mask_file, "seed": 1},
        {"prompt": "a red star", "sketch": sketch_file, "mask_image": mask_file, "seed": 1},
    ]
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    command = ["batch", str(manifest), "--out", str(out), "--steps", "4", "--model", base, "--lgp", lgp]
    assert cli.main([*command, "--threads", "1"]) == 1  # the third row fails; the others are written
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["status"] for row in results] == ["done", "done", "failed"]
    assert "give the `image` too" in results[2]["error"]
    with PIL.Image.open(out / "000000-seed1.png") as first, PIL.Image.open(out / "000001-seed1.png") as second:
        assert first.size == second.size == (32, 32)
        assert not np.array_equal(np.asarray(first), np.asarray(second))  # img2img at 0.7 and inpainting differ


def test_editing_refuses_the_families_without_it():
    from pipeline_sketch_guided import loading
    from pipeline_sketch_guided.testing import tiny_random_flux_pipeline

    with pytest.raises(ValueError, match="has no image-to-image or inpainting version yet"):
        loading.editing_pipeline(tiny_random_flux_pipeline(), image=True, mask=False)
