"""Run diffusers' own fast pipeline tests against our subclasses of its pipelines, offline.

The families (FAMILIES): FLUX and SD3 (text-to-image), and the editing pipelines: SD and SDXL img2img and inpainting,
and SD with a ControlNet. Used by benchmarks/diffusers_pipeline_tests.sh, in these roles:

- `python -m benchmarks.diffusers_tests_shim extract --git-dir D --rev R --dest OUT [--families F]`: copies the test
  files of the families out of a diffusers git directory, with every module of diffusers' `tests/` tree that they
  import (followed through the imports, function-level ones included), and a pytest.ini that keeps the repository's
  own pytest settings out. `files [--families F]` prints the test files.
- `pytest -p benchmarks.diffusers_tests_shim`: a pytest plugin. It answers the Hub loads the tests make
  (`hf-internal-testing/tiny-random-t5`, `.../tiny-random-clip`) with equivalents built in code, and, with
  `DIFFUSERS_TESTS_TARGET=ours`, points each test class's `pipeline_class` at our subclass (`parent`: left as is).
  Two diagnostics: DIFFUSERS_TESTS_EXPOSE_CLASSES and DIFFUSERS_TESTS_REBIND_NAMES (see below).
- `python -m benchmarks.diffusers_tests_shim summarize --parent P.xml --ours O.xml --out summary.md`: counts per test
  family and target, and every test that fails with ours, side by side with the parent's outcome.
- `python -m benchmarks.diffusers_tests_shim compare --dest OUT --out summary.md [--families F]`: parent and ours on
  the tests' dummy components and inputs, without a sketch: the largest difference of their images.

F: comma-separated family names (flux, sd3, sd-img2img, sd-inpaint, sdxl-img2img, sdxl-inpaint, controlnet) or groups
(all, text-to-image, editing); default all.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple


@dataclass(frozen=True)
class Family:
    """One pipeline family: diffusers' test file for the parent, the parent, our subclass, and the tester classes whose
    dummy components and inputs `compare` runs both on."""

    label: str
    test_file: str
    parent: str  # the class's name in `diffusers`
    ours: str  # module.Class
    testers: tuple[str, ...]


FAMILIES = {
    "flux": Family(
        "FLUX",
        "tests/pipelines/flux/test_pipeline_flux.py",
        "FluxPipeline",
        "pipeline_sketch_guided.pipeline_flux.SketchGuidedFluxPipeline",
        ("FluxPipelineTesterConfig",),
    ),
    "sd3": Family(
        "SD3",
        "tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py",
        "StableDiffusion3Pipeline",
        "pipeline_sketch_guided.pipeline_sd3.SketchGuidedStableDiffusion3Pipeline",
        ("StableDiffusion3PipelineFastTests",),
    ),
    "sd-img2img": Family(
        "SD img2img",
        "tests/pipelines/stable_diffusion/test_stable_diffusion_img2img.py",
        "StableDiffusionImg2ImgPipeline",
        "pipeline_sketch_guided.pipeline_img2img.SketchGuidedStableDiffusionImg2ImgPipeline",
        ("StableDiffusionImg2ImgPipelineTesterConfig",),
    ),
    "sd-inpaint": Family(
        "SD inpaint",
        "tests/pipelines/stable_diffusion/test_stable_diffusion_inpaint.py",
        "StableDiffusionInpaintPipeline",
        "pipeline_sketch_guided.pipeline_inpaint.SketchGuidedStableDiffusionInpaintPipeline",
        ("StableDiffusionInpaintPipelineTesterConfig", "StableDiffusionSimpleInpaintPipelineTesterConfig"),
    ),
    "sdxl-img2img": Family(
        "SDXL img2img",
        "tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl_img2img.py",
        "StableDiffusionXLImg2ImgPipeline",
        "pipeline_sketch_guided.pipeline_xl_img2img.SketchGuidedStableDiffusionXLImg2ImgPipeline",
        ("StableDiffusionXLImg2ImgPipelineFastTests", "StableDiffusionXLImg2ImgRefinerOnlyPipelineFastTests"),
    ),
    "sdxl-inpaint": Family(
        "SDXL inpaint",
        "tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl_inpaint.py",
        "StableDiffusionXLInpaintPipeline",
        "pipeline_sketch_guided.pipeline_xl_inpaint.SketchGuidedStableDiffusionXLInpaintPipeline",
        ("StableDiffusionXLInpaintPipelineFastTests",),
    ),
    "controlnet": Family(
        "ControlNet",
        "tests/pipelines/controlnet/test_controlnet.py",
        "StableDiffusionControlNetPipeline",
        "pipeline_sketch_guided.pipeline_controlnet.SketchGuidedStableDiffusionControlNetPipeline",
        (
            "ControlNetPipelineFastTests",
            "StableDiffusionMultiControlNetPipelineFastTests",
            "StableDiffusionMultiControlNetOneModelPipelineFastTests",
        ),
    ),
}
# Names that select several families at once (DIFFUSERS_TESTS_FAMILIES, --families).
FAMILY_GROUPS = {
    "all": tuple(FAMILIES),
    "text-to-image": ("flux", "sd3"),
    "editing": ("sd-img2img", "sd-inpaint", "sdxl-img2img", "sdxl-inpaint", "controlnet"),
}
FAMILIES_ENV = "DIFFUSERS_TESTS_FAMILIES"


def select_families(spec: str | None) -> list[str]:
    """The families a comma-separated list of family and group names selects (default: all), in FAMILIES' order."""
    chosen: set[str] = set()
    for name in (spec or "all").replace(" ", "").split(","):
        if name in FAMILY_GROUPS:
            chosen.update(FAMILY_GROUPS[name])
        elif name in FAMILIES:
            chosen.add(name)
        elif name:
            known = ", ".join([*FAMILY_GROUPS, *FAMILIES])
            raise SystemExit(f"unknown test family {name!r}; known: {known}")
    return [name for name in FAMILIES if name in chosen]


TARGET_ENV = "DIFFUSERS_TESTS_TARGET"
# Diagnostic only (not in the main counts): make our classes visible by name in `diffusers.pipelines`, where
# `test_encode_prompt_works_in_isolation` looks the pipeline class up (diffusers' ReturnNameVisitor.get_ast_tree).
EXPOSE_ENV = "DIFFUSERS_TESTS_EXPOSE_CLASSES"
# Diagnostic only: some tests of the swapped classes build the parent by its name (`StableDiffusionXLInpaintPipeline(
# **components)`) rather than through `self.pipeline_class`, so the ours run runs the parent there. With this set (and
# the ours target), each test module's global of the parent's name is pointed at our class, and only the tests of the
# swapped classes whose own source names the parent are kept.
REBIND_ENV = "DIFFUSERS_TESTS_REBIND_NAMES"

# ---------------------------------------------------------------------------------------------------------------------
# Extraction


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "-C", git_dir, *args], check=True, capture_output=True, text=True).stdout


def _module_of(path: str) -> str:
    parts = PurePosixPath(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every module a file's imports may name (`from .x import y` may name the module `x.y`), absolute."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "tests" or name.startswith("tests.")}


def import_closure(git_dir: str, rev: str, roots: list[str]) -> list[str]:
    """The files of diffusers' `tests/` at `rev` that `roots` need: each root, what it imports (transitively), and the
    `__init__.py` of each package on the way (relative imports need them)."""
    files = set(_git(git_dir, "ls-tree", "-r", "--name-only", rev, "tests").split())
    by_module = {_module_of(f): f for f in files if f.endswith(".py")}
    wanted, queue = set(), list(roots)
    while queue:
        path = queue.pop()
        if path in wanted:
            continue
        wanted.add(path)
        module = _module_of(path)
        parts = module.split(".")
        for depth in range(1, len(parts)):  # the packages above
            init = "/".join(parts[:depth]) + "/__init__.py"
            if init in files:
                queue.append(init)
        source = _git(git_dir, "show", f"{rev}:{path}")
        for name in _imported_modules(source, module, path.endswith("__init__.py")):
            if name in by_module:
                queue.append(by_module[name])
    return sorted(wanted)


def extract(git_dir: str, rev: str, dest: Path, families: list[str]) -> None:
    commit = _git(git_dir, "rev-parse", rev).strip()
    roots = [*(FAMILIES[name].test_file for name in families), "tests/conftest.py"]
    paths = import_closure(git_dir, commit, roots)
    for path in paths:
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_git(git_dir, "show", f"{commit}:{path}"))
    version = next(
        line.split("=", 1)[1].strip().strip("\"'")
        for line in _git(git_dir, "show", f"{commit}:src/diffusers/__init__.py").splitlines()
        if line.startswith("__version__")
    )
    described = _git(git_dir, "log", "-1", "--format=%h %cs %s", commit).strip()
    (dest / "REVISION").write_text(f"{commit}\nversion {version}\n{described}\n" + "".join(f"{p}\n" for p in paths))
    # Its own ini: pytest would otherwise climb to the repository's setup.cfg (`-n auto`, `testpaths = tests`).
    (dest / "pytest.ini").write_text(
        "[pytest]\n"
        "# Written by benchmarks/diffusers_tests_shim.py: diffusers' test files, run by our shim.\n"
        "filterwarnings =\n    ignore:.*requires torchvision.*\n"
    )
    print(f"extracted {len(paths)} files of diffusers {version} ({described}) into {dest}")


# ---------------------------------------------------------------------------------------------------------------------
# The pytest plugin: offline stand-ins for the Hub's tiny models, and the pipeline class swap

CLIP_ID = "hf-internal-testing/tiny-random-clip"
T5_ID = "hf-internal-testing/tiny-random-t5"
# The tests' prompts, whole words in our tokenizers (the Hub's tokenizers split them their own way).
PROMPT_WORDS = ["painting", "of", "squirrel", "eating", "burger", "different", "prompt", "bad", "quality"]


def tiny_t5_config():
    """The T5 the tests build from `AutoConfig.from_pretrained(T5_ID)`, as the Hub's (made with transformers'
    T5ModelTester, whose values these are; the vocabulary is its tokenizer's, 1103): d_model 32, which the FLUX and
    SD3 tests' `joint_attention_dim=32` and 32-wide prompt embeddings depend on; 5 layers of 4 heads of 8; d_ff 37.
    `initializer_factor=0.002` matters: the tests build `T5EncoderModel(config)` in training mode, whose dropout (0.1)
    changes every call; with weights this small the T5 embeddings are tiny and so is that noise (T5's default 1.0
    makes it big enough to break tests that compare two calls, e.g. test_ip_adapter)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=1103,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=5,
        num_decoder_layers=5,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.1,
        initializer_factor=0.002,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def tiny_t5_tokenizer():
    """The package's in-code T5 tokenizer (pad 0, end 1, unknown 2, as T5's), its ids well inside the 1103 above."""
    from pipeline_sketch_guided.testing import WORDS, tiny_t5_tokenizer

    return tiny_t5_tokenizer(words=[*WORDS, *PROMPT_WORDS], model_max_length=512)


def tiny_clip_tokenizer(vocab_size: int = 1000, model_max_length: int = 77):
    """The package's in-code CLIP BPE tokenizer, laid out as CLIP's: `vocab_size` ids (the tests' CLIPTextConfig has
    1000; unused ids are filler tokens no text produces), the start and end tokens last. The tests' text encoders have
    `eos_token_id=2`, for which CLIPTextModel pools at `input_ids.argmax(-1)`: the end token, only if it has the top id.
    77 positions, CLIP's (and CLIPTextConfig's default `max_position_embeddings`)."""
    from transformers import CLIPTokenizer

    from pipeline_sketch_guided.testing import WORDS, tiny_tokenizer

    source = tiny_tokenizer(words=[*WORDS, *PROMPT_WORDS])
    with tempfile.TemporaryDirectory(prefix="tiny_clip_") as folder:
        source.save_pretrained(folder)
        model = json.loads(Path(folder, "tokenizer.json").read_text())["model"]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if token not in specials]
    fillers = [f"<|unused{i}|>" for i in range(vocab_size - len(tokens) - len(specials))]
    vocab = {token: index for index, token in enumerate([*tokens, *fillers, *specials])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    with tempfile.TemporaryDirectory(prefix="tiny_clip_") as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length)
    assert len(tokenizer) == vocab_size and tokenizer.eos_token_id == vocab_size - 1, (len(tokenizer), tokenizer)
    return tokenizer


def _answer_offline(owner, factories: dict):
    """Wrap `owner.from_pretrained` so that the ids in `factories` are built by them, any other id loaded as before."""
    original = owner.from_pretrained.__func__  # a classmethod, maybe inherited: its function, to call with `cls`

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        factory = factories.get(str(pretrained_model_name_or_path))
        if factory is not None:
            return factory()
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    owner.from_pretrained = classmethod(from_pretrained)


def install_offline_models() -> None:
    from transformers import AutoConfig, AutoTokenizer, CLIPTokenizer

    _answer_offline(AutoConfig, {T5_ID: tiny_t5_config})
    _answer_offline(AutoTokenizer, {T5_ID: tiny_t5_tokenizer, CLIP_ID: tiny_clip_tokenizer})
    _answer_offline(CLIPTokenizer, {CLIP_ID: tiny_clip_tokenizer})


def _import(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def pipeline_swap() -> dict:
    """{diffusers' class: ours}, for every family."""
    import diffusers

    return {getattr(diffusers, family.parent): _import(family.ours) for family in FAMILIES.values()}


def pytest_configure(config) -> None:
    target = os.environ.get(TARGET_ENV, "parent")
    if target not in ("parent", "ours"):
        raise SystemExit(f"{TARGET_ENV} must be 'parent' or 'ours', not {target!r}")
    install_offline_models()
    if target == "ours" and os.environ.get(EXPOSE_ENV) == "1":
        import diffusers.pipelines

        for ours in pipeline_swap().values():
            setattr(diffusers.pipelines, ours.__name__, ours)


def _names_parent(item, parent: type, ours: type) -> bool:
    """Whether the test function of `item` names `parent` (by the name its module imports it under, which an earlier
    test of the module may have pointed at `ours` already)."""
    try:
        source = inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return False
    names = [name for name, value in vars(item.module).items() if value is parent or value is ours]
    return any(re.search(rf"\b{re.escape(name)}\b", source) for name in names)


def pytest_collection_modifyitems(config, items) -> None:
    # Each test class's `pipeline_class` (a class attribute, which every test reads as `self.pipeline_class`) is
    # pointed at our subclass; the rest of the class (components, inputs, tolerances) stays diffusers'.
    swap = pipeline_swap() if os.environ.get(TARGET_ENV, "parent") == "ours" else {}
    rebind = bool(swap) and os.environ.get(REBIND_ENV) == "1"
    kept, dropped = [], []
    for item in items:
        cls = getattr(item, "cls", None)
        current = getattr(cls, "pipeline_class", None)  # a property on diffusers' base config class: not a type
        parent = None
        if current in swap:
            parent = current
            cls.pipeline_class = swap[current]
            current = swap[current]
        elif current in swap.values():  # another test of the class swapped it already
            parent = next(p for p, o in swap.items() if o is current)
        if isinstance(current, type):
            item.user_properties.append(("pipeline_class", current.__name__))
        if rebind:
            if parent is not None and _names_parent(item, parent, swap[parent]):
                for name, value in list(vars(item.module).items()):
                    if value is parent:
                        setattr(item.module, name, swap[parent])
                kept.append(item)
            else:
                dropped.append(item)
    if rebind:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_report_header(config) -> str:
    target = os.environ.get(TARGET_ENV, "parent")
    return f"diffusers_tests_shim: {TARGET_ENV}={target}; {CLIP_ID} and {T5_ID} built in code"


# ---------------------------------------------------------------------------------------------------------------------
# Summary


class Outcome(NamedTuple):
    outcome: str  # passed, failed, error, skipped
    pipeline: str  # the pipeline class the plugin recorded, if any
    message: str  # the first line of the failure's message
    assertion: str  # the failure's `E` lines (object addresses blanked): equal in two runs, the same failure


def _outcomes(xml_path: Path) -> dict[str, Outcome]:
    """{test id: its Outcome} of a JUnit XML report."""
    results = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message, assertion = "passed", "", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (found.get("message") or found.text or "").strip().splitlines()[0:1]
                message = message[0][:160] if message else ""
                errors = [line for line in (found.text or "").splitlines() if line.startswith("E ")]
                assertion = re.sub(r"0x[0-9a-f]+", "0x", "\n".join(errors))
                break
        pipeline = next((p.get("value") for p in case.iter("property") if p.get("name") == "pipeline_class"), "")
        results[test_id] = Outcome(outcome, pipeline, message, assertion)
    return results


ABSENT = Outcome("absent", "", "", "")


def _family(test_id: str) -> str:
    """The family whose test file holds `test_id` (`module.Class::name`, as JUnit's classname writes it)."""
    for name, family in FAMILIES.items():
        if test_id.startswith(_module_of(family.test_file) + "."):
            return name
    return "other"


def _table(header: list[str], rows: list[list]) -> list[str]:
    cells = [header, ["---"] * len(header), *([str(cell).replace("|", "/") for cell in row] for row in rows)]
    return ["| " + " | ".join(row) + " |" for row in cells]


def summarize(
    parent_xml: Path,
    ours_xml: Path,
    out: Path,
    diagnostic_xml: Path | None = None,
    rebound_xml: Path | None = None,
) -> None:
    runs = {"parent": _outcomes(parent_xml), "ours": _outcomes(ours_xml)}
    parent, ours = runs["parent"], runs["ours"]
    present = {_family(test_id) for results in runs.values() for test_id in results}
    counts = []
    for family in [*FAMILIES, "other"]:
        if family not in present:
            continue
        for name, results in runs.items():
            tally = Counter(result.outcome for test_id, result in results.items() if _family(test_id) == family)
            row = [tally[k] for k in ("passed", "failed", "error", "skipped")]
            counts.append([family, name, *row, sum(row)])
    labels = [FAMILIES[family].label for family in FAMILIES if family in present]
    lines = [f"# diffusers' fast tests ({', '.join(labels)}): parent classes vs ours", ""]
    lines += _table(["family", "target", "passed", "failed", "errors", "skipped", "total"], counts)
    # Which class the tests ran (recorded by the plugin): the proof that the swap took.
    classes = Counter((name, r.pipeline) for name, results in runs.items() for r in results.values() if r.pipeline)
    lines += ["", "Pipeline class per run: " + ", ".join(f"{n}: {p} x{k}" for (n, p), k in sorted(classes.items()))]
    failing = []
    for test_id, result in sorted(ours.items()):
        if result.outcome in ("failed", "error"):
            theirs = parent.get(test_id, ABSENT)
            same = "-" if theirs.outcome not in ("failed", "error") else theirs.assertion == result.assertion
            failing.append([f"`{test_id}`", result.outcome, theirs.outcome, same, result.message])
    lines += ["", "## Failed or errored with ours", ""]
    lines += ["Same failure: both runs' `E` lines (values, diffs) are equal.", ""]
    lines += _table(["test", "ours", "parent", "same failure", "message (ours)"], failing)
    differing = [
        [f"`{test_id}`", parent.get(test_id, ABSENT).outcome, ours.get(test_id, ABSENT).outcome]
        for test_id in sorted(set(parent) | set(ours))
        if parent.get(test_id, ABSENT).outcome != ours.get(test_id, ABSENT).outcome
    ]
    lines += ["", "## Outcome differs between parent and ours", ""]
    lines += _table(["test", "parent", "ours"], differing)
    if diagnostic_xml is not None and diagnostic_xml.exists():
        lines += ["", f"## Diagnostic rerun with ours, {EXPOSE_ENV}=1 (not in the counts above)", ""]
        rows = [[f"`{t}`", r.outcome, r.message] for t, r in sorted(_outcomes(diagnostic_xml).items())]
        lines += _table(["test", "outcome", "message"], rows)
    if rebound_xml is not None and rebound_xml.exists():
        lines += ["", f"## Diagnostic rerun with ours, {REBIND_ENV}=1 (not in the counts above)", ""]
        lines += ["The tests that build the parent by name, with that name pointed at our class.", ""]
        rows = []
        for test_id, result in sorted(_outcomes(rebound_xml).items()):
            theirs = parent.get(test_id, ABSENT)
            same = "-" if "failed" not in (theirs.outcome, result.outcome) else theirs.assertion == result.assertion
            rows.append([f"`{test_id}`", theirs.outcome, result.outcome, same, result.message])
        lines += _table(["test", "parent run", "rebound to ours", "same failure", "message (rebound)"], rows)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


# ---------------------------------------------------------------------------------------------------------------------
# Equivalence without a sketch, on the tests' own components and inputs


def _dummy_components_and_inputs(family: str, tester: str):
    """`get_dummy_components()` and a function giving fresh `get_dummy_inputs(...)` (a new generator each time) of
    the extracted tester class `tester` of `family`: a unittest case or one of diffusers' newer pytest-style configs,
    whose `get_dummy_inputs` takes no device."""
    cls = getattr(importlib.import_module(_module_of(FAMILIES[family].test_file)), tester)
    case = cls()  # unittest.TestCase() accepts the missing default method name, `runTest`
    device = ("cpu",) if "device" in inspect.signature(case.get_dummy_inputs).parameters else ()
    return case.get_dummy_components(), lambda: case.get_dummy_inputs(*device)


def compare(dest: Path, out: Path, families: list[str]) -> None:
    """Parent and ours on the same components (the tests' dummy ones, in eval mode: the tests build the T5 encoder in
    training mode, whose dropout would make any two calls differ) and the tests' dummy inputs: the largest difference
    of their images, and the components each lists. Appended to `out`."""
    import torch

    sys.path.insert(0, str(dest))
    install_offline_models()
    lines = ["", "## Parent vs ours without a sketch (the tests' dummy components and inputs)", ""]
    rows = []
    swap = pipeline_swap()
    for family in families:
        import diffusers

        parent_class = getattr(diffusers, FAMILIES[family].parent)
        ours_class = swap[parent_class]
        for tester in FAMILIES[family].testers:
            components, inputs = _dummy_components_and_inputs(family, tester)
            for component in components.values():
                if isinstance(component, torch.nn.Module):
                    component.eval()
            images = {}
            pipes = {}
            for name, cls in (("parent", parent_class), ("ours", ours_class)):
                pipes[name] = cls(**components)
                pipes[name].set_progress_bar_config(disable=True)
                kwargs = inputs()
                kwargs["output_type"] = "pt"
                images[name] = pipes[name](**kwargs).images
            diff = (images["ours"] - images["parent"]).abs().max().item()
            extra = sorted(set(pipes["ours"].components) - set(pipes["parent"].components))
            lacking = sorted(set(pipes["parent"].components) - set(pipes["ours"].components))
            identical = torch.equal(images["ours"], images["parent"])
            shape = "x".join(map(str, images["ours"].shape))
            rows.append([family, tester, shape, f"{diff:.3g}", identical, ", ".join(extra), ", ".join(lacking)])
    header = ["family", "tester class", "images", "max abs diff", "identical", "components only ours lists"]
    header.append("only the parent lists")
    lines += _table(header, rows)
    with out.open("a") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("extract")
    ex.add_argument("--git-dir", required=True)
    ex.add_argument("--rev", required=True)
    ex.add_argument("--dest", required=True, type=Path)
    ex.add_argument("--families", help="comma-separated family or group names (default: all)")
    fi = commands.add_parser("files", help="print the test files of the selected families, one a line")
    fi.add_argument("--families", help="comma-separated family or group names (default: all)")
    su = commands.add_parser("summarize")
    su.add_argument("--parent", required=True, type=Path)
    su.add_argument("--ours", required=True, type=Path)
    su.add_argument("--out", required=True, type=Path)
    su.add_argument("--diagnostic", type=Path, help=f"JUnit XML of the {EXPOSE_ENV} rerun, if any")
    su.add_argument("--rebound", type=Path, help=f"JUnit XML of the {REBIND_ENV} rerun, if any")
    co = commands.add_parser("compare")
    co.add_argument("--dest", required=True, type=Path)
    co.add_argument("--out", required=True, type=Path)
    co.add_argument("--families", help="comma-separated family or group names (default: all)")
    args = parser.parse_args(argv)
    if args.command == "extract":
        extract(args.git_dir, args.rev, args.dest, select_families(args.families))
    elif args.command == "files":
        print("\n".join(FAMILIES[name].test_file for name in select_families(args.families)))
    elif args.command == "summarize":
        summarize(args.parent, args.ours, args.out, args.diagnostic, args.rebound)
    else:
        compare(args.dest, args.out, select_families(args.families))


if __name__ == "__main__":
    sys.exit(main())
