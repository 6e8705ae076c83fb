"""Fill guidance: the filled region of a sketch (`fill_sketch`), and the fill LGP guided alongside the edge LGP."""

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from conftest import draw_square

from pipeline_sketch_guided import SketchGuidedStableDiffusionPipeline
from pipeline_sketch_guided.fill import fill_sketch, fill_strokes
from pipeline_sketch_guided.guidance import FillGuidance
from pipeline_sketch_guided.testing import random_lgp


def generate(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    return pipe("a red star", generator=torch.Generator().manual_seed(0), **kwargs)


def disc(size: int, center: tuple[float, float], radius: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (x - center[0]) ** 2 + (y - center[1]) ** 2 <= radius**2


def ring(size: int, center: tuple[float, float], radius: float, width: float = 1.5) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    distance = np.sqrt((x - center[0]) ** 2 + (y - center[1]) ** 2)
    return np.abs(distance - radius) <= width / 2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_a_closed_outline_is_filled_with_its_strokes():
    strokes = ring(64, (32, 32), 14)
    filled = fill_strokes(strokes)
    assert iou(filled, disc(64, (32, 32), 14.75)) > 0.95
    assert filled[strokes].all() and not filled[2, 2]


def test_gaps_of_a_few_pixels_are_closed_and_the_fill_keeps_to_the_outline():
    strokes = ring(64, (32, 32), 14)
    strokes[:, 30:36] = False  # two gaps of 6 pixels, top and bottom
    filled = fill_strokes(strokes)
    assert iou(filled, disc(64, (32, 32), 14.75)) > 0.9


def test_an_outline_the_frame_cuts_is_closed_by_the_frame():
    """A circle that fills the frame, cut by its bottom and left edges: the inside is the shape, not the corners."""
    strokes = ring(64, (28, 40), 30)
    filled = fill_strokes(strokes)
    truth = disc(64, (28, 40), 30)
    assert iou(filled, truth) > 0.9
    assert not filled[0, 63] and not filled[0, 0]  # the corner pieces outside the ring are ground


def test_lines_that_outline_nothing_stay_lines():
    across = np.zeros((64, 64), bool)
    across[30, :] = True  # splits the page in halves, each bounded more by the frame than by the stroke
    assert np.array_equal(fill_strokes(across), across)
    short = np.zeros((64, 64), bool)
    short[20:40, 32] = True
    assert np.array_equal(fill_strokes(short), short)
    assert not fill_strokes(np.zeros((8, 8), bool)).any()


def test_two_closed_outlines_are_both_filled():
    strokes = ring(64, (16, 16), 8) | ring(64, (46, 46), 10)
    filled = fill_strokes(strokes)
    assert filled[16, 16] and filled[46, 46] and not filled[10, 50]


@pytest.mark.parametrize("dark_on_light", [True, False])
def test_fill_sketch_reads_either_polarity_and_returns_a_white_on_black_silhouette(dark_on_light):
    sketch = draw_square(128, dark_on_light=dark_on_light)
    filled = fill_sketch(sketch, 128, 128)
    assert filled.mode == "L" and filled.size == (128, 128)
    pixels = np.asarray(filled)
    assert set(np.unique(pixels)) == {0, 255}
    square = np.zeros((128, 128), bool)
    square[32:96, 32:96] = True
    assert iou(pixels > 0, square) > 0.9


def test_fill_sketch_works_at_the_working_resolution_for_large_images():
    """At 512x512 the fill is found at 64x64 (a stroke anywhere in an 8x8 block counts) and scaled back: right to
    within a block, as fine as the latents it guides."""
    image = PIL.Image.new("L", (512, 512), 255)
    PIL.ImageDraw.Draw(image).ellipse((100, 100, 400, 400), outline=0, width=3)
    pixels = np.asarray(fill_sketch(image, 512, 512)) > 0
    assert iou(pixels, disc(512, (250, 250), 150)) > 0.9
    assert pixels[250, 250] and not pixels[250, 60] and not pixels[10, 10]


def test_fill_sketch_refuses_a_blank_sketch():
    with pytest.raises(ValueError, match="blank"):
        fill_sketch(PIL.Image.new("L", (32, 32), 255), 32, 32)


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline


@pytest.fixture
def fill_pipe(components) -> SketchGuidedStableDiffusionPipeline:
    unet = components["unet"]
    pipe = SketchGuidedStableDiffusionPipeline(
        **components, lgp=random_lgp(unet), fill_lgp=random_lgp(unet, seed=1, map_kind="silhouette")
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def final_latents(pipe, **kwargs) -> torch.Tensor:
    return generate(pipe, sketch=draw_square(), output_type="latent", **kwargs).images


def test_a_fill_lgp_guides_by_default_and_scale_0_is_the_sketch_alone(fill_pipe, pipe):
    alone = final_latents(pipe)
    with_fill = final_latents(fill_pipe)
    assert not torch.allclose(with_fill, alone)
    assert torch.equal(final_latents(fill_pipe, sketch_fill_scale=0.0), alone)
    assert torch.equal(final_latents(fill_pipe, sketch_fill="auto"), with_fill)


def test_the_fill_enters_the_loss_with_its_weight(fill_pipe):
    """g(scale) = g_sketch + scale * g_fill: twice the scale moves the gradient twice as far from the sketch's own."""
    target = fill_pipe.prepare_sketch_latents(draw_square(), 1, 32, 32, "cpu")
    fill_latents = fill_pipe.prepare_fill_latents(draw_square(), "auto", 1, 32, 32, "cpu")
    embeds = torch.cat(fill_pipe.encode_prompt("a red star", "cpu", 1, True)[::-1])
    fill_pipe._guidance_scale = 7.5
    kwargs = {"timestep_cond": None, "cross_attention_kwargs": None, "added_cond_kwargs": None, "return_dict": False}
    side = fill_pipe.unet.config.sample_size
    latents = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))

    def gradient(scale):
        fill = FillGuidance(fill_pipe.fill_lgp, fill_latents, scale)
        return fill_pipe.noise_and_sketch_gradient(latents, torch.tensor(500), embeds, kwargs, target, fill=fill)[1]

    g0, g1, g2 = gradient(0.0), gradient(1.0), gradient(2.0)
    assert not torch.allclose(g1, g0)
    torch.testing.assert_close(g2 - g0, 2 * (g1 - g0), rtol=1e-4, atol=1e-6)


def test_a_given_fill_is_used_instead_of_the_sketchs_own(fill_pipe):
    auto = final_latents(fill_pipe)
    half = PIL.Image.new("L", (32, 32), 0)
    PIL.ImageDraw.Draw(half).rectangle((0, 0, 15, 31), fill=255)
    assert not torch.allclose(final_latents(fill_pipe, sketch_fill=half), auto)
    # The sketch's own fill, passed as an image, is what "auto" uses.
    own = fill_sketch(draw_square(), 32, 32)
    torch.testing.assert_close(final_latents(fill_pipe, sketch_fill=own), auto)


def test_an_lgp_for_another_map_guides_without_the_fill_by_default(fill_pipe, components):
    """A silhouette (or depth) LGP's map has no outline to fill: the pipeline's fill LGP stays out of its calls."""
    silhouette = random_lgp(components["unet"], seed=2, map_kind="silhouette")
    fill_pipe.lgp = silhouette
    alone = SketchGuidedStableDiffusionPipeline(**components, lgp=silhouette)
    alone.set_progress_bar_config(disable=True)
    torch.testing.assert_close(final_latents(fill_pipe), final_latents(alone), rtol=0, atol=0)


def test_the_sketch_mask_applies_to_the_fill(fill_pipe):
    """Where the mask is black, the fill's target does not matter: two fills that differ only there give one
    gradient (and differ in it without the mask)."""
    target = fill_pipe.prepare_sketch_latents(draw_square(), 1, 32, 32, "cpu")
    fill_a = fill_pipe.prepare_fill_latents(draw_square(), "auto", 1, 32, 32, "cpu")
    fill_b = fill_a.clone()
    fill_b[..., 3 * fill_b.shape[-1] // 4 :] += 1.0
    left = PIL.Image.new("L", (32, 32), 0)
    PIL.ImageDraw.Draw(left).rectangle((0, 0, 15, 31), fill=255)
    mask = fill_pipe.prepare_sketch_masks(left, 1, 32, 32, "cpu")
    embeds = torch.cat(fill_pipe.encode_prompt("a red star", "cpu", 1, True)[::-1])
    fill_pipe._guidance_scale = 7.5
    kwargs = {"timestep_cond": None, "cross_attention_kwargs": None, "added_cond_kwargs": None, "return_dict": False}
    side = fill_pipe.unet.config.sample_size
    latents = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))

    def gradient(fill_latents, sketch_mask):
        fill = FillGuidance(fill_pipe.fill_lgp, fill_latents, 1.0)
        call = (latents, torch.tensor(500), embeds, kwargs, target, sketch_mask)
        return fill_pipe.noise_and_sketch_gradient(*call, fill=fill)[1]

    torch.testing.assert_close(gradient(fill_a, mask), gradient(fill_b, mask))
    assert not torch.allclose(gradient(fill_a, None), gradient(fill_b, None))


def test_the_fill_lgp_is_saved_and_loaded_with_the_pipeline(fill_pipe, tmp_path):
    fill_pipe.save_pretrained(tmp_path)
    loaded = SketchGuidedStableDiffusionPipeline.from_pretrained(tmp_path)
    assert loaded.fill_lgp.config.map_kind == "silhouette"
    for name, tensor in fill_pipe.fill_lgp.state_dict().items():
        assert torch.equal(loaded.fill_lgp.state_dict()[name], tensor)


def test_lgps_set_on_a_pipeline_without_them_are_saved_with_it(components, tmp_path):
    """diffusers keeps a component that was None as `[null, null]` in the config when it is set by attribute, which
    would leave it out of `save_pretrained`: `pipe.lgp = ...` and `pipe.fill_lgp = ...` are saved, and None again is
    not."""
    pipe = SketchGuidedStableDiffusionPipeline(**components)
    pipe.lgp = random_lgp(components["unet"])
    pipe.fill_lgp = random_lgp(components["unet"], seed=1, map_kind="silhouette")
    pipe.save_pretrained(tmp_path / "both")
    loaded = SketchGuidedStableDiffusionPipeline.from_pretrained(tmp_path / "both")
    for name in ("lgp", "fill_lgp"):
        for key, tensor in getattr(pipe, name).state_dict().items():
            assert torch.equal(getattr(loaded, name).state_dict()[key], tensor), (name, key)
    pipe.fill_lgp = None
    pipe.save_pretrained(tmp_path / "edges")
    assert SketchGuidedStableDiffusionPipeline.from_pretrained(tmp_path / "edges").fill_lgp is None


def test_fill_arguments_are_checked(fill_pipe, pipe, components):
    with pytest.raises(ValueError, match="needs a fill LGP"):
        generate(pipe, sketch=draw_square(), sketch_fill="auto")
    with pytest.raises(ValueError, match="needs a `sketch`"):
        generate(fill_pipe, sketch_fill="auto")
    for bad in (-1.0, float("nan"), 1000.0):
        with pytest.raises(ValueError, match="sketch_fill_scale"):
            generate(fill_pipe, sketch=draw_square(), sketch_fill_scale=bad)
    with pytest.raises(ValueError, match="3 fills"):
        generate(fill_pipe, sketch=draw_square(), sketch_fill=[draw_square()] * 3)
    with pytest.raises(ValueError, match="filled silhouettes"):
        fill_pipe.fill_lgp = random_lgp(components["unet"])  # an edge LGP
    assert fill_pipe.fill_lgp.config.map_kind == "silhouette"  # left as it was
    edge_lgp = fill_pipe.lgp
    fill_pipe.lgp = random_lgp(components["unet"], seed=2, map_kind="depth")
    with pytest.raises(ValueError, match="reads depth maps, not sketches"):
        generate(fill_pipe, sketch=draw_square(), sketch_fill="auto")
    fill_pipe.lgp = edge_lgp
    fill_pipe.fill_lgp = random_lgp(components["unet"], map_kind="silhouette", feature_branch="unconditional")
    with pytest.raises(ValueError, match="`feature_branch` is 'unconditional'"):
        generate(fill_pipe, sketch=draw_square())
