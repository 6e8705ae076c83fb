"""Sketch-guided text-to-image generation for diffusers (Voynov, Aberman, Cohen-Or, SIGGRAPH 2023)."""

from .capture import capture_activations
from .lgp import BLOCK_PRESETS, LGPModel, noise_level_map
from .pipeline import SketchGuidedStableDiffusionPipeline, SketchGuidedStableDiffusionPipelineOutput
from .sketch import prepare_sketch

__all__ = [
    "BLOCK_PRESETS",
    "LGPModel",
    "SketchGuidedStableDiffusionPipeline",
    "SketchGuidedStableDiffusionPipelineOutput",
    "capture_activations",
    "noise_level_map",
    "prepare_sketch",
]
