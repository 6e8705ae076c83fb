"""The guided-sampling benchmark on the tiny pipeline, and the pipeline's cost options: guiding every k-th step and the
UNet's gradient checkpointing on guided steps."""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import draw_square

from benchmarks import guided_sampling, measuring

PROMPT = "a red star on the grey background"


def generate_latents(pipe, **kwargs) -> torch.Tensor:
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("sketch_guidance_end", 1.0)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images


def guided_timesteps(pipe, **kwargs) -> list[int]:
    """The timesteps at which the pipeline computed a sketch gradient."""
    calls = []
    compute = pipe.noise_and_sketch_gradient

    def recording(latents, t, *args, **kw):
        calls.append(int(t))
        return compute(latents, t, *args, **kw)

    pipe.noise_and_sketch_gradient = recording
    try:
        generate_latents(pipe, sketch=draw_square(), **kwargs)
    finally:
        del pipe.noise_and_sketch_gradient
    return calls


def test_modes_side_by_side_at_several_guided_fractions_in_one_run(tmp_path):
    argv = ["--model", "tiny", "--steps", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    argv += ["--guided_fraction", "0.5", "1.0", "--intervals", "2", "--step_modes", "split", "--phases", "generation"]
    argv += ["--efficacy", "--efficacy_cases", "2", "--efficacy_seeds", "0", "--efficacy_steps", "3"]
    argv += ["--sketch_guidance_scale", "2.5"]
    record = guided_sampling.main(argv)
    assert record["config"]["efficacy_steps"] == 3

    assert record["config"]["guided_fractions"] == [0.5, 1.0]
    for fraction in ("0.5", "1"):
        assert f"generation, guided (end {fraction})" in record["seconds"]
        assert f"generation, guided every 2 steps (end {fraction})" in record["seconds"]
        assert f"generation, guided, batched (end {fraction})" not in record["seconds"]  # --step_modes split only
    rows = {(row["fraction"], row["mode"]): row for row in record["side_by_side"]}
    assert set(rows) == {
        (0.0, "unguided"),
        *((f, m) for f in (0.5, 1.0) for m in ("exact", "every 2, reused", "every 2, nothing between")),
    }
    for (fraction, mode), row in rows.items():
        assert row["cost"] > 0 and 0 <= row["iou"] <= 1, (fraction, mode)
        if mode == "exact":
            assert row["iou_of_exact"] == 1
    # Each row's agreement is its own mode's at the run's scale; the plain interval mode is also measured at k x beta.
    efficacy = record["efficacy"]
    assert (
        rows[(1.0, "every 2, nothing between")]["iou"] == efficacy["every 2, nothing between, scale 2.5 (end 1)"]["iou"]
    )
    assert rows[(0.5, "every 2, reused")]["iou"] == efficacy["every 2, reused between, scale 2.5 (end 0.5)"]["iou"]
    assert "every 2, nothing between, scale 5 (end 1)" in efficacy


def test_efficacy_can_use_the_anywhere_sketches(monkeypatch):
    from benchmarks import efficacy

    assert guided_sampling.parse_args([]).efficacy_placement == "inside"
    for placement in efficacy.PLACEMENTS:  # the option offers every set of held-out sketches
        assert guided_sampling.parse_args(["--efficacy_placement", placement]).efficacy_placement == placement
    placements = []
    held_out_cases = efficacy.held_out_cases

    def recording(*args, placement="inside", **kwargs):
        placements.append(placement)
        return held_out_cases(*args, placement=placement, **kwargs)

    monkeypatch.setattr(efficacy, "held_out_cases", recording)
    argv = ["--model", "tiny", "--steps", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--phases"]
    argv += ["generation", "--step_modes", "split", "--efficacy", "--efficacy_cases", "2", "--efficacy_seeds", "0"]
    record = guided_sampling.main([*argv, "--efficacy_placement", "anywhere"])
    assert placements == ["anywhere"] and record["config"]["efficacy_placement"] == "anywhere"


def test_benchmark_smoke_run_reports_every_figure(tmp_path):
    output = tmp_path / "guided_sampling.json"
    argv = ["--model", "tiny", "--steps", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    argv += ["--guided_fraction", "0.5"]  # one of the 2 steps guided, whatever the pipeline's default
    argv += ["--intervals", "2", "--recurrences", "2", "--recurrence_fraction", "0.5"]
    guided_sampling.main([*argv, "--output", str(output)])
    record = json.loads(output.read_text())

    assert record["config"]["model"] == "tiny"
    assert record["config"]["recurrence_fraction"] == 0.5 and guided_sampling.guidance_module.RECURRENCE_FRACTION == 0.1
    assert record["config"]["guided_steps"] == 1
    for name in (
        "generation, unguided",
        "generation, guided",
        "generation, guided every 2 steps",
        "generation, guided, recurrence 2",
        "step, unguided",
        "step, guided",
        "  backward to the latents (LGP + UNet)",
        "  LGP forward + backward alone",
        "step, guided, gradient checkpointing",
        "step, guided, without the pipeline's savings",
    ):
        timing = record["seconds"][name]
        assert len(timing["runs"]) == 1 and 0 < timing["median"] < 60, name
        assert record["memory_mib"][name]["peak"] > 0, name
    for name, value in record["ratios"].items():
        assert math.isfinite(value) and value > 0, name
    # The exact method's floor is read off the parts: both branches' forwards and the backward, over an unguided step.
    s = {name: value["median"] for name, value in record["seconds"].items()}
    floor = 2 * s["  UNet forward, other branch, no grad"] + s["  backward to the latents (LGP + UNet)"]
    assert record["ratios"]["step floor (2 one-branch forwards + backward) / unguided"] == pytest.approx(
        floor / s["step, unguided"]
    )
    assert "CFG batch of 2 / 2 one-branch forwards" in record["ratios"]
    assert record["ratios"]["generation guided, recurrence 2 / unguided"] == pytest.approx(
        s["generation, guided, recurrence 2"] / s["generation, unguided"]
    )
    saved = record["saved_for_backward_mib"]
    # The pipeline keeps nothing for weight gradients or for the layers after the last block the LGP reads.
    assert saved["guided step"]["after the last block read"] == 0
    assert 0 < saved["guided step"]["total"] < saved["without the pipeline's savings"]["total"]
    assert 0 < saved["gradient checkpointing"]["total"] < saved["guided step"]["total"]


def test_interval_one_is_the_exact_method(pipe):
    exact = generate_latents(pipe, sketch=draw_square())
    assert torch.equal(generate_latents(pipe, sketch=draw_square(), sketch_guidance_interval=1), exact)
    assert not torch.equal(generate_latents(pipe, sketch=draw_square(), sketch_guidance_interval=2), exact)


def test_interval_guides_the_first_step_of_the_range_then_every_kth(pipe):
    every = guided_timesteps(pipe, num_inference_steps=8, sketch_guidance_end=1.0)
    assert len(every) == 8
    assert guided_timesteps(pipe, num_inference_steps=8, sketch_guidance_end=1.0, sketch_guidance_interval=3) == [
        every[0],
        every[3],
        every[6],
    ]
    late = guided_timesteps(
        pipe, num_inference_steps=8, sketch_guidance_start=0.25, sketch_guidance_end=0.5, sketch_guidance_interval=2
    )
    assert late == [every[2]]  # the range is steps 2 and 3 of 8


def test_interval_computes_every_gradient_of_the_first_tenth_of_the_schedule(pipe):
    every = guided_timesteps(pipe, num_inference_steps=20, sketch_guidance_end=0.5)
    assert len(every) == 10
    computed = guided_timesteps(pipe, num_inference_steps=20, sketch_guidance_end=0.5, sketch_guidance_interval=2)
    assert computed == [every[i] for i in (0, 1, 3, 5, 7, 9)]  # steps 0 and 1 (10% of 20), then every 2nd


@pytest.mark.parametrize("interval", [0, -1, 1.5, True, "2"])
def test_bad_interval(pipe, interval):
    with pytest.raises(ValueError, match="sketch_guidance_interval"):
        generate_latents(pipe, sketch=draw_square(), sketch_guidance_interval=interval)


def test_gradient_checkpointing_gives_the_same_latents(pipe):
    exact = generate_latents(pipe, sketch=draw_square())
    pipe.unet.enable_gradient_checkpointing()
    try:
        checkpointed = generate_latents(pipe, sketch=draw_square())
    finally:
        pipe.unet.disable_gradient_checkpointing()
    torch.testing.assert_close(checkpointed, exact, rtol=0, atol=1e-5)


def test_the_pipelines_savings_change_no_result(pipe):
    # Weights frozen and no graph after the last block the LGP reads: the same gradient, so the same latents.
    exact = generate_latents(pipe, sketch=draw_square())
    with measuring.without_savings():
        unsaved = generate_latents(pipe, sketch=draw_square())
    torch.testing.assert_close(exact, unsaved, rtol=0, atol=1e-6)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_parameters_keep_their_requires_grad(pipe, requires_grad):
    pipe.unet.requires_grad_(requires_grad)
    pipe.lgp.requires_grad_(requires_grad)
    generate_latents(pipe, sketch=draw_square(), num_inference_steps=2)
    flags = {p.requires_grad for module in (pipe.unet, pipe.lgp) for p in module.parameters()}
    assert flags == {requires_grad}
    assert torch.is_grad_enabled()


def test_sketch_mask_measure_reads_the_sketched_and_the_second_shape():
    from benchmarks import sketch_mask
    from pipeline_sketch_guided.training.shapes import COLOURS

    case = sketch_mask.make_cases(1)[0]
    image = np.full((64, 64, 3), 245, dtype=np.uint8)  # white paper
    image[case["filled"]] = COLOURS[case["colour"]]
    outside = np.asarray(case["mask"]) == 0
    rows, cols = np.nonzero(outside)
    top, left = rows.min() + 20, cols.min() + 8
    image[top : top + 12, left : left + 12] = COLOURS[case["other_colour"]]  # the second shape, outside the mask
    measured = sketch_mask.measure(PIL.Image.fromarray(image), case)
    assert measured["iou"] > 0.9 and measured["second_present"]
    image[top : top + 12, left : left + 12] = 245
    assert not sketch_mask.measure(PIL.Image.fromarray(image), case)["second_present"]


def test_transformer_cost_reports_each_family_and_mode(tmp_path, monkeypatch):
    """The transformer cost benchmark at toy sizes (narrow models: the real widths take a minute to build): SD3 split
    and batched, FLUX, each with a ratio to unguided, and the LGP reading every block of these two-block models."""
    from benchmarks import transformer_cost

    narrow = {"attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 4096}
    sd3 = {**transformer_cost.SD3_MEDIUM, **narrow, "caption_projection_dim": 16}
    monkeypatch.setitem(transformer_cost.__dict__, "SD3_MEDIUM", sd3)
    monkeypatch.setitem(
        transformer_cost.__dict__, "FLUX_DEV", {**transformer_cost.FLUX_DEV, **narrow, "axes_dims_rope": [2, 2, 4]}
    )

    report = transformer_cost.main(
        ["--resolution", "32", "--steps", "2", "--sd3_layers", "1", "--flux_layers", "1", "1", "--runs", "1"]
        + ["--output", str(tmp_path / "cost.json")]
    )
    sd3, flux = report["families"]["sd3"], report["families"]["flux"]
    assert set(sd3) >= {"unguided", "guided_split", "guided_batched"} and "guided" in flux
    assert sd3["lgp_blocks"] == ["transformer_blocks.0"]  # its one block
    assert flux["lgp_blocks"] == ["transformer_blocks.0", "single_transformer_blocks.0"]
    assert all(record[name]["ratio"] > 0 for record in (sd3, flux) for name in record if name.startswith("guided"))
    assert "| flux | 1+1 |" in report["table"] and (tmp_path / "cost.json").is_file()


def test_inpainting_benchmark_measures_both_and_the_vae_floor(tmp_path):
    """The inpainting proof at toy size: the same seeds with and without the sketch, the known half measured against
    the photo, the sheet written; the cases are the same for the same count."""
    from benchmarks import inpainting

    record = inpainting.main(["--num_cases", "1", "--seeds", "0", "--steps", "2", "--output_dir", str(tmp_path)])
    summary = record["summary"]
    assert set(summary) == {"unguided", "guided", "VAE round trip", "ratio"}
    assert 0 <= summary["guided"]["iou"] <= 1 and summary["VAE round trip"]["kept_max"] >= 0
    assert (tmp_path / "inpainting_sheet.png").is_file() and (tmp_path / "inpainting.md").is_file()
    first, again = inpainting.inpainting_cases(2), inpainting.inpainting_cases(2)
    assert first[1]["prompt"] == again[1]["prompt"] and (first[1]["region"] == again[1]["region"]).all()
    assert first[0]["region"].sum() == first[0]["region"].size // 2  # one half repainted
    # --model and --lgp name what to measure: the demo's own folders measure as the default does.
    from pipeline_sketch_guided.demo import DEMO_MODEL_DIR

    named = ["--model", str(DEMO_MODEL_DIR), "--lgp", str(DEMO_MODEL_DIR / "lgp")]
    again = inpainting.main([*named, "--num_cases", "1", "--seeds", "0", "--steps", "2", "--output_dir", str(tmp_path)])
    assert again["summary"] == summary
    with pytest.raises(SystemExit):
        inpainting.parse_args(["--lgp", str(DEMO_MODEL_DIR / "lgp")])
    with pytest.raises(SystemExit):
        inpainting.parse_args(["--fill_lgp", str(DEMO_MODEL_DIR / "fill_lgp")])
    # The demo guides with the sketch's fill by default; --sketch_fill_scale 0 is the sketch alone, and says so.
    assert "fill guidance: the model's fill LGP, scale 0.125" in (tmp_path / "inpainting.md").read_text()
    small = ["--num_cases", "1", "--seeds", "0", "--steps", "2"]
    off = inpainting.main([*small, "--sketch_fill_scale", "0", "--output_dir", str(tmp_path / "off")])
    assert "fill guidance: none" in (tmp_path / "off" / "inpainting.md").read_text()
    assert off["per_image"]["unguided"] == record["per_image"]["unguided"]
    assert off["per_image"]["guided"] != record["per_image"]["guided"]


def test_guided_sampling_refuses_a_recurrence_below_two(capsys):
    with pytest.raises(SystemExit):
        guided_sampling.parse_args(["--recurrences", "1"])
    assert "--recurrences must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        guided_sampling.parse_args(["--recurrences", "2", "--recurrence_fraction", "1.5"])
    assert "--recurrence_fraction: must be a fraction of the schedule in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        guided_sampling.parse_args(["--guided_fraction", "0.3", "0"])
    assert "--guided_fractions: must be a fraction of the schedule in (0, 1], got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec",
    [
        "gradient_blur:1",
        "error_blur:1",
        "detach:down_blocks.0",
        "schedule:linear",
        "schedule:front3",
        "relu_temperature:1",
    ],
)
def test_guidance_variants_change_the_guided_latents_and_are_undone_on_exit(pipe, spec):
    from benchmarks.guidance_variants import guidance_variant

    plain = generate_latents(pipe, sketch=draw_square())
    with guidance_variant(spec):
        varied = generate_latents(pipe, sketch=draw_square())
        unguided = generate_latents(pipe)
    assert not torch.allclose(varied, plain, atol=1e-4)
    # Only guidance changes: without a sketch the variant changes nothing, and on leaving everything is as before.
    assert torch.equal(unguided, generate_latents(pipe))
    assert torch.equal(generate_latents(pipe, sketch=draw_square()), plain)


def test_the_relu_width_variant_at_the_pipelines_width_changes_nothing(pipe):
    from benchmarks.guidance_variants import guidance_variant
    from pipeline_sketch_guided.lgp import RELU_GRADIENT_TEMPERATURE

    plain = generate_latents(pipe, sketch=draw_square())
    with guidance_variant(f"relu_temperature:{RELU_GRADIENT_TEMPERATURE}"):
        same = generate_latents(pipe, sketch=draw_square())
    assert torch.equal(same, plain)


def test_detaching_a_block_the_lgp_does_not_read_is_refused(pipe):
    from benchmarks.guidance_variants import guidance_variant

    with guidance_variant("detach:down_blocks.7"), pytest.raises(ValueError, match="reads no block"):
        generate_latents(pipe, sketch=draw_square())


def test_gradient_blur_spreads_a_point_gradient_over_its_neighbours():
    from benchmarks.guidance_variants import guidance_variant
    from pipeline_sketch_guided import guidance as guidance_module

    latents, next_latents = torch.zeros(1, 4, 9, 9), torch.ones(1, 4, 9, 9)
    point = torch.zeros(1, 4, 9, 9)
    point[..., 4, 4] = 1.0
    sharp = guidance_module.sketch_guidance_step(latents, next_latents, point, 1.0)
    with guidance_variant("gradient_blur:1"):
        broad = guidance_module.sketch_guidance_step(latents, next_latents, point, 1.0)
    moved_sharp, moved_broad = (next_latents - sharp)[0, 0], (next_latents - broad)[0, 0]
    assert (moved_sharp > 0).sum() == 1 and (moved_broad > 1e-3).sum() >= 9
    # The step's size is the rule's whatever the gradient's shape.
    assert torch.allclose(moved_sharp.norm(), moved_broad.norm(), rtol=1e-5)


def test_guidance_schedules_keep_the_mean_scale_or_say_they_add():
    from benchmarks.guidance_variants import schedule_weight

    def mean(name):
        return sum(schedule_weight(name, i, 9) for i in range(9)) / 9

    assert mean("linear") == pytest.approx(1.0) and mean("front3") == pytest.approx(1.0)
    assert mean("front3_plus") == pytest.approx(4 / 3)
    assert [schedule_weight("linear", i, 9) for i in range(9)] == sorted(
        (schedule_weight("linear", i, 9) for i in range(9)), reverse=True
    )


@pytest.mark.parametrize(
    "spec", ["blur:1", "gradient_blur:0", "gradient_blur:x", "error_blur", "schedule:cubic", "relu_temperature:-1"]
)
def test_guidance_variants_refuse_what_they_do_not_know(spec):
    from benchmarks.guidance_variants import main

    with pytest.raises(ValueError, match="got"):
        main(["--variant", spec, "--", "--model", "tiny"])


def test_fill_guidance_is_timed_as_its_own_generation(monkeypatch):
    """With --fill, one generation guides with a fill LGP and the sketch's fill; every other guided one without."""
    from pipeline_sketch_guided.guidance import SketchGuidanceMixin

    fills = []
    sketch_loss = SketchGuidanceMixin.sketch_loss

    def recording(self, *args, **kwargs):
        fills.append(kwargs.get("fill") is not None)
        return sketch_loss(self, *args, **kwargs)

    monkeypatch.setattr(SketchGuidanceMixin, "sketch_loss", recording)
    argv = ["--model", "tiny", "--steps", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--fill"]
    record = guided_sampling.main([*argv, "--step_modes", "split", "--phases", "generation"])
    assert "generation, guided, fill" in record["seconds"]
    assert record["ratios"]["generation guided, fill / unguided"] > 0
    # The plain guided generation guides without the fill, the fill generation with it.
    assert True in fills and False in fills
