"""Edge-agreement metrics and the evaluation script's output, on synthetic edge maps and the tiny pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
from conftest import draw_square

from pipeline_sketch_guided.training.evaluate import (
    SketchPrompt,
    chamfer_distance,
    edge_f_score,
    evaluate_pairs,
    map_edges,
    read_pairs,
    sketch_strokes,
)


def square_outline(size: int = 32, offset: int = 0) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    lo, hi = 8 + offset, 24 + offset
    mask[lo, lo:hi] = mask[hi - 1, lo:hi] = mask[lo:hi, lo] = mask[lo:hi, hi - 1] = True
    return mask


def test_identical_edges_agree_perfectly():
    square = square_outline()
    assert chamfer_distance(square, square) == 0.0
    assert edge_f_score(square, square) == {"precision": 1.0, "recall": 1.0, "f_score": 1.0}


def test_a_one_pixel_shift_is_within_tolerance_but_not_far_off():
    square, shifted = square_outline(), square_outline(offset=1)
    assert 0 < chamfer_distance(square, shifted) <= math.sqrt(2)
    assert edge_f_score(shifted, square, tolerance=2)["f_score"] == 1.0
    assert edge_f_score(shifted, square, tolerance=0)["f_score"] < 0.5

    far = np.zeros_like(square)
    far[0, :4] = True  # a stroke in the corner, far from the square
    assert chamfer_distance(far, square) > 5
    scores = edge_f_score(far, square)
    assert scores["precision"] == 0.0 and scores["f_score"] == 0.0


def test_metrics_on_empty_maps():
    empty, square = np.zeros((32, 32), dtype=bool), square_outline()
    assert chamfer_distance(empty, empty) == 0.0
    assert chamfer_distance(empty, square) == math.inf
    assert edge_f_score(empty, square)["f_score"] == 0.0
    with pytest.raises(ValueError, match="same size"):
        chamfer_distance(square, square[:16])


def test_sketch_strokes_accept_either_polarity():
    dark = sketch_strokes(draw_square(32, dark_on_light=True), 32, 32)
    light = sketch_strokes(draw_square(32, dark_on_light=False), 32, 32)
    np.testing.assert_array_equal(dark, light)
    assert 0 < dark.mean() < 0.5  # the strokes, not the paper


def test_an_lgp_of_another_map_is_scored_against_the_edges_of_its_map():
    from types import SimpleNamespace

    from pipeline_sketch_guided.demo import freehand_blob

    blob, _ = freehand_blob("circle", (32, 32), 18, seed=1, size=64)  # white blob on black
    filled = np.asarray(blob) > 127
    config = SimpleNamespace(map_kind="silhouette", sketch_polarity="light_on_dark", map_normalization="none")
    outline = map_edges(blob, 64, 64, config)
    assert 0 < outline.sum() < 0.5 * filled.sum()  # the blob's outline, not its fill
    inside, around = (
        np.asarray(blob.filter(f(5))) > 127 for f in (PIL.ImageFilter.MinFilter, PIL.ImageFilter.MaxFilter)
    )
    boundary = around & ~inside  # two pixels either side of the blob's edge
    assert (outline & ~boundary).sum() <= 0.1 * outline.sum()
    # An edge LGP (or none) reads the same picture as a sketch: its light fill is the stroke.
    assert map_edges(blob, 64, 64).sum() > filled.sum() * 0.9


def test_evaluate_pairs_writes_guided_and_unguided_images_with_metrics(pipe, tmp_path):
    draw_square(32).save(tmp_path / "square.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"sketch": "square.png", "prompt": "a red square"}) + "\n")
    pairs = read_pairs(str(tmp_path / "pairs.jsonl"))
    assert pairs == [SketchPrompt(str(tmp_path / "square.png"), "a red square")]

    output = tmp_path / "eval"
    summary = evaluate_pairs(
        pipe, pairs * 2, str(output), seed=3, num_inference_steps=2, sketch_guidance_scale=4.0, sketch_guidance_end=1.0
    )
    for kind in ("guided", "unguided", "sketches"):
        assert sorted(p.name for p in (output / kind).iterdir()) == ["0000.png", "0001.png"]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row["seed"] for row in rows] == [3, 4]
    assert set(rows[0]["guided"]) == {"chamfer", "precision", "recall", "f_score"}
    assert summary["num_pairs"] == 2 and set(summary) >= {"guided", "unguided", "tolerance"}
    assert json.loads((output / "summary.json").read_text()) == summary
    # Same seed, with and without the sketch: the guidance, and only it, makes the difference.
    guided, unguided = (np.asarray(PIL.Image.open(output / kind / "0000.png")) for kind in ("guided", "unguided"))
    assert not np.array_equal(guided, unguided)


def test_evaluation_goes_through_the_batch_runner_and_resumes(pipe, tmp_path):
    draw_square(32).save(tmp_path / "square.png")
    pairs = [SketchPrompt(str(tmp_path / "square.png"), "a red square")] * 3
    output = tmp_path / "eval"
    kwargs = {"seed": 3, "num_inference_steps": 2, "sketch_guidance_end": 1.0}
    first = evaluate_pairs(pipe, pairs, str(output), batch_size=2, **kwargs)
    made = {p: p.stat().st_mtime_ns for p in output.glob("*guided/*.png")}
    assert len(made) == 6 and (output / "results.jsonl").is_file()
    again = evaluate_pairs(pipe, pairs, str(output), batch_size=2, **kwargs)  # nothing left to generate
    assert {p: p.stat().st_mtime_ns for p in output.glob("*guided/*.png")} == made
    assert again == first
