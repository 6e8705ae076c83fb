"""Fixtures: tiny Stable Diffusion components built from configs, so every test runs offline on the CPU in seconds."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import pytest
import torch

from pipeline_sketch_guided import SketchGuidedStableDiffusionPipeline
from pipeline_sketch_guided.testing import random_lgp, tiny_components


def pytest_configure(config):
    # Under pytest-xdist (`-n 2`) the workers share the cores: each takes its share of torch's threads, since more
    # threads than cores run many times slower than one each.
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.fixture
def components() -> dict:
    return tiny_components()


@pytest.fixture
def pipe(components) -> SketchGuidedStableDiffusionPipeline:
    pipe = SketchGuidedStableDiffusionPipeline(**components, lgp=random_lgp(components["unet"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw_square(size: int = 32, dark_on_light: bool = True) -> PIL.Image.Image:
    """A square outline, 2 pixels wide."""
    paper, ink = (255, 0) if dark_on_light else (0, 255)
    array = np.full((size, size), paper, dtype=np.uint8)
    lo, hi = size // 4, 3 * size // 4
    array[lo : lo + 2, lo:hi] = ink
    array[hi - 2 : hi, lo:hi] = ink
    array[lo:hi, lo : lo + 2] = ink
    array[lo:hi, hi - 2 : hi] = ink
    return PIL.Image.fromarray(array)
