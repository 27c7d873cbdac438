"""End to end: steps per second and peak RSS of a real MiniLM fine-tune, per method.

all-MiniLM-L6-v2 (the packaged copy, ``moreft.models.load_model("minilm", ...)``) with a new
5-way head, fine-tuned on BBC News articles (the ``news`` task) with AdamW at equal batch and
sequence length (padded / truncated to ``seq``) for every method. Adapters go on query, key and
value (the model's defaults) and the head trains in full; ``frozen`` trains only the head (the
floor), ``peft-lora`` is HF peft's LoRA on the same modules. Each run is a fresh subprocess, so
its peak RSS is its own (``VmHWM`` of its own address space: ``ru_maxrss`` would carry over the
parent's peak through fork + exec); runs of different methods are interleaved and the medians
reported.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .variants import LORA_ALPHA, MORE_NBLOCKS, RANK

E2E_METHODS = ("frozen", "lora", "more", "mora", "peft-lora")
MORE_BLOCK_RANK = 8  # the same parameter count as LoRA r=8 on square layers
LEARNING_RATE = 1e-4


def _batches(tokenizer: Any, batch: int, seq: int, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of real news articles, tokenized to exactly ``(batch, seq)``."""
    from ..tasks import get_task

    examples = get_task("news").load(seed=seed).train
    need = batch * count
    chosen = [examples[i % len(examples)] for i in range(need)]
    enc = tokenizer(
        [ex.text for ex in chosen], padding="max_length", truncation=True, max_length=seq, return_tensors="pt"
    )
    labels = torch.tensor([ex.label for ex in chosen])
    return [
        {
            "input_ids": enc["input_ids"][i : i + batch],
            "attention_mask": enc["attention_mask"][i : i + batch],
            "labels": labels[i : i + batch],
        }
        for i in range(0, need, batch)
    ]


def _adapt(model: torch.nn.Module, method: str, targets: tuple[str, ...], head: str) -> torch.nn.Module:
    from .. import LoRAConfig, MoRAConfig, MoReConfig, inject

    if method == "frozen":
        model.requires_grad_(False)
        model.get_submodule(head).requires_grad_(True)
        return model
    if method == "peft-lora":
        import peft

        cfg = peft.LoraConfig(
            r=RANK,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=list(targets),
            modules_to_save=[head],
        )
        return peft.get_peft_model(model, cfg)
    configs = {
        "lora": LoRAConfig(rank=RANK, alpha=LORA_ALPHA),
        "more": MoReConfig(nblocks=MORE_NBLOCKS, block_rank=MORE_BLOCK_RANK),
        "mora": MoRAConfig(rank=RANK),
    }
    cfg = dataclasses.replace(configs[method], target_modules=targets, modules_to_save=(head,))
    return inject(model, cfg)


def e2e_child(method: str, batch: int, seq: int, steps: int, warmup: int) -> dict[str, Any]:
    """Fine-tune in this process and measure (run by :func:`bench_e2e` in a subprocess).

    Raises:
        ValueError: an unknown method.
    """
    from ..models import MODELS, load_model
    from ..train.peak_memory import peak_rss_mib, reset_peak_rss

    if method not in E2E_METHODS:
        raise ValueError(f"unknown end-to-end method {method!r}; choose from {', '.join(E2E_METHODS)}")
    torch.manual_seed(0)
    spec = MODELS["minilm"]
    model, tokenizer = load_model("minilm", "classification", num_labels=5)
    batches = _batches(tokenizer, batch, seq, warmup + steps, seed=0)
    model = _adapt(model, method, spec.target_modules, spec.head_module)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE)
    reset_peak_rss()
    rss_before = peak_rss_mib()
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = peak_rss_mib()
    return {
        "method": method,
        "median_step_s": statistics.median(times),
        "times_s": times,
        "peak_rss_mib": peak,
        "rss_growth_mib": peak - rss_before,
        "trainable_params": sum(p.numel() for p in params),
    }


def bench_e2e(
    methods: tuple[str, ...],
    batch: int,
    seq: int,
    steps: int,
    repeats: int,
    threads: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run :func:`e2e_child` ``repeats`` times per method in fresh subprocesses, interleaved.

    Raises:
        RuntimeError: a child failed (its stderr tail is included).
    """
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for rep in range(repeats):
        for m in methods:
            cmd = [
                sys.executable,
                "-m",
                "moreft.bench",
                "--e2e-child",
                m,
                "--e2e-batch",
                str(batch),
                "--e2e-seq",
                str(seq),
                "--e2e-steps",
                str(steps),
                "--threads",
                str(threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"end-to-end run of {m!r} failed:\n{proc.stderr[-2000:]}")
            runs[m].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            last = runs[m][-1]
            log(
                f"  e2e {m} ({rep + 1}/{repeats}): {1 / last['median_step_s']:.3f} steps/s, "
                f"peak RSS {last['peak_rss_mib']:.0f} MiB"
            )
    rows = []
    for m, rs in runs.items():
        step_s = statistics.median(r["median_step_s"] for r in rs)
        rows.append(
            {
                "method": m,
                "steps_per_s": 1.0 / step_s,
                "median_step_s": step_s,
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
                "trainable_params": rs[0]["trainable_params"],
                "runs": rs,
            }
        )
    frozen = next((r for r in rows if r["method"] == "frozen"), None)
    for r in rows:
        if frozen is not None:
            r["x_frozen_time"] = r["median_step_s"] / frozen["median_step_s"]
            r["extra_rss_mib"] = r["peak_rss_mib"] - frozen["peak_rss_mib"]
    return {
        "model": "all-MiniLM-L6-v2 + 5-way head, news task (BBC articles)",
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "repeats": repeats,
        "rows": rows,
    }
