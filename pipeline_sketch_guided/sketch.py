"""Turn a user's sketch (any format, either polarity) into the image the LGP's training edge maps looked like."""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

SketchInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike]

# How strokes look against the paper; an LGP's config names the one its training edge maps had.
SKETCH_POLARITIES = ("light_on_dark", "dark_on_light")

# A sketch whose darkest and lightest pixels differ by less than this (in [0, 1]) has no strokes to follow.
MIN_STROKE_CONTRAST = 0.05
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


def _to_grayscale_image(sketch: SketchInput) -> PIL.Image.Image:
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
        # Transparent pixels are paper: composite on white.
        rgba = sketch.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        sketch = PIL.Image.alpha_composite(background, rgba)
    return sketch.convert("L")


def fit_to_size(
    image: PIL.Image.Image, height: int, width: int, fill: int | None = None, what: str = "sketch"
) -> PIL.Image.Image:
    """`image` (grayscale) resized to `width` x `height`; one of another aspect is fitted inside, centred, and padded
    with `fill` (by default its paper, its median tone), never stretched, with a warning that says so."""
    # BOX averages every source pixel into the result, so thin strokes fade instead of vanishing when shrunk.
    box = PIL.Image.Resampling.BOX
    if abs(image.width * height / (image.height * width) - 1) <= ASPECT_TOLERANCE:
        return image.resize((width, height), resample=box)
    scale = min(width / image.width, height / image.height)
    fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample=box)
    paper = int(np.median(np.asarray(image))) if fill is None else fill
    canvas = PIL.Image.new("L", (width, height), paper)
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
    turned into `polarity`, the convention the LGP was trained on (`"light_on_dark"` or `"dark_on_light"`).

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
    light_background = np.median(gray) >= 0.5
    if light_background != (polarity == "dark_on_light"):
        gray = 1.0 - gray
    tensor = torch.from_numpy(gray)[None, None].expand(1, 3, height, width)
    return tensor * 2.0 - 1.0


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
