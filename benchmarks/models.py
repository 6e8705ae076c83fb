"""Model configurations shared by the benchmarks.

`sd15-random` is Stable Diffusion 1.5's architecture (UNet, VAE, CLIP ViT-L/14 text encoder) randomly initialised: the
cost of a step does not depend on the weights, and nothing is downloaded.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipeline_sketch_guided import loading
from pipeline_sketch_guided.lgp import LGPModel
from pipeline_sketch_guided.pipeline import SketchGuidedStableDiffusionPipeline
from pipeline_sketch_guided.pipeline_xl import SketchGuidedStableDiffusionXLPipeline
from pipeline_sketch_guided.testing import tiny_random_pipeline, tiny_random_sdxl_pipeline, tiny_tokenizer
from pipeline_sketch_guided.utils import dtype_kwargs

# Stable Diffusion 1.5's published component configurations (UNet, VAE, CLIP ViT-L/14 text encoder).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}

# Stable Diffusion XL base 1.0's published configurations: the UNet (3 levels, 10 transformer layers at the lowest),
# the VAE (SD's architecture, which overflows in float16: `force_upcast`), and the second text encoder (OpenCLIP
# ViT-bigG/14 with its projection); the first text encoder is SD15_TEXT.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT_2 = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


# Models built with random weights: their cost is real, their images are not (sketch agreement is measured elsewhere).
RANDOM_MODELS = ("tiny", "tiny-sdxl", "sd15-random", "sdxl-random")


def build_pipeline(model: str, lgp: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The pipeline to measure: `tiny`, `tiny-sdxl`, `sd15-random`, `sdxl-random`, `demo`, or a Hub id / folder of a
    Stable Diffusion (XL) model.

    Without `lgp`, a model other than the demo gets a randomly initialised LGP reading the sketch2img blocks (the cost
    of guidance does not depend on the LGP's weights). Random models are built on `device` (SDXL's 3.5 billion
    parameters initialise in seconds on a GPU, in minutes on a CPU).
    """
    if model == "tiny":
        pipe = tiny_random_pipeline()
    elif model == "tiny-sdxl":
        pipe = tiny_random_sdxl_pipeline()
    elif model == "sdxl-random":
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
            vae = AutoencoderKL(**SDXL_VAE).to(dtype)
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).to(dtype)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)).to(dtype)
            lgp_model = LGPModel.from_unet(unet).eval().to(dtype)
        tokenizer = tiny_tokenizer(model_max_length=SD15_TEXT["max_position_embeddings"])
        pipe = SketchGuidedStableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=EulerDiscreteScheduler(**SD15_SCHEDULER, timestep_spacing="leading", steps_offset=1),
            add_watermarker=False,
            lgp=lgp_model,
        )
    elif model == "sd15-random":
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        scheduler = DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        tokenizer = tiny_tokenizer(model_max_length=SD15_TEXT["max_position_embeddings"])
        pipe = SketchGuidedStableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            lgp=LGPModel.from_unet(unet).eval(),
        )
    else:
        kwargs = {"safety_checker": None, "requires_safety_checker": False}
        pipe = loading.load_pipeline(None if model == "demo" else model, None, torch_dtype=dtype, **kwargs)
    if lgp is not None:
        pipe.lgp = LGPModel.from_pretrained(lgp, **dtype_kwargs(dtype))
    elif pipe.lgp is None:
        torch.manual_seed(0)
        pipe.lgp = LGPModel.from_unet(pipe.unet).eval()
    pipe.set_progress_bar_config(disable=True)
    # Every timed generation pays the sketch's VAE encode, as a first call does (the cache would hide it after one).
    pipe.sketch_cache_size = 0
    return pipe if pipe.unet.dtype == dtype else pipe.to(dtype=dtype)
