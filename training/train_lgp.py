"""Train a Latent Guidance Predictor (LGP) for a Stable Diffusion (1.x, 2.x, XL, 3 / 3.5) or FLUX.1 base model.

The base model (denoiser, VAE, text encoders) is frozen; only the LGP learns. For each batch of (image x, edge map e,
caption c) from a folder made by `pipeline_sketch_guided.training.prepare_data`: z_t = add_noise(E(x), noise, t) (on
SD3 and FLUX the flow's x_t = (1 - sigma) E(x) + sigma noise, sigma = t / 1000), one forward of the UNet or transformer
on (z_t, t, c) without gradients captures the LGP's blocks, and the LGP is fitted at every latent pixel (mean squared
error, `--stroke_weight` weighing an edge map's strokes) to E(e), or with `--target map` to e itself at its output
resolution, given the noise level n = sqrt(1 - alphabar_t) * noise (sigma * noise on a flow). `training/denoisers.py`
holds what differs between the families. An inpainting UNet (9 input channels) also reads a repaint mask and the
masked image's latents, as its pipeline gives them: a random box per example (`inpainting_mask`), or the whole image.

Runs on the CPU, one GPU, or many GPUs and nodes through accelerate, from a checkout's root:

    python training/train_lgp.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir data/lgp --output_dir lgp-sd15 --mixed_precision fp16
    # the same arguments, on every GPU that accelerate is configured for:
    accelerate launch training/train_lgp.py ...

Installed, the same program is `sketch-guided train train_lgp ...` or
`python -m pipeline_sketch_guided.training.train_lgp`.

The result loads with `LGPModel.from_pretrained(output_dir)`. Checkpoints (`output_dir/checkpoint-<step>`) are written
to a temporary folder and renamed when complete, so a run killed at any moment leaves its last checkpoint loadable;
`--resume_from_checkpoint latest` continues from it with the same optimizer state, step count and random state.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, set_seed
from diffusers.optimization import get_scheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline_sketch_guided import BLOCK_PRESETS, LGPModel, capture_activations
from pipeline_sketch_guided.capture import resolve_blocks
from pipeline_sketch_guided.lgp import (
    FEATURE_BRANCHES,
    LGP_HEADS,
    LGP_TARGETS,
    SKETCH_POLARITIES,
    TRANSFORMER_BLOCK_PRESETS,
    noise_level_map,
)
from pipeline_sketch_guided.loading import absent_components, pipeline_class_for
from pipeline_sketch_guided.sketch import MAP_KINDS, MAP_NORMALIZATIONS
from pipeline_sketch_guided.training.denoisers import UNetDenoiser, inpainting_mask, training_denoiser
from pipeline_sketch_guided.training.prepare_data import (
    REPORT_FILE,
    PreparedExample,
    load_prepared_dataset,
    resize_and_center_crop,
)
from pipeline_sketch_guided.utils import dtype_kwargs

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_SUFFIX = ".tmp"
TRAINING_STATE_FILE = "training_state.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a Latent Guidance Predictor for a Stable Diffusion model.")
    # The base model and the data
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of a StableDiffusionPipeline-compatible base model.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the base model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Weights variant of the base model, e.g. fp16.")
    parser.add_argument(
        "--train_data_dir",
        type=str,
        required=True,
        help="A training set written by `python -m pipeline_sketch_guided.training.prepare_data`.",
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="Training image side; defaults to the training set's resolution."
    )
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every image and edge map with the VAE once, before training, instead of at every step.",
    )
    # The LGP
    parser.add_argument(
        "--block_preset",
        type=str,
        default=None,
        choices=sorted([*BLOCK_PRESETS, *TRANSFORMER_BLOCK_PRESETS]),
        help="The blocks to read: sketch2img or down-up for a UNet (default sketch2img), spread for SD3's and FLUX's"
        " transformers (the default there).",
    )
    parser.add_argument(
        "--blocks",
        type=str,
        nargs="+",
        default=None,
        help="UNet or transformer blocks to read (overrides preset). Leave out a UNet's last up block: an LGP that read"
        " it guided far worse (docs/fidelity.md).",
    )
    parser.add_argument("--hidden_dims", type=int, nargs="+", default=[512, 256, 128, 64], help="LGP hidden widths.")
    parser.add_argument("--feature_branch", type=str, default="conditional", choices=FEATURE_BRANCHES)
    parser.add_argument("--sketch_polarity", type=str, default="light_on_dark", choices=SKETCH_POLARITIES)
    parser.add_argument(
        "--map_kind",
        type=str,
        default=None,
        choices=MAP_KINDS,
        help="The kind of map the LGP predicts (its config's map_kind); default: the training set's report.json"
        " (prepare_data --map), else edges.",
    )
    parser.add_argument(
        "--map_normalization",
        type=str,
        default=None,
        choices=MAP_NORMALIZATIONS,
        help="How the maps were normalised (minmax for depth); default: the training set's report.json, else none.",
    )
    parser.add_argument(
        "--target",
        type=str,
        default="vae_latent",
        choices=LGP_TARGETS,
        help="What the LGP predicts: the VAE latent of the map (the paper's) or the map itself (see LGPModel).",
    )
    parser.add_argument(
        "--target_blur",
        type=float,
        default=0.0,
        help="With --target map: blur the target maps by a Gaussian of this many target pixels (see LGPModel).",
    )
    parser.add_argument(
        "--head",
        type=str,
        default="mlp",
        choices=LGP_HEADS,
        help="The LGP's head: the paper's per-pixel MLP, or the MLP with two 3x3 convolutions after it (see LGPModel).",
    )
    parser.add_argument(
        "--target_scale",
        type=int,
        default=1,
        help="With --target map: map pixels per latent pixel along each side (1: the latent resolution).",
    )
    parser.add_argument(
        "--stroke_weight",
        type=float,
        default=1.0,
        help="Edge maps: weight of the loss on stroke pixels and the pixels next to them, against 1 elsewhere (the"
        " strokes are a few per cent of the pixels). 1 weighs every pixel the same.",
    )
    parser.add_argument(
        "--min_timestep",
        type=int,
        default=0,
        help="Lowest training timestep (inclusive), out of the base model's (on SD3 and FLUX, 1000 times sigma).",
    )
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="SD3 and FLUX: tokens of T5's prompt embedding (default: the pipeline's, 256 on SD3 and 512 on FLUX);"
        " the LGP is best trained on what it will be sampled with.",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=3.5,
        help="FLUX.1 dev: the distilled guidance scale the transformer reads while training (FluxPipeline's default).",
    )
    parser.add_argument(
        "--max_timestep", type=int, default=None, help="Highest training timestep (inclusive); default: the last."
    )
    # Optimisation
    parser.add_argument("--train_batch_size", type=int, default=8, help="Images per step on each process.")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=0.0)
    parser.add_argument("--lr_scheduler", type=str, default="constant", help="A diffusers.optimization schedule.")
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--num_train_epochs", type=int, default=10)
    parser.add_argument(
        "--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides --num_train_epochs."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seeds the LGP's initialisation, data order and noise.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    # Output, checkpoints, logging
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=3,
        help="Keep only the newest N checkpoints (default 3; each holds the LGP and its optimizer state).",
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Train afresh into an --output_dir that holds an earlier run: its checkpoints are deleted first, so that"
        " `--resume_from_checkpoint latest` can only ever find this run's.",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint folder, or "latest" for the newest in --output_dir (a fresh start if there is none).',
    )
    parser.add_argument("--report_to", type=str, default="tensorboard", choices=["tensorboard", "none"])
    parser.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, inside --output_dir.")
    # Validation
    parser.add_argument("--validation_prompts", type=str, nargs="+", default=None)
    parser.add_argument(
        "--validation_sketches", type=str, nargs="+", default=None, help="One sketch for all prompts, or one each."
    )
    parser.add_argument("--validation_steps", type=int, default=500, help="Validate every N steps and at the end.")
    parser.add_argument("--num_validation_inference_steps", type=int, default=30)
    parser.add_argument("--validation_sketch_guidance_scale", type=float, default=1.6)
    # Publishing
    parser.add_argument("--push_to_hub", action="store_true", help="Push the trained LGP to --hub_model_id.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Hub repository id, e.g. user/my-lgp.")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading a model, so that a bad argument costs seconds, not a run."""

    def positive(name: str, minimum: float = 1) -> None:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"`--{name}` must be at least {minimum}, got {value}.")

    for name in ("train_batch_size", "num_train_epochs", "max_train_steps", "checkpointing_steps", "validation_steps"):
        positive(name)
    for name in ("num_validation_inference_steps", "checkpoints_total_limit", "resolution"):
        positive(name)
    positive("lr_warmup_steps", 0)
    positive("dataloader_num_workers", 0)
    if not args.learning_rate > 0:
        raise ValueError(f"`--learning_rate` must be positive, got {args.learning_rate}.")
    if args.target_scale < 1 or (args.target == "vae_latent" and args.target_scale != 1):
        raise ValueError(
            f"`--target_scale` must be 1 with `--target vae_latent` and at least 1 with `--target map`, got"
            f" {args.target_scale}."
        )
    if not args.stroke_weight > 0:
        raise ValueError(f"`--stroke_weight` must be positive, got {args.stroke_weight}.")
    if any(width < 1 for width in args.hidden_dims):
        raise ValueError(f"`--hidden_dims` must all be positive, got {args.hidden_dims}.")
    if args.resolution is not None and args.resolution % 8 != 0:
        raise ValueError(f"`--resolution` must be a multiple of 8 (the VAE's factor), got {args.resolution}.")
    if args.min_timestep < 0 or (args.max_timestep is not None and args.max_timestep < args.min_timestep):
        raise ValueError(
            f"Need 0 <= --min_timestep <= --max_timestep, got {args.min_timestep} and {args.max_timestep}."
        )
    if not os.path.isdir(args.train_data_dir):
        raise ValueError(f"`--train_data_dir` {args.train_data_dir!r} is not a folder.")
    if args.resume_from_checkpoint not in (None, "latest") and not is_checkpoint(args.resume_from_checkpoint):
        raise ValueError(
            f"`--resume_from_checkpoint` {args.resume_from_checkpoint!r} is not a complete checkpoint folder (one with"
            f' {TRAINING_STATE_FILE}); pass one, or "latest".'
        )
    if (args.validation_prompts is None) != (args.validation_sketches is None):
        raise ValueError("Validation needs both `--validation_prompts` and `--validation_sketches`.")
    if args.validation_prompts is not None:
        if len(args.validation_sketches) not in (1, len(args.validation_prompts)):
            raise ValueError(
                f"Got {len(args.validation_sketches)} validation sketches for {len(args.validation_prompts)} prompts:"
                " pass one sketch for all prompts, or one per prompt."
            )
        for sketch in args.validation_sketches:
            if not os.path.isfile(sketch):
                raise ValueError(f"The validation sketch {sketch!r} does not exist.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("`--push_to_hub` needs `--hub_model_id`, the repository to push to (e.g. user/my-lgp).")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("`--mixed_precision fp16` needs a CUDA GPU; on the CPU use bf16 or no.")


# ---------------------------------------------------------------------------------------------------------------------
# Data


def image_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float tensor in [-1, 1], as the VAE reads it."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class EdgeDataset(Dataset):
    """The prepared (image, map, caption) triplets as tensors in [-1, 1]: edge maps in `sketch_polarity`, other maps
    (`map_kind`) as prepared (grey maps repeated on three channels, colour maps in their own); with `mask_seed`, each
    example's `inpainting_mask` too."""

    def __init__(
        self,
        examples: list[PreparedExample],
        resolution: int,
        sketch_polarity: str = "light_on_dark",
        map_kind: str = "edges",
        mask_seed: int | None = None,
    ):
        self.examples = examples
        self.resolution = resolution
        self.mask_seed = mask_seed
        # Prepared edge maps are light on dark; no other kind of map has a polarity to turn.
        self.invert_edges = map_kind == "edges" and sketch_polarity == "dark_on_light"

    def __len__(self) -> int:
        return len(self.examples)

    def _load(self, path: str) -> PIL.Image.Image:
        with PIL.Image.open(path) as image:
            image = image.convert("RGB")
        if image.size != (self.resolution, self.resolution):
            image = resize_and_center_crop(image, self.resolution)
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        edges = image_to_tensor(self._load(example.edge_path))
        item = {
            "pixel_values": image_to_tensor(self._load(example.image_path)),
            "edge_values": -edges if self.invert_edges else edges,
            "caption": example.caption,
        }
        if self.mask_seed is not None:
            item["mask"] = inpainting_mask(index, self.resolution, self.mask_seed)
        return item


def prepared_resolution(examples: list[PreparedExample]) -> int:
    """The side of a prepared set's images (`prepare_data` writes them all square, at one size): the first one's."""
    with PIL.Image.open(examples[0].image_path) as first:
        return first.width


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0] if key != "caption"}
    batch["caption"] = [e["caption"] for e in examples]
    return batch


class CachedLatents(Dataset):
    """E(x), the LGP's targets and their loss weights, and an inpainting UNet's extra inputs, computed once
    (`--cache_latents`)."""

    def __init__(
        self,
        image_latents: torch.Tensor,
        edge_latents: torch.Tensor,
        loss_weights: torch.Tensor,
        captions: list[str],
        inpainting_inputs: torch.Tensor | None = None,
    ):
        self.image_latents, self.edge_latents, self.loss_weights = image_latents, edge_latents, loss_weights
        self.captions, self.inpainting_inputs = captions, inpainting_inputs

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {
            "image_latents": self.image_latents[index],
            "edge_latents": self.edge_latents[index],
            "loss_weights": self.loss_weights[index],
            "caption": self.captions[index],
        }
        if self.inpainting_inputs is not None:
            item["inpainting_inputs"] = self.inpainting_inputs[index]
        return item


def epoch_batches(
    num_examples: int, batch_size: int, epoch: int, seed: int, process_index: int = 0, num_processes: int = 1
) -> list[list[int]]:
    """This process's batches of one epoch: a permutation seeded by (seed, epoch), dealt out to the processes.

    A function of its arguments only, so a resumed run sees exactly the batches the interrupted one would have seen.
    Every process gets the same number of full batches (the remainder is left out: BatchNorm dislikes odd batches).
    """
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_process = num_examples // num_processes
    mine = order[process_index * per_process : (process_index + 1) * per_process]
    return [mine[i : i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]


# ---------------------------------------------------------------------------------------------------------------------
# The model work of a training step


class _StopForward(Exception):
    pass


@contextmanager
def stop_forward_after(module: nn.Module | None) -> Iterator[None]:
    """End a forward pass as soon as `module` has run: the UNet blocks after the last captured one are never needed."""
    if module is None:
        yield
        return

    def hook(module, args, output):
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


def last_block_to_run(model: nn.Module, blocks: Sequence[str], run: Callable[[], Any]) -> str:
    """Which of `blocks` of `model` (a UNet or a transformer) runs last in its forward pass: `run` runs one, without
    gradients."""
    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda module, args, output, name=name: order.append(name))
        for name, module in resolve_blocks(model, blocks).items()
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return order[-1]


def last_up_block_read(model: nn.Module, blocks: Sequence[str]) -> str | None:
    """The UNet's last up block where `blocks` reads it, else `None` (and for a transformer, which has none).

    Its features are nearly the UNet's output: on the demo model an LGP that read it predicted held-out edge maps 2.5x
    better and guided far worse (IoU 0.44 against 0.85 at the defaults; docs/fidelity.md, "Which blocks the LGP
    reads"). The paper's block set leaves it out.
    """
    up_blocks = getattr(model, "up_blocks", None)
    if not up_blocks:
        return None
    last = f"up_blocks.{len(up_blocks) - 1}"
    return last if last in blocks else None


def encode_latents(base, pixels: torch.Tensor) -> torch.Tensor:
    """E(x): exactly as the pipeline encodes the sketch (`encode_to_latents`: the posterior's mean times the scaling
    factor, in float32 where the VAE's config says `force_upcast`, as SDXL's does)."""
    return base.encode_to_latents(pixels.to(device=base.vae.device))


def lgp_targets(base, lgp: LGPModel, maps: torch.Tensor) -> torch.Tensor:
    """What the LGP learns to predict for prepared maps in [-1, 1]: their VAE latents E(e) (`target="vae_latent"`),
    or the maps themselves at the LGP's output resolution (`target="map"`), exactly as the pipeline prepares a
    user's map as the guidance target."""
    if lgp.config.target == "map":
        latent_size = (maps.shape[-2] // base.vae_scale_factor, maps.shape[-1] // base.vae_scale_factor)
        return lgp.target_from_map(maps.to(base.vae.device), latent_size)
    return encode_latents(base, maps)


def stroke_loss_weights(maps: torch.Tensor, size: Sequence[int], weight: float, light_strokes: bool) -> torch.Tensor:
    """Per-pixel loss weights `(B, 1, *size)` for edge maps in [-1, 1]: `weight` where a stroke passes through a
    target pixel or one of its 8 neighbours, 1 elsewhere, then divided by their mean over the batch so that the loss
    keeps its scale (and the learning rate its meaning)."""
    strokes = (maps.float().mean(dim=1, keepdim=True) + 1) / 2
    if not light_strokes:
        strokes = 1 - strokes
    near = F.max_pool2d(F.adaptive_max_pool2d(strokes, tuple(size)), 3, stride=1, padding=1)
    weights = 1 + (weight - 1) * near
    return weights / weights.mean()


def lgp_loss(
    denoiser: UNetDenoiser,
    lgp: nn.Module,
    lgp_config,
    image_latents: torch.Tensor,
    edge_latents: torch.Tensor,
    conditioning: dict[str, Any],
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    stop_block: nn.Module | None = None,
    loss_weights: torch.Tensor | None = None,
    inpainting: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of the LGP's prediction at every pixel of z_t = add_noise(E(x), noise, t) (the family's
    noising, `training/denoisers.py`), against its target (`lgp_targets`: E(e), or the map e itself), weighted per pixel
    by `loss_weights` where given.

    The denoiser runs without gradients, in its own dtype, with `conditioning` (`denoiser.conditioning`) and an
    inpainting UNet's `inpainting` inputs; `lgp` may be wrapped (DDP), so its config comes separately.
    """
    noisy_latents = denoiser.noisy_latents(image_latents, noise, timesteps)
    with torch.no_grad():
        with capture_activations(denoiser.module, lgp_config.blocks, lgp_config.tuple_output_index) as features:
            with stop_forward_after(stop_block):
                denoiser.forward(noisy_latents, timesteps, conditioning, inpainting)
        features = dict(features)
    prediction = lgp(features, noise_level_map(noise.float(), denoiser.alpha_bar(timesteps)))
    if loss_weights is None:
        return F.mse_loss(prediction.float(), edge_latents.float())
    return (loss_weights * (prediction.float() - edge_latents.float()).square()).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def is_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, TRAINING_STATE_FILE))


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in `output_dir` (half-written `.tmp` folders are ignored)."""
    steps = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit():
                if is_checkpoint(os.path.join(output_dir, name)):
                    steps.append(int(name[len(CHECKPOINT_PREFIX) :]))
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{max(steps)}") if steps else None


def replace_directory(source: str, target: str) -> None:
    """Rename `source` to `target`, replacing an existing `target` (os.replace cannot replace a non-empty folder)."""
    if os.path.exists(target):
        old = target + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)


def save_checkpoint(
    accelerator: Accelerator,
    lgp: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    global_step: int,
    output_dir: str,
    total_limit: int | None = None,
) -> str:
    """Write `checkpoint-<step>` atomically: everything goes to `checkpoint-<step>.tmp`, renamed once complete.

    The LGP is saved with `save_pretrained` (so `<checkpoint>/lgp` loads with `LGPModel.from_pretrained`), the
    optimizer, scheduler and random states as plain tensors, read back with `torch.load(weights_only=True)`.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    temporary = final + TEMPORARY_SUFFIX
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    # Each process's noise generator state: they differ, so that the processes draw different noise.
    torch.save(generator.get_state(), os.path.join(temporary, f"rng_state_{accelerator.process_index}.pt"))
    if accelerator.is_main_process:
        accelerator.unwrap_model(lgp).save_pretrained(os.path.join(temporary, "lgp"))
        torch.save(optimizer.state_dict(), os.path.join(temporary, "optimizer.pt"))
        torch.save(lr_scheduler.state_dict(), os.path.join(temporary, "lr_scheduler.pt"))
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), os.path.join(temporary, "grad_scaler.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Written last: its presence marks a complete checkpoint.
        state = {"global_step": global_step, "num_processes": accelerator.num_processes}
        Path(temporary, TRAINING_STATE_FILE).write_text(json.dumps(state) + "\n")
        replace_directory(temporary, final)
        if total_limit is not None:
            remove_old_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def remove_old_checkpoints(output_dir: str, total_limit: int) -> None:
    checkpoints = sorted(
        (int(name[len(CHECKPOINT_PREFIX) :]), name)
        for name in os.listdir(output_dir)
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit()
    )
    for _, name in checkpoints[:-total_limit]:
        shutil.rmtree(os.path.join(output_dir, name))


def load_checkpoint(
    path: str,
    accelerator: Accelerator,
    lgp: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> int:
    """Restore a checkpoint written by `save_checkpoint` into the prepared objects; returns its step."""
    state = json.loads(Path(path, TRAINING_STATE_FILE).read_text())
    saved = LGPModel.from_pretrained(os.path.join(path, "lgp"))
    model = accelerator.unwrap_model(lgp)
    for key in ("blocks", "block_channels", "hidden_dims", "feature_branch", "num_noise_frequencies", "head"):
        if list(np.atleast_1d(saved.config[key])) != list(np.atleast_1d(model.config[key])):
            raise ValueError(
                f"The checkpoint {path!r} holds an LGP with {key}={saved.config[key]!r}, but this run asks for"
                f" {model.config[key]!r}. Resume with the arguments of the original run, or start a new --output_dir."
            )
    model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    lr_scheduler.load_state_dict(torch.load(os.path.join(path, "lr_scheduler.pt"), weights_only=True))
    scaler_file = os.path.join(path, "grad_scaler.pt")
    if accelerator.scaler is not None and os.path.isfile(scaler_file):
        accelerator.scaler.load_state_dict(torch.load(scaler_file, weights_only=True))
    rng_file = os.path.join(path, f"rng_state_{accelerator.process_index}.pt")
    if os.path.isfile(rng_file) and state.get("num_processes") == accelerator.num_processes:
        generator.set_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning(
            f"The checkpoint was written by {state.get('num_processes')} processes and this run has"
            f" {accelerator.num_processes}: the noise is drawn afresh, the rest resumes exactly."
        )
    return int(state["global_step"])


# ---------------------------------------------------------------------------------------------------------------------
# Validation


def log_validation(
    base,
    lgp: LGPModel,
    args: argparse.Namespace,
    accelerator: Accelerator,
    global_step: int,
) -> list[PIL.Image.Image]:
    """Generate each validation prompt guided by its sketch; save the images and LGP edge maps, log them."""
    logger.info(f"Validation at step {global_step}: {len(args.validation_prompts)} prompts.")
    pipe = type(base).from_pipe(base, lgp=lgp)
    pipe.set_progress_bar_config(disable=True)
    sketches = args.validation_sketches * (len(args.validation_prompts) // len(args.validation_sketches))
    folder = Path(args.output_dir, "validation", f"step-{global_step:06d}")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (prompt, sketch) in enumerate(zip(args.validation_prompts, sketches, strict=True)):
        output = pipe(
            prompt,
            sketch=sketch,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.num_validation_inference_steps,
            sketch_guidance_scale=args.validation_sketch_guidance_scale,
            generator=torch.Generator().manual_seed(args.seed),
            return_edge_maps=True,
        )
        image, edges = output.images[0], output.edge_maps[0]
        image.save(folder / f"{index:02d}_image.png")
        edges.save(folder / f"{index:02d}_predicted_edges.png")
        rows.append(np.concatenate([np.asarray(image), np.asarray(edges)], axis=1))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(rows), global_step, dataformats="NHWC")
    lgp.train()  # the pipeline put it in eval mode
    return [PIL.Image.fromarray(row) for row in rows]


# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    output_dir: str
    global_step: int
    losses: list[float] = field(default_factory=list)  # the mean loss of each step this run took


def freeze(base):
    """`base` with every model in eval mode and no parameter requiring a gradient: only the LGP learns."""
    for module in base.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
            module.eval()
    return base


def load_base(pretrained: str, dtype: torch.dtype, revision: str | None = None, variant: str | None = None):
    """The frozen base model, as the sketch-guided pipeline of its kind (SD, SDXL, SD3 or FLUX, by its
    model_index.json) without an LGP: the same encoding of images and captions as when sampling, and no notice about
    components it lacks (those saved as `None`, such as an SD3's T5 encoder, stay `None`)."""
    pipeline_class = pipeline_class_for(pretrained, revision=revision)
    has_safety_checker = pipeline_class.__name__ == "SketchGuidedStableDiffusionPipeline"
    extra = {"safety_checker": None, "requires_safety_checker": False} if has_safety_checker else {}
    extra = {**absent_components(pretrained, revision=revision), "lgp": None, **extra}
    base = pipeline_class.from_pretrained(
        pretrained, revision=revision, variant=variant, **dtype_kwargs(dtype), **extra
    )
    base.set_progress_bar_config(disable=True)
    return freeze(base)


def training_map_kind(args: argparse.Namespace) -> tuple[str, str]:
    """(map_kind, map_normalization) of the LGP: the arguments where given, else what `prepare_data` recorded in the
    training set's report.json, else an edge LGP."""
    report_file = Path(args.train_data_dir, REPORT_FILE)
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    map_kind = args.map_kind or report.get("map_kind", "edges")
    if map_kind not in MAP_KINDS:
        raise ValueError(f"{report_file} names the map kind {map_kind!r}; pass --map_kind, one of {MAP_KINDS}.")
    default_normalization = report.get("map_normalization", "none") if map_kind == report.get("map_kind") else None
    map_normalization = args.map_normalization or default_normalization or ("minmax" if map_kind == "depth" else "none")
    return map_kind, map_normalization


def check_output_dir(args: argparse.Namespace) -> None:
    """A new run goes into an empty folder: one that holds another run would mix their checkpoints."""
    if args.resume_from_checkpoint is None and not args.overwrite_output_dir and os.path.isdir(args.output_dir):
        earlier = sorted(name for name in os.listdir(args.output_dir) if not name.startswith("."))
        if earlier:
            listed = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            raise ValueError(
                f"`--output_dir` {args.output_dir!r} already holds a run ({listed}). Continue it with"
                " `--resume_from_checkpoint latest`, replace it with `--overwrite_output_dir`, or choose an empty"
                " folder: a new run there would mix its checkpoints with the old ones."
            )


def main(argv: Sequence[str] | None = None) -> TrainingResult:
    args = parse_args(argv)
    check_output_dir(args)
    report_to = args.report_to
    if report_to == "tensorboard" and not is_tensorboard_available():
        report_to = None  # warned below, once logging is set up
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=report_to if report_to != "none" else None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if report_to is None and args.report_to == "tensorboard":
        logger.warning("TensorBoard is not installed (pip install tensorboard): logging to the console only.")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        for name in os.listdir(args.output_dir):
            # Leftovers of a run killed while checkpointing; with --overwrite_output_dir, the earlier run's checkpoints.
            leftover = name.endswith((TEMPORARY_SUFFIX, ".old"))
            if name.startswith(CHECKPOINT_PREFIX) and (leftover or args.overwrite_output_dir):
                shutil.rmtree(os.path.join(args.output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()

    # The frozen base model, in half precision where mixed precision is asked for.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    base = load_base(args.pretrained_model_name_or_path, weight_dtype, args.revision, args.variant)
    base.to(accelerator.device)
    examples = load_prepared_dataset(args.train_data_dir)
    if args.resolution is None:
        args.resolution = prepared_resolution(examples)
    denoiser = training_denoiser(base, args.resolution, args.max_sequence_length, args.guidance_scale)
    num_train_timesteps = denoiser.num_train_timesteps
    max_timestep = num_train_timesteps - 1 if args.max_timestep is None else args.max_timestep
    if max_timestep >= num_train_timesteps:
        raise ValueError(f"`--max_timestep` must be below the base model's {num_train_timesteps} timesteps.")
    latent_factor = denoiser.latent_multiple
    if args.resolution % latent_factor != 0:
        raise ValueError(f"This base model needs a `--resolution` that is a multiple of {latent_factor}.")
    per_step = args.train_batch_size * accelerator.num_processes
    if len(examples) < per_step:
        raise ValueError(
            f"The training set has {len(examples)} examples, fewer than one step needs ({args.train_batch_size} per"
            f" process x {accelerator.num_processes} processes); lower --train_batch_size or add data."
        )
    map_kind, map_normalization = training_map_kind(args)
    if denoiser.inpainting and args.validation_prompts:
        raise ValueError(
            "Validation draws text-to-image samples, which an inpainting UNet cannot (it needs an image and a mask):"
            " leave out `--validation_prompts`, and measure the LGP with its inpainting pipeline after training."
        )
    mask_seed = args.seed if denoiser.inpainting else None
    dataset = EdgeDataset(examples, args.resolution, args.sketch_polarity, map_kind, mask_seed)

    set_seed(args.seed)  # the LGP's initialisation: the same on every process
    lgp = denoiser.new_lgp(
        args.blocks,
        args.block_preset,
        hidden_dims=args.hidden_dims,
        feature_branch=args.feature_branch,
        sketch_polarity=args.sketch_polarity,
        map_kind=map_kind,
        map_normalization=map_normalization,
        target=args.target,
        target_scale=args.target_scale,
        head=args.head,
        target_blur=args.target_blur,
    )
    if args.stroke_weight != 1 and map_kind != "edges":
        raise ValueError(f"`--stroke_weight` weighs the strokes of edge maps; this LGP learns {map_kind!r} maps.")
    lgp_config = lgp.config
    last_up = last_up_block_read(denoiser.module, lgp_config.blocks)
    if last_up is not None:
        logger.warning(
            f"This LGP reads {last_up!r}, the UNet's last up block, whose features are nearly its output: on the demo"
            " model such an LGP predicted edge maps better but guided far worse (IoU 0.44 against 0.85). Leave it out"
            " (the default `--block_preset sketch2img` does) unless you mean to compare."
        )
    target_model = lgp  # unwrapped: what computes the targets

    def targets_and_weights(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        targets = lgp_targets(base, target_model, maps)
        if args.stroke_weight == 1:
            return targets, None
        light = lgp_config.sketch_polarity == "light_on_dark"
        return targets, stroke_loss_weights(maps, targets.shape[-2:], args.stroke_weight, light).to(targets.device)

    lgp.train()
    optimizer = torch.optim.AdamW(
        lgp.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
    )
    steps_per_epoch = len(epoch_batches(len(dataset), args.train_batch_size, 0, 0, 0, accelerator.num_processes))
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # Not passed to accelerator.prepare: that would step it once per process. It steps once per optimizer step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_train_steps
    )
    lgp, optimizer = accelerator.prepare(lgp, optimizer)
    # Different noise on each process; its state is checkpointed per process.
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed + accelerator.process_index)

    global_step = 0
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = latest_checkpoint(args.output_dir)
        if resume is None:
            logger.info(f"No checkpoint in {args.output_dir!r} yet: starting a new run.")
    if resume is not None:
        global_step = load_checkpoint(resume, accelerator, lgp, optimizer, lr_scheduler, generator)
        logger.info(f"Resumed from {resume} at step {global_step}.")

    with torch.no_grad():
        probe_conditioning = denoiser.conditioning([""], lgp_config.feature_branch)
        latent_size = args.resolution // base.vae_scale_factor
        probe = torch.zeros(1, lgp_config.latent_channels, latent_size, latent_size, device=accelerator.device)
        zero = torch.zeros(1, dtype=torch.long, device=accelerator.device)
        # An inpainting UNet's mask and masked-image latents: zeros, as the probe's latents are.
        probe_inpainting = probe.new_zeros(1, 1 + probe.shape[1], *probe.shape[2:]) if denoiser.inpainting else None
        last_block = last_block_to_run(
            denoiser.module,
            lgp_config.blocks,
            lambda: denoiser.forward(probe, zero, probe_conditioning, probe_inpainting),
        )
    stop_block = denoiser.module.get_submodule(last_block)

    if args.cache_latents:
        image_latents, edge_latents, loss_weights, inpainting_inputs = [], [], [], []
        loader = DataLoader(
            dataset, batch_size=args.train_batch_size, collate_fn=collate, num_workers=args.dataloader_num_workers
        )
        with torch.no_grad():
            for batch in tqdm(loader, desc="Caching latents", disable=not accelerator.is_local_main_process):
                image_latents.append(encode_latents(base, batch["pixel_values"]).cpu())
                targets, weights = targets_and_weights(batch["edge_values"])
                edge_latents.append(targets.cpu())
                loss_weights.append((torch.ones_like(targets[:, :1]) if weights is None else weights).cpu())
                if denoiser.inpainting:
                    inpainting_inputs.append(denoiser.inpainting_inputs(batch["pixel_values"], batch["mask"]).cpu())
        captions = [e.caption for e in examples]
        dataset = CachedLatents(
            torch.cat(image_latents),
            torch.cat(edge_latents),
            torch.cat(loss_weights),
            captions,
            torch.cat(inpainting_inputs) if inpainting_inputs else None,
        )

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("train_lgp", config=tracker_config)
    logger.info(
        f"Training an LGP on {len(dataset)} examples at {args.resolution}px: {len(lgp_config.blocks)} blocks"
        f" ({', '.join(lgp_config.blocks)}), {accelerator.unwrap_model(lgp).in_features} input channels,"
        f" {max_train_steps} steps of {args.train_batch_size} images x {accelerator.num_processes} processes."
    )

    losses = []
    progress = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    while global_step < max_train_steps:
        epoch, start = divmod(global_step, steps_per_epoch)
        batches = epoch_batches(
            len(dataset), args.train_batch_size, epoch, args.seed, accelerator.process_index, accelerator.num_processes
        )
        loader = DataLoader(
            dataset,
            batch_sampler=batches[start:],
            collate_fn=collate,
            num_workers=0 if args.cache_latents else args.dataloader_num_workers,
        )
        for batch in loader:
            with torch.no_grad():
                if args.cache_latents:
                    image_latents = batch["image_latents"].to(accelerator.device)
                    edge_latents = batch["edge_latents"].to(accelerator.device)
                    loss_weights = batch["loss_weights"].to(accelerator.device)
                    inpainting = batch.get("inpainting_inputs")
                else:
                    image_latents = encode_latents(base, batch["pixel_values"])
                    edge_latents, loss_weights = targets_and_weights(batch["edge_values"])
                    inpainting = denoiser.inpainting_inputs(batch["pixel_values"], batch.get("mask"))
                conditioning = denoiser.conditioning(batch["caption"], lgp_config.feature_branch)
                noise = torch.randn(
                    image_latents.shape, generator=generator, device=accelerator.device, dtype=torch.float32
                )
                timesteps = torch.randint(
                    args.min_timestep,
                    max_timestep + 1,
                    (len(noise),),
                    generator=generator,
                    device=accelerator.device,
                )
            loss = lgp_loss(
                denoiser,
                lgp,
                lgp_config,
                image_latents,
                edge_latents,
                conditioning,
                timesteps,
                noise,
                stop_block,
                loss_weights,
                inpainting,
            )
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1

            mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            losses.append(mean_loss)
            accelerator.log({"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}")

            if global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
                path = save_checkpoint(
                    accelerator,
                    lgp,
                    optimizer,
                    lr_scheduler,
                    generator,
                    global_step,
                    args.output_dir,
                    args.checkpoints_total_limit,
                )
                logger.info(f"Saved {path}")
            if accelerator.is_main_process and args.validation_prompts is not None:
                if global_step % args.validation_steps == 0 or global_step == max_train_steps:
                    log_validation(base, accelerator.unwrap_model(lgp), args, accelerator, global_step)
            if global_step >= max_train_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(lgp)
        save_final_model(model, args.output_dir)
        Path(args.output_dir, "training_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        logger.info(f"Saved the trained LGP to {args.output_dir}: LGPModel.from_pretrained({args.output_dir!r})")
    result = TrainingResult(args.output_dir, global_step, losses)
    if accelerator.is_main_process and args.push_to_hub:
        url = push_lgp_to_hub(accelerator.unwrap_model(lgp), args, result)
        logger.info(f"Pushed to {url}")
    accelerator.end_training()
    return result


def save_final_model(model: LGPModel, output_dir: str) -> None:
    """save_pretrained into a temporary folder, then move each file into place: no half-written weights file."""
    temporary = os.path.join(output_dir, "final" + TEMPORARY_SUFFIX)
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    for name in os.listdir(temporary):
        os.replace(os.path.join(temporary, name), os.path.join(output_dir, name))
    os.rmdir(temporary)


def push_lgp_to_hub(model: LGPModel, args: argparse.Namespace, result: TrainingResult) -> str:
    """Publish the LGP to `--hub_model_id`: with its model card and code through `pipeline_sketch_guided.hub` where
    that module is installed, otherwise config and weights alone with `LGPModel.push_to_hub`."""
    commit_message = f"LGP for {args.pretrained_model_name_or_path}, trained with training/train_lgp.py"
    try:
        from pipeline_sketch_guided.hub import push_lgp_to_hub as push_with_card
    except ImportError:
        return model.push_to_hub(args.hub_model_id, commit_message=commit_message)
    report_file = Path(args.train_data_dir, REPORT_FILE)
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    training_data = (
        f"{report.get('written', 'A set of')} captioned images"
        + (f" from {report['source']}" if report.get("source") else "")
        + (f", {report['edge_detector']} edge maps" if report.get("edge_detector") else "")
        + (f", {report['map']} maps" if report.get("map") and not report.get("edge_detector") else "")
        + f", at {args.resolution}x{args.resolution}; timesteps {args.min_timestep} to"
        + f" {args.max_timestep if args.max_timestep is not None else 'the last'}."
    )
    final_loss = f", final loss {np.mean(result.losses[-10:]):.4f}" if result.losses else ""
    training_details = (
        f"{result.global_step} steps of {args.train_batch_size} images per process, learning rate"
        f" {args.learning_rate}{final_loss}, with `training/train_lgp.py`."
    )
    validations = sorted(Path(args.output_dir, "validation").glob("step-*"))
    figures = sorted(validations[-1].glob("*_image.png")) if validations else []
    return push_with_card(
        model,
        args.hub_model_id,
        commit_message=commit_message,
        base_model=args.pretrained_model_name_or_path,
        training_data=training_data,
        training_details=training_details,
        figures=figures,
    )


if __name__ == "__main__":
    main()
