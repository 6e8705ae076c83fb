"""Train a small flow-matching diffusion transformer (Stable Diffusion 3's architecture) on the demo's shapes data.

    python -m pipeline_sketch_guided.training.train_demo_transformer --output_dir outputs/demo-sd3 --max_minutes 40

The transformer demo model: the shipped demo model's VAE and CLIP text encoder (frozen, used as SD3's two CLIP
encoders, with no T5: `StableDiffusion3Pipeline` then conditions on zeros in T5's place, as it does for any SD3
checkpoint loaded with `text_encoder_3=None`), and a new `SD3Transformer2DModel` trained from scratch by rectified flow
as SD3 is: x_t = (1 - sigma) x_0 + sigma noise, sigma drawn from a logit-normal, the transformer predicting the
velocity noise - x_0 at timestep 1000 sigma, captions dropped 10% of the time for classifier-free guidance (the
pipeline's embeddings of the empty prompt in their place), an EMA of the weights. The captions are encoded by the
pipeline's own `encode_prompt`, with the pipeline's default `max_sequence_length`, so the transformer learns on the
conditioning a user's call gives it.

The encoded dataset is cached, training checkpoints atomically and resumes where it stopped when run again with the
same `--output_dir`. The result is an ordinary `StableDiffusion3Pipeline` folder in `<output_dir>/pipeline`, which
`SketchGuidedStableDiffusion3Pipeline.from_pretrained` loads; `train_lgp` trains its LGP.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline_sketch_guided.demo import DEMO_MODEL_DIR
from pipeline_sketch_guided.training.shapes import BACKGROUND_STYLES, LAYOUTS, NEW_STYLES
from pipeline_sketch_guided.training.train_demo_model import (
    Clock,
    atomic_save,
    encode_dataset,
    load_checkpoint,
    load_dataset,
    save_checkpoint,
)
from pipeline_sketch_guided.utils import device_name

# SD3's default `max_sequence_length`: the T5 zeros a call of the pipeline gets when it does not set it.
PIPELINE_MAX_SEQUENCE_LENGTH = 256


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument(
        "--init_from",
        type=Path,
        default=DEMO_MODEL_DIR,
        help="a Stable Diffusion demo pipeline folder whose VAE, tokenizer and text encoder are kept (default: the"
        " shipped demo model)",
    )
    parser.add_argument("--num_images", type=int, default=20000, help="training images, seeds 0..N-1")
    parser.add_argument("--layout", default="inside", choices=LAYOUTS, help="how the shapes are sized and placed")
    parser.add_argument("--styles", nargs="+", default=list(BACKGROUND_STYLES), choices=BACKGROUND_STYLES + NEW_STYLES)
    parser.add_argument("--width", type=int, default=128, help="the transformer's hidden size (heads of 32)")
    parser.add_argument("--num_layers", type=int, default=6)
    parser.add_argument("--patch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--warmup_steps", type=int, default=200)
    parser.add_argument("--caption_dropout", type=float, default=0.1)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--checkpoint_every", type=int, default=200)
    parser.add_argument("--max_minutes", type=float, default=None, help="stop (after a checkpoint) after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.width % 32 != 0 or args.width <= 0:
        parser.error(f"--width must be a positive multiple of 32 (heads of 32 channels), got {args.width}")
    if not (args.init_from / "vae").is_dir() or not (args.init_from / "text_encoder").is_dir():
        parser.error(f"--init_from {args.init_from} is not a Stable Diffusion pipeline folder (no vae or text_encoder)")
    return args


def clip_with_projection(folder: Path) -> CLIPTextModelWithProjection:
    """The folder's `CLIPTextModel` as SD3 reads a CLIP encoder: the same text model, with a projection (as wide as the
    model, freshly initialised) for the pooled embedding."""
    plain = CLIPTextModel.from_pretrained(folder, dtype=torch.float32)
    config = CLIPTextConfig.from_dict({**plain.config.to_dict(), "projection_dim": plain.config.hidden_size})
    encoder = CLIPTextModelWithProjection(config)
    # transformers 5 lays a CLIPTextModel's modules out at the top; the projection model keeps them in `text_model`.
    source = getattr(plain, "text_model", plain)
    encoder.text_model.load_state_dict(source.state_dict())
    return encoder.eval().requires_grad_(False)


def make_transformer(args, latent_size: int, text_width: int) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=args.patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=args.num_layers,
        attention_head_dim=32,
        num_attention_heads=args.width // 32,
        joint_attention_dim=text_width,
        caption_projection_dim=args.width,
        pooled_projection_dim=text_width,
        pos_embed_max_size=2 * latent_size // args.patch_size,  # room for images up to twice the trained size
    )


def load_vae(args) -> AutoencoderKL:
    """The init pipeline's VAE, frozen, with SD3's `shift_factor` (0 where it has none: it was trained without)."""
    vae = AutoencoderKL.from_pretrained(args.init_from, subfolder="vae", torch_dtype=torch.float32).eval()
    vae.requires_grad_(False)
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    return vae


def build_pipeline(args, vae: AutoencoderKL, latent_size: int) -> StableDiffusion3Pipeline:
    """The pipeline with a new transformer: `vae` (`load_vae`) and the init pipeline's text encoder as both CLIP
    encoders."""
    tokenizer = CLIPTokenizer.from_pretrained(args.init_from, subfolder="tokenizer")
    # Seeded, so that a resumed run builds the same pooled projections; the second differs from the first.
    torch.manual_seed(args.seed + 6)
    text_encoder = clip_with_projection(args.init_from / "text_encoder")
    torch.manual_seed(args.seed + 7)
    text_encoder_2 = clip_with_projection(args.init_from / "text_encoder")
    width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    torch.manual_seed(args.seed)
    return StableDiffusion3Pipeline(
        transformer=make_transformer(args, latent_size, width),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),  # SD3's 3.0 is for 128x128 latents; these are tiny
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


@torch.no_grad()
def conditioning(pipe: StableDiffusion3Pipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the pipeline feeds the transformer for these captions: the joint text embeddings and the pooled ones."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        captions,
        None,
        None,
        device=pipe.transformer.device,
        do_classifier_free_guidance=False,
        max_sequence_length=PIPELINE_MAX_SEQUENCE_LENGTH,
    )
    return embeds, pooled


def train_transformer(args, pipe: StableDiffusion3Pipeline, latents: torch.Tensor, captions: list[str], clock: Clock):
    stage = args.output_dir / "transformer_stage"
    stage.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    transformer = pipe.transformer.to(device).train()
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.learning_rate, weight_decay=1e-2, foreach=True)
    ema = EMAModel(transformer.parameters(), decay=args.ema_decay, foreach=True)
    step = 0
    if (checkpoint := load_checkpoint(stage)) is not None:
        transformer.load_state_dict(checkpoint["transformer"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        ema.load_state_dict(checkpoint["ema"])
        ema.to(device)
        step = checkpoint["step"]
    latents = ((latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor).to(device)
    empty_embeds, empty_pooled = conditioning(pipe, [""])

    def checkpoint_now():
        save_checkpoint(
            stage, step, transformer=transformer.state_dict(), optimizer=optimizer.state_dict(), ema=ema.state_dict()
        )

    generator = torch.Generator().manual_seed(args.seed + 1 + step)
    started, running = time.monotonic(), []
    while step < args.steps and not clock.out_of_time():
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * min(1.0, (step + 1) / args.warmup_steps)
        index = torch.randint(len(latents), (args.batch_size,), generator=generator)
        clean = latents[index.to(device)]
        embeds, pooled = conditioning(pipe, [captions[i] for i in index.tolist()])
        dropped = (torch.rand(len(index), generator=generator) < args.caption_dropout).to(device)
        embeds = torch.where(dropped.view(-1, 1, 1), empty_embeds, embeds)
        pooled = torch.where(dropped.view(-1, 1), empty_pooled, pooled)
        noise = torch.randn(clean.shape, generator=generator).to(device)
        # SD3's timestep density: sigma = sigmoid(n), n ~ N(0, 1), which favours the middle of the flow.
        sigmas = compute_density_for_timestep_sampling(
            "logit_normal", len(clean), logit_mean=0.0, logit_std=1.0, generator=generator
        )
        sigmas = sigmas.to(device).view(-1, 1, 1, 1)
        noisy = (1 - sigmas) * clean + sigmas * noise
        prediction = transformer(
            hidden_states=noisy,
            timestep=sigmas.flatten() * pipe.scheduler.config.num_train_timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
        ).sample
        loss = F.mse_loss(prediction, noise - clean)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(transformer.parameters())
        step += 1
        running.append(loss.detach())
        if step % 50 == 0:
            minutes = (time.monotonic() - started) / 60
            print(f"transformer step {step}: loss {torch.stack(running).mean():.4f} ({minutes:.1f} min)", flush=True)
            running = []
        if step % args.checkpoint_every == 0:
            checkpoint_now()
    checkpoint_now()
    ema.copy_to(transformer.parameters())
    return step


def main(argv=None) -> None:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)  # as in train_demo_model: denormals slow Adam's small moments on CPUs
    clock = Clock(args.max_minutes)
    started = time.monotonic()
    images, captions = load_dataset(args.output_dir, args.num_images, args.styles, args.layout)
    print(f"dataset: {len(images)} images ({(time.monotonic() - started):.0f} s)", flush=True)
    cache = args.output_dir / "latents.pt"
    vae = load_vae(args)
    if cache.is_file():
        latents = torch.load(cache, weights_only=True)
    else:
        latents = encode_dataset(vae.to(args.device), images)
        vae.cpu()
        atomic_save(lambda path: torch.save(latents, path), cache)
    pipe = build_pipeline(args, vae, latent_size=latents.shape[-1])
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"transformer: {parameters / 1e6:.2f}M parameters; latents {tuple(latents.shape[1:])}", flush=True)
    step = train_transformer(args, pipe, latents, captions, clock)
    pipe.to("cpu")
    pipe.transformer.eval()
    atomic_save(pipe.save_pretrained, args.output_dir / "pipeline")
    report = {
        "minutes_this_run": round((time.monotonic() - started) / 60, 1),
        "transformer_steps_done": step,
        "transformer_parameters": parameters,
        "device": device_name(args.device),
        "threads": torch.get_num_threads(),
        **vars(args),
    }
    (args.output_dir / "training_report.json").write_text(json.dumps(report, default=str, indent=2))
    state = "done" if step >= args.steps else "stopped (run the same command again to resume)"
    print(f"{state} at step {step}: {args.output_dir / 'pipeline'}", flush=True)


if __name__ == "__main__":
    main()
