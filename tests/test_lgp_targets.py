"""LGPs that predict the map itself instead of its VAE latent (`target="map"`, sharp or blurred), the stroke-weighted
loss, and the spatial head: built, saved and loaded, and guiding the pipeline (training: tests/test_training.py)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import draw_square
from test_pipeline import generate, sketch_loss

from pipeline_sketch_guided import LGPModel, SketchGuidedStableDiffusionPipeline, prepare_sketch
from pipeline_sketch_guided.testing import random_lgp
from pipeline_sketch_guided.training.train_lgp import stroke_loss_weights


def map_lgp(unet, scale: int = 2, **kwargs) -> LGPModel:
    return random_lgp(unet, target="map", target_scale=scale, **kwargs)


def test_a_map_target_lgp_predicts_the_map_at_its_scale_and_round_trips(components, tmp_path):
    lgp = map_lgp(components["unet"], scale=2)
    assert lgp.config.out_channels == 4  # one grey channel, 2 x 2 map pixels per latent pixel
    features = [torch.randn(1, c, 8, 8) for c in lgp.config.block_channels]
    prediction = lgp.eval()(features, torch.randn(1, 4, 16, 16))
    assert prediction.shape == (1, 1, 32, 32)
    lgp.save_pretrained(tmp_path)
    loaded = LGPModel.from_pretrained(tmp_path).eval()
    assert (loaded.config.target, loaded.config.target_scale) == ("map", 2)
    assert torch.equal(loaded(features, torch.randn(1, 4, 16, 16) * 0 + 1), lgp(features, torch.ones(1, 4, 16, 16)))
    colour = LGPModel.from_unet(components["unet"], target="map", target_scale=1, map_kind="color")
    assert colour.config.out_channels == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "pixels"}, "`target` must be one of"),
        ({"target": "vae_latent", "target_scale": 2}, "`target_scale` is for `target='map'`"),
        ({"target": "map", "target_scale": 2, "out_channels": 4 * 3}, "has 4 outputs per latent pixel"),
        ({"target": "vae_latent", "target_blur": 1.0}, "`target_blur` is for `target='map'`"),
        ({"target": "map", "target_blur": -1.0}, "must be >= 0"),
        ({"head": "unet"}, "`head` must be one of"),
    ],
)
def test_inconsistent_target_configs_are_refused(components, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LGPModel.from_unet(components["unet"], hidden_dims=[8], **kwargs)


def test_the_target_is_the_prepared_map_area_averaged_as_the_trainer_makes_it(components):
    for scale, size in ((1, 16), (2, 32)):  # the tiny VAE's latents are 16 x 16 for 32 x 32 images
        pipe = SketchGuidedStableDiffusionPipeline(**components, lgp=map_lgp(components["unet"], scale=scale))
        for sketch in (draw_square(), draw_square(dark_on_light=False)):
            target = pipe.prepare_sketch_latents(sketch, 2, 32, 32, "cpu")
            prepared = prepare_sketch(sketch, 32, 32, "light_on_dark")  # light strokes on dark, in [-1, 1]
            expected = torch.nn.functional.avg_pool2d(prepared[:, :1], 32 // size)
            assert target.shape == (2, 1, size, size) and torch.allclose(target, expected.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="is for LGPs with `target='map'`"):
        random_lgp(components["unet"]).target_from_map(prepared, (16, 16))


def test_a_map_target_lgp_guides_and_lowers_its_loss(components):
    pipe = SketchGuidedStableDiffusionPipeline(**components, lgp=map_lgp(components["unet"], scale=2))
    pipe.set_progress_bar_config(disable=True)
    sketch = draw_square()
    kwargs = {"output_type": "latent", "sketch_guidance_end": 1.0, "num_inference_steps": 8}
    unguided = generate(pipe, **kwargs).images
    guided = generate(pipe, sketch=sketch, sketch_guidance_scale=2.0, **kwargs).images
    loss_unguided, loss_guided = sketch_loss(pipe, unguided, sketch), sketch_loss(pipe, guided, sketch)
    assert (loss_guided < 0.8 * loss_unguided).all(), (loss_guided, loss_unguided)
    # Its predicted map comes back at the image's size; a sketch mask reaches its finer output.
    out = generate(pipe, sketch=sketch, return_edge_maps=True)
    assert out.edge_maps.shape == out.images.shape == (1, 32, 32, 3)
    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    masked = generate(pipe, sketch=sketch, sketch_mask=PIL.Image.fromarray(left)).images
    assert not np.array_equal(masked, generate(pipe, sketch=sketch).images)


def test_stroke_weights_favour_the_strokes_and_their_neighbours_and_keep_the_loss_scale():
    maps = -torch.ones(2, 3, 32, 32)
    maps[0, :, 10, 4:28] = 1.0  # one light stroke, a pixel wide
    weights = stroke_loss_weights(maps, (16, 16), weight=5.0, light_strokes=True)
    assert weights.shape == (2, 1, 16, 16) and torch.isclose(weights.mean(), torch.tensor(1.0))
    near = weights[0, 0, 4:7, 1:15]  # the stroke's latent row (5) and one either side
    far = weights[0, 0, 12:, :]
    assert torch.allclose(near / far.mean(), torch.tensor(5.0)) and torch.allclose(weights[1], far.mean())
    # Dark strokes on light paper are weighed the same way once their polarity is given.
    assert torch.equal(stroke_loss_weights(-maps, (16, 16), 5.0, light_strokes=False), weights)


def test_a_blurred_target_is_the_sharp_one_smoothed_with_its_mass_kept(components):
    sharp = map_lgp(components["unet"], scale=2)
    blurred = map_lgp(components["unet"], scale=2, target_blur=1.5)
    maps = prepare_sketch(draw_square(), 32, 32, "light_on_dark")
    a, b = sharp.target_from_map(maps, (16, 16)), blurred.target_from_map(maps, (16, 16))
    assert a.shape == b.shape == (1, 1, 32, 32)
    torch.testing.assert_close(b.mean(), a.mean())  # a normalised kernel, the border replicated
    assert b.max() < a.max()  # strokes spread into ridges
    assert b[0, 0, 16, 6] > a[0, 0, 16, 6] == -1  # beside the square's left side (columns 8-9), off the stroke
    assert b[0, 0, 2, 2] == a[0, 0, 2, 2] == -1  # far from any stroke: untouched


def test_a_conv_head_starts_as_its_mlp_and_round_trips(components, tmp_path):
    """`head="conv"`: the same MLP weights give the same prediction until its zero-initialised convolution learns;
    once it has, the prediction at a pixel depends on its neighbours' features; saved and loaded, it is the same."""
    mlp = map_lgp(components["unet"], scale=2)
    conv = map_lgp(components["unet"], scale=2, head="conv")
    conv.load_state_dict({**conv.state_dict(), **mlp.state_dict()})
    features = [torch.randn(1, c, 8, 8) for c in mlp.config.block_channels]
    noise = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(conv.eval()(features, noise), mlp.eval()(features, noise))
    torch.nn.init.normal_(conv.spatial[2].weight, std=0.1)
    changed = [f.clone() for f in features]
    changed[0][..., 0, 0] += 5  # one latent corner's features
    difference = (conv(changed, noise) - conv(features, noise)).abs()[0, 0]
    assert difference[4:6, :].sum() > 0  # reaches map rows beyond that corner's own 2x2 pixels (rows 0-1)
    conv.save_pretrained(tmp_path)
    loaded = LGPModel.from_pretrained(tmp_path).eval()
    assert loaded.config.head == "conv"
    torch.testing.assert_close(loaded(features, noise), conv(features, noise))
