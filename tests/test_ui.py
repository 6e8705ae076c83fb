"""`sketch-guided ui`: the page's pieces in process, its API through gradio_client against a real server on the demo
model, and the whole path in a real browser (headless Chromium from the system: `apt-get install chromium`)."""

import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

pytest.importorskip("gradio", reason="the ui extra (pip install -e '.[ui]') is not installed")  # CI installs it

from benchmarks.efficacy import foreground_colour, iou, named_colour, segment_foreground  # noqa: E402
from pipeline_sketch_guided.demo import filled_mask, freehand_sketch, load_demo_pipeline  # noqa: E402
from pipeline_sketch_guided.guidance import DEFAULT_SKETCH_FILL_SCALE  # noqa: E402
from pipeline_sketch_guided.sketch import prepare_map  # noqa: E402
from pipeline_sketch_guided.ui import Settings, SketchGuidedApp, Stopped, sketch_from_canvas  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
STAR_PROMPT = "a red star on a white background"
# The upload limit of the test server: a small sketch passes, a big noisy PNG does not.
MAX_UPLOAD_MB = 0.2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def star_points(center: tuple[float, float], outer: float, inner: float) -> list[tuple[float, float]]:
    """A five-pointed star's outline, point up, closed (the last point is the first)."""
    points = []
    for k in range(11):
        angle = -math.pi / 2 + k * math.pi / 5
        radius = outer if k % 2 == 0 else inner
        points.append((center[0] + radius * math.cos(angle), center[1] + radius * math.sin(angle)))
    return points


def filled(points: list[tuple[float, float]], size: int = 64) -> np.ndarray:
    """The polygon (in fractions of the frame) filled, as a boolean `size` x `size` mask."""
    return filled_mask([(x * size, y * size) for x, y in points], size)


def enclosed_region(sketch: PIL.Image.Image, size: int = 64) -> np.ndarray:
    """What a sketch's dark strokes enclose, strokes included, at `size` x `size`: the outer contours, filled."""
    import cv2

    strokes = (np.asarray(sketch.convert("L").resize((size, size), PIL.Image.Resampling.BOX)) < 192).astype(np.uint8)
    contours, _ = cv2.findContours(strokes, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    region = np.zeros_like(strokes)
    cv2.drawContours(region, contours, -1, 1, thickness=cv2.FILLED)
    return region.astype(bool)


# ---------------------------------------------------------------------------------------------------------------------
# In process


def test_a_canvas_is_composited_onto_white_whatever_lies_under_its_transparent_pixels():
    layer = np.zeros((32, 32, 4), dtype=np.uint8)
    layer[..., :3] = (0, 255, 0)  # green under fully transparent pixels, as editors leave it
    layer[8:24, 15:17] = (0, 0, 0, 255)  # one black stroke
    value = {"background": None, "layers": [PIL.Image.fromarray(layer)], "composite": PIL.Image.fromarray(layer)}
    sketch = np.asarray(sketch_from_canvas(value))
    assert sketch.shape == (32, 32, 3)
    assert (sketch[8:24, 15:17] == 0).all()
    stroke = np.zeros((32, 32), dtype=bool)
    stroke[8:24, 15:17] = True
    assert (sketch[~stroke] == 255).all()  # paper, not green
    # An empty editor is a white page, which the pipeline then calls blank.
    assert (np.asarray(sketch_from_canvas(None)) == 255).all()
    assert (np.asarray(sketch_from_canvas({"background": None, "layers": [], "composite": None})) == 255).all()


def test_a_sketch_too_large_is_refused_before_it_is_used():
    with pytest.raises(ValueError, match="megapixels"):
        sketch_from_canvas(PIL.Image.new("L", (5000, 4000), 255))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "  "}, "Type a prompt"),
        ({"steps": 0}, "steps must be a whole number from 1"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"seed": -1}, "seed must be a whole number from 0"),
        ({"sketch_guidance_interval": 0}, "sketch_guidance_interval"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be from 0 to 50"),
        ({"sketch_fill_scale": -0.5}, "sketch_fill_scale must be from 0 \\(no fill guidance\\)"),
        ({"sketch_fill_scale": None}, "sketch_fill_scale must be from 0"),
    ],
)
def test_settings_out_of_range_say_which_and_the_range(change, message):
    settings = Settings(**{"prompt": STAR_PROMPT, **change})
    with pytest.raises(ValueError, match=message):
        settings.checked()
    # Whole numbers that arrive as floats (the API's JSON) are fine.
    assert Settings(STAR_PROMPT, seed=3.0, steps=4.0).checked().steps == 4


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--port", "70000"], "--port 70000: must be from 1 to 65535"),
        (["--max-upload-mb", "0"], "--max-upload-mb 0.0: must be more than 0"),
        (["--output-dir", "{file}"], "a file, not a folder"),
        (["--output-dir", "{missing}/out"], "does not exist"),
        (["--model", "./no/such/model"], "no such folder"),
        (["--demo-map", "silhouette", "--lgp", "some/lgp"], "--demo-map picks one of the demo model's LGPs"),
    ],
)
def test_ui_arguments_that_cannot_work_are_one_line_before_loading(arguments, message, tmp_path, monkeypatch):
    from pipeline_sketch_guided import cli, loading

    (tmp_path / "a_file").write_text("")
    arguments = [a.format(file=tmp_path / "a_file", missing=tmp_path / "missing") for a in arguments]
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model before checking"))
    with pytest.raises(SystemExit, match=message) as error:
        cli.main(["ui", "--output-dir", str(tmp_path / "out"), *arguments])
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = load_demo_pipeline()
    return SketchGuidedApp(pipe, tmp_path_factory.mktemp("ui-out"), model_name="demo")


def test_the_unguided_image_is_reused_for_a_new_sketch_and_matches_the_pipeline(demo_app):
    star = freehand_sketch("star", (24, 30), 16, seed=1, size=256)
    circle = freehand_sketch("circle", (40, 34), 14, seed=2, size=256)
    settings = Settings("a blue circle on a grey background", seed=5, steps=6)
    first = demo_app.generate(star, settings)
    second = demo_app.generate(circle, settings)
    assert second.unguided == first.unguided  # same prompt, seed and steps: the unguided image is not redrawn
    assert second.image != first.image and os.path.isfile(second.image)
    direct = demo_app.pipe(
        settings.prompt, num_inference_steps=6, generator=torch.Generator("cpu").manual_seed(5), output_type="np"
    ).images[0]
    unguided = np.asarray(PIL.Image.open(first.unguided), dtype=np.float32) / 255
    assert np.abs(unguided - direct).max() < 2 / 255
    # Every file is in the output folder, and the PNG says how it was made.
    for path in (first.image, first.unguided, first.edge_map, first.sketch):
        assert Path(path).parent == demo_app.output_dir
    text = PIL.Image.open(first.image).text
    assert '"seed": 5' in text["sketch_guided"] and settings.prompt in text["parameters"]
    # Another seed draws another unguided image.
    third = demo_app.generate(circle, Settings(settings.prompt, seed=6, steps=6))
    assert third.unguided != first.unguided


def test_the_canvas_guides_the_sketchs_fill_at_the_chosen_scale_and_records_it(demo_app):
    """The demo has a fill LGP: the app's images are the pipeline's own at the fill scale asked for (0 turns the fill
    off, not back to the pipeline's default), and each PNG records whether the fill guided it and how strongly."""
    assert demo_app.fills
    ring = freehand_sketch("circle", (32, 32), 29, seed=4, size=256)  # a frame-filling ring: the fill matters
    settings = Settings("a green circle on a white background", seed=3, steps=8)

    def pipeline_image(**fill):
        return demo_app.pipe(
            settings.prompt,
            sketch=ring,
            num_inference_steps=8,
            generator=torch.Generator("cpu").manual_seed(3),
            output_type="np",
            **fill,
        ).images[0]

    def app_image(result):
        return np.asarray(PIL.Image.open(result.image), dtype=np.float32) / 255

    default = demo_app.generate(ring, settings, compare=False)
    off = demo_app.generate(ring, replace(settings, sketch_fill_scale=0), compare=False)
    strong = demo_app.generate(ring, replace(settings, sketch_fill_scale=0.5), compare=False)
    assert np.abs(app_image(default) - pipeline_image()).max() < 2 / 255  # the pipeline's default: with the fill
    assert np.abs(app_image(off) - pipeline_image(sketch_fill_scale=0)).max() < 2 / 255
    assert np.abs(app_image(strong) - pipeline_image(sketch_fill_scale=0.5)).max() < 2 / 255
    assert np.abs(app_image(default) - app_image(off)).mean() > 1 / 255  # the fill changed the image
    recorded = [json.loads(PIL.Image.open(r.image).text["sketch_guided"]) for r in (default, off, strong)]
    assert (recorded[0]["sketch_fill"], recorded[0]["sketch_fill_scale"]) == ("auto", DEFAULT_SKETCH_FILL_SCALE)
    assert recorded[1]["sketch_fill"] is None and recorded[1]["sketch_fill_scale"] is None
    assert recorded[2]["sketch_fill_scale"] == 0.5


def test_a_silhouette_lgp_reads_shapes_painted_on_the_page_or_uploaded_white_on_black(tmp_path):
    from pipeline_sketch_guided.demo import freehand_blob

    app = SketchGuidedApp(load_demo_pipeline(map="silhouette"), tmp_path, model_name="demo")
    assert app.map_kind == "silhouette" and not app.fills  # a silhouette has no outline to fill
    blob, _ = freehand_blob("circle", (24, 36), 15, seed=4, size=256)  # white on black, as the LGP reads it
    painted = PIL.ImageOps.invert(blob.convert("RGB"))  # dark paint on the white page, as drawn on the canvas
    # The page hands the drawing over as drawn; the pipeline reads either way round, as it does for every way in.
    assert np.array_equal(np.asarray(app.guidance_map(painted)), np.asarray(painted))
    assert torch.equal(prepare_map(painted, 64, 64, "silhouette"), prepare_map(blob, 64, 64, "silhouette"))
    with pytest.raises(ValueError, match="The canvas is empty"):
        app.guidance_map(sketch_from_canvas(None))

    result = app.generate(painted, Settings("a blue circle on a white background", seed=2))
    truth = np.asarray(blob.convert("L").resize((64, 64), PIL.Image.Resampling.BOX)) > 127
    guided_iou = iou(segment_foreground(PIL.Image.open(result.image)), truth)
    unguided_iou = iou(segment_foreground(PIL.Image.open(result.unguided)), truth)
    assert guided_iou > max(0.5, 2 * unguided_iou), (guided_iou, unguided_iou)
    # The examples are blobs painted on the page, the way the canvas gives them.
    example = PIL.Image.open(app.write_examples()[0][0]).convert("L")
    assert np.median(np.asarray(example)) == 255 and np.asarray(example).min() == 0


def test_a_model_without_an_lgp_is_refused_with_what_to_pass(tmp_path):
    from pipeline_sketch_guided.testing import tiny_random_pipeline

    pipe = tiny_random_pipeline()
    pipe.lgp = None
    with pytest.raises(ValueError, match="has no LGP to guide with: pass one"):
        SketchGuidedApp(pipe, tmp_path, model_name="some/model")


@pytest.mark.parametrize("kind, cfg", [("sd", 7.5), ("sdxl", 5.0), ("sd3", 7.0), ("flux", 3.5)])
def test_the_app_serves_any_sketch_guided_pipeline(kind, cfg, tmp_path):
    """Each family's pipeline, at its own default classifier-free (FLUX: distilled) guidance scale."""
    from pipeline_sketch_guided import testing

    pipe = {
        "sd": testing.tiny_random_pipeline,
        "sdxl": testing.tiny_random_sdxl_pipeline,
        "sd3": testing.tiny_random_sd3_pipeline,
        "flux": testing.tiny_random_flux_pipeline,
    }[kind]()
    app = SketchGuidedApp(pipe, tmp_path, model_name=f"tiny-{kind}")
    sketch = freehand_sketch("circle", (32, 32), 20, size=128)
    result = app.generate(sketch, Settings("a red circle", steps=2, sketch_guidance_end=1.0))
    size = app.default_size
    for path in (result.image, result.unguided, result.edge_map):
        assert PIL.Image.open(path).size == (size, size)
    recorded = PIL.Image.open(result.image).text["sketch_guided"]
    assert f"tiny-{kind}" in recorded and result.settings["cfg_scale"] == cfg


def test_stop_interrupts_only_the_session_that_runs(demo_app):
    star = freehand_sketch("star", (24, 30), 16, seed=1, size=256)
    seen = []

    def progress(done, total, what):
        seen.append(done)
        if done == 2:
            assert not demo_app.stop("another-session")  # someone else's stop does nothing
            assert demo_app.stop("mine")

    files = set(demo_app.output_dir.iterdir())
    with pytest.raises(Stopped, match="Stopped at step 2 of 20"):
        demo_app.generate(star, Settings(STAR_PROMPT, steps=20), session="mine", progress=progress)
    assert set(demo_app.output_dir.iterdir()) == files  # a stopped generation leaves no file
    assert seen == [1, 2]  # diffusers' loop skipped the remaining steps ...
    assert not demo_app.stop("mine")  # ... and nothing runs after it
    # The next generation is not stopped by the old request.
    result = demo_app.generate(star, Settings(STAR_PROMPT, steps=3), compare=False, session="mine")
    assert result.unguided is None and os.path.isfile(result.image)


# ---------------------------------------------------------------------------------------------------------------------
# A real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`sketch-guided ui` on the demo model on a free port, in a folder of its own with its own temporary folder."""
    root = tmp_path_factory.mktemp("ui-server")
    (root / "tmp").mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("GRADIO_TEMP_DIR", None)
    command = [sys.executable, "-m", "pipeline_sketch_guided", "ui", "--port", str(port), "--output-dir", "out"]
    command += ["--threads", "2", "--max-upload-mb", str(MAX_UPLOAD_MB)]
    log = open(root / "server.log", "w")
    process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the ui server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
    yield url, root
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


@pytest.fixture(scope="module")
def star_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sketches") / "star.png"
    freehand_sketch("star", (30, 32), 20, seed=3, wobble=0.05, size=256).save(path)
    return path


def test_api_generates_from_a_sketch_file_with_the_unguided_image_beside_it(client, server, star_file):
    from gradio_client import handle_file

    image, unguided, edge_map, settings = client.predict(
        handle_file(star_file),
        STAR_PROMPT,
        seed=1,
        steps=30,
        sketch_guidance_scale=2.5,
        sketch_fill_scale=0.25,
        api_name="/generate",
    )
    guided_image, unguided_image = PIL.Image.open(image), PIL.Image.open(unguided)
    assert guided_image.size == unguided_image.size == (64, 64)
    assert PIL.Image.open(edge_map).size == (64, 64)
    assert '"seed": 1' in settings and '"sketch_guidance_scale": 2.5' in settings
    assert '"sketch_fill": "auto"' in settings and '"sketch_fill_scale": 0.25' in settings
    assert STAR_PROMPT in guided_image.text["parameters"]
    truth = enclosed_region(PIL.Image.open(star_file))
    guided_iou = iou(segment_foreground(guided_image), truth)
    unguided_iou = iou(segment_foreground(unguided_image), truth)
    assert guided_iou > max(0.5, 2 * unguided_iou), (guided_iou, unguided_iou)
    # The server wrote the files into its output folder.
    assert (server[1] / "out" / os.path.basename(image)).is_file()


def test_api_results_are_reproducible_by_seed(client, star_file):
    from gradio_client import handle_file

    def draw(seed):
        outputs = client.predict(
            handle_file(star_file), STAR_PROMPT, seed=seed, steps=8, compare=False, api_name="/generate"
        )
        return np.asarray(PIL.Image.open(outputs[0]), dtype=np.int16)

    first, again, other = draw(11), draw(11), draw(12)
    assert np.abs(first - again).max() <= 1
    assert np.abs(first - other).mean() > 5


def test_api_a_blank_sketch_gets_the_pipelines_message(client, tmp_path):
    from gradio_client import handle_file

    blank = tmp_path / "blank.png"
    PIL.Image.new("RGBA", (128, 128), (0, 0, 0, 0)).save(blank)  # an empty canvas: transparent
    with pytest.raises(Exception, match="The sketch is blank"):
        client.predict(handle_file(blank), STAR_PROMPT, steps=2, api_name="/generate")


def test_api_an_upload_over_the_limit_is_refused(client, tmp_path):
    from gradio_client import handle_file

    noise = tmp_path / "noise.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(noise)
    assert noise.stat().st_size > MAX_UPLOAD_MB * 1024 * 1024
    with pytest.raises(Exception, match="(?i)(too large|maximum|exceeds|size)"):
        client.predict(handle_file(noise), STAR_PROMPT, steps=2, api_name="/generate")


def test_api_stop_ends_a_long_generation_with_a_message(client, star_file):
    from gradio_client import handle_file

    job = client.submit(handle_file(star_file), STAR_PROMPT, steps=150, api_name="/generate")
    deadline = time.monotonic() + 60
    while not job.status().progress_data and time.monotonic() < deadline:  # until its steps have begun
        time.sleep(0.1)
    client.predict(api_name="/stop")
    with pytest.raises(Exception, match=r"Stopped at step \d+ of 150") as stopped:
        job.result(timeout=120)
    step = int(str(stopped.value).split("Stopped at step ")[1].split()[0])
    assert step < 150


def test_the_server_writes_only_in_its_output_folder(client, server, star_file):
    from gradio_client import handle_file

    client.predict(handle_file(star_file), STAR_PROMPT, steps=2, compare=False, api_name="/generate")
    root = server[1]
    assert sorted(p.name for p in root.iterdir()) == ["out", "server.log", "tmp"]
    assert not any((root / "tmp").iterdir()), list((root / "tmp").rglob("*"))
    assert any((root / "out" / ".gradio").rglob("*.png"))  # the uploads went to the output folder


# ---------------------------------------------------------------------------------------------------------------------
# A real browser


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "No Chromium for the browser test: apt-get install chromium (or set CHROMIUM to a Chromium binary)."
        )
    return path


def keep_screenshot(page, name: str) -> None:
    """Save the page to test-artifacts/NAME for the docs and for a person reading a failure. It is a picture, not a
    check: on a loaded machine a full-page screenshot can outlast Playwright's default 30 s (CI lost a passing run to
    that), so it gets longer and, if it still times out, the test warns and goes on to its assertions."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    ARTIFACTS.mkdir(exist_ok=True)
    try:
        page.screenshot(path=str(ARTIFACTS / name), full_page=True, timeout=120_000)
    except PlaywrightTimeoutError as error:
        warnings.warn(f"test-artifacts/{name} was not written: {error}", stacklevel=2)


def test_in_a_browser_a_drawn_star_becomes_a_red_star_where_it_was_drawn(server):
    from playwright.sync_api import sync_playwright

    url, root = server
    # The star, in fractions of the canvas: left of centre and high, so that "where it was drawn" is tested.
    star = star_points((0.42, 0.45), outer=0.34, inner=0.15)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            canvas = page.locator("#sketch canvas").first
            canvas.wait_for(timeout=60_000)
            page.locator('#sketch button[aria-label="Brush"]').click()  # picked at load already; a click keeps it
            page.wait_for_timeout(300)
            # The editor shows its square paper centred in the canvas element, at the zoom it prints.
            box = canvas.bounding_box()
            side = 512 * editor_zoom(page, "#sketch")
            left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
            screen = [(left + x * side, top + y * side) for x, y in star]
            page.mouse.move(*screen[0])
            page.mouse.down()
            for (x0, y0), (x1, y1) in zip(screen, screen[1:], strict=False):
                for step in range(1, 9):
                    page.mouse.move(x0 + (x1 - x0) * step / 8, y0 + (y1 - y0) * step / 8)
            page.mouse.up()
            page.locator("#prompt textarea").fill(STAR_PROMPT)
            page.locator("#generate").click()
            result = page.locator("#result img")
            result.wait_for(timeout=180_000)
            page.locator("#unguided img").wait_for(timeout=60_000)
            page.wait_for_timeout(500)
            keep_screenshot(page, "ui.png")
            guided = fetch_image(page, result.get_attribute("src"))
            unguided = fetch_image(page, page.locator("#unguided img").get_attribute("src"))
            edge_map = fetch_image(page, page.locator("#edge_map img").get_attribute("src"))
            # The session's gallery holds the result as the PNG that was written, its settings in its metadata.
            gallery_png = page.request.get(page.locator("#gallery img").first.get_attribute("src")).body()
        finally:
            browser.close()

    # The strokes reached the app where they were drawn: the sketch it saved encloses the star drawn.
    drawn = filled(star)
    newest_sketch = max((root / "out").glob("*-sketch.png"), key=os.path.getmtime)
    saved = enclosed_region(PIL.Image.open(newest_sketch))
    assert iou(saved, drawn) > 0.7, iou(saved, drawn)
    # The image has a red star there, and follows it far more than the unguided image of the same seed.
    foreground = segment_foreground(guided)
    guided_iou, unguided_iou = iou(foreground, drawn), iou(segment_foreground(unguided), drawn)
    assert guided_iou > max(0.5, 2 * unguided_iou), (guided_iou, unguided_iou)
    assert named_colour(foreground_colour(guided, foreground)) == "red"
    assert edge_map.size == guided.size
    settings = PIL.Image.open(io.BytesIO(gallery_png)).text["sketch_guided"]
    assert STAR_PROMPT in settings and '"seed": 0' in settings


def editor_zoom(page, editor: str) -> float:
    """The zoom an image editor prints (its paper's scale on screen), as a fraction."""
    return float(page.locator(editor).get_by_text("%").first.inner_text().strip("%")) / 100


def wait_for_new_zoom(page, editor: str, old: float, timeout_s: float = 60) -> float:
    """Wait until the editor's zoom is no longer `old` (it has refitted itself to a new image) and stays the same for
    half a second; return it."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        zoom = editor_zoom(page, editor)
        if zoom != old and zoom == last:
            return zoom
        last = zoom
        page.wait_for_timeout(500)
    pytest.fail(f"{editor} did not refit itself to the uploaded image within {timeout_s} s (zoom stayed {old:.0%})")


def fetch_image(page, src: str) -> PIL.Image.Image:
    response = page.request.get(src)
    assert response.ok, src
    return PIL.Image.open(io.BytesIO(response.body())).convert("RGB")


def test_in_a_browser_an_example_loads_with_one_click_and_is_followed(server):
    from playwright.sync_api import sync_playwright

    from pipeline_sketch_guided.demo import DEMO_SKETCHES, shape_polygon

    url, root = server
    prompt, kind, center, radius, rotation, _ = DEMO_SKETCHES[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            page.get_by_text(prompt, exact=True).last.click()  # the example's row
            page.wait_for_function(
                "p => document.querySelector('#prompt textarea').value === p", arg=prompt, timeout=30_000
            )
            before = set((root / "out").glob("*-sketch.png"))
            page.locator("#generate").click()
            page.wait_for_function(
                "() => document.querySelector('#status')?.innerText.includes('written to')", timeout=180_000
            )
        finally:
            browser.close()
    (sketch_file,) = set((root / "out").glob("*-sketch.png")) - before
    # The sketch the app followed is the example's: the star it encloses is the example's star.
    example_star = filled_mask(shape_polygon(kind, center, radius, rotation))
    assert iou(enclosed_region(PIL.Image.open(sketch_file)), example_star) > 0.7


# ---------------------------------------------------------------------------------------------------------------------
# Drawing into a photo


def half_mask(right: bool = True, size: int = 64) -> PIL.Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 255 if right else 0
    mask[:, : size // 2] = 0 if right else 255
    return PIL.Image.fromarray(mask)


def square_photo(size: int = 64) -> PIL.Image.Image:
    """A render of the demo's kind: an orange square on the left of a grey background."""
    photo = np.full((size, size, 3), 150, dtype=np.uint8)
    photo[24:40, 8:24] = (250, 140, 20)
    return PIL.Image.fromarray(photo)


def test_the_app_draws_into_a_photo_inside_the_painted_region(tmp_path):
    """With a photo and a painted region the app inpaints (the sketch guiding inside the region), records the photo
    and the strength, and compares against the unguided inpainting of the same photo; a region without a photo is
    refused; the canvas helpers take strokes off a photo and a region off a mask editor."""
    app = SketchGuidedApp(load_demo_pipeline(), tmp_path, model_name="demo")
    star = freehand_sketch("star", (46, 32), 12, seed=2, size=256)
    settings = Settings("a red star on a grey background", steps=4, strength=0.9)
    result = app.generate(star, settings, photo=square_photo(), region=half_mask())
    recorded = json.loads(PIL.Image.open(result.image).text["sketch_guided"])
    assert recorded["strength"] == 0.9 and recorded["image_sha256"] and recorded["mask_image_sha256"]
    assert PIL.Image.open(result.unguided).size == (64, 64)
    img2img = app.generate(
        star, Settings("a red star on a grey background", steps=4, strength=0.5), photo=square_photo()
    )
    assert "mask_image_sha256" not in json.loads(PIL.Image.open(img2img.image).text["sketch_guided"])
    # The demo's fill LGP guides drawing into a photo too; at 0 the fill is off and not recorded.
    assert (recorded["sketch_fill"], recorded["sketch_fill_scale"]) == ("auto", DEFAULT_SKETCH_FILL_SCALE)
    off = app.generate(
        star, replace(settings, sketch_fill_scale=0), compare=False, photo=square_photo(), region=half_mask()
    )
    assert json.loads(PIL.Image.open(off.image).text["sketch_guided"])["sketch_fill"] is None
    assert not np.array_equal(np.asarray(PIL.Image.open(off.image)), np.asarray(PIL.Image.open(result.image)))
    with pytest.raises(ValueError, match="needs the photo"):
        app.generate(star, settings, region=half_mask())

    from pipeline_sketch_guided.ui import region_from_mask_editor, strokes_from_canvas

    stroke = PIL.Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    stroke.paste((0, 0, 0, 255), (10, 10, 20, 12))
    drawing = np.asarray(strokes_from_canvas({"background": square_photo(), "layers": [stroke], "composite": None}))
    assert drawing[11, 15].tolist() == [0, 0, 0] and drawing[30, 15].tolist() == [255, 255, 255]  # no photo in it
    region = region_from_mask_editor({"background": square_photo(), "layers": [stroke]})
    assert np.asarray(region)[11, 15] == 255 and np.asarray(region)[30, 15] == 0
    assert region_from_mask_editor({"layers": [PIL.Image.new("RGBA", (64, 64), (0, 0, 0, 0))]}) is None


def test_in_a_browser_a_shape_is_drawn_into_a_photo(server, tmp_path):
    """Upload a photo, paint the right half as the region, draw a star there on the canvas (the photo under it),
    Generate: the left of the result is the photo's (as well as the VAE gives it back) and the right has the star."""
    from playwright.sync_api import sync_playwright

    url, root = server
    photo_file = tmp_path / "photo.png"
    square_photo().resize((256, 256), PIL.Image.Resampling.NEAREST).save(photo_file)
    star = star_points((0.72, 0.5), outer=0.2, inner=0.09)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(url)
            page.locator("#editing").get_by_text("Draw into a photo").click()
            region = page.locator("#region canvas").first
            region.wait_for(timeout=60_000)
            empty_zoom = editor_zoom(page, "#region")
            page.locator("#photo input[type=file]").set_input_files(str(photo_file))
            # The region editor fits itself to the photo once the photo reaches it, which on a loaded machine takes
            # seconds: painting before that lands at the empty editor's scale (CI lost a run to a fixed wait).
            zoom = wait_for_new_zoom(page, "#region", empty_zoom)
            page.locator('#region button[aria-label="Brush"]').click()
            box = region.bounding_box()
            side = 256 * zoom
            left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
            for row in range(6, 256, 12):  # paint the right half, row by row
                page.mouse.move(left + 0.55 * side, top + row / 256 * side)
                page.mouse.down()
                page.mouse.move(left + 0.98 * side, top + row / 256 * side, steps=6)
                page.mouse.up()
            canvas = page.locator("#sketch canvas").first
            page.locator('#sketch button[aria-label="Brush"]').click()
            box = canvas.bounding_box()
            side = 512 * editor_zoom(page, "#sketch")  # the sketch canvas's fixed paper, the photo fitted onto it
            left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
            screen = [(left + x * side, top + y * side) for x, y in star]
            page.mouse.move(*screen[0])
            page.mouse.down()
            for x, y in screen[1:]:
                page.mouse.move(x, y, steps=8)
            page.mouse.up()
            page.locator("#prompt textarea").fill("a red star on a grey background")
            page.locator("#generate").click()
            page.wait_for_function(
                "() => document.querySelector('#status')?.innerText.includes('written to')", timeout=240_000
            )
            keep_screenshot(page, "ui_photo.png")
            guided = fetch_image(page, page.locator("#result img").get_attribute("src"))
        finally:
            browser.close()
    newest = max((root / "out").glob("*[0-9].png"), key=os.path.getmtime)
    recorded = json.loads(PIL.Image.open(newest).text["sketch_guided"])
    assert recorded["mask_image_sha256"] and recorded["strength"] == 1.0
    sketch = PIL.Image.open(max((root / "out").glob("*-sketch.png"), key=os.path.getmtime))
    assert iou(enclosed_region(sketch), filled(star)) > 0.6  # the strokes, without the photo under them
    pixels = np.asarray(guided.resize((64, 64)), dtype=np.int16)
    assert np.abs(pixels[28:36, 12:20] - (250, 140, 20)).mean() < 60  # the photo's square, kept
    right = segment_foreground(guided.resize((64, 64)))[:, 32:]
    assert iou(right, filled(star)[:, 32:]) > 0.3
