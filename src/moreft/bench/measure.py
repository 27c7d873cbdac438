"""Timing and memory of one training step of a layer, robust to a shared, busy CPU.

**Time.** Variants run interleaved in one process: every round runs each variant once, in a
fresh random order, after warm-up. Besides each variant's median and minimum, every round gives
the *paired* ratio ``t_variant / t_reference`` of two steps taken moments apart; their median is
what the tables report as ``x base`` and ``x peft-LoRA``: load from other processes hits both
sides of a pair alike, so it cancels much better than in a ratio of two medians.

**Memory.** CPU PyTorch has no allocator statistics (``tracemalloc`` cannot see its buffers, RSS
hides them behind the allocator's caching), so one extra, untimed step runs under
``torch.profiler`` with ``profile_memory=True``. Its allocation (+) and free (-) events, summed in
time order, give the peak of live tensor bytes above the step's start: ``method = "profiler"``.
Where that private event API is missing, the fallback counts the unique storages autograd saves
for backward plus the output (``method = "saved-tensors"``), which misses transient buffers.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def clear(module: nn.Module, x: Tensor) -> None:
    """Drop the gradients of ``x`` and the module's parameters (a step starts from none)."""
    x.grad = None
    for p in module.parameters():
        p.grad = None


def step(module: nn.Module, x: Tensor, g: Tensor) -> None:
    """One training step of a layer: forward, then backward with the upstream gradient ``g``."""
    module(x).backward(g)


def _profiler_peak(module: nn.Module, x: Tensor, g: Tensor) -> float | None:
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(module, x, g)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except (AttributeError, RuntimeError):  # private API: absent or changed in this torch
        return None
    if not events:
        return None
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return float(peak)


def _saved_tensor_bytes(module: nn.Module, x: Tensor, g: Tensor) -> float:
    known = {x.untyped_storage().data_ptr()}
    known |= {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    y.backward(g)
    return float(sum(seen.values()) + y.numel() * y.element_size())


def peak_step_memory(module: nn.Module, x: Tensor, g: Tensor) -> tuple[float, str]:
    """Peak live tensor bytes during one step above its start, and the method used (see module doc)."""
    clear(module, x)
    peak = quiet(lambda: _profiler_peak(module, x, g))
    if peak is not None:
        return peak, "profiler"
    clear(module, x)
    return _saved_tensor_bytes(module, x, g), "saved-tensors"


def quiet(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with file descriptors 1 and 2 silenced (the profiler prints from C++)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        return fn()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def interleaved_times(
    runs: dict[str, Callable[[], None]], rounds: int, warmup: int, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each runnable: ``warmup`` untimed calls each, then ``rounds`` rounds.

    Each round calls every runnable once, in a fresh random order (seeded), so that no variant
    always follows the same neighbour.
    """
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    order = list(runs)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of ``times[i] / reference[i]``."""
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))
