"""The Latent Guidance Predictor (LGP): a per-pixel MLP from UNet activations to the VAE latent of a spatial map (an
edge map by default; any map it was trained on: silhouettes, depth, colour maps)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .capture import block_output_channels, resolve_blocks
from .sketch import GREY_MAP_KINDS, MAP_KINDS, MAP_NORMALIZATIONS, SKETCH_POLARITIES

FEATURE_BRANCHES = ("conditional", "unconditional")
# What the LGP predicts: "vae_latent", the VAE latent of the map (the paper's target); or "map", the map itself,
# area-averaged to `target_scale` times the latent resolution (one channel for grey maps, three for colour maps),
# where a thin stroke is a stroke and not whatever the VAE makes of it.
LGP_TARGETS = ("vae_latent", "map")
# How the LGP reads the features: "mlp", the paper's per-pixel MLP (each latent pixel on its own); or "conv", the same
# MLP with a residual block of two 3x3 convolutions over its last hidden layer, so each output also sees the
# pixels around it (docs/fidelity.md measures one against the other).
LGP_HEADS = ("mlp", "conv")

# Widths of the community LGP, said to follow section 4.1 of the paper (see DESIGN.md, "Published details").
DEFAULT_HIDDEN_DIMS = (512, 256, 128, 64)
# sin(2*pi*n*2^-l) for l = 0..8, as in the published SD1.5 LGPs.
DEFAULT_NUM_NOISE_FREQUENCIES = 9
# Width of the softened ReLU whose gradient sketch guidance follows (`LGPModel.smooth_relu_gradients`).
RELU_GRADIENT_TEMPERATURE = 0.02


def sketch2img_blocks(unet: nn.Module) -> list[str]:
    """Every down and up block but the last, then the mid block's attention and resnets (in that order).

    On SD 1.x / 2.x UNets this is exactly the 9-block set of the published sketch2img LGP
    (nyanko7/sketch2img-edge-predictor-train), so its converted weights drop straight in.
    """
    num_down, num_up = len(unet.down_blocks), len(unet.up_blocks)
    blocks = [f"down_blocks.{i}" for i in range(max(num_down - 1, 1))]
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        blocks += [f"mid_block.attentions.{i}" for i in range(len(getattr(mid, "attentions", [])))]
        blocks += [f"mid_block.resnets.{i}" for i in range(len(getattr(mid, "resnets", [])))]
    blocks += [f"up_blocks.{i}" for i in range(max(num_up - 1, 1))]
    return blocks


def down_up_blocks(unet: nn.Module) -> list[str]:
    """All down blocks then all up blocks: the set of the published Sketch-Guided-Stable-Diffusion LGP
    (ogkalu/Stable-Diffusion-Latent-Guidance-Predictor)."""
    return [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + [
        f"up_blocks.{i}" for i in range(len(unet.up_blocks))
    ]


BLOCK_PRESETS = {"sketch2img": sketch2img_blocks, "down-up": down_up_blocks}

# How many blocks the "spread" preset of a diffusion transformer reads.
SPREAD_BLOCK_COUNT = 4


def transformer_block_names(transformer: nn.Module) -> list[str]:
    """Every block of a diffusion transformer in the order they run: SD3's `transformer_blocks`; FLUX's double-stream
    `transformer_blocks` then its `single_transformer_blocks`."""
    names = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    singles = getattr(transformer, "single_transformer_blocks", None) or []
    return names + [f"single_transformer_blocks.{i}" for i in range(len(singles))]


def spread_blocks(transformer: nn.Module, count: int = SPREAD_BLOCK_COUNT) -> list[str]:
    """`count` blocks at evenly spaced depths of a diffusion transformer, neither the first nor the last (every block
    of a model with no more than `count`).

    A UNet's presets read it across its resolutions; a diffusion transformer keeps one token grid throughout, so depth
    is the only axis to spread over. The ends are left out: the first block's tokens are still close to the patch
    embedding of the noisy latents and the last one's to the velocity readout. On SD3 medium (24 blocks) this reads
    blocks 4, 9, 13 and 18; on FLUX.1 (19 double + 38 single blocks) double block 10 and single blocks 3, 14 and 26.
    The rule is a starting point chosen for that reason, not the result of a search over block sets.
    """
    names = transformer_block_names(transformer)
    if len(names) <= count:  # a small model: every block
        return names
    picks = sorted({min(max(round((k + 1) * len(names) / (count + 1)) - 1, 0), len(names) - 1) for k in range(count)})
    return [names[i] for i in picks]


TRANSFORMER_BLOCK_PRESETS = {"spread": spread_blocks}


def denoiser_latent_channels(denoiser: nn.Module) -> int:
    """Channels of the latents a denoiser works on: its `in_channels`, but FLUX's transformer reads 2x2 patches of
    them packed into one token (`in_channels` is 4x the latents'), and an inpainting UNet reads the latents followed
    by the mask and the masked image's latents (9 in, 4 out: its `out_channels`)."""
    config = denoiser.config
    if type(denoiser).__name__.startswith("Flux"):
        return config.in_channels // 4
    out_channels = getattr(config, "out_channels", None)
    return out_channels if isinstance(out_channels, int) and out_channels < config.in_channels else config.in_channels


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A transformer block's image tokens `(B, N, C)` as the feature map `(B, C, h, w)` of their patches, for latents
    of `height` x `width` (N = (height / p) (width / p) for patch side p: 2 on SD3 and FLUX)."""
    batch, count, channels = tokens.shape
    patch = math.isqrt(height * width // count) if count else 0
    if patch < 1 or (height // patch) * (width // patch) != count:
        raise ValueError(f"{count} tokens do not tile latents of {height}x{width} in square patches.")
    return tokens.reshape(batch, height // patch, width // patch, channels).permute(0, 3, 1, 2)


class _ReLUWithSmoothGradient(torch.autograd.Function):
    """max(x, 0) forward; backward through sigmoid(x / temperature), the derivative of temperature * softplus(x /
    temperature), instead of ReLU's step function."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.temperature = temperature
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(x / ctx.temperature), None


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each channel of `images` `(B, C, H, W)` blurred by a Gaussian of standard deviation `sigma` pixels (a kernel of
    +-3 sigma, the border replicated), separably."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def map_target_channels(map_kind: str) -> int:
    """Channels of a `target="map"` LGP's map: one for grey maps, three for colour maps."""
    return 1 if map_kind in GREY_MAP_KINDS else 3


def noise_level_map(noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The LGP's noise-level input n = sqrt(1 - alphabar_t) * epsilon.

    Args:
        noise: epsilon, `(B, C, h, w)`: the true noise when training, the UNet's estimate of it when sampling.
        alphas_cumprod: alphabar_t, a scalar or one value per sample.
    """
    alphas_cumprod = torch.as_tensor(alphas_cumprod, device=noise.device, dtype=torch.float32)
    sigma = (1 - alphas_cumprod).sqrt().reshape(-1, 1, 1, 1)
    return (sigma * noise.float()).to(noise.dtype)


class LGPModel(ModelMixin, ConfigMixin):
    r"""
    Latent Guidance Predictor of "Sketch-Guided Text-to-Image Diffusion Models" (Voynov et al., 2023).

    For every latent pixel it maps the UNet's activations there (each captured block resized bilinearly to the latent
    size, concatenated in `blocks` order), followed by a noise-level input, to the VAE latent of the map it was trained
    on (an edge map unless its `map_kind` says otherwise) at that pixel. The noise-level input is
    n = sqrt(1 - alphabar_t) * epsilon (`latent_channels` channels) and its encoding sin(2 pi n 2^-l) for
    l = 0 .. `num_noise_frequencies` - 1 (ordered frequency-major).

    The MLP is `layers`: Linear, then (ReLU, BatchNorm1d, Linear) for each hidden width, the state-dict layout of the
    published community LGPs. Its first layer is linear and so is bilinear resizing, so `forward` applies the first
    layer to each activation at its own resolution and sums the resized results: the wide concatenated feature map is
    never built.

    Args:
        blocks (`list[str]`): module paths in the UNet whose outputs are read, in input order.
        block_channels (`list[int]`): channels of each block's output, checked against the UNet.
        feature_branch (`str`, defaults to `"conditional"`): the classifier-free guidance branch whose activations the
            LGP was trained on, `"conditional"` (text) or `"unconditional"` (empty prompt).
        tuple_output_index (`int`, defaults to 0): which element is read where a block returns a tuple.
        latent_channels (`int`, defaults to 4): channels of the UNet's latents, the width of the noise-level map.
        num_noise_frequencies (`int`, defaults to 9): frequencies of the sinusoidal noise-level encoding.
        hidden_dims (`list[int]`, defaults to `[512, 256, 128, 64]`): widths of the hidden layers.
        out_channels (`int`, defaults to 4): channels of the predicted map latent (the VAE's latent channels).
        sketch_polarity (`str`, defaults to `"light_on_dark"`): how the edge maps it was trained on look: light
            strokes on a dark background (edge detectors' output) or dark on light. Read for edge maps only.
        map_kind (`str`, defaults to `"edges"`): the kind of map it predicts, which says how a user's map is prepared
            (`pipeline_sketch_guided.sketch.prepare_map`): `"edges"` (strokes of either polarity, turned into
            `sketch_polarity`; a blank sketch is an error), `"silhouette"` and `"depth"` (one grey channel, taken as
            they are: no polarity flip), or `"color"` (three channels kept, for segmentation colour maps, normal
            maps and other RGB maps). Configs written before maps had kinds load as `"edges"`.
        map_normalization (`str`, defaults to `"none"`): how each training map was normalised, and so how a user's
            map is: `"none"` (as drawn) or `"minmax"` (stretched to the full 0..1 range, as `prepare_data --map depth`
            writes depth maps). Edge maps take `"none"`.
        target (`str`, defaults to `"vae_latent"`): what it predicts, `"vae_latent"` (the VAE latent of the map, as in
            the paper: `out_channels` is the VAE's latent channels) or `"map"` (the prepared map itself in [-1, 1],
            area-averaged to `target_scale` times the latent resolution: `out_channels` is the map's channels, 1 for
            grey maps or 3 for colour maps, times `target_scale` squared). Configs written before load as
            `"vae_latent"`.
        target_scale (`int`, defaults to 1): with `target="map"`, how many map pixels each latent pixel predicts along
            each side (its outputs are rearranged by `pixel_shuffle`); 1 for `"vae_latent"`.
        target_blur (`float`, defaults to 0): with `target="map"`, the standard deviation (in pixels of the target's
            resolution) of a Gaussian blur of the map after area-averaging, for training and guidance targets alike: a
            stroke becomes a ridge whose sides still pull towards it, which forgives a wobble of a pixel or two. 0 keeps
            the map sharp. Configs written before load as 0.
        head (`str`, defaults to `"mlp"`): `"mlp"` (the paper's: every latent pixel predicted from its own features)
            or `"conv"` (the MLP, then h + conv(relu(conv(h))) with 3x3 convolutions over its last hidden layer h,
            the second initialised to zero, before the output layer: a spatial head of 2 x 9 x `hidden_dims[-1]`^2
            more weights). Configs written before load as `"mlp"`.
    """

    @register_to_config
    def __init__(
        self,
        blocks: Sequence[str],
        block_channels: Sequence[int],
        feature_branch: str = "conditional",
        tuple_output_index: int = 0,
        latent_channels: int = 4,
        num_noise_frequencies: int = DEFAULT_NUM_NOISE_FREQUENCIES,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
        out_channels: int = 4,
        sketch_polarity: str = "light_on_dark",
        map_kind: str = "edges",
        map_normalization: str = "none",
        target: str = "vae_latent",
        target_scale: int = 1,
        head: str = "mlp",
        target_blur: float = 0.0,
    ):
        super().__init__()
        if len(blocks) == 0 or len(blocks) != len(block_channels):
            raise ValueError(
                f"`blocks` and `block_channels` must be non-empty and of the same length, got {len(blocks)} blocks"
                f" and {len(block_channels)} channel counts."
            )
        if feature_branch not in FEATURE_BRANCHES:
            raise ValueError(f"`feature_branch` must be one of {FEATURE_BRANCHES}, got {feature_branch!r}.")
        if sketch_polarity not in SKETCH_POLARITIES:
            raise ValueError(f"`sketch_polarity` must be one of {SKETCH_POLARITIES}, got {sketch_polarity!r}.")
        if map_kind not in MAP_KINDS:
            raise ValueError(f"`map_kind` must be one of {MAP_KINDS}, got {map_kind!r}.")
        if map_normalization not in MAP_NORMALIZATIONS:
            raise ValueError(f"`map_normalization` must be one of {MAP_NORMALIZATIONS}, got {map_normalization!r}.")
        if map_kind == "edges" and map_normalization != "none":
            raise ValueError(f"Edge maps take `map_normalization='none'`, got {map_normalization!r}.")
        if len(hidden_dims) == 0:
            raise ValueError("`hidden_dims` must name at least one hidden width.")
        if head not in LGP_HEADS:
            raise ValueError(f"`head` must be one of {LGP_HEADS}, got {head!r}.")
        if target not in LGP_TARGETS:
            raise ValueError(f"`target` must be one of {LGP_TARGETS}, got {target!r}.")
        if target_blur < 0 or (target_blur > 0 and target != "map"):
            raise ValueError(f"`target_blur` is for `target='map'` and must be >= 0, got {target_blur}.")
        if target == "vae_latent" and target_scale != 1:
            raise ValueError(f"`target_scale` is for `target='map'`; a VAE latent target takes 1, got {target_scale}.")
        if target == "map":
            expected = map_target_channels(map_kind) * target_scale**2
            if target_scale < 1 or out_channels != expected:
                raise ValueError(
                    f"An LGP with `target='map'` for {map_kind!r} maps at `target_scale={target_scale}` has"
                    f" {expected} outputs per latent pixel (`out_channels`), got {out_channels}. Build it with"
                    " `LGPModel.from_unet(unet, target='map', target_scale=...)`, which sets it."
                )

        widths = [self.in_features, *hidden_dims]
        layers: list[nn.Module] = [nn.Linear(widths[0], widths[1])]
        for width_in, width_out in zip(widths[1:], [*hidden_dims[1:], out_channels], strict=True):
            layers += [nn.ReLU(), nn.BatchNorm1d(width_in), nn.Linear(width_in, width_out)]
        self.layers = nn.Sequential(*layers)
        if head == "conv":
            width = hidden_dims[-1]
            self.spatial = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)
            )
            # Zero: a new conv head starts as the per-pixel MLP.
            nn.init.zeros_(self.spatial[2].weight)
            nn.init.zeros_(self.spatial[2].bias)
        # Not config: a property of how gradients are taken while sampling, see `smooth_relu_gradients`.
        self.relu_gradient_temperature: float | None = None

    @contextmanager
    def smooth_relu_gradients(self, temperature: float = RELU_GRADIENT_TEMPERATURE) -> Iterator[None]:
        """Inside the context, the gradient of the output with respect to the inputs passes each ReLU through
        sigmoid(x / temperature) instead of a step; the outputs are unchanged.

        The exact gradient of a ReLU network jumps wherever a hidden unit crosses zero, and some of the hundreds of
        units at thousands of pixels always sit near zero. Sketch guidance takes a step of fixed size along the
        normalised gradient, so those jumps make the image depend on rounding: a 1e-6 change in the latents (a batch of
        3 instead of 1, another attention kernel, float16) moved the next latents 50-190 times as far on the tiny test
        model. The smooth gradient is the gradient of the same network with each ReLU softened to a softplus of
        width `temperature`, and it is continuous.
        """
        previous = self.relu_gradient_temperature
        self.relu_gradient_temperature = temperature
        try:
            yield
        finally:
            self.relu_gradient_temperature = previous

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # `auto_map` (written for published repos) lets AutoModel find this class; it is not an __init__ argument.
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k != "auto_map"}, **kwargs)

    @property
    def noise_level_channels(self) -> int:
        return self.config.latent_channels * (1 + self.config.num_noise_frequencies)

    @property
    def in_features(self) -> int:
        """Width of one pixel's input vector: all block channels, then the noise level and its encoding."""
        return sum(self.config.block_channels) + self.noise_level_channels

    @classmethod
    def from_unet(
        cls, unet: nn.Module, blocks: Sequence[str] | None = None, preset: str = "sketch2img", **kwargs
    ) -> "LGPModel":
        """A freshly initialised LGP that reads `blocks` (or the blocks of `preset`) of `unet`.

        Presets: `"sketch2img"` (default; on SD 1.x / 2.x the published 9-block set) and `"down-up"` (all down blocks
        then all up blocks). Other keyword arguments go to the config (`hidden_dims`, `feature_branch`, ...).
        """
        if blocks is None:
            if preset not in BLOCK_PRESETS:
                raise ValueError(f"Unknown block preset {preset!r}; choose one of {list(BLOCK_PRESETS)}.")
            blocks = BLOCK_PRESETS[preset](unet)
        modules = resolve_blocks(unet, blocks)
        channels = [block_output_channels(module) for module in modules.values()]
        kwargs.setdefault("latent_channels", denoiser_latent_channels(unet))
        if kwargs.get("target") == "map":
            scale = kwargs.get("target_scale", 1)
            kwargs.setdefault("out_channels", map_target_channels(kwargs.get("map_kind", "edges")) * scale**2)
        return cls(blocks=list(blocks), block_channels=channels, **kwargs)

    @classmethod
    def from_transformer(
        cls, transformer: nn.Module, blocks: Sequence[str] | None = None, preset: str = "spread", **kwargs
    ) -> "LGPModel":
        """A freshly initialised LGP that reads the image tokens of `blocks` (or of `preset`'s) of a diffusion
        transformer: `SD3Transformer2DModel` or `FluxTransformer2DModel`.

        Each block's image tokens are laid out on their patch grid and resized to the latent resolution, like a UNet
        block's activations. Presets: `"spread"` (`spread_blocks`: 4 blocks at evenly spaced depths). The LGP predicts
        at the resolution of the unpacked latents (FLUX's `(B, 16, H/8, W/8)`, the VAE's); the sketch gradient reaches
        FLUX's packed latents through the same unpacking. Other keyword arguments go to the config.
        """
        if blocks is None:
            if preset not in TRANSFORMER_BLOCK_PRESETS:
                raise ValueError(f"Unknown block preset {preset!r}; choose one of {list(TRANSFORMER_BLOCK_PRESETS)}.")
            blocks = TRANSFORMER_BLOCK_PRESETS[preset](transformer)
        kwargs.setdefault("tuple_output_index", 1)  # the blocks return (text tokens, image tokens)
        return cls.from_unet(transformer, blocks=blocks, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "LGPModel":
        """Load an LGP saved with `save_pretrained` (config.json + safetensors) from a folder or a Hub repo id.

        Takes the keyword arguments of diffusers' `ModelMixin.from_pretrained` (`subfolder`, `torch_dtype`, `revision`,
        ...). A missing or corrupt weights file raises an `OSError` that says what was expected.
        """
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as error:
            raise OSError(
                f"Cannot load an LGP from {str(pretrained_model_name_or_path)!r}: {error}\nAn LGP folder or repo holds"
                " config.json and diffusion_pytorch_model.safetensors, as written by `LGPModel.save_pretrained`. A"
                " community .pt file must be converted first (`sketch-guided convert`)."
            ) from error

    def check_unet(self, unet: nn.Module) -> None:
        """Raise a `ValueError` naming the block where `unet` (or a diffusion transformer) does not provide what this
        LGP was built for."""
        kind = "UNet" if "UNet" in type(unet).__name__ else "transformer"
        modules = resolve_blocks(unet, self.config.blocks)
        for (name, module), expected in zip(modules.items(), self.config.block_channels, strict=True):
            found = block_output_channels(module)
            if found != expected:
                raise ValueError(
                    f"This LGP expects {expected} channels from {kind} block {name!r}, but that block of the {kind}"
                    f" outputs {found}. The LGP was made for a different base model: load an LGP trained for this"
                    f" {kind}, or train one with `sketch-guided train train_lgp` (training/train_lgp.py in a checkout)."
                )
        if denoiser_latent_channels(unet) != self.config.latent_channels:
            raise ValueError(
                f"This LGP expects {self.config.latent_channels} latent channels, but the {kind} works on"
                f" {denoiser_latent_channels(unet)}."
            )

    def encode_noise_level(self, noise_level: torch.Tensor) -> torch.Tensor:
        """[n | sin(2 pi n 2^-l) for each l], frequency-major: the last `noise_level_channels` of the input."""
        scales = [2 * math.pi * 2.0**-level for level in range(self.config.num_noise_frequencies)]
        return torch.cat([noise_level] + [torch.sin(noise_level * scale) for scale in scales], dim=1)

    def forward(
        self, features: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], noise_level: torch.Tensor
    ) -> torch.Tensor:
        """Predict the latent of the map (the edge map, for an edge LGP).

        Args:
            features: the captured activations, `(B, C_i, H_i, W_i)` each, in `blocks` order (or a dict by block name,
                as `capture_activations` fills it).
            noise_level: `(B, latent_channels, h, w)`, see `noise_level_map`; sets the output size.

        Returns:
            `torch.Tensor` of shape `(B, out_channels, h, w)`; with `target="map"`, `(B, out_channels / s^2, s h, s w)`
            for `target_scale` s.
        """
        if isinstance(features, Mapping):
            features = [features[name] for name in self.config.blocks]
        if len(features) != len(self.config.blocks):
            raise ValueError(f"Expected {len(self.config.blocks)} feature maps, got {len(features)}.")
        first = self.layers[0]
        dtype = first.weight.dtype
        batch, _, height, width = noise_level.shape

        # The first Linear, applied per block at the block's own resolution: W @ resize(f) == resize(W @ f).
        weights = first.weight.split([*self.config.block_channels, self.noise_level_channels], dim=1)
        hidden = F.conv2d(self.encode_noise_level(noise_level.to(dtype)), weights[-1][:, :, None, None], first.bias)
        for name, feature, weight, channels in zip(
            self.config.blocks,
            features,
            weights,
            self.config.block_channels,
            strict=False,  # weights has one more
        ):
            if feature.ndim == 3:  # a transformer block's image tokens
                feature = tokens_to_grid(feature, height, width)
            if feature.shape[1] != channels:
                raise ValueError(f"Block {name!r} gave {feature.shape[1]} channels; this LGP expects {channels}.")
            projected = F.conv2d(feature.to(dtype), weight[:, :, None, None])
            if projected.shape[-2:] != (height, width):
                projected = F.interpolate(projected, size=(height, width), mode="bilinear", align_corners=False)
            hidden = hidden + projected

        pixels = hidden.permute(0, 2, 3, 1).reshape(batch * height * width, -1)
        for layer in self.layers[1:-1]:
            pixels = self._relu(pixels) if isinstance(layer, nn.ReLU) else layer(pixels)
        if self.config.head == "conv":
            spatial = pixels.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
            first_conv, _, second_conv = self.spatial
            spatial = spatial + second_conv(self._relu(first_conv(spatial)))
            pixels = spatial.permute(0, 2, 3, 1).reshape(batch * height * width, -1)
        pixels = self.layers[-1](pixels)
        out = pixels.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        if self.config.target_scale > 1:
            out = F.pixel_shuffle(out, self.config.target_scale)
        return out

    def _relu(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu_gradient_temperature is not None:
            return _ReLUWithSmoothGradient.apply(x, self.relu_gradient_temperature)
        return F.relu(x)

    def target_from_map(self, maps: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """The `target="map"` LGP's training target and guidance target for prepared maps `(B, 3, H, W)` in [-1, 1]
        (`prepare_map`'s output): each area-averaged to `target_scale` times `latent_size`, grey maps as one
        channel."""
        if self.config.target != "map":
            raise ValueError("`target_from_map` is for LGPs with `target='map'`; a VAE latent target is encoded.")
        if map_target_channels(self.config.map_kind) == 1:
            maps = maps.mean(dim=1, keepdim=True)
        size = tuple(side * self.config.target_scale for side in latent_size)
        targets = F.interpolate(maps.float(), size=size, mode="area")
        blur = getattr(self.config, "target_blur", 0.0)
        return gaussian_blur(targets, blur) if blur > 0 else targets
