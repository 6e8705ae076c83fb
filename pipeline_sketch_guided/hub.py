"""Publish an LGP on the Hugging Face Hub: a model card, the weights, and the code that `custom_pipeline=` loads.

A published LGP repo is one folder (see `hub_card/README.md`):

    README.md                            model card (huggingface_hub `ModelCard`, template in templates/)
    config.json                          LGPModel config, with `auto_map` so that `AutoModel` finds the class
    diffusion_pytorch_model.safetensors  the weights
    pipeline.py guidance.py lgp.py ...   this package's modules, for users who have not installed it (pipeline.py is
                                         pipeline_xl.py, pipeline_sd3.py or pipeline_flux.py for an SDXL, SD3 or FLUX
                                         base model)
    figures/                             the figures named in the card, if any

The weights sit at the root so that one id serves every way in: `LGPModel.from_pretrained(repo)` with the package,
`AutoModel.from_pretrained(repo, trust_remote_code=True)` without it, and
`DiffusionPipeline.from_pretrained(base, custom_pipeline=repo, trust_remote_code=True, lgp=lgp)` for the pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .convert import CommunityLGPFormat
from .lgp import BLOCK_PRESETS, LGPModel

PACKAGE_DIR = Path(__file__).resolve().parent
# Relative imports as diffusers' dynamic-module loader finds them (`from .x import ...`, `import .x`).
_RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+)\s*$)", flags=re.MULTILINE)
# `AutoModel.from_pretrained(repo, trust_remote_code=True)` imports the class named here from the repo's lgp.py.
LGP_AUTO_MAP = {"AutoModel": "lgp.LGPModel"}
DEFAULT_CARD_TEMPLATE = PACKAGE_DIR / "templates" / "model_card.md"
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_LICENSE = "apache-2.0"  # the license of our own LGPs; converted ones carry their source's terms
CARD_TAGS = ["diffusers", "stable-diffusion", "text-to-image", "sketch-to-image", "latent-guidance-predictor"]


# The pipeline a published LGP's repo carries as its pipeline.py, by the kind of base model: (module, class).
PIPELINES = {
    "sd": ("pipeline.py", "SketchGuidedStableDiffusionPipeline"),
    "sdxl": ("pipeline_xl.py", "SketchGuidedStableDiffusionXLPipeline"),
    "sd3": ("pipeline_sd3.py", "SketchGuidedStableDiffusion3Pipeline"),
    "flux": ("pipeline_flux.py", "SketchGuidedFluxPipeline"),
}


def pipeline_kind(base_model: str, config=None) -> str:
    """The kind of base model, by its Hub id or folder's name ("flux" for FLUX, "sd3" for Stable Diffusion 3 / 3.5,
    "sdxl" for XL), else by the blocks the LGP's `config` reads (FLUX's single-stream blocks, a transformer's blocks:
    SD3), else "sd"."""
    name = base_model.lower()
    if "flux" in name:
        return "flux"
    if re.search(r"(stable-diffusion-3|(^|[^a-z0-9])sd-?3)", name):
        return "sd3"
    if re.search(r"(^|[^a-z])xl([^a-z]|$)", name):
        return "sdxl"
    blocks = list(getattr(config, "blocks", []) or [])
    if any(block.startswith("single_transformer_blocks") for block in blocks):
        return "flux"
    if any(block.startswith("transformer_blocks") for block in blocks):
        return "sd3"
    return "sd"


def hub_code_files(pipeline_file: str = "pipeline.py") -> list[str]:
    """The package modules a Hub repo must carry: the pipeline's file and every module it needs, by relative imports.

    diffusers copies `custom_pipeline` code into its module cache by following relative imports; from a local folder it
    follows only pipeline.py's direct ones. So this also checks that the pipeline's file imports each needed module
    itself. The repo holds `pipeline_file` as its pipeline.py.
    """
    needed, queue = [pipeline_file], [pipeline_file]
    direct: set[str] = set()
    while queue:
        name = queue.pop()
        source = (PACKAGE_DIR / name).read_text(encoding="utf-8")
        for match in _RELATIVE_IMPORT.finditer(source):
            module = f"{match.group(1) or match.group(2)}.py"
            if name == pipeline_file:
                direct.add(module)
            if module not in needed:
                needed.append(module)
                queue.append(module)
    indirect = sorted(set(needed) - direct - {pipeline_file})
    if indirect:
        raise RuntimeError(
            f"{pipeline_file} needs {', '.join(indirect)} only through other modules; diffusers does not copy those for"
            f" a local custom_pipeline folder. Import them in {pipeline_file} directly."
        )
    return needed


def infer_block_preset(blocks: Sequence[str]) -> str | None:
    """The name of the `BLOCK_PRESETS` entry that gives exactly `blocks` for some UNet, or `None` for a custom set."""
    blocks = list(blocks)

    def count(prefix: str) -> int:
        indices = [
            int(name[len(prefix) :]) for name in blocks if name.startswith(prefix) and name[len(prefix) :].isdigit()
        ]
        return max(indices, default=-1) + 1

    num_down, num_up = count("down_blocks."), count("up_blocks.")
    mid = SimpleNamespace(
        attentions=[None] * count("mid_block.attentions."), resnets=[None] * count("mid_block.resnets.")
    )
    # A preset may leave out the last down / up block (sketch2img does), so also try one more than the names show; the
    # exact count first, so that all down then all up blocks read as "down-up".
    for extra in (0, 1):
        for name, preset in BLOCK_PRESETS.items():
            unet = SimpleNamespace(down_blocks=[None] * (num_down + extra), up_blocks=[None] * (num_up + extra))
            unet.mid_block = mid
            if preset(unet) == blocks:
                return name
    return None


def _is_hub_repo_id(name: str | None) -> bool:
    """Whether `name` can be a Hub model id (the Hub rejects a card whose `base_model` is, say, a local path)."""
    if not name or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def card_target_text(config) -> str:
    """How a model card names what the LGP predicts (`target`: configs from before targets predict VAE latents)."""
    if getattr(config, "target", "vae_latent") == "map":
        scale = config.target_scale
        where = "the latent resolution" if scale == 1 else f"{scale}x the latent resolution"
        blur = getattr(config, "target_blur", 0.0)
        blurred = f", blurred by a Gaussian of {blur:g} pixels there (`target_blur={blur:g}`)" if blur > 0 else ""
        return f'the map itself (`target="map"`), area-averaged to {where}{blurred}'
    return 'the VAE latent of the map (`target="vae_latent"`, the paper\'s)'


def card_head_text(config) -> str:
    """How a model card names the LGP's head (`head`: configs from before heads have the per-pixel MLP)."""
    if getattr(config, "head", "mlp") == "conv":
        return 'the per-pixel MLP, then two 3x3 convolutions over its last hidden layer (`head="conv"`)'
    return 'a per-pixel MLP (`head="mlp"`, the paper\'s)'


def card_map_text(config) -> dict[str, str]:
    """How a model card names the LGP's map (`map_kind`: configs from before map kinds are edge LGPs) and tells a
    user what to pass."""
    kind = getattr(config, "map_kind", "edges")
    normalization = getattr(config, "map_normalization", "none")
    if kind == "edges":
        return {
            "title": "Sketch",
            "task": "sketch-guided",
            "name": "edge map",
            "input": "sketch",
            "argument": "sketch",
            "file": "sketch.png",
            "how": "The sketch may be dark strokes on light paper or light on dark, any size.",
            "row": f"edges, trained as {config.sketch_polarity.replace('_', ' ')}",
        }
    stretched = " stretched to its full range (as in training)" if normalization == "minmax" else ""
    how = {
        "silhouette": (
            'The map is filled shapes, white on black ("a thing here, this big"), taken as it is, any size. Beside a'
            " sketch LGP for the same base model it is also a fill LGP"
            " (`pipe.fill_lgp = LGPModel.from_pretrained(...)`): it then guides each sketch's filled outline too"
            " (fill guidance, `sketch_fill`)."
        ),
        "depth": f"The map is a depth map, light is near, any size, taken as it is{stretched}.",
        "color": "The map is a colour map (segmentation colours, normals, any RGB map), its three channels kept.",
    }[kind]
    return {
        "title": kind.capitalize() if kind != "color" else "Colour map",
        "task": f"{kind}-guided" if kind != "color" else "colour-map-guided",
        "name": f"{kind} map" if kind != "color" else "colour map",
        "input": "map",
        "argument": "guidance_map",
        "file": f"{kind}.png",
        "how": how,
        "row": kind + (f" ({normalization} normalisation)" if normalization != "none" else ""),
    }


def build_model_card(
    lgp: LGPModel,
    repo_id: str,
    base_model: str = DEFAULT_BASE_MODEL,
    license: str | None = DEFAULT_LICENSE,
    training_data: str | None = None,
    training_details: str | None = None,
    datasets: Sequence[str] | None = None,
    figures: Sequence[str | os.PathLike] = (),
    source: CommunityLGPFormat | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """The model card of a published LGP.

    Args:
        lgp: the LGP; its config gives the blocks, branch and polarity shown in the card.
        repo_id: the Hub repo the card is for; the usage snippets load from it.
        base_model: the Hub id of the diffusion model whose UNet the LGP reads (a local path is named in the text but
            left out of the metadata, which must hold a Hub id).
        license: a Hub license id; for weights converted from a community repo, use that repo's terms (`"other"` if
            it states none).
        training_data: what it was trained on (images, edge detector, captions, timesteps), in a sentence or two.
        training_details: steps, batch size, final loss, hardware, the command line: anything that reproduces it.
        datasets: Hub dataset ids for the card's metadata.
        figures: image files shown in the card (as `figures/<name>`; `export_hub_folder` copies them there).
        source: for converted community weights, where they come from.
        template_path: a Jinja template; defaults to the package's `templates/model_card.md`.

    Returns:
        `huggingface_hub.ModelCard`, whose `data` holds the metadata and `text` the rendered body.
    """
    template_path = Path(template_path) if template_path is not None else DEFAULT_CARD_TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(
            f"No model card template at {str(template_path)!r}. It ships inside the package"
            " (pipeline_sketch_guided/templates/); reinstall the package, or pass `template_path`."
        )
    config = lgp.config
    card_data = ModelCardData(
        base_model=base_model if _is_hub_repo_id(base_model) else None,
        library_name="diffusers",
        license=license,
        tags=list(CARD_TAGS),
        datasets=list(datasets) if datasets else None,
    )
    preset = infer_block_preset(config.blocks)
    kind = pipeline_kind(base_model, config)
    transformer = kind in ("sd3", "flux")
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        base_model=base_model,
        pipeline_class=PIPELINES[kind][1],
        denoiser="transformer" if transformer else "UNet",
        torch_dtype="bfloat16" if transformer else "float16",
        head=card_head_text(config),
        preset=preset,
        blocks=list(zip(config.blocks, config.block_channels, strict=True)),
        in_features=lgp.in_features,
        hidden_dims=list(config.hidden_dims),
        feature_branch=config.feature_branch,
        sketch_polarity=config.sketch_polarity,
        map=card_map_text(config),
        target=card_target_text(config),
        num_noise_frequencies=config.num_noise_frequencies,
        num_parameters=sum(p.numel() for p in lgp.parameters()),
        training_data=training_data or (source.training_data if source else None),
        training_details=training_details,
        figures=[f"figures/{Path(figure).name}" for figure in figures],
        source=source,
    )


def export_hub_folder(
    lgp: LGPModel,
    output_dir: str | os.PathLike,
    repo_id: str,
    figures: Sequence[str | os.PathLike] = (),
    card: ModelCard | None = None,
    **card_kwargs,
) -> Path:
    """Write everything a published LGP repo holds into `output_dir`, ready for `push_lgp_to_hub` or a local load.

    Args:
        lgp: the LGP to publish.
        output_dir: the folder to fill (created if needed; files of the same name are replaced).
        repo_id: the Hub repo it is meant for (the card's snippets load from it).
        figures: image files to show in the card; copied to `figures/`.
        card: a ready model card; by default one is built with `build_model_card(lgp, repo_id, figures=figures,
            **card_kwargs)`.

    Returns:
        `Path` of `output_dir`. `DiffusionPipeline.from_pretrained(base, custom_pipeline=output_dir,
        trust_remote_code=True, lgp=AutoModel.from_pretrained(output_dir, trust_remote_code=True))` works from it
        without this package installed.
    """
    output_dir = Path(output_dir)
    missing = [str(Path(figure)) for figure in figures if not Path(figure).is_file()]
    if missing:
        raise FileNotFoundError(f"Figures not found: {', '.join(missing)}.")
    names = [Path(figure).name for figure in figures]
    if len(set(names)) != len(names):
        raise ValueError(f"Figures are copied to figures/<file name>, so their names must differ; got {names}.")
    if card is None:
        card = build_model_card(lgp, repo_id, figures=figures, **card_kwargs)

    lgp.save_pretrained(output_dir, safe_serialization=True)
    config_file = output_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = dict(LGP_AUTO_MAP)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    pipeline_file, _ = PIPELINES[pipeline_kind(card_kwargs.get("base_model", DEFAULT_BASE_MODEL), lgp.config)]
    for name in hub_code_files(pipeline_file):
        target = "pipeline.py" if name == pipeline_file else name
        shutil.copyfile(PACKAGE_DIR / name, output_dir / target)
    if figures:
        (output_dir / "figures").mkdir(exist_ok=True)
        for figure in figures:
            shutil.copyfile(figure, output_dir / "figures" / Path(figure).name)
    card.save(output_dir / "README.md")
    return output_dir


def upload_hub_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload sketch-guidance LGP",
) -> str:
    """Create (or reuse) the Hub model repo `repo_id` and upload `folder` to it. Needs internet and a write token.

    Args:
        folder: a folder built by `export_hub_folder`.
        repo_id: `"<user or org>/<name>"`.
        private: create the repo private (an existing repo keeps its visibility).
        token: a Hub token with write access; defaults to the logged-in one (`hf auth login`).
        commit_message: the commit's message.

    Returns:
        `str`: the URL of the commit.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))


def push_lgp_to_hub(
    lgp: LGPModel,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload sketch-guidance LGP",
    **export_kwargs,
) -> str:
    """Publish `lgp` with its card and code in one call: `export_hub_folder` to a temporary folder, then upload it.

    Args:
        lgp: the LGP to publish.
        repo_id, private, token, commit_message: as for `upload_hub_folder`.
        export_kwargs: passed to `export_hub_folder` (`figures`, `base_model`, `license`, `training_data`, ...).

    Returns:
        `str`: the URL of the commit.
    """
    with tempfile.TemporaryDirectory(prefix="lgp_hub_") as folder:
        export_hub_folder(lgp, folder, repo_id, **export_kwargs)
        return upload_hub_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)
