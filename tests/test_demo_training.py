"""Training the demo model further, ControlNet on the same pairs, and the side-by-side comparison of the two methods."""

import json
import random

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file

from benchmarks import controlnet_comparison, efficacy
from pipeline_sketch_guided import LGPModel, loading
from pipeline_sketch_guided.demo import DEMO_MODEL_DIR
from pipeline_sketch_guided.training import (
    prepare_data,
    shapes,
    train_controlnet,
    train_demo_model,
    train_demo_transformer,
    train_lgp,
)


def test_layout_anywhere_draws_larger_and_more_single_shapes_than_inside():
    def stats(layout):
        drawn = [shapes.random_shapes(random.Random(seed), layout) for seed in range(400)]
        radii = [shape.radius for sample in drawn if len(sample) == 1 for shape in sample]
        return np.mean([len(sample) == 1 for sample in drawn]), max(radii)

    single_inside, largest_inside = stats("inside")
    single_anywhere, largest_anywhere = stats("anywhere")
    assert largest_inside <= 22 < 28 < largest_anywhere  # "anywhere" reaches shapes that fill the frame
    assert single_anywhere > single_inside + 0.05
    # Every shape's centre keeps at least 60% of its radius (or the frame's middle) inside the frame.
    for seed in range(200):
        for shape in shapes.random_shapes(random.Random(seed), "anywhere"):
            margin = min(0.6 * shape.radius, shapes.IMAGE_SIZE / 2) - 1e-9
            assert all(margin <= c <= shapes.IMAGE_SIZE - margin for c in shape.center)
    with pytest.raises(ValueError, match="layout"):
        shapes.random_shapes(random.Random(0), "edge")


def test_striped_backgrounds_are_stripes_and_an_unknown_style_is_named():
    image, caption, drawn = shapes.render_sample(7, styles=("striped",))
    plain, _, _ = shapes.render_sample(7, styles=("plain",))
    background = ~np.logical_or.reduce([shapes.shape_mask(shape) for shape in drawn])
    assert np.asarray(image)[background].std() > 10 > np.asarray(plain)[background].std()
    assert caption == shapes.render_sample(7)[1]  # the style changes the look, not the caption
    with pytest.raises(ValueError, match="striped"):
        shapes.render_sample(7, styles=("dotted",))


def test_training_further_keeps_the_vae_and_moves_the_unet(tmp_path):
    train_demo_model.main(
        [
            "--output_dir", str(tmp_path), "--init_from", str(DEMO_MODEL_DIR), "--num_images", "32",
            "--unet_steps", "2", "--unet_batch_size", "4", "--styles", "striped", "--layout", "anywhere",
            "--device", "cpu",
        ]
    )  # fmt: skip
    before = load_file(DEMO_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before)
    vae_before = AutoencoderKL.from_pretrained(DEMO_MODEL_DIR, subfolder="vae").state_dict()
    vae_after = AutoencoderKL.from_pretrained(tmp_path / "pipeline", subfolder="vae").state_dict()
    assert all(torch.equal(vae_before[k].float(), vae_after[k].float()) for k in vae_before)
    scaling = AutoencoderKL.load_config(DEMO_MODEL_DIR, subfolder="vae")["scaling_factor"]
    assert AutoencoderKL.load_config(tmp_path / "pipeline", subfolder="vae")["scaling_factor"] == scaling
    report = json.loads((tmp_path / "training_report.json").read_text())
    assert report["unet_steps_done"] == 2 and report["styles"] == ["striped"] and report["layout"] == "anywhere"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A prepare_data folder of 12 demo renders with their Canny edges."""
    root = tmp_path_factory.mktemp("pairs")
    shapes.write_image_folder(root / "raw", 12, first_seed=1_000_000)
    prepare_data.main(["--input_dir", str(root / "raw"), "--output_dir", str(root / "data"), "--resolution", "64"])
    return root / "data"


def test_controlnet_snapshots_at_each_budget_drive_the_demo_unet(pairs, tmp_path):
    output = tmp_path / "controlnet"
    train_controlnet.main(
        [
            "--pretrained_model_name_or_path", str(DEMO_MODEL_DIR), "--train_data_dir", str(pairs),
            "--output_dir", str(output), "--snapshot_seconds", "0", "0.001", "--train_batch_size", "2",
            "--device", "cpu",
        ]
    )  # fmt: skip
    records = [json.loads((output / name / "training.json").read_text()) for name in ("seconds-0", "seconds-0.001")]
    assert [record["steps"] for record in records] == [1, 2]  # one snapshot per budget, the run stops after the last
    controlnet = ControlNetModel.from_pretrained(output / "seconds-0.001")
    assert records[1]["trainable_parameters"] == sum(p.numel() for p in controlnet.parameters())
    # The condition is read at the image's size (64 px) and shrunk to the latents' (16), as the demo VAE does.
    unet = UNet2DConditionModel.from_pretrained(DEMO_MODEL_DIR, subfolder="unet", torch_dtype=torch.float32)
    latents, states = torch.randn(1, 4, 16, 16), torch.randn(1, 16, unet.config.cross_attention_dim)
    down, mid = controlnet(latents, 10, states, controlnet_cond=torch.rand(1, 3, 64, 64), return_dict=False)
    steered = unet(latents, 10, states, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert steered.sample.shape == latents.shape


def test_controlnet_snapshots_by_steps_count_optimiser_steps(pairs, tmp_path):
    output = tmp_path / "controlnet"
    train_controlnet.main(
        [
            "--pretrained_model_name_or_path", str(DEMO_MODEL_DIR), "--train_data_dir", str(pairs),
            "--output_dir", str(output), "--snapshot_steps", "3", "1", "--train_batch_size", "2", "--device", "cpu",
        ]
    )  # fmt: skip
    records = [json.loads((output / name / "training.json").read_text()) for name in ("steps-1", "steps-3")]
    assert [record["steps"] for record in records] == [1, 3] == [record["budget_steps"] for record in records]
    assert sorted(path.name for path in output.iterdir()) == ["steps-1", "steps-3"]
    first, last = (ControlNetModel.from_pretrained(output / name) for name in ("steps-1", "steps-3"))
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), last.parameters(), strict=True))  # trained on


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (["--snapshot_steps", "0"], "at least 1 step"),
        (["--snapshot_seconds", "nan"], "0 or more"),
        (["--snapshot_steps", "5", "--snapshot_seconds", "5"], "not allowed with"),
        ([], "one of the arguments --snapshot_seconds --snapshot_steps is required"),
    ],
)
def test_controlnet_budgets_that_cannot_work_are_refused_before_loading(budget, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_controlnet.main(
            ["--pretrained_model_name_or_path", "no/such/model", "--train_data_dir", str(tmp_path),
             "--output_dir", str(tmp_path / "out"), *budget]
        )  # fmt: skip
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_controlnet_training_names_a_folder_that_is_not_training_data(tmp_path):
    with pytest.raises(SystemExit, match="prepare_data"):
        train_controlnet.main(
            [
                "--pretrained_model_name_or_path", str(DEMO_MODEL_DIR), "--train_data_dir", str(tmp_path),
                "--output_dir", str(tmp_path / "out"), "--snapshot_seconds", "1", "--device", "cpu",
            ]
        )  # fmt: skip


def test_comparison_an_untrained_controlnet_draws_the_unguided_images(tmp_path, monkeypatch):
    """ControlNet's zero convolutions start the control at nothing: an untrained one must score exactly as unguided,
    image by image, while the LGP moves the images; the table carries each method's size and parameters, the json each
    image's figures. Measured on the sketch set asked for (`--placement`)."""
    asked, asked_cases = [], []
    held_out_cases = efficacy.held_out_cases

    def recording(*args, **kwargs):
        asked.append(kwargs.get("placement"))
        cases = held_out_cases(*args, **kwargs)
        asked_cases.extend(cases)
        return cases

    monkeypatch.setattr(efficacy, "held_out_cases", recording)
    unet = UNet2DConditionModel.from_pretrained(DEMO_MODEL_DIR, subfolder="unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(DEMO_MODEL_DIR, subfolder="vae")
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=train_controlnet.conditioning_channels(vae)
    )
    controlnet.save_pretrained(tmp_path / "untrained")
    (tmp_path / "untrained" / "training.json").write_text(json.dumps({"seconds": 0.5, "device": "cpu", "steps": 0}))
    rows = controlnet_comparison.main(
        [
            "--controlnets", str(tmp_path / "untrained"), "--num_cases", "4", "--seeds", "0",
            "--num_inference_steps", "10", "--timing_runs", "0", "--output_dir", str(tmp_path / "out"),
            "--placement", "anywhere",
        ]
    )  # fmt: skip
    assert asked == ["anywhere"]
    unguided, lgp, untrained = rows
    metrics = ("iou", "outline_f_score", "colour_agreement", "recognisable", "one_object")
    assert [untrained[m] for m in metrics] == pytest.approx([unguided[m] for m in metrics], abs=1e-6)
    assert lgp["iou"] > unguided["iou"] + 0.1
    # The demo brings its fill LGP, so the LGP row guides with each sketch's fill, and counts both LGPs.
    assert lgp["fill_guidance"] and lgp["method"] == "LGP guidance (pipeline defaults, with fill guidance)"
    lgps = [LGPModel.from_pretrained(DEMO_MODEL_DIR / folder) for folder in ("lgp", "fill_lgp")]
    assert lgp["trainable_parameters"] == sum(p.numel() for model in lgps for p in model.parameters())
    assert untrained["trainable_parameters"] == sum(p.numel() for p in controlnet.parameters())
    # Both files count, and the table names the fill LGP's training time: the demo's does not record one in seconds.
    assert lgp["file_bytes"] == sum(
        (DEMO_MODEL_DIR / folder / "diffusion_pytorch_model.safetensors").stat().st_size
        for folder in ("lgp", "fill_lgp")
    )
    assert lgp["fill_training_seconds"] is None
    # Each image's own figures, by seed and case, so a set's figure can be traced to the sketches that hold it down.
    report = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [case["radius"] for case in report["cases"]] == [round(case.radius, 2) for case in asked_cases]
    seed_and_case = [(0, case.index) for case in asked_cases]
    for row in report["rows"]:
        assert [(image["seed"], image["case"]) for image in row["per_image"]] == seed_and_case
        assert np.mean([image["iou"] for image in row["per_image"]]) == pytest.approx(row["iou"])
    untrained_images, unguided_images = report["rows"][2]["per_image"], report["rows"][0]["per_image"]
    assert [i["iou"] for i in untrained_images] == pytest.approx([i["iou"] for i in unguided_images], abs=1e-6)
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "ControlNet, 0.5 s of training" in table and "LGP guidance" in table and "| one object |" in table
    assert "fill LGP's time not recorded" in table
    # SD1.5's published ControlNets train 361M parameters; the sizes are counted on that architecture.
    assert "a ControlNet trains 361M" in table


def test_held_out_sketches_anywhere_are_other_cases_of_every_size():
    inside, anywhere = efficacy.held_out_cases(24), efficacy.held_out_cases(24, placement="anywhere")
    assert all(a.center != b.center for a, b in zip(inside, anywhere, strict=True))
    assert max(c.radius for c in inside) <= 20 < 28 < max(c.radius for c in anywhere)
    assert min(c.radius for c in anywhere) < 12
    # Some sketches touch the frame's edge: their filled shape reaches the border.
    assert any(c.mask[0].any() or c.mask[-1].any() or c.mask[:, 0].any() or c.mask[:, -1].any() for c in anywhere)
    assert not any(c.mask[0].any() or c.mask[-1].any() or c.mask[:, 0].any() or c.mask[:, -1].any() for c in inside)
    with pytest.raises(ValueError, match="placement"):
        efficacy.held_out_cases(2, placement="edge")


def test_a_candidate_demo_is_written_beside_the_shipped_one_not_over_it(tmp_path):
    from pipeline_sketch_guided.training import ship_demo_model

    shipped = {path: path.stat().st_mtime_ns for path in DEMO_MODEL_DIR.rglob("*") if path.is_file()}
    target = tmp_path / "candidate"
    ship_demo_model.main(
        ["--model", str(DEMO_MODEL_DIR), "--lgp", str(DEMO_MODEL_DIR / "lgp"), "--target", str(target)]
    )
    assert {path: path.stat().st_mtime_ns for path in DEMO_MODEL_DIR.rglob("*") if path.is_file()} == shipped
    candidate = efficacy.load_pipeline(str(target))
    assert candidate.lgp is not None and candidate.unet.dtype == torch.float32  # loads as a measurable pipeline
    assert load_file(target / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"].dtype == torch.float16


def test_the_cached_dataset_is_rendered_again_for_another_style_or_layout(tmp_path):
    images, captions = train_demo_model.load_dataset(tmp_path, 8)
    assert (tmp_path / "dataset.npz").is_file()
    cached, _ = train_demo_model.load_dataset(tmp_path, 8)
    striped, striped_captions = train_demo_model.load_dataset(tmp_path, 8, styles=("striped",))
    anywhere, _ = train_demo_model.load_dataset(tmp_path, 8, layout="anywhere")
    assert np.array_equal(images, cached)
    assert not np.array_equal(images, striped) and striped_captions == captions
    assert not np.array_equal(striped, anywhere)


def test_transformer_demo_trains_resumes_and_loads_as_an_sd3_pipeline_that_an_lgp_guides(pairs, tmp_path):
    """The flow-matching demo: an SD3 pipeline on the demo's VAE and CLIP without T5, which `load_pipeline` and
    `train_lgp` load although it was saved without `text_encoder_3`, and which a freshly trained LGP guides."""
    output = tmp_path / "sd3"
    arguments = [
        "--output_dir", str(output), "--num_images", "8", "--batch_size", "2", "--width", "32", "--num_layers", "1",
        "--checkpoint_every", "1", "--device", "cpu",
    ]  # fmt: skip
    train_demo_transformer.main([*arguments, "--steps", "2"])
    weights = output / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"
    first = load_file(weights)
    projection = output / "pipeline" / "text_encoder" / "model.safetensors"
    first_projection = load_file(projection)["text_projection.weight"]
    train_demo_transformer.main([*arguments, "--steps", "2"])  # resumes at step 2: nothing left to train
    assert all(torch.equal(first[k], tensor) for k, tensor in load_file(weights).items())
    # The pooled projections it conditions on are rebuilt the same: the resumed run trains on the same conditioning.
    assert torch.equal(load_file(projection)["text_projection.weight"], first_projection)
    assert json.loads((output / "training_report.json").read_text())["transformer_steps_done"] == 2
    index = json.loads((output / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]

    pipe = loading.load_pipeline(str(output / "pipeline"), None)
    assert type(pipe).__name__ == "SketchGuidedStableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    demo_text = load_file(DEMO_MODEL_DIR / "text_encoder" / "model.safetensors")
    text_model = pipe.text_encoder.text_model.state_dict()
    assert all(torch.equal(text_model[name].float(), tensor.float()) for name, tensor in demo_text.items())

    train_lgp.main(
        [
            "--pretrained_model_name_or_path", str(output / "pipeline"), "--train_data_dir", str(pairs),
            "--output_dir", str(tmp_path / "lgp"), "--max_train_steps", "1", "--train_batch_size", "2",
            "--target", "map", "--target_scale", "4", "--report_to", "none",
        ]
    )  # fmt: skip
    pipe = loading.load_pipeline(str(output / "pipeline"), str(tmp_path / "lgp"))
    sketch = efficacy.held_out_cases(1)[0].sketch

    def image(**guidance):
        generator = torch.Generator().manual_seed(0)
        result = pipe("a red circle", num_inference_steps=3, generator=generator, output_type="np", **guidance)
        return result.images[0]

    unguided, guided = image(), image(sketch=sketch, sketch_guidance_scale=4.0)
    assert unguided.shape == (64, 64, 3)  # the transformer's sample size times the VAE's factor
    assert np.abs(guided - unguided).max() > 1e-3


def test_transformer_demo_names_an_init_folder_that_is_not_a_pipeline(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_demo_transformer.main(["--output_dir", str(tmp_path / "out"), "--init_from", str(tmp_path)])
    assert f"--init_from {tmp_path} is not a Stable Diffusion pipeline folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_inpainting_demo_starts_as_its_base_then_trains_on_masks_and_an_lgp_guides_it(tmp_path, capsys):
    base = UNet2DConditionModel.from_pretrained(DEMO_MODEL_DIR, subfolder="unet", torch_dtype=torch.float32)
    inpainting = train_demo_model.inpainting_unet(base)
    assert inpainting.config.in_channels == 9
    latents, extra = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16, 16)
    states, timesteps = torch.randn(2, 16, base.config.cross_attention_dim), torch.tensor([10, 500])
    with torch.no_grad():  # the new channels' weights are zero: whatever they read, it computes what the base does
        torch.testing.assert_close(
            inpainting(torch.cat([latents, extra], 1), timesteps, states).sample,
            base(latents, timesteps, states).sample,
        )

    train_demo_model.main(
        [
            "--output_dir", str(tmp_path), "--init_from", str(DEMO_MODEL_DIR), "--inpainting", "--num_images", "8",
            "--unet_steps", "2", "--unet_batch_size", "4", "--device", "cpu",
        ]
    )  # fmt: skip
    folder = tmp_path / "pipeline"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    trained = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
    assert trained.shape[1] == 9 and trained[:, 4:].abs().max() > 0  # the new channels learned something

    pipe = loading.editing_pipeline(
        loading.load_pipeline(str(folder), str(DEMO_MODEL_DIR / "lgp")), image=True, mask=True
    )
    assert type(pipe).__name__ == "SketchGuidedStableDiffusionInpaintPipeline"
    pipe.set_progress_bar_config(disable=True)
    photo, _, _ = shapes.render_sample(3)
    mask = PIL.Image.new("L", photo.size, 0)
    mask.paste(255, (32, 0, 64, 64))
    sketch = efficacy.held_out_cases(1)[0].sketch

    def inpaint(**guidance):
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a red circle", image=photo, mask_image=mask, num_inference_steps=3, generator=generator,
            output_type="np", **guidance,
        ).images[0]  # fmt: skip

    assert np.abs(inpaint(sketch=sketch, sketch_guidance_scale=4.0) - inpaint()).max() > 1e-3

    with pytest.raises(SystemExit):
        train_demo_model.main(["--output_dir", str(tmp_path / "no-init"), "--inpainting"])
    assert "--inpainting makes an inpainting UNet from a trained one" in capsys.readouterr().err
