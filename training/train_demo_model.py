"""Train the demo model from scratch: a tiny Stable Diffusion (VAE, CLIP text encoder, UNet) on procedural shapes.

    python -m pipeline_sketch_guided.training.train_demo_model --output_dir outputs/demo-sd --max_minutes 60

Stage 1 trains the AutoencoderKL (64x64 images -> 4x16x16 latents), stage 2 encodes the dataset once and trains the
UNet and the text encoder together on the cached latents (captions dropped 10% of the time, for classifier-free
guidance), with an EMA of the UNet. Each stage checkpoints atomically and resumes where it stopped when run again. The
result is an ordinary `StableDiffusionPipeline` folder in `<output_dir>/pipeline`.

`--init_from` continues from a trained pipeline folder instead (its VAE kept as it is, its text encoder and UNet
trained further), on the same or another data mix (`--styles`): how demo model v2 was trained on a GPU, and
how the fine-tune that the LGP is checked on was made.

    python -m pipeline_sketch_guided.training.train_demo_model --output_dir outputs/demo-sd-v2 \
        --init_from pipeline_sketch_guided/demo_model --device cuda --num_images 60000 --unet_batch_size 256 \
        --layout anywhere

With `--inpainting` as well, the UNet of `--init_from` becomes an inpainting UNet (9 input channels: the latents, the
repaint mask, the masked image's latents; the new channels' weights start at zero, as Stable Diffusion's inpainting
checkpoints were made from their bases) trained on a random mask per image (the masks `train_lgp` uses), and the result
is a `StableDiffusionInpaintPipeline`:

    python -m pipeline_sketch_guided.training.train_demo_model --output_dir outputs/demo-inpainting \
        --init_from pipeline_sketch_guided/demo_model --inpainting --num_images 4000 --unet_steps 800
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from transformers import CLIPTextConfig, CLIPTextModel

from pipeline_sketch_guided.testing import tiny_tokenizer
from pipeline_sketch_guided.training.denoisers import inpainting_inputs, inpainting_mask
from pipeline_sketch_guided.training.shapes import (
    BACKGROUND_STYLES,
    IMAGE_SIZE,
    LAYOUTS,
    NEW_STYLES,
    WORDS,
    render_sample,
)
from pipeline_sketch_guided.utils import device_name

# Noise schedule of Stable Diffusion 1.x, so that the demo model behaves like the models users know.
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
MAX_TOKENS = 16  # the longest caption is 13 tokens with its start and end tokens


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--num_images", type=int, default=20000, help="training images, seeds 0..N-1")
    parser.add_argument("--vae_steps", type=int, default=400)
    parser.add_argument("--vae_batch_size", type=int, default=16)
    parser.add_argument("--decoder_steps", type=int, default=0, help="decoder fine-tuning (--only_decoder)")
    parser.add_argument(
        "--only_decoder", action="store_true", help="fine-tune the decoder and stop; can run beside the UNet stage"
    )
    parser.add_argument("--unet_steps", type=int, default=4000)
    parser.add_argument("--unet_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--caption_dropout", type=float, default=0.1)
    parser.add_argument("--checkpoint_every", type=int, default=200)
    parser.add_argument("--max_minutes", type=float, default=None, help="stop (after a checkpoint) after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init_from",
        type=Path,
        default=None,
        help="a trained demo pipeline folder: keep its VAE, train its text encoder and UNet further",
    )
    parser.add_argument(
        "--styles",
        nargs="+",
        default=list(BACKGROUND_STYLES),
        choices=BACKGROUND_STYLES + NEW_STYLES,
        help="the backgrounds of the training images",
    )
    parser.add_argument("--layout", default="inside", choices=LAYOUTS, help="how the shapes are sized and placed")
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--inpainting",
        action="store_true",
        help="with --init_from: make its UNet an inpainting UNet (9 input channels) and train it on random masks",
    )
    args = parser.parse_args(argv)
    if args.inpainting and args.init_from is None:
        parser.error("--inpainting makes an inpainting UNet from a trained one: give the pipeline with --init_from")
    return args


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        # Narrow at full resolution, where nearly all of a VAE's time goes; flat-coloured shapes need little width.
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def make_text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def inpainting_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """`unet` taking, after its latents, a repaint mask and the masked image's latents (`2 * in_channels + 1` input
    channels): the new channels' input weights are zero, so that it starts out computing exactly what `unet` does."""
    channels = unet.config.in_channels
    inpainting = UNet2DConditionModel.from_config({**unet.config, "in_channels": 2 * channels + 1})
    state = unet.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], channels + 1, *weight.shape[2:])], 1)
    inpainting.load_state_dict(state)
    return inpainting.to(unet.dtype)


@torch.no_grad()
def encode_inpainting_inputs(vae: AutoencoderKL, images: np.ndarray, seed: int) -> torch.Tensor:
    """Per image, what an inpainting UNet reads after the latents (`UNetDenoiser.inpainting_inputs`): its mask
    (`inpainting_mask`) at the latents' size, then the latents of the image with the masked pixels zeroed (posterior
    means, scaled as the pipeline scales them)."""

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    inputs = []
    for start in range(0, len(images), 256):
        pixels = to_tensor(images[start : start + 256]).to(vae.device)
        masks = torch.stack([inpainting_mask(start + i, pixels.shape[-1], seed) for i in range(len(pixels))])
        inputs.append(inpainting_inputs(encode, pixels, masks).cpu())
    return torch.cat(inputs)


def _render(arguments: tuple[int, tuple[str, ...], str]) -> tuple[np.ndarray, str]:
    image, caption, _ = render_sample(*arguments)
    return np.asarray(image), caption


def load_dataset(
    output_dir: Path, num_images: int, styles=BACKGROUND_STYLES, layout: str = "inside"
) -> tuple[np.ndarray, list[str]]:
    """The rendered images (uint8, N x 64 x 64 x 3) and captions, cached in `output_dir/dataset.npz` (and rendered
    again when the cache holds another number of images, styles or layout)."""
    cache = output_dir / "dataset.npz"

    def recipe_of(styles, layout: str) -> str:
        return json.dumps({"styles": list(styles), "layout": layout})

    recipe = recipe_of(styles, layout)
    if cache.is_file():
        data = np.load(cache)
        # A cache from before styles and layouts holds the default recipe.
        cached = str(data["recipe"]) if "recipe" in data else recipe_of(BACKGROUND_STYLES, "inside")
        if len(data["images"]) == num_images and cached == recipe:
            return data["images"], json.loads(str(data["captions"]))
    with ProcessPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        jobs = [(seed, tuple(styles), layout) for seed in range(num_images)]
        rendered = list(pool.map(_render, jobs, chunksize=500))
    images = np.stack([image for image, _ in rendered])
    captions = [caption for _, caption in rendered]
    atomic_save(
        lambda path: np.savez(path, images=images, captions=json.dumps(captions), recipe=recipe), cache, suffix=".npz"
    )
    return images, captions


def atomic_save(write, target: Path, suffix: str = "") -> None:
    """Write to a temporary name beside `target`, then rename: a run killed mid-write leaves the old file."""
    temporary = target.with_name(target.name + ".tmp" + suffix)
    if temporary.is_dir():
        shutil.rmtree(temporary)
    write(temporary)
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(temporary, target)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def save_checkpoint(directory: Path, step: int, **state) -> None:
    atomic_save(lambda path: torch.save({"step": step, **state}, path), directory / "checkpoint.pt")


def load_checkpoint(directory: Path) -> dict | None:
    path = directory / "checkpoint.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


class Clock:
    def __init__(self, max_minutes: float | None):
        self.start, self.limit = time.monotonic(), max_minutes

    def out_of_time(self) -> bool:
        return self.limit is not None and time.monotonic() - self.start > self.limit * 60


def train_vae(args, images: np.ndarray, clock: Clock) -> tuple[AutoencoderKL, int]:
    stage = args.output_dir / "vae_stage"
    stage.mkdir(parents=True, exist_ok=True)
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    step = 0
    if (checkpoint := load_checkpoint(stage)) is not None:
        vae.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
    generator = torch.Generator().manual_seed(args.seed + step)
    started = time.monotonic()
    while step < args.vae_steps and not clock.out_of_time():
        batch = to_tensor(images[torch.randint(len(images), (args.vae_batch_size,), generator=generator).numpy()])
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        # A light KL term keeps the latents near a unit Gaussian without blurring the reconstructions.
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if step % 25 == 0:
            print(f"vae step {step}: loss {loss.item():.5f} ({(time.monotonic() - started) / 60:.1f} min)", flush=True)
        if step % args.checkpoint_every == 0 or step == args.vae_steps:
            save_checkpoint(stage, step, model=vae.state_dict(), optimizer=optimizer.state_dict())
    save_checkpoint(stage, step, model=vae.state_dict(), optimizer=optimizer.state_dict())
    vae.requires_grad_(False)
    return vae.eval(), step


def train_decoder(args, images: np.ndarray, vae: AutoencoderKL, clock: Clock) -> int:
    """Fine-tune the VAE's decoder alone on the encoder's posterior means, the latents the UNet learns to make.

    The encoder, and so the UNet's training data, stay as they are: this stage can run beside the UNet's. It loads its
    own checkpoint when present, so `decoder_weights` can hand the result to the final pipeline.
    """
    stage = args.output_dir / "decoder_stage"
    stage.mkdir(parents=True, exist_ok=True)
    decoder = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for parameter in decoder:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder, lr=5e-4)
    step = 0
    if (checkpoint := load_checkpoint(stage)) is not None:
        vae.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
    generator = torch.Generator().manual_seed(args.seed + 2 + step)
    started = time.monotonic()
    while step < args.decoder_steps and not clock.out_of_time():
        batch = to_tensor(images[torch.randint(len(images), (args.vae_batch_size,), generator=generator).numpy()])
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.mean
        loss = F.mse_loss(vae.decode(latents).sample, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if step % 25 == 0:
            minutes = (time.monotonic() - started) / 60
            print(f"decoder step {step}: loss {loss.item():.5f} ({minutes:.1f} min)", flush=True)
        if step % args.checkpoint_every == 0:
            save_checkpoint(stage, step, model=vae.state_dict(), optimizer=optimizer.state_dict())
    save_checkpoint(stage, step, model=vae.state_dict(), optimizer=optimizer.state_dict())
    return step


def use_finetuned_decoder(args, vae: AutoencoderKL) -> None:
    """Load the decoder of `train_decoder`'s checkpoint, if there is one, into `vae` (the encoder is unchanged)."""
    if (checkpoint := load_checkpoint(args.output_dir / "decoder_stage")) is not None:
        decoder = {k: v for k, v in checkpoint["model"].items() if k.startswith(("decoder.", "post_quant_conv."))}
        vae.load_state_dict(decoder, strict=False)
        print(f"using the decoder fine-tuned for {checkpoint['step']} steps", flush=True)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: np.ndarray) -> torch.Tensor:
    device = vae.device
    latents = [
        vae.encode(to_tensor(images[i : i + 256]).to(device)).latent_dist.mean.cpu() for i in range(0, len(images), 256)
    ]
    return torch.cat(latents)


def train_unet(args, vae, latents, captions, clock: Clock, inpainting_inputs: torch.Tensor | None = None):
    stage = args.output_dir / "unet_stage"
    stage.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(WORDS, model_max_length=MAX_TOKENS)
    token_ids = tokenizer(captions + [""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    caption_ids, empty_ids = token_ids[:-1], token_ids[-1]
    torch.manual_seed(args.seed)
    if args.init_from is not None:
        unet = UNet2DConditionModel.from_pretrained(args.init_from, subfolder="unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(args.init_from, subfolder="text_encoder", dtype=torch.float32)
        if inpainting_inputs is not None and unet.config.in_channels == latents.shape[1]:
            unet = inpainting_unet(unet)
    else:
        unet, text_encoder = make_unet(), make_text_encoder(len(tokenizer))
    device = torch.device(args.device)
    unet.to(device).train()
    text_encoder.to(device).train()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    # foreach: one kernel per step for all tensors, not one per tensor; on a CPU that is most of a small model's step.
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=1e-2, foreach=True)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, foreach=True)
    scheduler = DDPMScheduler(**SCHEDULE)
    step = 0
    if (checkpoint := load_checkpoint(stage)) is not None:
        unet.load_state_dict(checkpoint["unet"])
        text_encoder.load_state_dict(checkpoint["text_encoder"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        ema.load_state_dict(checkpoint["ema"])
        ema.to(device)
        step = checkpoint["step"]
    latents = latents.to(device) * vae.config.scaling_factor
    if inpainting_inputs is not None:
        inpainting_inputs = inpainting_inputs.to(device)
    caption_ids, empty_ids = caption_ids.to(device), empty_ids.to(device)

    def checkpoint_now():
        save_checkpoint(
            stage,
            step,
            unet=unet.state_dict(),
            text_encoder=text_encoder.state_dict(),
            optimizer=optimizer.state_dict(),
            ema=ema.state_dict(),
        )

    generator = torch.Generator().manual_seed(args.seed + 1 + step)
    warmup = 100
    started, running = time.monotonic(), []
    while step < args.unet_steps and not clock.out_of_time():
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * min(1.0, (step + 1) / warmup)
        index = torch.randint(len(latents), (args.unet_batch_size,), generator=generator).to(device)
        clean = latents[index]
        ids = caption_ids[index].clone()
        ids[(torch.rand(len(ids), generator=generator) < args.caption_dropout).to(device)] = empty_ids
        noise = torch.randn(clean.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
        timesteps = timesteps.to(device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        if inpainting_inputs is not None:
            noisy = torch.cat([noisy, inpainting_inputs[index]], dim=1)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        step += 1
        running.append(loss.detach())  # no .item() each step: on a GPU that would wait for every step to finish
        if step % 50 == 0:
            minutes = (time.monotonic() - started) / 60
            print(f"unet step {step}: loss {torch.stack(running).mean():.4f} ({minutes:.1f} min)", flush=True)
            running = []
        if step % args.checkpoint_every == 0:
            checkpoint_now()
    checkpoint_now()
    ema.copy_to(unet.parameters())
    return unet.cpu().eval(), text_encoder.cpu().eval(), tokenizer, step


def main(argv=None) -> None:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    # Denormal floats (Adam's tiny second moments, for one) are many times slower on CPUs; flushing them to zero made
    # a VAE step 1.7x faster here.
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    clock = Clock(args.max_minutes)
    started = time.monotonic()
    images, captions = load_dataset(args.output_dir, args.num_images, args.styles, args.layout)
    print(f"dataset: {len(images)} images ({(time.monotonic() - started):.0f} s)", flush=True)
    if args.init_from is not None:
        vae = AutoencoderKL.from_pretrained(args.init_from, subfolder="vae", torch_dtype=torch.float32).eval()
        vae.requires_grad_(False)
        vae_step = args.vae_steps = 0
    else:
        vae, vae_step = train_vae(args, images, clock)
    if vae_step < args.vae_steps:
        print(f"stopped at VAE step {vae_step} of {args.vae_steps}: run the same command again to resume", flush=True)
        return
    if args.only_decoder:
        print(f"decoder fine-tuned for {train_decoder(args, images, vae, clock)} steps", flush=True)
        return
    # Encoding 20,000 images takes minutes on a CPU: keep them for the next run of the same VAE.
    cache = args.output_dir / f"latents-vae{vae_step}.pt"
    if cache.is_file():
        latents = torch.load(cache, weights_only=True)
    else:
        latents = encode_dataset(vae.to(args.device), images)
        vae.cpu()
        atomic_save(lambda path: torch.save(latents, path), cache)
    if args.init_from is None:  # a VAE kept from --init_from keeps the scale its UNet learned
        # Scale the latents to unit variance, as Stable Diffusion's scaling_factor does for its VAE.
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
    print(f"latents: std {latents.std():.3f}, scaling_factor {vae.config.scaling_factor:.4f}", flush=True)
    inpainting_inputs = None
    if args.inpainting:
        cache = args.output_dir / f"inpainting-inputs-{len(images)}-seed{args.seed}.pt"
        if cache.is_file():
            inpainting_inputs = torch.load(cache, weights_only=True)
        else:
            inpainting_inputs = encode_inpainting_inputs(vae.to(args.device), images, args.seed)
            vae.cpu()
            atomic_save(lambda path: torch.save(inpainting_inputs, path), cache)
    unet, text_encoder, tokenizer, unet_step = train_unet(args, vae, latents, captions, clock, inpainting_inputs)
    use_finetuned_decoder(args, vae)
    pipeline_class = StableDiffusionInpaintPipeline if args.inpainting else StableDiffusionPipeline
    pipe = pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    atomic_save(pipe.save_pretrained, args.output_dir / "pipeline")
    minutes = (time.monotonic() - started) / 60
    report = {
        "minutes_this_run": round(minutes, 1),
        "vae_steps_done": vae_step,
        "unet_steps_done": unet_step,
        "device": device_name(args.device),
        "threads": torch.get_num_threads(),
        **vars(args),
    }
    (args.output_dir / "training_report.json").write_text(json.dumps(report, default=str, indent=2))
    print(f"done in {minutes:.1f} min: {args.output_dir / 'pipeline'}", flush=True)


if __name__ == "__main__":
    main()
