"""How `train_lgp` runs each family of base model: the noising of the training latents, the LGP's noise-level input, the
captions' conditioning and the denoiser's forward, for UNets on a DDPM schedule (SD 1.x/2.x, SDXL) and for diffusion
transformers on a flow-matching one (SD3, FLUX.1).

Each is what the sketch-guided pipeline of that family does while sampling (guidance.py), so that the LGP learns on the
features and noise levels it will read there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from pipeline_sketch_guided import LGPModel

# With an inpainting UNet: the share of examples whose mask is the whole image (nothing known, as in text-to-image),
# and the smallest side of the other examples' box masks, as a fraction of the image's.
WHOLE_IMAGE_MASK_FRACTION = 0.25
SMALLEST_MASK_SIDE = 0.25


def inpainting_mask(index: int, resolution: int, seed: int) -> torch.Tensor:
    """The repaint mask `(1, resolution, resolution)` (1 = repaint) of example `index` for an inpainting UNet: the whole
    image for a quarter of the examples, else a box of random size (a quarter of the side to all of it) and place.
    A function of its arguments only, so that cached, uncached and resumed runs see the same masks."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    mask = torch.zeros(1, resolution, resolution)
    if torch.rand(1, generator=generator).item() < WHOLE_IMAGE_MASK_FRACTION:
        return mask + 1
    height, width = torch.randint(int(SMALLEST_MASK_SIDE * resolution), resolution + 1, (2,), generator=generator)
    top = torch.randint(0, resolution - height + 1, (1,), generator=generator).item()
    left = torch.randint(0, resolution - width + 1, (1,), generator=generator).item()
    mask[:, top : top + height, left : left + width] = 1
    return mask


def inpainting_inputs(
    encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """What an inpainting UNet reads after the latents, made as `StableDiffusionInpaintPipeline` makes them from images
    in [-1, 1] and their masks (1 where to repaint): the binarised mask at the latents' size (nearest), then
    `encode`(the image with the masked pixels zeroed), `encode` giving scaled latents."""
    masks = (masks.to(pixels.device) >= 0.5).float()
    masked_latents = encode(pixels * (masks < 0.5))
    small_masks = F.interpolate(masks, size=masked_latents.shape[-2:]).to(masked_latents)
    return torch.cat([small_masks, masked_latents], dim=1)


class UNetDenoiser:
    """SD 1.x/2.x and SDXL: z_t = sqrt(alphabar_t) E(x) + sqrt(1 - alphabar_t) noise on the base model's DDPM schedule,
    integer timesteps. An inpainting UNet (9 input channels) reads, after z_t, a repaint mask and the latents of the
    masked image (`inpainting_inputs`)."""

    default_block_preset = "sketch2img"
    inpainting = False

    def __init__(self, base, resolution: int):
        self.base, self.resolution = base, resolution
        self.module: nn.Module = base.unet
        self.schedule = DDPMScheduler.from_config(base.scheduler.config)
        self.num_train_timesteps = self.schedule.config.num_train_timesteps
        latent_channels, in_channels = base.vae.config.latent_channels, self.module.config.in_channels
        if in_channels not in (latent_channels, 2 * latent_channels + 1):
            raise ValueError(
                f"This UNet takes {in_channels} input channels: train_lgp reads UNets that take the VAE's"
                f" {latent_channels} latent channels, or inpainting UNets that take {2 * latent_channels + 1} (the"
                " latents, the mask, the masked image's latents)."
            )
        self.inpainting = in_channels != latent_channels

    @property
    def latent_multiple(self) -> int:
        """What the training resolution must be a multiple of: the VAE's factor times the UNet's downsamplings."""
        return self.base.vae_scale_factor * 2 ** (len(self.module.down_blocks) - 1)

    def new_lgp(self, blocks: Sequence[str] | None, preset: str | None, **config) -> LGPModel:
        return LGPModel.from_unet(self.module, blocks=blocks, preset=preset or self.default_block_preset, **config)

    def conditioning(self, captions: list[str], branch: str) -> dict[str, Any]:
        """The denoiser's keyword arguments for these captions on `branch`: the captions' embeddings (conditional), or
        the pipeline's embeddings of an empty negative prompt (unconditional); SDXL's pooled embeddings and size
        conditioning (an uncropped square image of the training resolution)."""
        base, device, unconditional = self.base, self.base._execution_device, branch == "unconditional"
        if not hasattr(base, "text_encoder_2"):
            embeds = base.encode_prompt(captions, device, 1, unconditional)
            return {"encoder_hidden_states": embeds[1 if unconditional else 0]}
        embeds = base.encode_prompt(captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        hidden_states, pooled = (embeds[1], embeds[3]) if unconditional else (embeds[0], embeds[2])
        size = (self.resolution, self.resolution)
        projection_dim = base.text_encoder_2.config.projection_dim
        time_ids = base._get_add_time_ids(size, (0, 0), size, hidden_states.dtype, projection_dim)
        time_ids = time_ids.to(device).repeat(len(captions), 1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return {"encoder_hidden_states": hidden_states, "added_cond_kwargs": added}

    def noisy_latents(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.schedule.add_noise(latents.float(), noise.float(), timesteps)

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """alphabar of each timestep, for the LGP's noise-level input sqrt(1 - alphabar) noise."""
        return self.schedule.alphas_cumprod.to(timesteps.device)[timesteps]

    def inpainting_inputs(self, pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor | None:
        """What an inpainting UNet reads after the latents, made as `StableDiffusionInpaintPipeline` makes them from an
        image in [-1, 1] and its mask (1 where to repaint): the binarised mask at the latents' size (nearest), then
        the latents of the image with the masked pixels zeroed (the posterior's mean, as for the training latents,
        where the pipeline draws a sample). `None` for any other denoiser."""
        if not self.inpainting:
            return None
        return inpainting_inputs(self.base.encode_to_latents, pixels.to(self.base.vae.device), masks)

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, Any],
        inpainting: torch.Tensor | None = None,
    ) -> Any:
        if self.inpainting:
            if inpainting is None:
                raise ValueError("An inpainting UNet needs its mask and masked-image latents (`inpainting_inputs`).")
            noisy = torch.cat([noisy, inpainting.to(noisy)], dim=1)
        return self.module(noisy.to(self.module.dtype), timesteps, **conditioning)


class SD3Denoiser(UNetDenoiser):
    """Stable Diffusion 3 / 3.5: x_t = (1 - sigma) E(x) + sigma noise with sigma = t / 1000 (t an integer in the
    timestep range, sampled uniformly as for the UNets), the transformer reading t as its timestep."""

    default_block_preset = "spread"

    def __init__(self, base, resolution: int, max_sequence_length: int | None = None):
        self.base, self.resolution = base, resolution
        self.module = base.transformer
        self.num_train_timesteps = base.scheduler.config.num_train_timesteps
        self.max_sequence_length = max_sequence_length

    @property
    def latent_multiple(self) -> int:
        return self.base.vae_scale_factor * self.module.config.patch_size

    def new_lgp(self, blocks: Sequence[str] | None, preset: str | None, **config) -> LGPModel:
        preset = preset or self.default_block_preset
        return LGPModel.from_transformer(self.module, blocks=blocks, preset=preset, **config)

    def sequence_length(self) -> dict[str, Any]:
        return {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}

    def conditioning(self, captions: list[str], branch: str) -> dict[str, Any]:
        device, unconditional = self.base._execution_device, branch == "unconditional"
        embeds, negative, pooled, negative_pooled = self.base.encode_prompt(
            captions,
            None,
            None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=unconditional,
            **self.sequence_length(),
        )
        if unconditional:
            return {"encoder_hidden_states": negative, "pooled_projections": negative_pooled}
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.num_train_timesteps

    def noisy_latents(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas(timesteps).view(-1, 1, 1, 1)
        return (1 - sigma) * latents.float() + sigma * noise.float()

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """1 - sigma^2, so that the LGP's noise-level input sqrt(1 - alphabar) noise is sigma noise, the noise in x_t
        (as the pipeline computes it, `SketchGuidanceMixin.noise_level_alpha_bar`)."""
        return 1 - self.sigmas(timesteps) ** 2

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, Any], inpainting: None = None
    ) -> Any:
        timestep = self.sigmas(timesteps) * self.num_train_timesteps  # as the pipeline passes the scheduler's t
        return self.module(hidden_states=noisy.to(self.module.dtype), timestep=timestep, **conditioning)


class FluxDenoiser(SD3Denoiser):
    """FLUX.1: the flow of SD3, on latents packed 2x2 into tokens; the transformer reads sigma as its timestep and the
    distilled guidance scale (`guidance_scale`, 3.5 as in `FluxPipeline`) as an input. FLUX has no unconditional
    branch."""

    def __init__(self, base, resolution: int, max_sequence_length: int | None = None, guidance_scale: float = 3.5):
        super().__init__(base, resolution, max_sequence_length)
        self.guidance_scale = guidance_scale

    @property
    def latent_multiple(self) -> int:
        return self.base.vae_scale_factor * 2

    def conditioning(self, captions: list[str], branch: str) -> dict[str, Any]:
        if branch == "unconditional":
            raise ValueError("FLUX has no unconditional branch to read: train with `--feature_branch conditional`.")
        embeds, pooled, text_ids = self.base.encode_prompt(
            captions, None, device=self.base._execution_device, num_images_per_prompt=1, **self.sequence_length()
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, Any], inpainting: None = None
    ) -> Any:
        batch, channels, height, width = noisy.shape
        dtype, device = self.module.dtype, noisy.device
        packed = self.base._pack_latents(noisy.to(dtype), batch, channels, height, width)
        image_ids = self.base._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        guidance = None
        if self.module.config.guidance_embeds:
            guidance = torch.full([batch], self.guidance_scale, device=device, dtype=torch.float32)
        return self.module(
            hidden_states=packed,
            timestep=self.sigmas(timesteps).to(dtype),
            guidance=guidance,
            img_ids=image_ids,
            **conditioning,
        )


def training_denoiser(base, resolution: int, max_sequence_length: int | None = None, guidance_scale: float = 3.5):
    """The adapter for `base`'s family (a sketch-guided pipeline without an LGP)."""
    name = type(base).__name__
    if "Flux" in name:
        return FluxDenoiser(base, resolution, max_sequence_length, guidance_scale)
    if "StableDiffusion3" in name:
        return SD3Denoiser(base, resolution, max_sequence_length)
    return UNetDenoiser(base, resolution)
