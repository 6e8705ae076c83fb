"""Tiny, randomly initialised Stable Diffusion (1.x, XL, 3) and FLUX components built from configs, for tests and
offline smoke runs.

Nothing here is downloaded: the tokenizers' vocabularies are written out in code. The images such a model draws are
noise; what it shows is that the machinery runs, end to end, on any machine.
"""

from __future__ import annotations

import itertools
import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .lgp import LGPModel
from .pipeline import SketchGuidedStableDiffusionPipeline
from .pipeline_flux import SketchGuidedFluxPipeline
from .pipeline_sd3 import SketchGuidedStableDiffusion3Pipeline
from .pipeline_xl import SketchGuidedStableDiffusionXLPipeline

# Words that the tiny tokenizer keeps whole; any other word is spelled in letters.
WORDS = ["a", "red", "blue", "circle", "square", "star", "cat", "on", "the", "grey", "background"]


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until no pair has a merge."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(pieces))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def tiny_tokenizer(words: list[str] = WORDS, model_max_length: int = 16) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the special tokens, single letters (with and without the end-of-word mark)
    and `words`, each a single token."""
    letters = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [f"{c}</w>" for c in letters]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Add merges until BPE, with every merge so far, joins the word into one token.
        while len(pieces := _bpe([*word[:-1], word[-1] + "</w>"], ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            tokens.append(pieces[0] + pieces[1])
    merges = [f"{a} {b}" for a, b in ranks]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    # Files, because that is what every transformers version's CLIPTokenizer reads.
    with tempfile.TemporaryDirectory(prefix="tiny_clip_tokenizer_") as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length)


def tiny_unet(**overrides) -> UNet2DConditionModel:
    """A two-level UNet for 16x16 latents (seeded), SD 1.x-like unless `overrides` say otherwise."""
    config = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "norm_num_groups": 16,
        "attention_head_dim": 8,
    }
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**config, **overrides})


def tiny_text_config(tokenizer: CLIPTokenizer, **overrides) -> CLIPTextConfig:
    """A two-layer CLIP text encoder's config over `tokenizer`'s vocabulary, unless `overrides` say otherwise."""
    config = {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
    }
    return CLIPTextConfig(**{**config, **overrides})


def tiny_components() -> dict:
    unet = tiny_unet()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=16,
    )
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def random_lgp(unet: UNet2DConditionModel, seed: int = 0, **kwargs) -> LGPModel:
    torch.manual_seed(seed)
    return LGPModel.from_unet(unet, hidden_dims=[32, 16], **kwargs).eval()


def tiny_random_pipeline(seed: int = 0) -> SketchGuidedStableDiffusionPipeline:
    """A tiny random `SketchGuidedStableDiffusionPipeline` (32x32 images) with a random LGP."""
    components = tiny_components()
    pipe = SketchGuidedStableDiffusionPipeline(**components, lgp=random_lgp(components["unet"], seed=seed))
    return pipe


def tiny_sdxl_components() -> dict:
    """A tiny SDXL: two text encoders (the second with a projection, whose pooled output and the size and crop
    conditioning make the UNet's `text_time` embedding), a UNet with linear projections in its transformers."""
    unet = tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=8 * 6 + 32,  # 6 size / crop numbers embedded, + the pooled text
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
    )
    components = tiny_components()
    tokenizer = components["tokenizer"]
    text_config = tiny_text_config(tokenizer, projection_dim=32)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    return {
        "vae": components["vae"],
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_tokenizer(),
        "unet": unet,
        "scheduler": components["scheduler"],
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def tiny_random_sdxl_pipeline(seed: int = 0) -> SketchGuidedStableDiffusionXLPipeline:
    """A tiny random `SketchGuidedStableDiffusionXLPipeline` (32x32 images) with a random LGP."""
    components = tiny_sdxl_components()
    return SketchGuidedStableDiffusionXLPipeline(**components, lgp=random_lgp(components["unet"], seed=seed))


def tiny_t5_tokenizer(words: list[str] = WORDS, model_max_length: int = 16) -> T5TokenizerFast:
    """A T5 tokenizer (SentencePiece-style unigram) whose vocabulary is T5's special tokens, `words` (each one token)
    and single letters, for any other word."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{word}", -1.0) for word in words] + [(c, -3.0) for c in string.ascii_lowercase]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def tiny_t5_encoder(tokenizer: T5TokenizerFast, d_model: int = 32) -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()  # built in training mode, whose dropout would make every call differ


def tiny_flow_vae(latent_channels: int) -> AutoencoderKL:
    """A two-level VAE (images 2x the latents' side) with SD3's and FLUX's shift and scaling factors."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=latent_channels,
        norm_num_groups=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def tiny_sd3_components() -> dict:
    """A tiny SD3: three text encoders (two CLIP with projections, one T5), a 4-block MMDiT over 2x2 patches of
    16x16 latents (32x32 images), the flow-matching scheduler."""
    tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer()
    text_config = tiny_text_config(tokenizer, projection_dim=32)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(text_config)
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # the two CLIP encoders' hidden states side by side; T5's width
        pooled_projection_dim=64,  # both CLIP encoders' pooled projections
        out_channels=4,
        pos_embed_max_size=32,
    )
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": tiny_flow_vae(latent_channels=4),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tiny_tokenizer(),
        "text_encoder_3": tiny_t5_encoder(t5_tokenizer, d_model=64),
        "tokenizer_3": t5_tokenizer,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_flux_components() -> dict:
    """A tiny FLUX.1: a CLIP and a T5 text encoder, a transformer of 2 double- and 2 single-stream blocks over latents
    of 4 channels packed 2x2 into tokens (16x16 latents, 32x32 images), the flow-matching scheduler."""
    tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, projection_dim=32))
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": tiny_flow_vae(latent_channels=4),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": tiny_t5_encoder(t5_tokenizer, d_model=32),
        "tokenizer_2": t5_tokenizer,
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }


def random_transformer_lgp(transformer, seed: int = 0, **kwargs) -> LGPModel:
    torch.manual_seed(seed)
    return LGPModel.from_transformer(transformer, hidden_dims=[32, 16], **kwargs).eval()


def tiny_random_sd3_pipeline(seed: int = 0) -> SketchGuidedStableDiffusion3Pipeline:
    """A tiny random `SketchGuidedStableDiffusion3Pipeline` (32x32 images) with a random LGP."""
    components = tiny_sd3_components()
    lgp = random_transformer_lgp(components["transformer"], seed=seed)
    return SketchGuidedStableDiffusion3Pipeline(**components, lgp=lgp)


def tiny_random_flux_pipeline(seed: int = 0) -> SketchGuidedFluxPipeline:
    """A tiny random `SketchGuidedFluxPipeline` (32x32 images) with a random LGP."""
    components = tiny_flux_components()
    return SketchGuidedFluxPipeline(**components, lgp=random_transformer_lgp(components["transformer"], seed=seed))
