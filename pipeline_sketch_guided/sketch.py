"""Turn a user's sketch (any format, either polarity), or any other spatial map an LGP was trained on (silhouettes,
depth, colour maps), into the image the LGP's training maps looked like."""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers.utils import logging

SketchInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike]

# How strokes look against the paper; an LGP's config names the one its training edge maps had.
SKETCH_POLARITIES = ("light_on_dark", "dark_on_light")
# The kinds of map an LGP can predict (its config's `map_kind`): edge maps (sketches), one-channel continuous maps
# (filled silhouettes, depth) and three-channel colour maps (segmentation colours, normals, any RGB map).
MAP_KINDS = ("edges", "silhouette", "depth", "color")
GREY_MAP_KINDS = ("edges", "silhouette", "depth")
# How a map was normalised in training (config `map_normalization`): as drawn, or stretched to the full 0..1 range.
MAP_NORMALIZATIONS = ("none", "minmax")

# A sketch whose darkest and lightest pixels differ by less than this (in [0, 1]) has no strokes to follow.
MIN_STROKE_CONTRAST = 0.05
# Strokes are stretched to full contrast from the paper's tone to their ink's, the ink being the tone this quantile of
# pixels stays below (the brightest few pixels of the strokes, not a lone speck)...
STROKE_INK_QUANTILE = 0.999
# ... by at most 1 / this: a stroke fainter than a quarter of full contrast is made stronger but not full, so that the
# grain of a scanned page is not made into strokes. Edge detectors' maps, on which LGPs are trained, have full-contrast
# strokes; a pencil's grey line or a thin line shrunk to the output size is the same instruction. On the free-hand
# efficacy set (pencil tones) this took a map-target LGP from IoU 0.595 to 0.716 at the defaults (docs/fidelity.md).
MAX_STROKE_GAIN_DIVISOR = 0.25
# Aspect ratios closer than this (relative) count as equal: the sketch is resized to the output without padding.
ASPECT_TOLERANCE = 0.02

logger = logging.get_logger(__name__)


def sketch_list(sketch: SketchInput | list[SketchInput]) -> list[SketchInput]:
    """The sketches in `sketch`, in diffusers' image conventions: a list of images, or a batch as one numpy array
    `(B, H, W, C)` or torch tensor `(B, C, H, W)`; anything else is one sketch."""
    if isinstance(sketch, (list, tuple)):
        return list(sketch)
    if isinstance(sketch, (np.ndarray, torch.Tensor)) and sketch.ndim == 4:
        return list(sketch)
    return [sketch]


def to_image(sketch: SketchInput, paper: int = 255) -> PIL.Image.Image:
    """Any accepted input as a PIL image in mode L or RGB; transparent pixels are composited on `paper`."""
    if isinstance(sketch, (str, os.PathLike)):
        if not os.path.isfile(sketch):
            raise ValueError(f"The sketch file {os.fspath(sketch)!r} does not exist.")
        try:
            with PIL.Image.open(sketch) as opened:
                sketch = opened.copy()
        except (OSError, PIL.UnidentifiedImageError) as error:
            raise ValueError(f"Cannot read the sketch file {os.fspath(sketch)!r}: {error}") from error
    if isinstance(sketch, torch.Tensor):
        sketch = sketch.detach().cpu()
        if sketch.is_floating_point() and sketch.min() < 0:
            sketch = (sketch + 1) / 2  # diffusers reads a tensor with negative values as [-1, 1]
        if sketch.ndim == 4 and sketch.shape[0] == 1:
            sketch = sketch[0]
        if sketch.ndim == 3:  # channels first, as torch images are
            sketch = sketch.permute(1, 2, 0)
        sketch = sketch.numpy()
    if isinstance(sketch, np.ndarray):
        array = sketch[0] if sketch.ndim == 4 and sketch.shape[0] == 1 else sketch
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(
                "A sketch array must be (H, W), (H, W, 1|3|4) or (1, H, W, 1|3|4), and a tensor (1|3|4, H, W) or"
                f" (1, 1|3|4, H, W); got shape {tuple(sketch.shape)}. A batch of sketches is a list of them, an"
                " array (B, H, W, C) or a tensor (B, C, H, W)."
            )
        if array.dtype == np.bool_:
            array = array.astype(np.uint8) * 255
        elif array.dtype != np.uint8:
            # Floats are read as [0, 1], the diffusers convention for image arrays and tensors.
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
        sketch = PIL.Image.fromarray(array)
    if not isinstance(sketch, PIL.Image.Image):
        raise TypeError(
            "`sketch` must be a PIL image, a numpy array, a torch tensor or a path to an image file, got"
            f" {type(sketch).__name__}."
        )
    if sketch.mode in ("RGBA", "LA", "PA") or (sketch.mode == "P" and "transparency" in sketch.info):
        # Transparent pixels are paper: composite on white (sketches) or black (other maps' background).
        rgba = sketch.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (paper, paper, paper, 255))
        sketch = PIL.Image.alpha_composite(background, rgba)
    return sketch.convert("L" if sketch.mode in ("1", "L", "I", "I;16", "F") else "RGB")


def _to_grayscale_image(sketch: SketchInput, paper: int = 255) -> PIL.Image.Image:
    return to_image(sketch, paper).convert("L")


def fit_to_size(
    image: PIL.Image.Image, height: int, width: int, fill: int | None = None, what: str = "sketch"
) -> PIL.Image.Image:
    """`image` (grayscale or RGB) resized to `width` x `height`; one of another aspect is fitted inside, centred, and
    padded with `fill` (by default its paper, its median tone), never stretched, with a warning that says so."""
    # BOX averages every source pixel into the result, so thin strokes fade instead of vanishing when shrunk.
    box = PIL.Image.Resampling.BOX
    if abs(image.width * height / (image.height * width) - 1) <= ASPECT_TOLERANCE:
        return image.resize((width, height), resample=box)
    scale = min(width / image.width, height / image.height)
    fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample=box)
    paper = int(np.median(np.asarray(image))) if fill is None else fill
    canvas = PIL.Image.new(image.mode, (width, height), paper if image.mode == "L" else (paper,) * 3)
    canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    logger.warning(
        f"The {what} ({image.width}x{image.height}) has another aspect than the output ({width}x{height}): it was"
        f" fitted inside and padded{' with paper' if fill is None else ''}, not stretched. Pass `height` and `width`"
        f" of the {what}'s aspect to fill the image."
    )
    return canvas


def prepare_sketch(sketch: SketchInput, height: int, width: int, polarity: str = "light_on_dark") -> torch.Tensor:
    """Load, normalise and resize a sketch to a `(1, 3, height, width)` tensor in [-1, 1], ready for the VAE.

    Accepts a PIL image (modes 1, L, P, RGB, RGBA, LA: transparency is composited on white), a numpy array `(H, W)`,
    `(H, W, C)` or `(1, H, W, C)` or torch tensor `(C, H, W)` or `(1, C, H, W)` (uint8, bool, or float in [0, 1]),
    or a path to an image file. A sketch of another aspect than `height` x `width` is fitted inside and padded with
    paper (`fit_to_size`). Dark strokes on light paper and light
    strokes on dark paper are both accepted: the background is told by the median brightness, and the result is
    turned into `polarity`, the convention the LGP was trained on (`"light_on_dark"` or `"dark_on_light"`). The
    strokes are stretched to full contrast (`STROKE_INK_QUANTILE`, `MAX_STROKE_GAIN_DIVISOR`): a grey pencil line on
    grey paper asks for the same edge as a black line on white.

    Raises:
        ValueError: for an unreadable file, a bad array shape, an unknown polarity, or a blank sketch.
    """
    if polarity not in SKETCH_POLARITIES:
        raise ValueError(f"`polarity` must be 'light_on_dark' or 'dark_on_light', got {polarity!r}.")
    image = fit_to_size(_to_grayscale_image(sketch), height, width)
    gray = np.asarray(image, dtype=np.float32) / 255.0
    if gray.max() - gray.min() < MIN_STROKE_CONTRAST:
        raise ValueError(
            "The sketch is blank (one flat tone after resizing to the output size); draw some strokes, or pass"
            " `sketch=None` to generate without sketch guidance."
        )
    strokes = 1.0 - gray if np.median(gray) >= 0.5 else gray  # light strokes on dark paper
    paper, ink = np.median(strokes), np.quantile(strokes, STROKE_INK_QUANTILE)
    strokes = np.clip((strokes - paper) / max(ink - paper, MAX_STROKE_GAIN_DIVISOR), 0.0, 1.0)
    if polarity == "dark_on_light":
        strokes = 1.0 - strokes
    tensor = torch.from_numpy(strokes.astype(np.float32))[None, None].expand(1, 3, height, width)
    return tensor * 2.0 - 1.0


def prepare_map(
    guidance_map: SketchInput,
    height: int,
    width: int,
    map_kind: str = "edges",
    polarity: str = "light_on_dark",
    normalization: str = "none",
    invert: bool = False,
) -> torch.Tensor:
    """Load and prepare a guidance map for an LGP trained on maps of `map_kind`: a `(1, 3, height, width)` tensor in
    [-1, 1], ready for the VAE. Accepts every input `prepare_sketch` does.

    - `"edges"`: `prepare_sketch` (either polarity, turned into `polarity`; a blank sketch is an error).
    - `"silhouette"`: one grey channel, the shapes light on a dark background as the LGP was trained. Drawn either way:
      the paper is the tone of the map's border (`border_tone`), so shapes filled dark on white paper are turned
      round, however much of the page they cover.
    - `"depth"`: one grey channel, light is near (the convention of depth estimators' disparity output and of
      `prepare_data --map depth`), taken as it is; `invert=True` turns round a map that is dark where near (a
      distance map). Stretched to the full 0..1 range first where `normalization` is `"minmax"` (as in training).
    - `"color"`: the three channels kept as they are (segmentation colour maps, normal maps); padding is black.
    Transparent pixels and the padding of another aspect are black, the background, for every kind but edges.

    Raises:
        ValueError: for an unknown kind or normalisation, `invert` for a kind other than depth, an unreadable input,
            or a map that `"minmax"` cannot normalise (one flat tone).
    """
    if map_kind not in MAP_KINDS:
        raise ValueError(f"`map_kind` must be one of {MAP_KINDS}, got {map_kind!r}.")
    if normalization not in MAP_NORMALIZATIONS:
        raise ValueError(f"`normalization` must be one of {MAP_NORMALIZATIONS}, got {normalization!r}.")
    if invert and map_kind != "depth":
        raise ValueError(
            f"`invert_map` turns a depth map that is dark where near round; this LGP reads {map_kind} maps, which"
            " need no flag (sketches and silhouettes are read either way round, colour maps have no inverse)."
        )
    if map_kind == "edges":
        return prepare_sketch(guidance_map, height, width, polarity)
    raw = _high_range_grey(guidance_map) if normalization == "minmax" and map_kind in GREY_MAP_KINDS else None
    if raw is not None:  # raw depth (metres, disparities) or a 16-bit map: stretched from its own range
        image = _stretch(raw, map_kind, min_range=0.0)
    else:
        image = to_image(guidance_map, paper=0).convert("L" if map_kind in GREY_MAP_KINDS else "RGB")
        if map_kind == "silhouette" and border_tone(np.asarray(image)) >= 128:
            image = PIL.ImageOps.invert(image)  # shapes drawn dark on light paper
        if normalization == "minmax":
            image = _stretch(np.asarray(image, dtype=np.float32), map_kind, min_range=MIN_STROKE_CONTRAST * 255)
    if invert:
        image = PIL.ImageOps.invert(image)  # before fitting: the padding stays background (far)
    image = fit_to_size(image, height, width, fill=0, what=f"{map_kind} map")
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.max() - array.min() < MIN_STROKE_CONTRAST:
        logger.warning(f"The {map_kind} map is one flat tone: it asks for the same value everywhere.")
    tensor = torch.from_numpy(array)
    tensor = tensor[None, None].expand(1, 3, height, width) if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]
    return tensor.contiguous() * 2.0 - 1.0


def border_tone(grey: np.ndarray) -> float:
    """The median tone of a grey image's outermost pixels: the paper a map is drawn on. A filled shape may cover most of
    the page (its median is then the shape's), but rarely all of its edge."""
    edge = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
    return float(np.median(edge))


def _high_range_grey(guidance_map: SketchInput) -> np.ndarray | None:
    """A one-channel map whose values are not 8-bit tones (a float or 16-bit array or tensor, a PIL image or file in
    mode I or F: raw depth, say) as float32 `(H, W)`, for min-max normalisation from its own range; else `None`."""
    value = guidance_map
    if isinstance(value, (str, os.PathLike)):
        try:
            with PIL.Image.open(value) as opened:
                return np.asarray(opened, dtype=np.float32) if opened.mode.startswith(("I", "F")) else None
        except (OSError, ValueError):
            return None  # `to_image` says what is wrong with the file
    if isinstance(value, PIL.Image.Image):
        return np.asarray(value, dtype=np.float32) if value.mode.startswith(("I", "F")) else None
    if isinstance(value, torch.Tensor) and value.dtype not in (torch.uint8, torch.bool):
        value = value.detach().cpu().float().numpy()
    elif not isinstance(value, np.ndarray) or value.dtype in (np.uint8, np.bool_):
        return None
    squeezed = np.squeeze(value.astype(np.float32))
    return squeezed if squeezed.ndim == 2 else None


def _stretch(values: np.ndarray, map_kind: str, min_range: float) -> PIL.Image.Image:
    """`values` ((H, W) or (H, W, 3)) stretched to the full 0..255 range, as `"minmax"` maps were in training."""
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if not np.isfinite([low, high]).all() or high - low <= min_range or not np.isfinite(values).all():
        raise ValueError(
            f"The {map_kind} map is one flat tone (or not finite), so it cannot be normalised to the range this LGP was"
            " trained on; pass a map with some variation, or `sketch=None` to generate without guidance."
        )
    return PIL.Image.fromarray(((values - low) * (255.0 / (high - low))).round().astype(np.uint8))


def prepare_sketch_mask(mask: SketchInput, height: int, width: int) -> torch.Tensor:
    """Where the sketch applies, as a `(1, 1, height, width)` weight in [0, 1] (pass the latents' size).

    White (1) where the sketch's strokes and its blank paper are both instructions, black (0) where the prompt alone
    decides; grey between. Any input `prepare_sketch` takes; one of another aspect is fitted and padded with black.

    Raises:
        ValueError: for a mask that is black everywhere (nothing of the sketch would apply).
    """
    image = fit_to_size(_to_grayscale_image(mask), height, width, fill=0, what="sketch mask")
    weight = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
    if not weight.any():
        raise ValueError(
            "The sketch mask is black everywhere, so no part of the sketch would apply: make it white where the sketch"
            " should be followed, or pass `sketch_mask=None` to follow all of it."
        )
    return weight
