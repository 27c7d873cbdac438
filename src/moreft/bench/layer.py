"""The layer benchmark (one shape, every variant) and the merge benchmark."""

from __future__ import annotations

import copy
import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import LoRAConfig, MoRAConfig, MoReConfig
from ..layers import LoRALinear, MoRALinear, MoReLinear
from .measure import clear, interleaved_times, paired_ratio, peak_step_memory, step
from .variants import ADAPTER_INIT_STD, MORE_NBLOCKS, RANK, Variant, build_variants

MIB = float(1 << 20)
MS = 1e3


#: ``--autocast`` choices: the dtype the layer steps run in under CPU autocast.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Autocast(nn.Module):
    """``inner`` run under CPU autocast to ``dtype``: the step of a bf16-autocast training loop."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.inner(x)


def _runner(v: Variant, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        clear(v.module, x)
        step(v.module, x, g)

    return run


def bench_shape(
    in_f: int,
    out_f: int,
    tokens: int,
    methods: tuple[str, ...],
    rounds: int,
    warmup: int,
    seed: int = 0,
    autocast: str | None = None,
) -> dict[str, Any]:
    """Time one training step of every variant on ``x (tokens, in_f)``, interleaved; and its peak memory.

    ``autocast`` (a key of :data:`AUTOCAST_DTYPES`) runs every variant's forward under CPU autocast
    (fp32 parameters, the upstream gradient in the autocast dtype), as a bf16-autocast loop does.

    Returns:
        ``{"in", "out", "tokens", "rounds", "autocast", "rows": [...]}``; a row holds the method, its note and
        trainable parameters, ``median_ms``, ``min_ms``, every ``times_ms``, ``flop_floor``,
        ``peak_mib`` and ``memory_method``, and where the references ran ``x_base`` (paired
        median ratio), ``x_floor`` (``x_base / flop_floor``), ``extra_peak_mib`` (over the base
        layer) and ``x_peft_lora`` (paired median ratio).
    """
    if any(m.endswith("-compiled") for m in methods):
        torch._dynamo.reset()  # every shape compiles afresh (and stays under dynamo's recompile limit)
    variants = build_variants(in_f, out_f, tokens, methods, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, in_f, generator=gen).requires_grad_(True)  # as inside a network
    g = torch.randn(tokens, out_f, generator=gen)
    if autocast is not None:
        dtype = AUTOCAST_DTYPES[autocast]
        variants = [dataclasses.replace(v, module=Autocast(v.module, dtype)) for v in variants]
        g = g.to(dtype)  # the output's dtype under autocast
    for v in variants:
        if v.name.endswith("-compiled"):  # compile before the memory step, outside the profiler
            _runner(v, x, g)()
    memory = {v.name: peak_step_memory(v.module, x, g) for v in variants}
    times = interleaved_times({v.name: _runner(v, x, g) for v in variants}, rounds, warmup, seed=seed)
    rows = []
    for v in variants:
        t = times[v.name]
        peak, how = memory[v.name]
        row: dict[str, Any] = {
            "method": v.name,
            "note": v.note,
            "trainable_params": v.params,
            "median_ms": statistics.median(t) * MS,
            "min_ms": min(t) * MS,
            "times_ms": [s * MS for s in t],
            "flop_floor": v.flop_floor,
            "peak_mib": peak / MIB,
            "memory_method": how,
        }
        if "base" in times:
            row["x_base"] = paired_ratio(t, times["base"])
            row["x_floor"] = row["x_base"] / v.flop_floor
            row["extra_peak_mib"] = (peak - memory["base"][0]) / MIB
        if "peft-lora" in times:
            row["x_peft_lora"] = paired_ratio(t, times["peft-lora"])
        eager = v.name.removesuffix("-compiled")
        if eager != v.name and eager in times:
            row["x_eager"] = paired_ratio(t, times[eager])
        if "peft-lora-compiled" in times:
            row["x_peft_lora_compiled"] = paired_ratio(t, times["peft-lora-compiled"])
        rows.append(row)
    return {"in": in_f, "out": out_f, "tokens": tokens, "rounds": rounds, "autocast": autocast, "rows": rows}


def bench_merge(size: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Time ``merge()`` + ``unmerge()`` of each method on a ``size x size`` fp32 layer, interleaved.

    The reference is one ``W.add_(D)`` + ``W.sub_(D)`` with a dense ``D``: the memory traffic an
    in-place merge cannot avoid. Ratios are paired medians over rounds.
    """
    torch.manual_seed(seed)
    base = nn.Linear(size, size, bias=False).requires_grad_(False)
    layers = {
        "lora": LoRALinear(copy.deepcopy(base), LoRAConfig(rank=RANK)),
        "more-r8": MoReLinear(copy.deepcopy(base), MoReConfig(nblocks=MORE_NBLOCKS, block_rank=8)),
        "mora": MoRALinear(copy.deepcopy(base), MoRAConfig(rank=RANK)),
    }
    for layer in layers.values():
        with torch.no_grad():
            for p in layer.adapter_params().values():
                p.normal_(0.0, ADAPTER_INIT_STD)
    weight = base.weight
    delta = torch.randn(size, size) * ADAPTER_INIT_STD

    @torch.no_grad()
    def add_sub() -> None:
        weight.add_(delta)
        weight.sub_(delta)

    def merge_unmerge(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.merge()
            layer.unmerge()

        return run

    runs = {"W.add_(D)": add_sub, **{k: merge_unmerge(v) for k, v in layers.items()}}
    times = interleaved_times(runs, rounds, warmup=1, seed=seed)
    ref = times["W.add_(D)"]
    return {
        "size": size,
        "rounds": rounds,
        "rows": [
            {"what": k, "median_ms": statistics.median(t) * MS / 2, "x_add": paired_ratio(t, ref)}
            for k, t in times.items()
        ],
    }


INFERENCE_METHODS = ("lora", "more-r8", "mora", "mora-sharing")


def bench_inference(
    in_f: int, out_f: int, tokens: int, methods: tuple[str, ...], rounds: int, warmup: int, seed: int = 0
) -> dict[str, Any]:
    """Forward-only times of a layer: merged and unmerged adapters against the frozen layer, interleaved.

    Per method: ``merged`` (``layer.merge()``, then ``no_grad``: what serving runs), ``no_grad``
    (unmerged, the inference path) and ``train-fwd`` (unmerged, grad mode on, ``x`` requiring grad:
    the training forward, graph built and dropped). ``x base`` is the paired ratio over the frozen
    layer's ``no_grad`` forward; ``x train-fwd`` (``no_grad`` rows) over the same method's training forward.
    """
    variants = build_variants(in_f, out_f, tokens, ("base", *methods), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, in_f, generator=gen)
    x_grad = x.clone().requires_grad_(True)

    def forward(module: nn.Module, grad: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.set_grad_enabled(grad):
                module(x_grad if grad else x)

        return run

    runs: dict[str, Callable[[], None]] = {"base": forward(variants[0].module, False)}
    for v in variants[1:]:
        merged = copy.deepcopy(v.module)
        merged.merge()
        runs[f"{v.name} merged"] = forward(merged, False)
        runs[f"{v.name} no_grad"] = forward(v.module, False)
        runs[f"{v.name} train-fwd"] = forward(v.module, True)
    times = interleaved_times(runs, rounds, warmup, seed=seed)
    rows = []
    for name, t in times.items():
        row: dict[str, Any] = {
            "what": name,
            "median_ms": statistics.median(t) * MS,
            "x_base": paired_ratio(t, times["base"]),
        }
        if name.endswith(" no_grad"):
            row["x_train_fwd"] = paired_ratio(t, times[name.replace(" no_grad", " train-fwd")])
        rows.append(row)
    return {"in": in_f, "out": out_f, "tokens": tokens, "rounds": rounds, "rows": rows}
