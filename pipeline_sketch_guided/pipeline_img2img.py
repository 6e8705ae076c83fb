"""SketchGuidedStableDiffusionImg2ImgPipeline: Stable Diffusion 1.x/2.x image-to-image steered by a sketch through a
Latent Guidance Predictor.

Loadable as a package module or as a diffusers custom pipeline (this file, with its sibling modules). The guided step is
guidance.py's, shared with every other pipeline; editing.py holds what the editing pipelines share.
"""

import torch
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

# diffusers copies a local custom pipeline's modules by this file's own relative imports: each module is imported here.
from .capture import capture_activations  # noqa: F401
from .editing import SketchGuidedEditingMixin, SketchGuidedEditingPipelineOutput, sketch_guided_signature
from .fill import fill_sketch  # noqa: F401
from .guidance import SketchGuidanceMixin
from .lgp import LGPModel
from .sketch import SketchInput  # noqa: F401


class SketchGuidedStableDiffusionImg2ImgPipeline(
    SketchGuidedEditingMixin, SketchGuidanceMixin, StableDiffusionImg2ImgPipeline
):
    r"""
    [`StableDiffusionImg2ImgPipeline`] that follows a sketch (Voynov et al., "Sketch-Guided Text-to-Image Diffusion
    Models", 2023).

    The photo (`image`) is noised to `strength` and denoised with the prompt, as `StableDiffusionImg2ImgPipeline`
    does; the sketch steers the first guided fraction of the steps it runs. The images take the photo's size.

    Every argument of the parent's `__call__` works as there, and without a sketch (or at `sketch_guidance_scale=0`) the
    output is the parent's, bit for bit. The sketch arguments are those of
    [`SketchGuidedStableDiffusionPipeline.__call__`]; the guided fraction counts the steps this call runs (with
    `strength` < 1, about `strength` x `num_inference_steps`). `from_pipe` moves between this pipeline and the other
    sketch-guided ones, sharing the LGP and the fill LGP.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder,
            requires_safety_checker: as for [`StableDiffusionImg2ImgPipeline`].
        lgp ([`LGPModel`], *optional*):
            The Latent Guidance Predictor trained for this `unet`, checked against it when set.
        fill_lgp ([`LGPModel`], *optional*):
            The fill LGP (`map_kind="silhouette"`) of [`SketchGuidedStableDiffusionPipeline`]: with it, a sketch is
            guided with its fill too (`sketch_fill`, `sketch_fill_scale`).
    """

    _optional_components = [*StableDiffusionImg2ImgPipeline._optional_components, "lgp", "fill_lgp"]
    output_class = SketchGuidedEditingPipelineOutput

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = True,
        lgp: LGPModel | None = None,
        fill_lgp: LGPModel | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_modules(lgp=lgp, fill_lgp=fill_lgp)

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        return self.sketch_guided_call(*args, **kwargs)

    __call__.__signature__ = sketch_guided_signature(StableDiffusionImg2ImgPipeline.__call__)
