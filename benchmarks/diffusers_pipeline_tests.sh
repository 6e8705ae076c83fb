#!/usr/bin/env bash
# diffusers' own fast pipeline tests, run offline twice: against diffusers' pipelines (the "parent" run), then with
# each test class's `pipeline_class` pointed at our subclass of it (the "ours" run). Families (FAMILIES in
# benchmarks/diffusers_tests_shim.py): text-to-image (flux: FluxPipeline, sd3: StableDiffusion3Pipeline) and editing
# (sd-img2img, sd-inpaint, sdxl-img2img, sdxl-inpaint, controlnet: StableDiffusion{,XL}{Img2Img,Inpaint}Pipeline and
# StableDiffusionControlNetPipeline). A test that fails in both runs fails for a reason outside our classes (the
# offline stand-ins, the test files' diffusers version, the environment).
#
# Run from the repository root:
#   bash benchmarks/diffusers_pipeline_tests.sh [--families LIST] [extra pytest arguments]
# LIST: comma-separated families or groups (all, text-to-image, editing; default all, or DIFFUSERS_TESTS_FAMILIES).
# Writes outputs/diffusers_tests/ (or DIFFUSERS_TESTS_OUT): src/ (the extracted tests), parent.xml and ours.xml
# (JUnit), their logs, diagnostic.xml, rebound.xml, summary.md. Docs: docs/diffusers_tests.md.
#
# Environment: DIFFUSERS_GIT_DIR (a git directory of diffusers; default the local mirror), DIFFUSERS_TESTS_REV (the
# revision to take the tests from; default the tag of the installed diffusers version, else HEAD).
set -euo pipefail
cd "$(dirname "$0")/.."
repo_root="$(pwd)"
families="${DIFFUSERS_TESTS_FAMILIES:-all}"
if [[ "${1:-}" == "--families" ]]; then
    families="${2:?--families needs a value}"
    shift 2
elif [[ "${1:-}" == --families=* ]]; then
    families="${1#--families=}"
    shift
fi
out="$(realpath -m "${DIFFUSERS_TESTS_OUT:-$repo_root/outputs/diffusers_tests}")"  # absolute: pytest runs in $out/src
git_dir="${DIFFUSERS_GIT_DIR:-/work/.mirror/huggingface+diffusers/repo}"
python="${PYTHON:-python}"

# One thread: the machine this was written on has 2 cores and other work; pytest runs one process at a time.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Nothing may come from the Hub: the plugin builds what the tests load from it; anything else fails fast.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

# The test files that match the installed diffusers best: its release tag if the git directory has it, else HEAD.
installed="$("$python" -c 'import diffusers; print(diffusers.__version__)')"
rev="${DIFFUSERS_TESTS_REV:-}"
if [[ -z "$rev" ]]; then
    if git -C "$git_dir" rev-parse -q --verify "refs/tags/v$installed^{commit}" >/dev/null; then
        rev="v$installed"
    else
        rev=HEAD
        echo "note: no tag v$installed in $git_dir; the tests come from HEAD" >&2
    fi
fi
listed="$("$python" -m benchmarks.diffusers_tests_shim files --families "$families")"  # fails on an unknown name
mapfile -t test_files <<<"$listed"
echo "installed diffusers $installed; test files from $rev; families $families"

rm -rf "$out/src"
mkdir -p "$out"
"$python" -m benchmarks.diffusers_tests_shim extract --git-dir "$git_dir" --rev "$rev" --dest "$out/src" \
    --families "$families"

# Test-only packages the extracted files import (parameterized, requests-mock) and the LoRA tests need (peft; without
# it they skip), installed into outputs/ rather than the project's environment, without their dependencies (all of
# which the environment has). Shared by every output folder.
site="$repo_root/outputs/diffusers_tests/site"
missing=()
for spec in parameterized:parameterized requests_mock:requests-mock peft:peft; do
    module="${spec%%:*}" package="${spec#*:}"
    PYTHONPATH="$site" "$python" -c "import $module" 2>/dev/null || missing+=("$package")
done
if ((${#missing[@]})); then
    "$python" -m pip install --quiet --no-deps --target "$site" "${missing[@]}"
fi
export PYTHONPATH="$repo_root:$site${PYTHONPATH:+:$PYTHONPATH}"

run_pytest() {  # run_pytest NAME [pytest arguments...]: one pytest process, in the extracted tree, with the plugin
    local name="$1"
    shift
    # -c: the extracted tree's own pytest.ini (and rootdir), not the repository's setup.cfg (-n auto, testpaths).
    (cd "$out/src" && "$python" -m pytest -c pytest.ini -p no:xdist -p no:cacheprovider \
        -p benchmarks.diffusers_tests_shim -q -rfEs --junitxml="$out/$name.xml" "$@") >"$out/$name.log" 2>&1 || true
    echo "$name: $(tail -n 1 "$out/$name.log")"
}

DIFFUSERS_TESTS_TARGET=parent run_pytest parent "${test_files[@]}" "$@"
DIFFUSERS_TESTS_TARGET=ours run_pytest ours "${test_files[@]}" "$@"
# Diagnostic, outside the counts: test_encode_prompt_works_in_isolation looks the pipeline class up by name in
# `diffusers.pipelines`; with our classes made visible there, does the rest of the test pass?
DIFFUSERS_TESTS_TARGET=ours DIFFUSERS_TESTS_EXPOSE_CLASSES=1 \
    run_pytest diagnostic "${test_files[@]}" -k test_encode_prompt_works_in_isolation
# Diagnostic, outside the counts: the tests of the swapped classes that build the parent by name (so that the ours run
# ran the parent there), with that name pointed at our class in their module; the plugin keeps only those tests.
DIFFUSERS_TESTS_TARGET=ours DIFFUSERS_TESTS_REBIND_NAMES=1 run_pytest rebound "${test_files[@]}" "$@"

"$python" -m benchmarks.diffusers_tests_shim summarize --parent "$out/parent.xml" --ours "$out/ours.xml" \
    --diagnostic "$out/diagnostic.xml" --rebound "$out/rebound.xml" --out "$out/summary.md"
# Without a sketch ours must give the parent's images exactly: compared on the tests' own components and inputs.
"$python" -m benchmarks.diffusers_tests_shim compare --dest "$out/src" --out "$out/summary.md" --families "$families" \
    2>"$out/compare.log" ||
    { cat "$out/compare.log" >&2; exit 1; }
