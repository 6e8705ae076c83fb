"""Loading a sketch-guided pipeline by name: the shipped demo model or any saved Stable Diffusion or FLUX model, with
an LGP. Shared by the command line, the training programs and the benchmarks."""

from __future__ import annotations

# Scheduler names (the command line's `--scheduler`): diffusers' schedulers for Stable Diffusion 1.x/2.x/XL
# (KarrasDiffusionSchedulers), by their usual names, and for the flow-matching models.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++_single": "DPMSolverSinglestepScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "dpm2_a": "KDPM2AncestralDiscreteScheduler",
    "deis": "DEISMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "dpm_sde": "DPMSolverSDEScheduler",
    "edm_euler": "EDMEulerScheduler",
    # For flow-matching models (SD3, FLUX.1)
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "flow_heun": "FlowMatchHeunDiscreteScheduler",
}


def set_scheduler(pipe, name: str) -> None:
    """Give `pipe` the scheduler `name` (a key of SCHEDULERS) from its own scheduler's config; a `ValueError` when it
    is of the other kind (a flow-matching sampler on a DDPM-schedule model, or the reverse), which would draw noise."""
    import diffusers

    flow_model = "FlowMatch" in type(pipe.scheduler).__name__
    if name.startswith("flow_") != flow_model:
        kind, choices = ("a flow-matching", "flow_*") if flow_model else ("a DDPM-schedule", "the others")
        raise ValueError(
            f"{type(pipe).__name__} samples with {kind} scheduler ({type(pipe.scheduler).__name__}); {name!r} is not"
            f" one. Choose among {choices}, or leave the model's own."
        )
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def load_pipeline(
    model: str | None,
    lgp: str | None,
    device: str | None = None,
    torch_dtype=None,
    demo_map: str | None = None,
    fill_lgp: str | None = None,
    **kwargs,
):
    """The demo pipeline (`model=None`, with its LGP for `demo_map`, edges by default) or the Stable Diffusion model at
    `model` (a folder or Hub id, loaded with `kwargs` as for `from_pretrained`), with the LGP at `lgp` and the fill LGP
    at `fill_lgp` when given, on `device`.

    `torch_dtype` defaults to float16 on a GPU and float32 on the CPU.
    """
    import torch

    from .demo import load_demo_pipeline
    from .lgp import LGPModel
    from .utils import dtype_kwargs

    if torch_dtype is None:
        torch_dtype = torch.float16 if device is not None and device.startswith("cuda") else torch.float32
    if model is None:
        pipe = load_demo_pipeline(torch_dtype=torch_dtype, map=demo_map or "edges")
    else:
        pipeline_class = pipeline_class_for(model, revision=kwargs.get("revision"))
        kwargs = {**absent_components(model, revision=kwargs.get("revision")), **kwargs}
        pipe = pipeline_class.from_pretrained(model, **dtype_kwargs(torch_dtype), **kwargs)
    if lgp is not None:
        pipe.lgp = LGPModel.from_pretrained(lgp, **dtype_kwargs(torch_dtype))
    if fill_lgp is not None:
        load_fill_lgp(pipe, fill_lgp, torch_dtype)
    return pipe.to(device) if device is not None else pipe


def load_fill_lgp(pipe, fill_lgp: str, torch_dtype) -> None:
    """Set the fill LGP at `fill_lgp` (a folder or Hub id) as `pipe.fill_lgp`, in `torch_dtype`, on the pipeline's
    device. The pipeline refuses one it cannot guide with (another map kind, another base model): `ValueError`."""
    from .lgp import LGPModel
    from .utils import dtype_kwargs

    pipe.fill_lgp = LGPModel.from_pretrained(fill_lgp, **dtype_kwargs(torch_dtype)).to(pipe.device)


def pipeline_class_for(model: str, revision: str | None = None):
    """The sketch-guided pipeline for a saved model, by the class its `model_index.json` names: the FLUX one for
    FLUX.1, the SD3 one for Stable Diffusion 3 / 3.5, the SDXL one for Stable Diffusion XL, the SD 1.x/2.x one
    otherwise."""
    from diffusers import DiffusionPipeline

    from .pipeline import SketchGuidedStableDiffusionPipeline
    from .pipeline_flux import SketchGuidedFluxPipeline
    from .pipeline_sd3 import SketchGuidedStableDiffusion3Pipeline
    from .pipeline_xl import SketchGuidedStableDiffusionXLPipeline

    class_name = DiffusionPipeline.load_config(model, revision=revision).get("_class_name", "")
    if "Flux" in class_name:
        return SketchGuidedFluxPipeline
    if "StableDiffusion3" in class_name:
        return SketchGuidedStableDiffusion3Pipeline
    return SketchGuidedStableDiffusionXLPipeline if "XL" in class_name else SketchGuidedStableDiffusionPipeline


def absent_components(model: str, revision: str | None = None) -> dict[str, None]:
    """The components a saved pipeline lacks (`[null, null]` in its model_index.json, as `save_pretrained` writes a
    component that was `None`, such as an SD3 saved without its T5 encoder), as `None` keyword arguments for
    `from_pretrained`, which otherwise asks for every component that is not optional, even one saved as `None`."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(model, revision=revision)
    return {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, (list, tuple)) and all(part is None for part in value)
    }


def editing_pipeline(pipe, image: bool, mask: bool):
    """`pipe` as the editing pipeline of its family that takes an `image` (img2img) and a `mask_image` (inpainting), by
    `from_pipe` (the same components, LGP included); `pipe` itself without an image. A `ValueError` for a mask without
    an image, or for the families that have no sketch-guided editing pipeline yet (SD3, FLUX)."""
    from .pipeline import SketchGuidedStableDiffusionPipeline
    from .pipeline_img2img import SketchGuidedStableDiffusionImg2ImgPipeline
    from .pipeline_inpaint import SketchGuidedStableDiffusionInpaintPipeline
    from .pipeline_xl import SketchGuidedStableDiffusionXLPipeline
    from .pipeline_xl_img2img import SketchGuidedStableDiffusionXLImg2ImgPipeline
    from .pipeline_xl_inpaint import SketchGuidedStableDiffusionXLInpaintPipeline

    if mask and not image:
        raise ValueError("A mask image says which part of an image to repaint: give the image too.")
    if not image:
        return pipe
    families = {
        SketchGuidedStableDiffusionPipeline: (
            SketchGuidedStableDiffusionImg2ImgPipeline,
            SketchGuidedStableDiffusionInpaintPipeline,
        ),
        SketchGuidedStableDiffusionXLPipeline: (
            SketchGuidedStableDiffusionXLImg2ImgPipeline,
            SketchGuidedStableDiffusionXLInpaintPipeline,
        ),
    }
    for text_to_image, (img2img, inpaint) in families.items():
        if isinstance(pipe, (text_to_image, img2img, inpaint)):
            target = inpaint if mask else img2img
            return pipe if type(pipe) is target else target.from_pipe(pipe)
    raise ValueError(
        f"Editing an image with a sketch works on Stable Diffusion 1.x/2.x and XL; {type(pipe).__name__} has no"
        " image-to-image or inpainting version yet."
    )
