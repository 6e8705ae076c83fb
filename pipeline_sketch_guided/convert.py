"""Convert the Latent Guidance Predictors published by the community for Stable Diffusion 1.5 to `LGPModel`.

Two SD1.5 LGPs are on the Hub, both the same per-pixel MLP (state-dict keys `layers.0` ... `layers.12`) but trained on
different UNet blocks, a different classifier-free guidance branch and edge maps of opposite polarity:

- sketch2img: `edge_predictor.pt` of nyanko7/sketch2img-edge-predictor-train, a bare state dict, 9320 inputs;
- Sketch-Guided-Stable-Diffusion: `SDv1.5-trained_LGP.pt` of ogkalu/Stable-Diffusion-Latent-Guidance-Predictor, a dict
  whose `model_state_dict` is the MLP (beside the optimizer state), 7080 inputs.

`LGPModel.layers` has exactly their layout and input order ([block features | n | sin(2 pi n 2^-l), frequency-major]),
so converting is writing the config that says what each was trained on and loading the weights unchanged. The facts
below come from the two projects' training code (see DESIGN.md, "Published details").
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import logging

from .lgp import DEFAULT_NUM_NOISE_FREQUENCIES, LGPModel
from .sketch import SKETCH_POLARITIES

logger = logging.get_logger(__name__)

# SD1.5 latents have 4 channels; the noise-level input is n (4 channels) and sin(2 pi n 2^-l) for l = 0..8 (36).
SD15_LATENT_CHANNELS = 4
NOISE_LEVEL_CHANNELS = SD15_LATENT_CHANNELS * (1 + DEFAULT_NUM_NOISE_FREQUENCIES)

# Where Sketch-Guided-Stable-Diffusion's train_LGP.py saves the MLP (beside `optimizer_state_dict` and `loss`).
MODEL_STATE_DICT_KEY = "model_state_dict"

_LINEAR_WEIGHT = re.compile(r"^layers\.(\d+)\.weight$")
# In `layers`, Linear layers sit at 0, 3, 6, ...: each hidden Linear is followed by ReLU and BatchNorm1d.
_LAYERS_PER_HIDDEN = 3


@dataclass(frozen=True)
class CommunityLGPFormat:
    """What a published LGP was trained with: everything `LGPModel`'s config must say to compute the same function.

    Args:
        name: short name, as given to `--format`.
        repo_id: the Hub repository that publishes it.
        filename: the checkpoint file in that repository.
        container: how the file holds the MLP: `"state_dict"` (bare) or `"model_state_dict"` (a dict entry).
        blocks: diffusers module paths of the SD1.5 UNet whose outputs it reads, in input order.
        block_channels: the channels of each of those outputs in SD1.5.
        feature_branch: the classifier-free guidance branch whose activations it was trained on.
        sketch_polarity: how its training edge maps look.
        training_data: what it was trained on, for its model card.
        project_url: the code that trained it.
    """

    name: str
    repo_id: str
    filename: str
    container: str
    blocks: tuple[str, ...]
    block_channels: tuple[int, ...]
    feature_branch: str
    sketch_polarity: str
    training_data: str
    project_url: str

    @property
    def in_features(self) -> int:
        return sum(self.block_channels) + NOISE_LEVEL_CHANNELS

    def lgp_config(self, hidden_dims: list[int], out_channels: int) -> dict:
        return {
            "blocks": list(self.blocks),
            "block_channels": list(self.block_channels),
            "feature_branch": self.feature_branch,
            "tuple_output_index": 0,  # both read the first element where a block returns a tuple
            "latent_channels": SD15_LATENT_CHANNELS,
            "num_noise_frequencies": DEFAULT_NUM_NOISE_FREQUENCIES,
            "hidden_dims": hidden_dims,
            "out_channels": out_channels,
            "sketch_polarity": self.sketch_polarity,
        }


# Mikubill/sketch2img's trainer hooks down_blocks[0:3], then mid_block.attentions + mid_block.resnets (so the attention
# comes before the first resnet, which is not execution order), then up_blocks[0:3]; it runs the UNet on the caption's
# embedding alone (the conditional branch), and its targets are Anime2Sketch line art: dark lines on white.
# Channels: SD1.5's block_out_channels (320, 640, 1280, 1280); 320+640+1280 + 3*1280 + 1280+1280+640 = 9280.
SKETCH2IMG_SD15 = CommunityLGPFormat(
    name="sketch2img",
    repo_id="nyanko7/sketch2img-edge-predictor-train",
    filename="edge_predictor.pt",
    container="state_dict",
    blocks=(
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block.attentions.0",
        "mid_block.resnets.0",
        "mid_block.resnets.1",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
    ),
    block_channels=(320, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640),
    feature_branch="conditional",
    sketch_polarity="dark_on_light",
    training_data=(
        "per its trainer's published config: anime illustrations (a pixiv set) with Anime2Sketch line art as"
        " targets, timesteps 0..999, on an anime SD1.x fine-tune; the Hub file states neither its data nor its base"
        " model"
    ),
    project_url="https://github.com/Mikubill/sketch2img",
)

# ogkalu2/Sketch-Guided-Stable-Diffusion's train_LGP.py hooks down_blocks 0..3 then up_blocks 0..3 and keeps the first
# half of the classifier-free guidance batch, whose embeddings are the empty prompt's (the unconditional branch); its
# targets are PiDiNet edge maps (light edges on dark). 320+640+1280+1280 + 1280+1280+640+320 = 7040.
SKETCH_GUIDED_SD_SD15 = CommunityLGPFormat(
    name="sketch-guided-stable-diffusion",
    repo_id="ogkalu/Stable-Diffusion-Latent-Guidance-Predictor",
    filename="SDv1.5-trained_LGP.pt",
    container="model_state_dict",
    blocks=(
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "down_blocks.3",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
        "up_blocks.3",
    ),
    block_channels=(320, 640, 1280, 1280, 1280, 1280, 640, 320),
    feature_branch="unconditional",
    sketch_polarity="light_on_dark",
    training_data="4995 ImageNet images (class names as captions) with PiDiNet edge maps, timesteps 250..899",
    project_url="https://github.com/ogkalu2/Sketch-Guided-Stable-Diffusion",
)

COMMUNITY_FORMATS: dict[str, CommunityLGPFormat] = {f.name: f for f in (SKETCH2IMG_SD15, SKETCH_GUIDED_SD_SD15)}


def _expected_formats() -> str:
    return " or ".join(
        f"{f.in_features} ({f.name}: {f.filename} of {f.repo_id}, a {f.container})" for f in COMMUNITY_FORMATS.values()
    )


# What `sketch-guided convert` reads, said in every message about a file it cannot read.
CONVERTIBLE = (
    "A convertible file is a community LGP checkpoint holding the MLP's state dict: a PyTorch file written by"
    " torch.save (.pt, .pth, .bin, .ckpt) or a .safetensors file."
)
# The first bytes of the files torch.load reads: a zip archive (torch.save since 1.6) or a pickle (older torch.save).
_ZIP_MAGIC, _PICKLE_PROTOCOL_OPCODE = b"PK\x03\x04", 0x80


def _load_tensors_only(path: Path):
    """`torch.load(path, weights_only=True)`, with one line that says what the file is not when it fails. Nothing is
    ever unpickled with `weights_only=False`: a file that needs it would run code."""
    with open(path, "rb") as file:
        head = file.read(4)
    if not (head.startswith(_ZIP_MAGIC) or head[0] == _PICKLE_PROTOCOL_OPCODE):
        raise ValueError(
            f"{str(path)!r} is not a PyTorch file (it starts with {head!r}, neither a zip archive nor a pickle)."
            f" {CONVERTIBLE}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols: not the user's concern
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"a {unsafe.group(1)} object" if unsafe else "objects other than tensors in plain containers"
        raise ValueError(
            f"{str(path)!r} holds {what}: loading it could run code, so it is not loaded. {CONVERTIBLE}"
        ) from error
    except Exception as error:  # torch raises EOFError, RuntimeError, KeyError, ... for damaged files
        reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{str(path)!r} is a damaged or truncated PyTorch file ({reason}). {CONVERTIBLE}") from error


def load_community_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the MLP's state dict from a community checkpoint file, dropping everything else in it.

    Pickle files (`.pt`, `.pth`, `.bin`, `.ckpt`) are read with `torch.load(weights_only=True)`, which refuses to run
    code; `.safetensors` files are read as such. The file may hold the bare state dict (sketch2img) or a dict with the
    state dict under `"model_state_dict"` (Sketch-Guided-Stable-Diffusion; its optimizer state and loss are dropped).

    Args:
        path: the checkpoint file.

    Returns:
        `dict[str, torch.Tensor]`: the MLP's state dict, keys `layers.<i>.<name>`.

    Raises:
        ValueError: if the file cannot be read that way, or holds neither layout.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"No LGP checkpoint file at {str(path)!r}.")
    if path.stat().st_size == 0:
        raise ValueError(f"{str(path)!r} is empty (0 bytes), not a checkpoint. {CONVERTIBLE}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            checkpoint = load_file(path)
        except SafetensorError as error:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({error}). {CONVERTIBLE}") from error
    else:
        checkpoint = _load_tensors_only(path)

    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"{str(path)!r} holds a {type(checkpoint).__name__}; expected a dict: the MLP's state dict (sketch2img) or"
            f" a dict with {MODEL_STATE_DICT_KEY!r} (Sketch-Guided-Stable-Diffusion)."
        )
    if MODEL_STATE_DICT_KEY in checkpoint:
        dropped = sorted(str(key) for key in checkpoint if key != MODEL_STATE_DICT_KEY)
        if dropped:
            logger.info(f"Converting {MODEL_STATE_DICT_KEY!r} of {path.name}; dropping {', '.join(dropped)}.")
        checkpoint = checkpoint[MODEL_STATE_DICT_KEY]
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"{MODEL_STATE_DICT_KEY!r} of {str(path)!r} is a {type(checkpoint).__name__}, not a dict.")

    state_dict = dict(checkpoint)
    # A model saved while wrapped in DataParallel / DistributedDataParallel has every key prefixed with `module.`.
    if state_dict and all(isinstance(key, str) and key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    if "layers.0.weight" not in state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        found = ", ".join(repr(key) for key in list(state_dict)[:8]) + (", ..." if len(state_dict) > 8 else "")
        raise ValueError(
            f"{str(path)!r} is not a community LGP checkpoint: found a dict with keys {found or '(none)'}; expected the"
            " MLP's state dict (tensors under 'layers.0.weight', 'layers.0.bias', 'layers.2.running_mean', ...) either"
            f" bare (sketch2img) or under {MODEL_STATE_DICT_KEY!r} (Sketch-Guided-Stable-Diffusion)."
        )
    return state_dict


def _mlp_widths(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, list[int], int]:
    """(input width, hidden widths, output width) of the MLP, read from its Linear weights."""
    linear = {int(m.group(1)): state_dict[key] for key in state_dict if (m := _LINEAR_WEIGHT.match(key))}
    linear = {index: weight for index, weight in linear.items() if weight.ndim == 2}
    indices = sorted(linear)
    expected_indices = list(range(0, _LAYERS_PER_HIDDEN * len(indices), _LAYERS_PER_HIDDEN))
    if len(indices) < 2 or indices != expected_indices:
        raise ValueError(
            f"Found Linear weights at layers {indices}; expected them at layers {expected_indices or [0, 3, '...']}"
            " (Linear, then ReLU, BatchNorm1d, Linear for each hidden width), as in the community LGPs."
        )
    widths = [int(linear[i].shape[1]) for i in indices] + [int(linear[indices[-1]].shape[0])]
    for previous, index in itertools.pairwise(indices):
        if linear[previous].shape[0] != linear[index].shape[1]:
            raise ValueError(
                f"layers.{previous}.weight has {linear[previous].shape[0]} outputs but layers.{index}.weight takes"
                f" {linear[index].shape[1]} inputs: the checkpoint is not one MLP."
            )
    return widths[0], widths[1:-1], widths[-1]


def lgp_from_community_state_dict(
    state_dict: Mapping[str, torch.Tensor], source_format: str | CommunityLGPFormat | None = None
) -> LGPModel:
    """Build the `LGPModel` that computes the same function as a community LGP's MLP.

    Args:
        state_dict: the MLP's state dict (see `load_community_state_dict`).
        source_format: `"sketch2img"`, `"sketch-guided-stable-diffusion"` or a `CommunityLGPFormat`; by default
            told from the input width (9320 or 7080), which differs between the two.

    Returns:
        `LGPModel` in eval mode (BatchNorm uses its running statistics, as at inference).

    Raises:
        ValueError: naming what was found and what was expected when the input width, a key or a shape does not fit.
    """
    in_features, hidden_dims, out_channels = _mlp_widths(state_dict)
    if source_format is None:
        matches = [f for f in COMMUNITY_FORMATS.values() if f.in_features == in_features]
        if not matches:
            raise ValueError(
                f"The checkpoint's first layer takes {in_features} inputs; expected {_expected_formats()}. An LGP of"
                " another width was trained on other blocks or another base model: load it with"
                " `LGPModel.from_pretrained` if it is in diffusers format."
            )
        source_format = matches[0]
    elif isinstance(source_format, str):
        if source_format not in COMMUNITY_FORMATS:
            raise ValueError(f"Unknown LGP format {source_format!r}; choose one of {list(COMMUNITY_FORMATS)}.")
        source_format = COMMUNITY_FORMATS[source_format]
    fmt = source_format
    if in_features != fmt.in_features:
        raise ValueError(
            f"The checkpoint's first layer takes {in_features} inputs, but the {fmt.name} format has"
            f" {fmt.in_features} ({sum(fmt.block_channels)} feature channels from {len(fmt.blocks)} blocks +"
            f" {NOISE_LEVEL_CHANNELS} noise-level channels)."
        )

    lgp = LGPModel(**fmt.lgp_config(hidden_dims, out_channels))
    expected = lgp.state_dict()
    state_dict = dict(state_dict)
    for key, value in expected.items():
        # Checkpoints from torch < 0.4.1 have no BatchNorm step counter; it plays no part at inference.
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint does not have the community LGP's layout: missing keys {missing}, unexpected keys"
            f" {unexpected}."
        )
    for key, value in expected.items():
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{key} has shape {tuple(state_dict[key].shape)} in the checkpoint; expected {tuple(value.shape)}."
            )
    lgp.load_state_dict(state_dict)
    return lgp.eval()


def convert_community_lgp(
    source: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    filename: str | None = None,
    source_format: str | None = None,
    sketch_polarity: str | None = None,
    **download_kwargs,
) -> LGPModel:
    """Convert a published SD1.5 LGP to `LGPModel`, and save it as a diffusers folder if `output_dir` is given.

    Args:
        source: a local checkpoint file, or a Hub repo id (needs internet), such as
            `"nyanko7/sketch2img-edge-predictor-train"` or `"ogkalu/Stable-Diffusion-Latent-Guidance-Predictor"`.
        output_dir: where to write `config.json` and `diffusion_pytorch_model.safetensors`; nothing is saved if `None`.
        filename: the file in the Hub repo; defaults to the known file of the two repos above.
        source_format: `"sketch2img"` or `"sketch-guided-stable-diffusion"`; by default told from the weights.
        sketch_polarity: `"dark_on_light"` or `"light_on_dark"`, the look of the edge maps it was trained on, when
            it is not the format's recorded one (sketch2img's history has both; docs/polarity.md).
        download_kwargs: passed to `huggingface_hub.hf_hub_download` (`revision`, `cache_dir`, `token`, ...).

    Returns:
        `LGPModel`: the converted model, in eval mode. `LGPModel.from_pretrained(output_dir)` loads it back.
    """
    path = Path(source)
    if path.is_dir():
        if filename is None:
            raise ValueError(f"{str(source)!r} is a folder; pass the checkpoint file, or name it with `filename`.")
        path = path / filename
    elif not path.is_file():
        repo_id = str(source)
        if filename is None:
            known = {f.repo_id: f.filename for f in COMMUNITY_FORMATS.values()}
            if repo_id not in known:
                raise ValueError(
                    f"{repo_id!r} is neither a local file nor a Hub repo whose LGP file is known ({', '.join(known)});"
                    " pass `filename` to name the checkpoint in that repo."
                )
            filename = known[repo_id]
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(repo_id=repo_id, filename=filename, **download_kwargs))

    if sketch_polarity is not None and sketch_polarity not in SKETCH_POLARITIES:
        raise ValueError(f"`sketch_polarity` must be one of {SKETCH_POLARITIES}, got {sketch_polarity!r}.")
    lgp = lgp_from_community_state_dict(load_community_state_dict(path), source_format=source_format)
    if sketch_polarity is not None:
        lgp.register_to_config(sketch_polarity=sketch_polarity)
    if output_dir is not None:
        lgp.save_pretrained(output_dir, safe_serialization=True)
    return lgp
