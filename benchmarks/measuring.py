"""Timing and memory measurement for the benchmarks: medians over repeats run round-robin, peak memory per phase (CPU
RSS sampled, or CUDA `max_memory_allocated`), the activations autograd keeps, and the contexts that switch the
pipeline's savings and modes for one measurement."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from pipeline_sketch_guided import guidance as guidance_module

# How often the CPU memory sampler reads the resident size: often enough to catch a step's peak (a UNet forward takes
# milliseconds at the very least), rarely enough to cost nothing measurable.
RSS_SAMPLE_SECONDS = 0.002


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    """Collect garbage and return freed heap memory to the system, so that a phase's RSS starts from what it holds."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory over a phase: `torch.cuda.max_memory_allocated` on a GPU, else the process's sampled RSS.

    After the `with` block: `peak_mib` (the peak) and `rise_mib` (the peak minus what was held when the phase began).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = device.type != "cuda" and os.path.exists("/proc/self/statm")
        self.peak_mib = self.rise_mib = float("nan")

    def __enter__(self) -> PeakMemory:
        release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.cpu:
            self._start = self._peak = current_rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self._peak = max(self._peak, current_rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.cpu:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, current_rss_bytes())
        else:
            return
        self.peak_mib, self.rise_mib = peak / 2**20, (peak - self._start) / 2**20


def memory_kind(device: torch.device) -> str:
    return "CUDA max_memory_allocated" if device.type == "cuda" else "process RSS, sampled"


@contextlib.contextmanager
def count_saved_activations(exclude: set[int], after: Callable[[], bool]) -> Iterator[dict[str, int]]:
    """Count the bytes autograd saves for the backward inside the context, each storage once, skipping the storages in
    `exclude` (the weights). Yields a dict that holds, when the context exits, the `total` and the part saved while
    `after()` was true."""
    seen: set[int] = set()
    counts = {"total": 0, "after": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            counts["total"] += storage.nbytes()
            if after():
                counts["after"] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counts


def measure(
    runs: dict[str, Callable[[], float | None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Seconds of `repeats` timed calls of each of `runs` after `warmup` untimed ones, and each one's peak memory.

    Round-robin: every repetition calls each run once, so that a machine whose load changes during the measurement
    slows every run alike and their ratios hold. A run may return the seconds (a `float`) of the part it times, after
    untimed set-up of its own; otherwise the whole call is timed.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    results = {name: {"runs": [], "peak": float("nan"), "rise": float("nan")} for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            with PeakMemory(device) as memory:
                synchronize(device)
                start = time.perf_counter()
                own = run()
                synchronize(device)
            result = results[name]
            result["runs"].append(own if isinstance(own, float) else time.perf_counter() - start)
            result["peak"] = max(result["peak"], memory.peak_mib) if result["runs"][1:] else memory.peak_mib
            result["rise"] = max(result["rise"], memory.rise_mib) if result["runs"][1:] else memory.rise_mib
    return results


def within(context: Callable[[], contextlib.AbstractContextManager], run: Callable[[], Any]) -> Callable[[], Any]:
    """`run`, called inside a fresh `context()` each time."""

    def wrapped():
        with context():
            return run()

    return wrapped


@contextlib.contextmanager
def without_savings() -> Iterator[None]:
    """The guided step as it would be without the pipeline's savings: autograd recording weight gradients (diffusers
    loads models with `requires_grad=True`) and the layers after the last block the LGP reads."""
    saved = guidance_module.frozen_parameters, guidance_module.autograd_until
    guidance_module.frozen_parameters = guidance_module.autograd_until = lambda *args: contextlib.nullcontext()
    try:
        yield
    finally:
        guidance_module.frozen_parameters, guidance_module.autograd_until = saved


def schedule_fraction(value: str) -> float:
    """An argparse type: a fraction of the sampling schedule, in (0, 1]."""
    fraction = float(value)
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction of the schedule in (0, 1], got {value}")
    return fraction


@contextlib.contextmanager
def recurrence_fraction(fraction: float | None) -> Iterator[None]:
    """For screening: inside the context, the guided steps in the first `fraction` of the schedule recur (the
    pipeline's `RECURRENCE_FRACTION`); `None` leaves it. Restored on leaving."""
    saved = guidance_module.RECURRENCE_FRACTION
    if fraction is not None:
        guidance_module.RECURRENCE_FRACTION = fraction
    try:
        yield
    finally:
        guidance_module.RECURRENCE_FRACTION = saved


@contextlib.contextmanager
def guided_step_mode(pipe, mode: str) -> Iterator[None]:
    """The pipeline's guided steps run their two classifier-free guidance branches `mode`'s way inside the context."""
    previous = pipe.guided_step_mode
    pipe.guided_step_mode = mode
    try:
        yield
    finally:
        pipe.guided_step_mode = previous


@contextlib.contextmanager
def gradient_checkpointing(unet: UNet2DConditionModel) -> Iterator[None]:
    unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        unet.disable_gradient_checkpointing()
