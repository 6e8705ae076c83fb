"""`sketch-guided batch`: a manifest of rows, resumable, each image its own row's, bad rows reported, many processes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from pipeline_sketch_guided import cli, loading
from pipeline_sketch_guided.batch import ManifestError, read_manifest
from pipeline_sketch_guided.demo import demo_sketches

STEPS = "4"


@pytest.fixture
def manifest(tmp_path):
    """Five rows: three guided (two sharing settings), one unguided, one whose sketch is missing."""
    (tmp_path / "sketches").mkdir()
    for index, (_, sketch) in enumerate(demo_sketches()[:2]):
        sketch.save(tmp_path / "sketches" / f"{index}.png")
    rows = [
        {"prompt": "a red star on a white background", "sketch": "sketches/0.png", "seed": 3},
        {"prompt": "a blue circle on a grey background", "sketch": "sketches/1.png", "seed": 4},
        {"prompt": "a red star on a white background", "sketch": "sketches/0.png", "seed": 5, "output": "star.png"},
        {"prompt": "a green square on a beige background", "seed": 6, "sketch_guidance_scale": 1.6},
        {"prompt": "a red star on a white background", "sketch": "sketches/missing.png", "seed": 7},
    ]
    rows[2]["sketch_guidance_end"] = 0.5
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(manifest, out, *extra) -> int:
    try:
        return cli.main(["batch", str(manifest), "--out", str(out), "--steps", STEPS, "--threads", "1", *extra])
    except SystemExit as exit:  # the command's non-zero exit when a row failed
        return exit.code


def results(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_rows_are_generated_and_a_bad_row_is_reported_without_stopping_the_run(manifest, tmp_path):
    out = tmp_path / "out"
    assert run(manifest, out, "--batch-size", "2", "--contact-sheet", str(tmp_path / "sheet.png")) == 1
    rows = results(out)
    assert [r["status"] for r in rows] == ["done", "done", "done", "done", "failed"]
    assert "does not exist" in rows[4]["error"]
    assert (out / "000000-seed3.png").is_file() and (out / "star.png").is_file()
    recorded = json.loads(PIL.Image.open(out / "star.png").text["sketch_guided_row"])
    assert recorded["seed"] == 5 and recorded["sketch_guidance_end"] == 0.5 and recorded["num_inference_steps"] == 4
    assert PIL.Image.open(tmp_path / "sheet.png").size == (2 * 128, 2 * 128)


def test_a_second_run_skips_finished_rows_and_redoes_changed_ones(manifest, tmp_path):
    out = tmp_path / "out"
    run(manifest, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[1]["seed"] = 40  # the second row changes; its output name follows the seed, so it is a new image
    rows[3]["sketch_guidance_scale"] = 2.0  # the fourth keeps its name but not its settings
    rows.pop()  # and the bad row is gone
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert run(manifest, out) == 0
    statuses = [r["status"] for r in results(out)]
    assert statuses == ["skipped", "done", "skipped", "done"]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert after["000000-seed3.png"] == before["000000-seed3.png"] and after["star.png"] == before["star.png"]
    assert after["000003-seed6.png"] != before["000003-seed6.png"]
    assert not list(out.glob("*.tmp*"))


def test_an_image_depends_on_its_row_not_on_its_batch(manifest, tmp_path):
    run(manifest, tmp_path / "batched", "--batch-size", "4")
    run(manifest, tmp_path / "alone", "--batch-size", "1")
    for name in ("000000-seed3.png", "000001-seed4.png", "star.png", "000003-seed6.png"):
        batched = np.asarray(PIL.Image.open(tmp_path / "batched" / name), dtype=int)
        alone = np.asarray(PIL.Image.open(tmp_path / "alone" / name), dtype=int)
        assert np.abs(batched - alone).max() <= 1, name  # at most a rounding tie in 8 bits


def test_a_manifest_that_cannot_be_read_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded a model"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red star", "sketh": "typo.png"}\n')
    with pytest.raises(SystemExit, match="fields sketh that are no pipeline argument"):
        cli.main(["batch", str(bad), "--out", str(tmp_path / "out")])
    (tmp_path / "manifest.txt").write_text("x")
    with pytest.raises(ManifestError, match="JSON lines .* or CSV"):
        read_manifest(tmp_path / "manifest.txt")
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,seed\na red star,3\n")
    assert read_manifest(csv) == [{"prompt": "a red star", "seed": "3"}]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not installed")
def test_two_processes_with_accelerate_give_the_single_process_images(manifest, tmp_path):
    single = tmp_path / "single"
    batch = ["-m", "pipeline_sketch_guided", "batch", str(manifest), "--steps", STEPS, "--batch-size", "1"]
    batch += ["--threads", "1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    # The single process runs in a fresh process too, as the two do: not in this test process, whose torch state
    # earlier tests may have changed (a pixel's rounding then differs).
    completed = subprocess.run(
        [sys.executable, *batch, "--out", str(single)], capture_output=True, text=True, timeout=600, env=env
    )
    assert completed.returncode == 1, completed.stderr[-3000:]  # the bad row
    # As in test_training: accelerate's torchrun launcher with ACCELERATE_USE_CPU starts two CPU processes (gloo).
    command = [shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29600 + os.getpid() % 1000),
    ]
    command += [*batch, "--out", str(tmp_path / "multi")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 1, completed.stderr[-3000:]  # the bad row, reported by the main process
    assert "4 done, 0 skipped, 1 failed" in completed.stdout
    multi = tmp_path / "multi"
    names = sorted(p.name for p in single.glob("*.png"))
    assert names == sorted(p.name for p in multi.glob("*.png")) and len(names) == 4
    for name in names:
        assert (single / name).read_bytes() == (multi / name).read_bytes(), name
    assert [r["status"] for r in results(multi)] == [r["status"] for r in results(single)]
    assert not list(multi.glob("results.*.jsonl"))


def test_rows_can_set_the_fill_and_its_weight(tmp_path):
    """On the demo (which has a fill LGP) a row's `sketch_fill_scale` 0 is the sketch alone, its own fill image as
    `sketch_fill` is the same as "auto" (the default), and a fill without a sketch fails its row."""
    from pipeline_sketch_guided.fill import fill_sketch

    (tmp_path / "sketches").mkdir()
    star = demo_sketches()[0][1]
    star.save(tmp_path / "sketches" / "star.png")
    fill_sketch(star, 64, 64).save(tmp_path / "sketches" / "star-fill.png")
    row = {"prompt": "a red star on a white background", "sketch": "sketches/star.png", "seed": 3}
    rows = [
        {**row, "output": "default.png"},
        {**row, "output": "off.png", "sketch_fill_scale": 0},
        {**row, "output": "own.png", "sketch_fill": "sketches/star-fill.png"},
        {**row, "output": "auto.png", "sketch_fill": "auto"},
        {"prompt": "a red star on a white background", "sketch_fill": "auto", "output": "bad.png"},
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert run(path, out) == 1
    statuses = {r["output"].rsplit("/", 1)[-1]: r for r in results(out)}
    assert statuses["bad.png"]["status"] == "failed" and "give the `sketch`" in statuses["bad.png"]["error"]
    names = ("default.png", "off.png", "own.png", "auto.png")
    pixels = {name: np.asarray(PIL.Image.open(out / name)) for name in names}
    assert np.array_equal(pixels["default.png"], pixels["auto.png"])
    assert np.array_equal(pixels["own.png"], pixels["auto.png"])
    assert not np.array_equal(pixels["off.png"], pixels["default.png"])
    recorded = json.loads(PIL.Image.open(out / "own.png").text["sketch_guided_row"])
    assert recorded["sketch_fill"].endswith("star-fill.png")


def test_a_fill_lgp_given_to_the_batch_is_recorded_and_a_change_of_it_redoes_the_rows(tmp_path):
    """`--fill-lgp` is part of what each image records, so a run with another fill LGP does not keep images made
    with the model's own."""
    from pipeline_sketch_guided.demo import DEMO_LGP_FOLDERS, DEMO_MODEL_DIR

    (tmp_path / "sketches").mkdir()
    demo_sketches()[0][1].save(tmp_path / "sketches" / "star.png")
    row = {"prompt": "a red star on a white background", "sketch": "sketches/star.png", "seed": 3, "output": "a.png"}
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps(row) + "\n")
    out = tmp_path / "out"
    assert run(path, out) == 0
    silhouette_lgp = str(DEMO_MODEL_DIR / DEMO_LGP_FOLDERS["silhouette"])
    assert run(path, out, "--fill-lgp", silhouette_lgp) == 0
    assert [r["status"] for r in results(out)] == ["done"]
    recorded = json.loads(PIL.Image.open(out / "a.png").text["sketch_guided_row"])
    assert recorded["fill_lgp"] == silhouette_lgp
