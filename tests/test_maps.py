"""Any spatial map, not only sketches: LGPs that know their map (edges, silhouettes, depth, colour maps), training
data for each (`prepare_data --map`), and the pipelines guided by them. Offline: the depth estimator is a tiny model
built from a config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from conftest import draw_square
from diffusers import StableDiffusionPipeline

from pipeline_sketch_guided import LGPModel, SketchGuidedStableDiffusionPipeline, prepare_sketch
from pipeline_sketch_guided.batch import Row, check_row_inputs
from pipeline_sketch_guided.demo import DEMO_MODEL_DIR
from pipeline_sketch_guided.sketch import prepare_map
from pipeline_sketch_guided.testing import random_lgp, tiny_components
from pipeline_sketch_guided.training import prepare_data, train_lgp

PROMPT = "a red circle on the grey background"


def blob(size: int = 32, light_on_dark: bool = True) -> PIL.Image.Image:
    """A filled disc, off centre: a silhouette map."""
    ys, xs = np.mgrid[0:size, 0:size]
    inside = (xs - size * 0.35) ** 2 + (ys - size * 0.6) ** 2 < (size * 0.25) ** 2
    return PIL.Image.fromarray(((inside == light_on_dark) * 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# The LGP knows its map; old configs are edge LGPs


# An LGP config.json as written before maps had kinds: demo model v1's LGP, shipped until 2026-11-26 (commit 3f16c69).
OLD_EDGE_CONFIG = {
    "_class_name": "LGPModel",
    "_diffusers_version": "0.42.1",
    "_name_or_path": "outputs/demo-lgp",
    "block_channels": [64, 128, 128, 128, 128, 128, 128],
    "blocks": [
        "down_blocks.0", "down_blocks.1", "mid_block.attentions.0", "mid_block.resnets.0", "mid_block.resnets.1",
        "up_blocks.0", "up_blocks.1",
    ],
    "feature_branch": "conditional",
    "hidden_dims": [512, 256, 128, 64],
    "latent_channels": 4,
    "num_noise_frequencies": 9,
    "out_channels": 4,
    "sketch_polarity": "light_on_dark",
    "tuple_output_index": 0,
}  # fmt: skip


def old_edge_config(**overrides) -> dict:
    return {**OLD_EDGE_CONFIG, **overrides}


def test_a_config_from_before_map_kinds_loads_as_an_edge_lgp_and_behaves_identically(tmp_path, components):
    unet = components["unet"]
    reference = random_lgp(unet)  # today's edge LGP, saved, then its config rewritten as an old one
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # Exactly the keys of the shipped old file, with this LGP's values.
    old = {key: config.get(key, value) for key, value in old_edge_config().items()}
    assert set(config) - set(old) == {"map_kind", "map_normalization", "target", "target_scale", "head", "target_blur"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    lgp = LGPModel.from_pretrained(tmp_path)
    assert (lgp.config.map_kind, lgp.config.map_normalization) == ("edges", "none")
    assert (lgp.config.target, lgp.config.target_scale) == ("vae_latent", 1)  # the paper's target, as it was
    assert (lgp.config.head, lgp.config.target_blur) == ("mlp", 0.0)  # the paper's per-pixel MLP, a sharp target

    pipe = SketchGuidedStableDiffusionPipeline(**components, lgp=lgp.eval())
    pipe.set_progress_bar_config(disable=True)
    reference_pipe = SketchGuidedStableDiffusionPipeline(**tiny_components(), lgp=reference)
    reference_pipe.set_progress_bar_config(disable=True)
    # Edge handling is today's: dark strokes on light paper are turned into the LGP's polarity, light on dark kept...
    for sketch in (draw_square(), draw_square(dark_on_light=False)):
        target = pipe.prepare_sketch_latents(sketch, 1, 32, 32, "cpu")
        expected = pipe.encode_to_latents(prepare_sketch(sketch, 32, 32, "light_on_dark"))
        assert torch.equal(target, expected)
    kwargs = {"num_inference_steps": 4, "output_type": "np", "sketch": draw_square(), "sketch_guidance_end": 1.0}
    images = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    expected = reference_pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.array_equal(images, expected)
    # ... and a blank sketch is still refused.
    with pytest.raises(ValueError, match="blank"):
        pipe(PROMPT, sketch=PIL.Image.new("L", (32, 32), 255), num_inference_steps=2)


def test_the_shipped_demo_lgp_config_is_an_edge_lgp():
    lgp = LGPModel.from_pretrained(DEMO_MODEL_DIR / "lgp")
    assert (lgp.config.map_kind, lgp.config.map_normalization, lgp.config.sketch_polarity) == (
        "edges",
        "none",
        "light_on_dark",
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"map_kind": "normals"}, "map_kind"),
        ({"map_normalization": "zscore"}, "map_normalization"),
        ({"map_kind": "edges", "map_normalization": "minmax"}, "Edge maps"),
    ],
)
def test_bad_map_settings_are_refused(components, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LGPModel.from_unet(components["unet"], hidden_dims=[8], **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Preparing a user's map for the LGP's kind


def test_silhouettes_drawn_either_way_round_are_read_as_light_shapes_on_dark():
    light = prepare_map(blob(), 32, 32, "silhouette")
    dark = prepare_map(blob(light_on_dark=False), 32, 32, "silhouette")  # a pen filling a blob on white paper
    expected = torch.from_numpy(np.asarray(blob(), dtype=np.float32) / 127.5 - 1)
    assert (
        light.shape == (1, 3, 32, 32)
        and torch.allclose(light[0, 0], expected)
        and torch.equal(light[0, 0], light[0, 2])
    )
    assert torch.equal(dark, light)
    # The paper is the border's tone, not the majority's: a shape covering most of the page is still the shape.
    ys, xs = np.mgrid[0:32, 0:32]
    large = (np.abs(xs - 15.5) < 13) & (np.abs(ys - 15.5) < 13)  # 66% of the pixels
    for drawn in (large, ~large):
        prepared = prepare_map(PIL.Image.fromarray((drawn * 255).astype(np.uint8)), 32, 32, "silhouette")
        assert torch.equal(prepared[0, 0] > 0, torch.from_numpy(large))
    assert torch.allclose(prepare_map(blob(light_on_dark=False), 32, 32, "edges"), light)
    # An empty silhouette map is an instruction (nothing here), not an error; a transparent one is background.
    assert (prepare_map(PIL.Image.new("L", (32, 32), 0), 32, 32, "silhouette") == -1).all()
    assert (prepare_map(PIL.Image.new("L", (32, 32), 255), 32, 32, "silhouette") == -1).all()
    assert (prepare_map(PIL.Image.new("RGBA", (32, 32), (255, 255, 255, 0)), 32, 32, "silhouette") == -1).all()


def test_a_depth_map_dark_where_near_is_turned_round_only_when_asked():
    ramp = np.tile(np.linspace(0, 255, 48, dtype=np.float32), (32, 1)).round().astype(np.uint8)  # another aspect
    as_drawn = prepare_map(ramp, 32, 32, "depth")
    inverted = prepare_map(ramp, 32, 32, "depth", invert=True)
    expected = prepare_map(255 - ramp, 32, 32, "depth")
    assert torch.allclose(inverted, expected) and not torch.allclose(inverted, as_drawn)
    # The padding of another aspect is the background (far) either way.
    assert (inverted[0, 0, :4] == -1).all() and (as_drawn[0, 0, :4] == -1).all()
    for kind in ("edges", "silhouette", "color"):
        with pytest.raises(ValueError, match="`invert_map` turns a depth map"):
            prepare_map(blob(), 32, 32, kind, invert=True)


def test_depth_maps_are_normalised_as_in_training():
    ramp = np.tile(np.linspace(60, 140, 32, dtype=np.float32), (32, 1)).round().astype(np.uint8)
    prepared = prepare_map(PIL.Image.fromarray(ramp), 32, 32, "depth", normalization="minmax")
    assert prepared.min() == -1 and prepared.max() == 1
    assert (prepared[0, 0].diff(dim=1) >= 0).all()  # near stays light, far dark: no flip
    unnormalised = prepare_map(PIL.Image.fromarray(ramp), 32, 32, "depth", normalization="none")
    assert unnormalised.min() > -0.6 and unnormalised.max() < 0.2
    with pytest.raises(ValueError, match="flat"):
        prepare_map(PIL.Image.new("L", (32, 32), 90), 32, 32, "depth", normalization="minmax")
    # Raw depth of any range (metres as floats, a 16-bit image) is stretched from its own range, not clipped to 0..1.
    metres = np.tile(np.linspace(2.0, 9.0, 32, dtype=np.float32), (32, 1))
    assert torch.allclose(prepare_map(metres, 32, 32, "depth", normalization="minmax"), prepared, atol=0.025)
    sixteen_bit = PIL.Image.fromarray((metres * 5000).astype(np.uint16))
    assert torch.allclose(prepare_map(sixteen_bit, 32, 32, "depth", normalization="minmax"), prepared, atol=0.025)
    assert torch.allclose(
        prepare_map(torch.from_numpy(metres)[None], 32, 32, "depth", normalization="minmax"), prepared, atol=0.025
    )


def test_colour_maps_keep_their_channels_and_are_padded_black():
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, :32] = (255, 0, 0)
    array[:, 32:] = (0, 0, 255)
    prepared = prepare_map(PIL.Image.fromarray(array), 32, 32, "color")
    assert prepared.shape == (1, 3, 32, 32)
    assert prepared[0, :, 16, 4].tolist() == [1.0, -1.0, -1.0]  # red, left
    assert prepared[0, :, 16, 28].tolist() == [-1.0, -1.0, 1.0]  # blue, right
    assert (prepared[0, :, 0] == -1).all()  # another aspect: fitted inside, padded with black


def test_a_silhouette_lgp_guides_the_pipeline_and_its_loss_falls(components):
    lgp = random_lgp(components["unet"], map_kind="silhouette")
    pipe = SketchGuidedStableDiffusionPipeline(**components, lgp=lgp)
    pipe.set_progress_bar_config(disable=True)
    target_map = blob()
    target = pipe.prepare_sketch_latents(target_map, 1, 32, 32, "cpu")
    assert torch.equal(target, pipe.encode_to_latents(prepare_map(target_map, 32, 32, "silhouette")))

    def loss(latents: torch.Tensor) -> float:
        prompt_embeds = torch.cat(pipe.encode_prompt(PROMPT, "cpu", 1, True)[::-1])
        pipe._guidance_scale = 7.5
        unet_kwargs = {"timestep_cond": None, "cross_attention_kwargs": None, "added_cond_kwargs": None}
        *_, predicted = pipe.noise_and_sketch_gradient(
            torch.cat([latents] * 2), torch.tensor(50), prompt_embeds, {**unet_kwargs, "return_dict": False}, target
        )
        return float((predicted - target).detach().square().sum())

    kwargs = {"num_inference_steps": 8, "output_type": "latent", "sketch_guidance_end": 1.0}
    unguided = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    guided = pipe(
        PROMPT, generator=torch.Generator().manual_seed(0), guidance_map=target_map, sketch_guidance_scale=1.0, **kwargs
    ).images
    assert loss(guided) < 0.8 * loss(unguided)
    # `guidance_map` is `sketch` by another name.
    by_sketch = pipe(
        PROMPT, generator=torch.Generator().manual_seed(0), sketch=target_map, sketch_guidance_scale=1.0, **kwargs
    )
    assert torch.equal(by_sketch.images, guided)
    with pytest.raises(ValueError, match="not both"):
        pipe(PROMPT, sketch=target_map, guidance_map=target_map, num_inference_steps=2)


def test_batch_checks_a_rows_map_as_its_lgp_reads_it(tmp_path):
    empty = tmp_path / "empty.png"
    PIL.Image.new("L", (32, 32), 0).save(empty)
    for config, status in (
        (None, "failed"),
        (LGPModel.from_unet(tiny_components()["unet"], map_kind="silhouette").config, "pending"),
    ):
        row = Row(0, {"prompt": PROMPT, "sketch": str(empty)}, tmp_path / "out.png", status="pending")
        check_row_inputs(row, 8, (32, 32), config)
        assert row.status == status, row.error


# ---------------------------------------------------------------------------------------------------------------------
# Training data for any map


def write_images(folder: Path, count: int, size: tuple[int, int] = (48, 32)) -> list[np.ndarray]:
    """`count` captioned images with a red square at a place that varies; returns each square's mask."""
    folder.mkdir(parents=True, exist_ok=True)
    masks = []
    for index in range(count):
        array = np.full((size[1], size[0], 3), 128, dtype=np.uint8)
        mask = np.zeros(array.shape[:2], dtype=bool)
        mask[4 + index : 16 + index, 8 + 2 * index : 20 + 2 * index] = True
        array[mask] = (220, 30, 30)
        PIL.Image.fromarray(array).save(folder / f"img_{index}.png")
        (folder / f"img_{index}.txt").write_text("a red square on the grey background\n")
        masks.append(mask)
    return masks


def test_folder_maps_are_paired_by_name_cropped_like_their_image_and_missing_ones_reported(tmp_path):
    images, maps = tmp_path / "images", tmp_path / "maps"
    masks = write_images(images, 5)
    maps.mkdir()
    for index, mask in enumerate(masks[:3]):  # no map for 3; a map of another aspect for 4
        colour = np.zeros((*mask.shape, 3), dtype=np.uint8)
        colour[mask] = (0, 255, 0)  # a segmentation colour
        PIL.Image.fromarray(colour).save(maps / f"img_{index}.png")
    PIL.Image.new("RGB", (32, 32)).save(maps / "img_4.png")
    output = tmp_path / "prepared"
    report = prepare_data.main(
        ["--input_dir", str(images), "--output_dir", str(output), "--resolution", "16", "--map", f"folder:{maps}"]
    )
    assert report["written"] == 3 and report["without_map"] == 2 and report["skipped"] == 2
    assert (report["map_kind"], report["map_normalization"]) == ("color", "none")
    reasons = {Path(entry["source"]).name: entry["reason"] for entry in report["skipped_files"]}
    assert set(reasons) == {"img_3.png", "img_4.png"}
    assert "no map" in reasons["img_3.png"] and "img_3" in reasons["img_3.png"] and "aspect" in reasons["img_4.png"]

    for example in prepare_data.load_prepared_dataset(str(output)):
        with PIL.Image.open(example.image_path) as image, PIL.Image.open(example.edge_path) as guidance_map:
            assert (guidance_map.mode, guidance_map.size) == ("RGB", (16, 16))
            red = np.asarray(image)[..., 0] > 170
            green = np.asarray(guidance_map)[..., 1] > 127
        assert set(np.unique(np.asarray(guidance_map)).tolist()) <= {0, 255}  # colours kept exact (nearest)
        assert (red == green).mean() > 0.95  # the map was cropped exactly as its image

    with pytest.raises(ValueError, match="not a folder"):
        prepare_data.parse_args(["--input_dir", str(images), "--output_dir", str(output), "--map", "folder:nowhere"])
    with pytest.raises(ValueError, match="Unknown `--map"):
        prepare_data.parse_args(["--input_dir", str(images), "--output_dir", str(output), "--map", "normals"])


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory) -> str:
    """A Depth Anything model with a four-layer 16-wide DINOv2 backbone, built from a config and saved with its image
    processor, as `--map_model` takes one from the Hub."""
    transformers = pytest.importorskip("transformers")
    backbone = transformers.Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=28,
        patch_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        patch_size=7,
        neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8,
        head_hidden_size=8,
    )
    torch.manual_seed(0)
    model = transformers.DepthAnythingForDepthEstimation(config).eval()
    processor = transformers.DPTImageProcessor(
        size={"height": 28, "width": 28}, keep_aspect_ratio=False, ensure_multiple_of=7, do_pad=False
    )
    folder = tmp_path_factory.mktemp("tiny-depth")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def test_prepare_data_makes_depth_maps_with_a_transformers_depth_estimator(tmp_path, tiny_depth_model):
    from transformers import pipeline

    images = tmp_path / "images"
    write_images(images, 3)
    output = tmp_path / "prepared"
    report = prepare_data.main(
        ["--input_dir", str(images), "--output_dir", str(output), "--resolution", "16"]
        + ["--map", "depth", "--map_model", tiny_depth_model]
    )
    assert report["written"] == 3 and report["without_map"] == 0
    assert (report["map"], report["map_kind"], report["map_normalization"]) == ("depth", "depth", "minmax")
    assert report["map_model"] == tiny_depth_model

    estimator = pipeline("depth-estimation", model=tiny_depth_model)
    for example in prepare_data.load_prepared_dataset(str(output)):
        with PIL.Image.open(example.image_path) as image, PIL.Image.open(example.edge_path) as depth:
            depth_values = np.asarray(depth)
            expected = estimator(image.copy())["predicted_depth"].float().numpy()
        assert depth.mode == "L" and depth.size == (16, 16)
        assert depth_values.min() == 0 and depth_values.max() == 255  # stretched per image: "minmax"
        expected = (expected - expected.min()) / (expected.max() - expected.min()) * 255
        assert np.abs(depth_values - expected).max() <= 1

    with pytest.raises(ValueError, match="--map_model"):
        prepare_data.main(
            ["--input_dir", str(images), "--output_dir", str(tmp_path / "x"), "--map", "depth"]
            + ["--map_model", str(tmp_path / "no-such-model")]
        )


def test_the_trained_lgp_records_the_map_of_its_training_set(tmp_path):
    images, maps = tmp_path / "images", tmp_path / "maps"
    masks = write_images(images, 8, size=(32, 32))
    maps.mkdir()
    for index, mask in enumerate(masks):
        PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(maps / f"img_{index}.png")
    data = tmp_path / "prepared"
    prepare_data.main(
        ["--input_dir", str(images), "--output_dir", str(data), "--resolution", "32"]
        + ["--map", f"folder:{maps}", "--map_kind", "silhouette"]
    )
    base = tmp_path / "base"
    StableDiffusionPipeline(**tiny_components()).save_pretrained(base)
    output = tmp_path / "lgp"
    train_lgp.main(
        ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir", str(output)]
        + ["--hidden_dims", "16", "--train_batch_size", "4", "--max_train_steps", "2", "--report_to", "none"]
        + ["--sketch_polarity", "dark_on_light"]  # an edge setting: silhouettes are never flipped
    )
    lgp = LGPModel.from_pretrained(output)
    assert (lgp.config.map_kind, lgp.config.map_normalization) == ("silhouette", "none")
    dataset = train_lgp.EdgeDataset(prepare_data.load_prepared_dataset(str(data)), 32, "dark_on_light", "silhouette")
    expected = torch.from_numpy(masks[0].astype(np.float32) * 2 - 1)
    assert torch.equal(dataset[0]["edge_values"][0], expected)


# ---------------------------------------------------------------------------------------------------------------------
# The efficacy benchmark on hand-drawn blobs


def test_held_out_blobs_are_filled_hand_drawn_shapes_scored_against_themselves():
    from benchmarks.efficacy import BLOB_STYLES, held_out_cases
    from pipeline_sketch_guided.demo import filled_mask, shape_polygon

    blobs, sketches = held_out_cases(6, map="silhouette"), held_out_cases(6)
    assert [c.describe() for c in blobs] == [c.describe() for c in held_out_cases(6, map="silhouette")]
    assert {c.style.name for c in blobs} == {s.name for s in BLOB_STYLES}
    for blob_case, sketch_case in zip(blobs, sketches, strict=True):
        assert blob_case.prompt == sketch_case.prompt and blob_case.center == sketch_case.center
        assert blob_case.map == "silhouette" and not blob_case.dark_on_light
        drawn = np.asarray(blob_case.sketch.resize((64, 64), PIL.Image.Resampling.BOX)) > 127
        assert np.median(np.asarray(blob_case.sketch)) == 0  # white blob on black
        assert (drawn == blob_case.mask).mean() > 0.97  # the IoU's reference is the blob as drawn...
        exact = filled_mask(shape_polygon(blob_case.kind, blob_case.center, blob_case.radius, blob_case.rotation))
        assert not np.array_equal(blob_case.mask, exact)  # ... which is not the renderer's exact shape
        assert 0.01 < blob_case.mask.mean() < 0.6
    with pytest.raises(ValueError, match="maps"):
        held_out_cases(2, map="depth")


def test_the_efficacy_benchmark_runs_on_silhouettes(tmp_path):
    from benchmarks.efficacy import load_pipeline, run_benchmark

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_pipeline("tiny", map="silhouette")
        assert pipe.lgp.config.map_kind == "silhouette"
        common = {"num_cases": 2, "seeds": [0], "scales": [1.0], "ends": [0.5], "num_inference_steps": 2}
        common.update(timing_runs=0, validation_samples=0, log=lambda *_: None)
        result = run_benchmark(pipe, tmp_path, map="silhouette", **common)
        with pytest.raises(ValueError, match="--map silhouette"):
            run_benchmark(pipe, tmp_path, **common)
    finally:
        torch.set_num_threads(threads)
    assert result["config"]["map"] == "silhouette" and result["cases"][0]["map"] == "silhouette"
    for row in (result["unguided"], *result["sweep"]):
        assert 0 <= row["iou"] <= 1 and 0 <= row["colour_agreement"] <= 1
    assert (tmp_path / "contact_sheet.png").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# The demo's silhouette LGP


@pytest.fixture(scope="module")
def silhouette_demo():
    from pipeline_sketch_guided.demo import load_demo_pipeline

    return load_demo_pipeline(map="silhouette")


def test_the_demo_ships_a_silhouette_lgp_beside_its_edge_lgp(silhouette_demo):
    from pipeline_sketch_guided.demo import load_demo_pipeline

    lgp = silhouette_demo.lgp
    assert (lgp.config.map_kind, lgp.config.map_normalization) == ("silhouette", "none")
    assert lgp.dtype == torch.float32 and silhouette_demo.unet.dtype == torch.float32
    lgp.check_unet(silhouette_demo.unet)
    folder = DEMO_MODEL_DIR / "fill_lgp"
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_size < 4 * 2**20
    assert "lgp" in json.loads((folder / "training.json").read_text())["silhouette_training_summary"]
    assert load_demo_pipeline().lgp.config.map_kind == "edges"  # the default stays the edge LGP
    with pytest.raises(ValueError, match=r"\['edges', 'silhouette'\]"):
        load_demo_pipeline(map="depth")


def test_the_silhouette_demo_puts_the_shape_in_the_blob(silhouette_demo):
    from benchmarks.efficacy import generate, held_out_cases, measure_image

    cases = held_out_cases(num_cases=4, map="silhouette")
    unguided = generate(silhouette_demo, cases, seed=0, image_size=64, num_inference_steps=10)
    guided = generate(silhouette_demo, cases, seed=0, image_size=64, num_inference_steps=10, guidance={})
    iou_unguided = np.mean([measure_image(image, case)["iou"] for image, case in zip(unguided, cases, strict=True)])
    iou_guided = np.mean([measure_image(image, case)["iou"] for image, case in zip(guided, cases, strict=True)])
    assert iou_guided > iou_unguided + 0.1, (iou_guided, iou_unguided)


def test_a_silhouette_drawn_dark_on_paper_guides_as_the_same_shape_light_on_black(silhouette_demo, tmp_path):
    from pipeline_sketch_guided.batch import run_rows
    from pipeline_sketch_guided.cli import main as cli
    from pipeline_sketch_guided.demo import freehand_blob

    light = freehand_blob("star", (30, 34), 16, seed=5)[0].convert("L")
    dark = PIL.ImageOps.invert(light)
    light.save(tmp_path / "light.png")
    dark.save(tmp_path / "dark.png")
    common = {"num_inference_steps": 4, "generator": None}

    def pipeline_image(sketch):
        common["generator"] = torch.Generator().manual_seed(1)
        return np.asarray(silhouette_demo("a red star on a white background", sketch=sketch, **common).images[0])

    assert np.array_equal(pipeline_image(dark), pipeline_image(light))
    outputs = {}
    for name in ("light", "dark"):
        outputs[name] = tmp_path / f"cli-{name}.png"
        cli(
            ["generate", "--prompt", "a red star", "--sketch", str(tmp_path / f"{name}.png"), "--steps", "4"]
            + ["--demo-map", "silhouette", "--out", str(outputs[name])]
        )
    assert np.array_equal(np.asarray(PIL.Image.open(outputs["dark"])), np.asarray(PIL.Image.open(outputs["light"])))
    rows = [{"prompt": "a red star", "sketch": f"{name}.png", "seed": 3, "num_inference_steps": 4} for name in outputs]
    summary = run_rows(silhouette_demo, rows, tmp_path, tmp_path / "batch", progress=False)
    assert summary.done == 2
    first, second = (np.asarray(PIL.Image.open(row["output"])) for row in summary.rows)
    assert np.array_equal(first, second)
    # A depth flag for a silhouette is refused, through batch as through the pipeline.
    flagged = run_rows(silhouette_demo, [{**rows[0], "invert_map": "yes"}], tmp_path, tmp_path / "b2", progress=False)
    assert flagged.failed == 1 and "turns a depth map" in flagged.rows[0]["error"]


def test_the_cli_guides_with_a_silhouette_through_the_lgp_option(tmp_path):
    from pipeline_sketch_guided.cli import main as cli
    from pipeline_sketch_guided.demo import freehand_blob

    blob_file, out, predicted = tmp_path / "blob.png", tmp_path / "out.png", tmp_path / "predicted.png"
    freehand_blob("circle", (24, 30), 14, seed=3)[0].save(blob_file)
    args = ["generate", "--prompt", "a red circle on a white background", "--sketch", str(blob_file)]
    args += ["--lgp", str(DEMO_MODEL_DIR / "fill_lgp"), "--steps", "4", "--out", str(out)]
    cli([*args, "--edge-map-out", str(predicted)])
    assert PIL.Image.open(out).size == (64, 64) and PIL.Image.open(predicted).size == (64, 64)
    # The demo's fill LGP stays out: a silhouette has no outline to fill, and the metadata says no fill guided.
    assert json.loads(PIL.Image.open(out).text["sketch_guided"])["sketch_fill"] is None


def test_shipping_another_maps_lgp_puts_it_beside_the_model_and_reshipping_the_model_keeps_it(tmp_path):
    from pipeline_sketch_guided.training.ship_demo_model import ship, ship_lgp

    components = tiny_components()
    StableDiffusionPipeline(**components).save_pretrained(tmp_path / "model")
    random_lgp(components["unet"]).save_pretrained(tmp_path / "edge-lgp")
    random_lgp(components["unet"], seed=1, map_kind="silhouette").save_pretrained(tmp_path / "silhouette-lgp")
    target = tmp_path / "demo"
    with pytest.raises(ValueError, match="ship the model first"):
        ship_lgp(tmp_path / "silhouette-lgp", "silhouette", target)
    ship(tmp_path / "model", tmp_path / "edge-lgp", target)
    assert SketchGuidedStableDiffusionPipeline.from_pretrained(target).fill_lgp is None
    ship_lgp(tmp_path / "silhouette-lgp", "silhouette", target, notes={"summary": {"steps": 2}})
    # The silhouette LGP is the demo's fill LGP: loading the demo brings it.
    assert SketchGuidedStableDiffusionPipeline.from_pretrained(target).fill_lgp.config.map_kind == "silhouette"
    with pytest.raises(ValueError, match="another demo map"):
        ship_lgp(tmp_path / "silhouette-lgp", "edges", target)
    ship(tmp_path / "model", tmp_path / "edge-lgp", target)  # the model again: the silhouette LGP stays beside it
    from safetensors.torch import load_file

    weights = load_file(target / "fill_lgp" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for name, tensor in weights.items() if "num_batches" not in name} == {torch.float16}
    assert LGPModel.from_pretrained(target / "fill_lgp").config.map_kind == "silhouette"
    assert json.loads((target / "fill_lgp" / "training.json").read_text()) == {"summary": {"steps": 2}}
    assert LGPModel.from_pretrained(target / "lgp").config.map_kind == "edges"
    reshipped = SketchGuidedStableDiffusionPipeline.from_pretrained(target)
    assert reshipped.lgp.config.map_kind == "edges" and reshipped.fill_lgp.config.map_kind == "silhouette"
