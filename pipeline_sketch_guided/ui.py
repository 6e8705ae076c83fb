"""`sketch-guided ui`: a Gradio page to draw a sketch, type a prompt and see the sketch-guided image beside the
unguided one.

`build_app` makes the page around any loaded sketch-guided pipeline; `SketchGuidedApp` holds the pipeline, runs one
generation at a time and writes only under its output folder. Needs the `ui` extra (`pip install
"pipeline_sketch_guided[ui]"`).
"""

import hashlib
import inspect
import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from . import loading
from .guidance import (
    DEFAULT_SKETCH_FILL_SCALE,
    DEFAULT_SKETCH_GUIDANCE_END,
    DEFAULT_SKETCH_GUIDANCE_SCALE,
    MAX_SKETCH_GUIDANCE_SCALE,
)
from .saving import save_image
from .sketch import to_image

logger = logging.getLogger(__name__)

# Uploads above this are refused by the server with a message (Gradio's `max_file_size`).
DEFAULT_MAX_UPLOAD_MB = 10
# A sketch with more pixels than this is refused before it is decoded into the pipeline (about 16 megapixels).
MAX_SKETCH_PIXELS = 4096 * 4096
MAX_STEPS = 500
MAX_SEED = 2**32 - 1
# Unguided images kept for the compare view, keyed by everything that decides them (not the sketch).
UNGUIDED_CACHE_SIZE = 32


@dataclass(frozen=True)
class Settings:
    """What one generation was asked for; written into each PNG's metadata."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 30
    guidance_scale: float | None = None  # None: the pipeline's own default (7.5 for SD, 7 for SD3, 3.5 for FLUX)
    sketch_guidance_scale: float = DEFAULT_SKETCH_GUIDANCE_SCALE
    sketch_guidance_start: float = 0.0
    sketch_guidance_end: float = DEFAULT_SKETCH_GUIDANCE_END
    sketch_guidance_interval: int = 1
    strength: float | None = None  # with a photo: how much of it is redrawn; None: the pipeline's own default
    # Fill guidance, where the pipeline has a fill LGP: the weight of the sketch's filled outline (0: off).
    sketch_fill_scale: float = DEFAULT_SKETCH_FILL_SCALE

    def checked(self) -> "Settings":
        """These settings with whole numbers made whole; a ValueError saying which value is out of range otherwise.

        The page's sliders keep to the ranges, but the API takes any number.
        """
        if not self.prompt or not self.prompt.strip():
            raise ValueError("Type a prompt: it says what to draw; the sketch says where.")
        for name, value, low, high in (
            ("seed", self.seed, 0, MAX_SEED),
            ("steps", self.steps, 1, MAX_STEPS),
            ("sketch_guidance_interval", self.sketch_guidance_interval, 1, MAX_STEPS),
        ):
            if value is None or not float(value).is_integer() or not low <= value <= high:
                raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value}.")
        if self.guidance_scale is not None and not 0 <= self.guidance_scale <= 50:  # NaN fails too
            raise ValueError(f"guidance_scale must be from 0 to 50, got {self.guidance_scale}.")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise ValueError(f"strength must be above 0 and at most 1, got {self.strength}.")
        if self.sketch_fill_scale is None or not 0 <= self.sketch_fill_scale <= MAX_SKETCH_GUIDANCE_SCALE:
            raise ValueError(
                f"sketch_fill_scale must be from 0 (no fill guidance) to {MAX_SKETCH_GUIDANCE_SCALE}, got"
                f" {self.sketch_fill_scale}."
            )
        return Settings(
            **{
                **asdict(self),
                "seed": int(self.seed),
                "steps": int(self.steps),
                "sketch_guidance_interval": int(self.sketch_guidance_interval),
                "negative_prompt": self.negative_prompt or "",
            }
        )


@dataclass
class Result:
    """The files one generation wrote (all under the app's output folder)."""

    image: str
    unguided: str | None
    edge_map: str | None
    sketch: str
    settings: dict[str, Any]


class Stopped(Exception):
    """The user stopped the generation."""


def sketch_from_canvas(value: Any) -> PIL.Image.Image:
    """The drawing in a Gradio image editor's value, composited onto white paper, as an RGB image.

    The editor gives RGBA layers whose transparent pixels hold arbitrary colours: only the alpha-weighted composite
    is the drawing. An editor with nothing in it gives a white page (the pipeline then says the sketch is blank).
    A plain image (an upload through the API) is taken the same way.
    """
    image = value
    if isinstance(value, dict):
        image = value.get("composite")
        if image is None:
            image = value.get("background")
    if image is None:
        return PIL.Image.new("RGB", (64, 64), "white")
    drawing = to_image(image, paper=255).convert("RGB")
    check_sketch_size(drawing)
    return drawing


def strokes_from_canvas(value: Any) -> PIL.Image.Image:
    """What was drawn on an image editor whose background is a photo: its layers composited onto white paper, the
    photo left out (it is shown under the strokes only so that they can be drawn where things go)."""
    layers = [layer for layer in (value or {}).get("layers") or [] if layer is not None]
    background = (value or {}).get("background")
    if not layers:
        return sketch_from_canvas(None)
    size = (background or layers[0]).size
    paper = PIL.Image.new("RGBA", size, "white")
    for layer in layers:
        paper.alpha_composite(to_image(layer, paper=255).convert("RGBA").resize(size))
    drawing = paper.convert("RGB")
    check_sketch_size(drawing)
    return drawing


def region_from_mask_editor(value: Any) -> PIL.Image.Image | None:
    """The painted region of a mask editor: white where any layer was painted, black elsewhere; `None` when nothing
    was painted."""
    layers = [layer for layer in (value or {}).get("layers") or [] if layer is not None]
    painted = None
    for layer in layers:
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return None
    return PIL.Image.fromarray(painted.astype(np.uint8) * 255)


def faded(photo: PIL.Image.Image | None) -> PIL.Image.Image | None:
    """The photo lightened halfway to white: under the sketch canvas's strokes, it shows where to draw."""
    if photo is None:
        return None
    return PIL.Image.blend(photo.convert("RGB"), PIL.Image.new("RGB", photo.size, "white"), 0.5)


def check_sketch_size(image: PIL.Image.Image) -> None:
    if image.width * image.height > MAX_SKETCH_PIXELS:
        raise ValueError(
            f"The sketch is {image.width}x{image.height} pixels, more than this page takes"
            f" ({MAX_SKETCH_PIXELS // 1_000_000} megapixels); scale it down (it is resized to the model's size anyway)."
        )


def image_sha256(image: PIL.Image.Image) -> str:
    return hashlib.sha256(image.tobytes() + repr((image.mode, image.size)).encode()).hexdigest()


class SketchGuidedApp:
    """A sketch-guided pipeline served to a page: one generation at a time, every file under `output_dir`.

    Args:
        pipe: a loaded `SketchGuidedStableDiffusionPipeline` or `SketchGuidedStableDiffusionXLPipeline`.
        output_dir: where results, their sketches and their edge maps are written (created if needed).
        model_name: what the PNG metadata names as the model.
        lgp_name: what the PNG metadata names as the LGP (`None`: the one saved with the model).
    """

    def __init__(self, pipe, output_dir: str | os.PathLike, model_name: str, lgp_name: str | None = None):
        if getattr(pipe, "lgp", None) is None:
            raise ValueError(
                f"{model_name} has no LGP to guide with: pass one (`--lgp`, a folder or Hub id of an LGP trained for"
                " this base model; see docs/training.md)."
            )
        self.pipe = pipe
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model_name = model_name
        self.lgp_name = lgp_name
        self.lock = threading.Lock()
        self.unguided_cache: OrderedDict[tuple, str] = OrderedDict()
        self._running_session: str | None = None
        self._stop_requested = threading.Event()
        self._count = 0

    @property
    def default_size(self) -> int:
        return self.pipe.sketch_size(None, None, None)[0]

    @property
    def default_guidance_scale(self) -> float:
        """The pipeline's own default `guidance_scale`."""
        return inspect.signature(type(self.pipe).__call__).parameters["guidance_scale"].default

    @property
    def map_kind(self) -> str:
        """The kind of map the pipeline's LGP reads (`LGPModel.config.map_kind`): edges, silhouette, depth, color."""
        return getattr(self.pipe.lgp.config, "map_kind", "edges")

    @property
    def fills(self) -> bool:
        """Whether sketches are guided with their fill as well (`fills_by_default`: a fill LGP, and an LGP that reads
        sketches)."""
        return self.pipe.fills_by_default

    def guidance_map(self, drawing: PIL.Image.Image) -> PIL.Image.Image:
        """The drawing, passed to the pipeline as drawn: it reads sketches and silhouettes either way round (shapes
        painted dark on the white page, or an upload white on black), as every other way in does.

        Raises:
            ValueError: for an empty canvas, when the pipeline itself would not say so.
        """
        if self.map_kind == "edges":
            return drawing
        grey = np.asarray(drawing.convert("L"))
        if grey.max() == grey.min():
            raise ValueError(
                f"The canvas is empty: this LGP reads {self.map_kind} maps, so paint the shapes where they go (filled)"
                " or upload a map."
            )
        return drawing

    def stop(self, session: str | None) -> bool:
        """Ask the generation of `session` to stop after its current step; False if it is not running one."""
        if session is None or session != self._running_session:
            return False
        self._stop_requested.set()
        return True

    def generate(
        self,
        sketch: PIL.Image.Image,
        settings: Settings,
        compare: bool = True,
        session: str | None = None,
        progress: Callable[[int, int, str], None] | None = None,
        photo: PIL.Image.Image | None = None,
        region: PIL.Image.Image | None = None,
    ) -> Result:
        """Draw `settings.prompt` following `sketch` (and, with `compare`, the unguided image of the same seed);
        write the images and return their paths. With a `photo`, draw into it: the white part of `region` is
        repainted and the sketch guides there (inpainting), or without a region the whole photo is redrawn to
        `settings.strength` (image-to-image).

        Raises:
            ValueError: for settings or a sketch the pipeline cannot take, with the pipeline's message.
            Stopped: when `stop(session)` was called during the generation.
        """
        settings = settings.checked()
        if settings.guidance_scale is None:
            settings = replace(settings, guidance_scale=self.default_guidance_scale)
        sketch = self.guidance_map(sketch)
        if region is not None and photo is None:
            raise ValueError("A region to repaint needs the photo it belongs to: upload the photo.")
        editing = {}
        if photo is not None:
            check_sketch_size(photo)
            editing["image"] = photo.convert("RGB")
            if region is not None:
                editing["mask_image"] = region.convert("L").resize(photo.size)
            if settings.strength is not None:
                editing["strength"] = settings.strength
        with self.lock:
            self._running_session = session
            self._stop_requested.clear()
            try:
                report = progress or (lambda done, total, what: None)
                return self._generate(sketch, settings, compare, report, editing)
            finally:
                self._running_session = None

    def _generate(self, sketch, settings: Settings, compare: bool, progress, editing: dict[str, Any]) -> Result:
        stem = self._new_stem(settings.seed)
        unguided_key = (
            settings.prompt,
            settings.negative_prompt,
            settings.seed,
            settings.steps,
            settings.guidance_scale,
            type(self.pipe.scheduler).__name__,
            settings.strength,
            *(image_sha256(editing[name]) if name in editing else None for name in ("image", "mask_image")),
        )
        unguided = self.unguided_cache.get(unguided_key) if compare else None
        if unguided is not None and not os.path.isfile(unguided):
            unguided = None
        runs = 1 + (compare and unguided is None)
        total = runs * settings.steps

        output = self._run(sketch, settings, progress, 0, total, "sketch-guided", editing)
        unguided_output = None
        if compare and unguided is None:
            unguided_output = self._run(None, settings, progress, settings.steps, total, "unguided", editing)

        # Written only once both are drawn, so that a stopped generation leaves no file.
        metadata = self._metadata(settings, sketch, editing)
        sketch_path = str(self.output_dir / f"{stem}-sketch.png")
        save_image(sketch, sketch_path)
        image_path = str(self.output_dir / f"{stem}.png")
        save_image(output.images[0], image_path, {**metadata, "sketch_file": os.path.basename(sketch_path)})
        edge_path = str(self.output_dir / f"{stem}-edges.png")
        save_image(output.edge_maps[0], edge_path)
        if unguided_output is not None:
            unguided = str(self.output_dir / f"{stem}-unguided.png")
            unguided_metadata = {k: v for k, v in metadata.items() if not k.startswith("sketch")}
            save_image(unguided_output.images[0], unguided, unguided_metadata)
            self.unguided_cache[unguided_key] = unguided
            while len(self.unguided_cache) > UNGUIDED_CACHE_SIZE:
                self.unguided_cache.popitem(last=False)
        elif unguided is not None:
            self.unguided_cache.move_to_end(unguided_key)
        return Result(image_path, unguided, edge_path, sketch_path, metadata)

    def _run(self, sketch, settings: Settings, progress, done: int, total: int, what: str, editing: dict[str, Any]):
        stopped_at = []

        def on_step_end(pipe, step, timestep, tensors):
            progress(done + step + 1, total, what)
            if self._stop_requested.is_set() and not stopped_at:
                stopped_at.append(step + 1)
                pipe._interrupt = True  # diffusers' loops skip the remaining steps
            return tensors

        generator = torch.Generator("cpu").manual_seed(settings.seed)
        guidance = {}
        if sketch is not None:
            guidance = {
                "sketch": sketch,
                "sketch_guidance_scale": settings.sketch_guidance_scale,
                "sketch_guidance_start": settings.sketch_guidance_start,
                "sketch_guidance_end": settings.sketch_guidance_end,
                "sketch_guidance_interval": settings.sketch_guidance_interval,
                "return_edge_maps": True,
            }
        pipe = loading.editing_pipeline(self.pipe, image="image" in editing, mask="mask_image" in editing)
        if sketch is not None and self.fills:  # 0 too: the pipeline's default would fill
            guidance["sketch_fill_scale"] = settings.sketch_fill_scale
        output = pipe(
            settings.prompt,
            negative_prompt=settings.negative_prompt or None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            generator=generator,
            callback_on_step_end=on_step_end,
            **guidance,
            **editing,
        )
        if stopped_at:
            raise Stopped(f"Stopped at step {stopped_at[0]} of {settings.steps} ({what}); nothing was saved.")
        return output

    def _fill_scale(self, settings: Settings) -> float | None:
        """The weight the sketch's fill is guided with; `None` for no fill guidance (none asked for, or none in the
        pipeline)."""
        if not self.fills or settings.sketch_fill_scale == 0:
            return None
        return settings.sketch_fill_scale

    def _new_stem(self, seed: int) -> str:
        self._count += 1
        return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self._count:04d}-seed{seed}"

    def _metadata(self, settings: Settings, sketch: PIL.Image.Image, editing: dict[str, Any]) -> dict[str, Any]:
        from . import __version__

        photo = {
            "image_sha256": image_sha256(editing["image"]) if "image" in editing else None,
            "mask_image_sha256": image_sha256(editing["mask_image"]) if "mask_image" in editing else None,
            "strength": settings.strength if "image" in editing else None,
        }
        fill_scale = self._fill_scale(settings)
        return {
            **{name: value for name, value in photo.items() if value is not None},
            "prompt": settings.prompt,
            "negative_prompt": settings.negative_prompt or None,
            "seed": settings.seed,
            "steps": settings.steps,
            "sampler": type(self.pipe.scheduler).__name__,
            "cfg_scale": settings.guidance_scale,
            "model": self.model_name,
            "lgp": self.lgp_name,
            "sketch_sha256": image_sha256(sketch),
            "sketch_guidance_scale": settings.sketch_guidance_scale,
            "sketch_guidance_start": settings.sketch_guidance_start,
            "sketch_guidance_end": settings.sketch_guidance_end,
            "sketch_guidance_interval": settings.sketch_guidance_interval,
            "sketch_fill": "auto" if fill_scale is not None else None,
            "sketch_fill_scale": fill_scale,
            "generator": f"pipeline_sketch_guided {__version__} ui",
        }

    def write_examples(self) -> list[list[str]]:
        """The demo model's built-in free-hand sketches (for its silhouette LGP: blobs, painted dark on the page as on
        the canvas) as files under the output folder, with their prompts."""
        from .demo import DEMO_SKETCHES, freehand_blob, freehand_sketch

        folder = self.output_dir / "examples"
        folder.mkdir(exist_ok=True)
        examples = []
        for index, (prompt, kind, center, radius, rotation, style) in enumerate(DEMO_SKETCHES):
            path = folder / f"{kind}-{self.map_kind}.png"
            if not path.is_file():
                if self.map_kind == "silhouette":
                    blob, _ = freehand_blob(kind, center, radius, rotation, seed=index, size=512)
                    example = PIL.ImageOps.invert(blob.convert("L"))
                else:
                    example = freehand_sketch(kind, center, radius, rotation, seed=index, size=512, **style)
                save_image(example, str(path))
            examples.append([str(path), prompt])
        return examples


# ---------------------------------------------------------------------------------------------------------------------
# The page


# Small model outputs (the demo's 64x64) are shown enlarged, with crisp pixels.
PAGE_CSS = """
#result img, #unguided img, #edge_map img { width: 100%; height: 100%; object-fit: contain; }
#result img, #unguided img, #edge_map img, #gallery img { image-rendering: pixelated; }
"""


def build_app(app: SketchGuidedApp, examples: list[list[str]] | None = None):
    """The Gradio page (a `gr.Blocks`) around `app`, with the named API endpoints `/generate` and `/stop`."""
    import gradio as gr

    from .demo import VOCABULARY_HELP

    canvas_size = max(512, min(1024, app.default_size))
    pen = max(2, canvas_size // 48) * (4 if app.map_kind == "silhouette" else 1)
    what_to_draw = {
        "edges": "Sketch: draw, or upload a drawing",
        "silhouette": "Silhouettes: paint the shapes where they go, filled, or upload a map",
    }.get(app.map_kind, f"The {app.map_kind} map to follow: upload it")

    def on_generate(
        canvas,
        prompt,
        negative,
        seed,
        steps,
        scale,
        start,
        end,
        interval,
        compare,
        fill,
        photo,
        region,
        strength,
        gallery,
        request: gr.Request = None,
        progress=gr.Progress(),  # noqa: B008 (Gradio finds its progress tracker by this default)
    ):
        session = request.session_hash if request is not None else None
        settings = Settings(prompt, negative, seed, steps, None, scale, start, end, interval, sketch_fill_scale=fill)
        editing = {}
        if photo is not None:
            settings = replace(settings, strength=strength)
            editing = {"photo": photo, "region": region_from_mask_editor(region)}
            canvas = strokes_from_canvas(canvas)  # the photo under the strokes is not the sketch
        result = run_for_page(canvas, settings, compare, session, progress, **editing)
        gallery = [*(gallery or []), (result.image, f"seed {result.settings['seed']}: {result.settings['prompt']}")]
        status = f"Seed {result.settings['seed']}, written to {os.path.basename(result.image)}."
        return result.image, result.unguided, result.edge_map, gallery, gallery, status

    def on_api_generate(  # its parameter names are the API's: the pipeline's own
        sketch,
        prompt,
        negative_prompt,
        seed,
        steps,
        sketch_guidance_scale,
        sketch_guidance_start,
        sketch_guidance_end,
        sketch_guidance_interval,
        compare,
        sketch_fill_scale=DEFAULT_SKETCH_FILL_SCALE,
        request: gr.Request = None,
        progress=gr.Progress(),  # noqa: B008 (Gradio finds its progress tracker by this default)
    ):
        session = request.session_hash if request is not None else None
        settings = Settings(
            prompt,
            negative_prompt,
            seed,
            steps,
            sketch_guidance_scale=sketch_guidance_scale,
            sketch_guidance_start=sketch_guidance_start,
            sketch_guidance_end=sketch_guidance_end,
            sketch_guidance_interval=sketch_guidance_interval,
            sketch_fill_scale=sketch_fill_scale,
        )
        result = run_for_page(sketch, settings, compare, session, progress)
        return result.image, result.unguided, result.edge_map, json.dumps(result.settings)

    def run_for_page(canvas, settings, compare, session, progress, photo=None, region=None) -> Result:
        def report(done, total, what):
            progress((done, total), desc=f"{what} steps", unit="steps")

        try:
            sketch = canvas if isinstance(canvas, PIL.Image.Image) else sketch_from_canvas(canvas)
            return app.generate(sketch, settings, bool(compare), session, report, photo=photo, region=region)
        except Stopped as stopped:
            raise gr.Error(str(stopped), title="Stopped", print_exception=False) from None
        except (ValueError, TypeError) as error:
            raise gr.Error(" ".join(str(error).split()), print_exception=False) from None
        except Exception as error:  # anything else still reaches the page as a message, and the log with its trace
            logger.exception("The generation failed")
            raise gr.Error(f"The generation failed: {type(error).__name__}: {error}") from None

    def on_stop(request: gr.Request):
        if app.stop(request.session_hash if request is not None else None):
            gr.Info("Stopping after the current step.")

    with gr.Blocks(title="Sketch-guided diffusion") as page:
        gr.Markdown(
            "# Sketch-guided text-to-image\n"
            "Draw where things go, say what they are. The Latent Guidance Predictor steers the diffusion model toward"
            " your lines during the first steps (Voynov, Aberman & Cohen-Or, *Sketch-Guided Text-to-Image Diffusion"
            f" Models*, 2023). Model: `{app.model_name}`." + (f"\n\n{VOCABULARY_HELP}" if examples else "")
        )
        gallery_state = gr.State([])
        with gr.Row():
            with gr.Column():
                canvas = gr.Sketchpad(
                    label=what_to_draw,
                    type="pil",
                    image_mode="RGBA",
                    sources=("upload", "clipboard"),
                    canvas_size=(canvas_size, canvas_size),
                    fixed_canvas=True,
                    brush=gr.Brush(colors=["#000000"], default_color="#000000", color_mode="fixed", default_size=pen),
                    eraser=gr.Eraser(default_size=3 * pen),
                    layers=False,
                    elem_id="sketch",
                )
                prompt = gr.Textbox(label="Prompt", placeholder="a red star on a white background", elem_id="prompt")
                negative = gr.Textbox(value="", label="Negative prompt", placeholder="what to keep out of the image")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, scale=4)
                    dice = gr.Button("Random seed", scale=1, min_width=80)
                steps = gr.Slider(1, 150, value=30, step=1, label="Steps", info="denoising steps (default 30)")
                scale = gr.Slider(
                    0,
                    min(10.0, MAX_SKETCH_GUIDANCE_SCALE),
                    value=DEFAULT_SKETCH_GUIDANCE_SCALE,
                    step=0.1,
                    label="Sketch guidance scale",
                    info=f"how strongly to follow the sketch: 0 ignores it, about 1 to 4 follows it"
                    f" (default {DEFAULT_SKETCH_GUIDANCE_SCALE})",
                )
                with gr.Row():
                    start = gr.Slider(
                        0,
                        0.95,
                        value=0.0,
                        step=0.05,
                        label="Guidance start",
                        info="fraction of the steps before guidance begins (default 0)",
                    )
                    end = gr.Slider(
                        0.05,
                        1,
                        value=DEFAULT_SKETCH_GUIDANCE_END,
                        step=0.05,
                        label="Guidance end",
                        info=f"fraction of the steps after which the prompt alone finishes the image: later follows"
                        f" the lines more closely, costs more (default {DEFAULT_SKETCH_GUIDANCE_END})",
                    )
                interval = gr.Slider(
                    1,
                    5,
                    value=1,
                    step=1,
                    label="Guidance interval",
                    info="compute the sketch's gradient every k-th guided step (and every step of the first 10%)"
                    " and reuse it between: faster, approximate (default 1, the exact method)",
                )
                fill = gr.Slider(
                    0,
                    1,
                    value=DEFAULT_SKETCH_FILL_SCALE,
                    step=0.025,
                    label="Fill guidance scale",
                    info="how strongly the region your outlines enclose is drawn as the shape, so that a ring or a"
                    f" shape the frame cuts comes out on the right side of its lines: 0 turns it off (default"
                    f" {DEFAULT_SKETCH_FILL_SCALE})",
                    visible=app.fills,
                )
                compare = gr.Checkbox(
                    value=True,
                    label="Compare",
                    info="also draw the unguided image of the same seed, to see what the sketch did",
                )
                with gr.Accordion("Draw into a photo (optional)", open=False, elem_id="editing"):
                    photo = gr.Image(
                        label="Photo: it appears, faded, under the sketch canvas; draw the new thing where it goes",
                        type="pil",
                        image_mode="RGB",
                        sources=("upload", "clipboard"),
                        elem_id="photo",
                    )
                    region = gr.ImageMask(
                        label="Region to repaint: paint over it (nothing painted: the whole photo is redrawn)",
                        type="pil",
                        image_mode="RGBA",
                        sources=(),
                        brush=gr.Brush(colors=["#ff0000"], default_color="#ff0000", color_mode="fixed"),
                        layers=False,
                        elem_id="region",
                    )
                    strength = gr.Slider(
                        0.05,
                        1,
                        value=1.0,
                        step=0.05,
                        label="Strength",
                        info="how much of the photo (or of the region) is redrawn: 1 all of it, lower keeps more of"
                        " what was there; the guided steps are a fraction of the steps this runs",
                    )
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column():
                with gr.Row():
                    result = gr.Image(
                        label="Sketch-guided", type="filepath", interactive=False, height=320, elem_id="result"
                    )
                    unguided = gr.Image(
                        label="Unguided, same seed", type="filepath", interactive=False, height=320, elem_id="unguided"
                    )
                edge_map = gr.Image(
                    label=f"The LGP's predicted {'edge map' if app.map_kind == 'edges' else app.map_kind + ' map'}"
                    " (last guided step)",
                    type="filepath",
                    interactive=False,
                    height=240,
                    elem_id="edge_map",
                )
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(
                    label="This session's results (PNG with prompt, seed and settings in its metadata)",
                    type="filepath",
                    columns=6,
                    height=240,
                    preview=False,
                    object_fit="contain",
                    fit_columns=False,
                    buttons=["download"],
                    interactive=False,
                    elem_id="gallery",
                )
        if examples:
            gr.Examples(examples=examples, inputs=[canvas, prompt], label="Examples: one click loads a sketch")

        inputs = [prompt, negative, seed, steps, scale, start, end, interval, compare, fill]
        page_inputs = [canvas, *inputs, photo, region, strength, gallery_state]
        # A photo shows faded under the sketch canvas and, as it is, under the region's brush.
        photo.change(lambda image: (faded(image), image), photo, [canvas, region], api_visibility="private")
        run = generate.click(
            on_generate,
            inputs=page_inputs,
            outputs=[result, unguided, edge_map, gallery, gallery_state, status],
            api_visibility="private",
        )
        submitted = prompt.submit(
            on_generate,
            inputs=page_inputs,
            outputs=[result, unguided, edge_map, gallery, gallery_state, status],
            api_visibility="private",
        )
        stop.click(on_stop, None, None, queue=False, api_name="stop", cancels=[run, submitted])
        dice.click(lambda: random.randint(0, MAX_SEED), None, seed, queue=False, api_visibility="private")

        # The pen is picked at once, so that a new user can draw without finding the tool first.
        page.load(None, js="() => document.querySelector('#sketch button[aria-label=\"Brush\"]')?.click()")

        # The API: a plain image instead of the editor's layers; the same settings and defaults.
        with gr.Row(visible=False):
            api_sketch = gr.Image(label="sketch", type="pil", image_mode="RGBA")
            api_image = gr.Image(label="image", type="filepath")
            api_unguided = gr.Image(label="unguided image", type="filepath")
            api_edge_map = gr.Image(label="edge map", type="filepath")
            api_settings = gr.Textbox(label="settings (JSON)")
            api_button = gr.Button()
        api_button.click(
            on_api_generate,
            inputs=[api_sketch, *inputs],
            outputs=[api_image, api_unguided, api_edge_map, api_settings],
            api_name="generate",
        )
    return page


def launch(
    app: SketchGuidedApp,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    examples: list[list[str]] | None = None,
    block: bool = True,
):
    """Serve the page: one generation at a time (others wait in a queue), uploads up to `max_upload_mb`."""
    page = build_app(app, examples)
    page.queue(default_concurrency_limit=1)
    return page.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=int(max_upload_mb * 1024 * 1024),
        allowed_paths=[str(app.output_dir)],
        prevent_thread_lock=not block,
        css=PAGE_CSS,
        footer_links=["api"],
        show_error=True,
    )
