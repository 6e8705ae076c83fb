"""Sketch-guided text-to-image generation for diffusers (Voynov, Aberman, Cohen-Or, SIGGRAPH 2023).

The names below load on first use (as diffusers' own do), so that `import pipeline_sketch_guided` and the command line's
`--help` start at once, and the command line can quiet the libraries before they load.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("pipeline_sketch_guided")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "BLOCK_PRESETS": ".lgp",
    "LGPModel": ".lgp",
    "SketchGuidedFluxPipeline": ".pipeline_flux",
    "SketchGuidedFluxPipelineOutput": ".pipeline_flux",
    "SketchGuidedStableDiffusion3Pipeline": ".pipeline_sd3",
    "SketchGuidedStableDiffusion3PipelineOutput": ".pipeline_sd3",
    "SketchGuidedStableDiffusionPipeline": ".pipeline",
    "SketchGuidedStableDiffusionPipelineOutput": ".pipeline",
    "SketchGuidedStableDiffusionXLPipeline": ".pipeline_xl",
    "SketchGuidedStableDiffusionXLPipelineOutput": ".pipeline_xl",
    "capture_activations": ".capture",
    "load_demo_pipeline": ".demo",
    "noise_level_map": ".lgp",
    "prepare_sketch": ".sketch",
}
__all__ = [
    "BLOCK_PRESETS",
    "LGPModel",
    "SketchGuidedFluxPipeline",
    "SketchGuidedFluxPipelineOutput",
    "SketchGuidedStableDiffusion3Pipeline",
    "SketchGuidedStableDiffusion3PipelineOutput",
    "SketchGuidedStableDiffusionPipeline",
    "SketchGuidedStableDiffusionPipelineOutput",
    "SketchGuidedStableDiffusionXLPipeline",
    "SketchGuidedStableDiffusionXLPipelineOutput",
    "capture_activations",
    "load_demo_pipeline",
    "noise_level_map",
    "prepare_sketch",
]

if TYPE_CHECKING:
    from .capture import capture_activations
    from .demo import load_demo_pipeline
    from .lgp import BLOCK_PRESETS, LGPModel, noise_level_map
    from .pipeline import SketchGuidedStableDiffusionPipeline, SketchGuidedStableDiffusionPipelineOutput
    from .pipeline_flux import SketchGuidedFluxPipeline, SketchGuidedFluxPipelineOutput
    from .pipeline_sd3 import SketchGuidedStableDiffusion3Pipeline, SketchGuidedStableDiffusion3PipelineOutput
    from .pipeline_xl import SketchGuidedStableDiffusionXLPipeline, SketchGuidedStableDiffusionXLPipelineOutput
    from .sketch import prepare_sketch


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
