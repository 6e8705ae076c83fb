"""Writing images: atomically, with the settings that made them in a PNG's metadata. Shared by the command line, `batch`
and the canvas."""

from __future__ import annotations

import math
import os


def png_metadata(settings: dict):
    """The settings as PNG text chunks: `parameters` in the one-line form other generators write, and `sketch_guided`
    as JSON."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    first = f"{settings['prompt']}\n"
    if settings.get("negative_prompt"):
        first += f"Negative prompt: {settings['negative_prompt']}\n"
    rest = {k: v for k, v in settings.items() if k not in ("prompt", "negative_prompt") and v is not None}
    info.add_text("parameters", first + ", ".join(f"{k}: {v}" for k, v in rest.items()))
    info.add_text("sketch_guided", json.dumps(settings))
    return info


def save_image(image, path: str, settings: dict | None = None, extra_text: dict[str, str] | None = None) -> None:
    """Write through a temporary file (one per process) and rename, so that an interrupted write leaves no half image.
    A PNG gets `settings` (`png_metadata`) and `extra_text` in its text chunks."""
    extension = os.path.splitext(path)[1]
    temporary = f"{path}.{os.getpid()}.tmp{extension}"
    kwargs = {}
    if settings and extension.lower() == ".png":
        info = png_metadata(settings)
        for key, value in (extra_text or {}).items():
            info.add_text(key, value)
        kwargs["pnginfo"] = info
    image.save(temporary, **kwargs)
    os.replace(temporary, path)


def file_sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def image_grid(images: list):
    """The images in a near-square grid, row by row, on white (one image is returned as it is)."""
    import PIL.Image

    if len(images) == 1:
        return images[0]
    columns = math.ceil(math.sqrt(len(images)))
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (columns * width, math.ceil(len(images) / columns) * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, (index % columns * width, index // columns * height))
    return grid
