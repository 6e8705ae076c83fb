"""Checks that need a CUDA GPU, on the shipped demo model; each skips where there is none.

`benchmarks/gpu_check.sh` runs them first, before its timings (`python -m pytest -m gpu`).

Guided sampling on CUDA is not bit-reproducible by default: the backward of some kernels (upsampling, interpolation)
adds with atomics, so two identical guided runs differ a little (mean 2e-4 in float32, 8e-4 in float16 on the demo
model, H100), while unguided runs are identical. The checks that two ways of computing give the same images therefore
run with `torch.use_deterministic_algorithms`, under which they agree exactly.
"""

import os

# Read by cuBLAS when CUDA starts: needed for deterministic matrix products (PyTorch's reproducibility notes).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu_check import HALF_PRECISION_TOLERANCE, demo_images
from pipeline_sketch_guided.demo import demo_sketches, load_demo_pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def deterministic():
    """Deterministic CUDA kernels for the test (a kernel without a deterministic version warns, not fails)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def on_gpu(dtype: torch.dtype = torch.float32):
    return load_demo_pipeline(dtype).to("cuda")


@pytest.fixture(scope="module")
def float32_images() -> dict[bool, np.ndarray]:
    pipe = on_gpu()
    return {guided: demo_images(pipe, guided) for guided in (False, True)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_guided_generation_is_finite_and_as_close_to_float32_as_unguided(float32_images, dtype):
    pipe = on_gpu(dtype)
    latents = demo_images(pipe, guided=True, output_type="latent")
    assert latents.dtype == dtype and torch.isfinite(latents).all()
    difference = {guided: np.abs(demo_images(pipe, guided) - float32_images[guided]).mean() for guided in (False, True)}
    # Guidance may not amplify rounding: its images lie about as close to float32 as unguided ones do.
    bound = HALF_PRECISION_TOLERANCE[dtype] + 1.5 * difference[False]
    message = f"mean |{dtype} - float32|: guided {difference[True]:.4f}, unguided {difference[False]:.4f}"
    assert difference[True] < bound, message


def test_model_cpu_offload_with_a_sketch_gives_the_images_of_the_model_on_the_gpu(deterministic):
    expected = demo_images(on_gpu(torch.float16), guided=True)
    pipe = load_demo_pipeline(torch.float16)
    pipe.enable_model_cpu_offload()
    images = demo_images(pipe, guided=True)
    assert np.abs(images - expected).max() < 1e-4
    assert pipe.unet.device.type == "cpu"  # offloaded again after the call


def test_gradient_checkpointing_gives_the_same_images(deterministic):
    pipe = on_gpu(torch.float16)
    expected = demo_images(pipe, guided=True)
    pipe.unet.enable_gradient_checkpointing()
    images = demo_images(pipe, guided=True)
    assert np.abs(images - expected).max() < 1e-4


def test_batched_and_split_guided_steps_give_the_same_images():
    pipe = on_gpu(torch.float16)
    pipe.guided_step_mode = "split"
    split = demo_images(pipe, guided=True)
    pipe.guided_step_mode = "batched"
    batched = demo_images(pipe, guided=True)
    assert np.abs(split - batched).mean() < HALF_PRECISION_TOLERANCE[torch.float16]


def test_sdxl_in_float16_with_its_upcast_vae():
    from pipeline_sketch_guided.testing import tiny_random_sdxl_pipeline

    pipe = tiny_random_sdxl_pipeline().to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.register_to_config(force_upcast=True)  # as SDXL's VAE says of itself
    prompt, sketch = demo_sketches()[0]
    generator = torch.Generator("cpu").manual_seed(0)
    out = pipe(
        prompt, sketch=sketch, num_inference_steps=4, generator=generator, output_type="np", return_edge_maps=True
    )
    assert np.isfinite(out.images).all() and np.isfinite(out.edge_maps).all()
    assert pipe.vae.dtype == torch.float16
