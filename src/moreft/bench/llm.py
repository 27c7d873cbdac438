"""End to end on an LLM: SmolLM2-135M causal-LM training steps, peak RSS and inference, per method.

Adapters go on every linear layer but the output head (``all-linear``), sequence 256, batch 8 by
default, AdamW, in fp32 and under bf16 autocast. Methods: ours (LoRA r=8, MoRe 4×r8, MoRA r=8
with its default ROTATION and with SHARING) and HF peft's LoRA r=8 and high-rank peers (BOFT,
HiRA, MiSS, GraLoRA, VeRA, C3A) configured near LoRA r=8's parameter count (VeRA is far below by
design; every row prints its count). ``frozen`` only runs inference (the floor of the merged
rows). Each run is a fresh subprocess (its own peak RSS, ``VmHWM``); runs are interleaved and
the medians reported. A peer that fails on CPU is skipped with its error in the report; one of
ours failing stops the benchmark.

After the timed training steps each child times ``no_grad`` forwards of the unmerged model and,
for ours, of the model after :func:`moreft.merge` (plain linear layers again): a merged model
should run at ``frozen``'s speed.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

OURS = ("lora", "more", "mora", "mora-sharing")
PEERS = ("peft-lora", "peft-boft", "peft-hira", "peft-miss", "peft-gralora", "peft-vera", "peft-c3a")
LLM_METHODS = ("frozen", *OURS, *PEERS)
PRECISIONS = ("fp32", "bf16")
LLM_WARMUP = 1


def _peft_config(method: str) -> Any:
    """peft's config for a peer, all linear layers, near LoRA r=8's parameter count."""
    import peft

    kw = {"target_modules": "all-linear"}
    configs = {
        "peft-lora": lambda: peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **kw),
        "peft-boft": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=4, **kw),
        "peft-hira": lambda: peft.HiraConfig(r=8, **kw),
        "peft-miss": lambda: peft.MissConfig(r=16, **kw),
        "peft-gralora": lambda: peft.GraloraConfig(r=8, gralora_k=2, **kw),
        "peft-vera": lambda: peft.VeraConfig(r=256, **kw),
        "peft-c3a": lambda: peft.C3AConfig(block_size=32, **kw),
    }
    return configs[method]()


def _adapt(model: torch.nn.Module, method: str) -> torch.nn.Module:
    from .. import LoRAConfig, MoRAConfig, MoRAOperator, MoReConfig, inject

    if method == "frozen":
        return model.requires_grad_(False)
    if method.startswith("peft-"):
        import peft

        return peft.get_peft_model(model, _peft_config(method))
    configs = {
        "lora": LoRAConfig(rank=8, alpha=16.0, target_modules="all-linear"),
        "more": MoReConfig(nblocks=4, block_rank=8, target_modules="all-linear"),
        "mora": MoRAConfig(rank=8, target_modules="all-linear"),
        "mora-sharing": MoRAConfig(rank=8, operator=MoRAOperator.SHARING, target_modules="all-linear"),
    }
    return inject(model, configs[method])


def _batches(tokenizer: Any, batch: int, seq: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` causal-LM batches of real news articles, exactly ``(batch, seq)`` tokens."""
    from ..tasks import get_task

    examples = get_task("news").load(seed=0).train
    texts = [examples[i % len(examples)].text for i in range(batch * count)]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return [
        {
            "input_ids": enc["input_ids"][i : i + batch],
            "attention_mask": enc["attention_mask"][i : i + batch],
            "labels": labels[i : i + batch],
        }
        for i in range(0, batch * count, batch)
    ]


def _timed(fn: Callable[[], None], count: int) -> list[float]:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def llm_child(spec: str, model_name: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """One run of ``spec = "<method>:<precision>"`` in this process (started by :func:`bench_llm`).

    Raises:
        ValueError: an unknown method or precision.
    """
    from .. import merge
    from ..models import load_model
    from ..train.peak_memory import peak_rss_mib, reset_peak_rss

    method, precision = spec.split(":")
    if method not in LLM_METHODS or precision not in PRECISIONS:
        raise ValueError(f"unknown LLM run {spec!r}; methods {LLM_METHODS}, precisions {PRECISIONS}")
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name, "generation")
    batches = _batches(tokenizer, batch, seq, LLM_WARMUP + steps)
    model = _adapt(model, method)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, Any] = {
        "method": method,
        "precision": precision,
        "trainable_params": sum(p.numel() for p in params),
    }
    reset_peak_rss()
    if params:
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4)
        it = iter(batches)

        def train_step() -> None:
            with autocast:
                loss = model(**next(it)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out["step_s"] = _timed(train_step, LLM_WARMUP + steps)[LLM_WARMUP:]
        out["peak_rss_mib"] = peak_rss_mib()
    model.eval()

    @torch.no_grad()
    def forward() -> None:
        with autocast:
            model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])

    out["forward_s"] = _timed(forward, LLM_WARMUP + steps)[LLM_WARMUP:]
    if method in OURS:
        merge(model)
        out["merged_forward_s"] = _timed(forward, LLM_WARMUP + steps)[LLM_WARMUP:]
    return out


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [statistics.median(r[key]) if isinstance(r[key], list) else r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def bench_llm(
    methods: tuple[str, ...],
    precisions: tuple[str, ...],
    model_name: str,
    batch: int,
    seq: int,
    steps: int,
    repeats: int,
    threads: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run :func:`llm_child` ``repeats`` times per method and precision in fresh subprocesses, interleaved.

    Raises:
        RuntimeError: one of moreft's own methods failed (its stderr tail is included).
    """
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(m, p): [] for p in precisions for m in methods}
    skipped: dict[tuple[str, str], str] = {}
    for rep in range(repeats):
        for (m, p), done in runs.items():
            if (m, p) in skipped:
                continue
            cmd = [
                sys.executable,
                "-m",
                "moreft.bench",
                "--llm-child",
                f"{m}:{p}",
                "--llm-model",
                model_name,
                "--llm-batch",
                str(batch),
                "--llm-seq",
                str(seq),
                "--llm-steps",
                str(steps),
                "--threads",
                str(threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                if not m.startswith("peft-"):
                    raise RuntimeError(f"LLM run of {m!r} ({p}) failed:\n{proc.stderr[-2000:]}")
                skipped[(m, p)] = (
                    proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"
                )
                log(f"  llm {m} {p}: skipped ({skipped[(m, p)]})")
                continue
            done.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            last = done[-1]
            trained = (
                f"{statistics.median(last['step_s']):.2f} s/step, peak RSS {last['peak_rss_mib']:.0f} MiB"
                if "step_s" in last
                else "inference only"
            )
            log(
                f"  llm {m} {p} ({rep + 1}/{repeats}): {trained}, "
                f"no_grad forward {statistics.median(last['forward_s']):.2f} s"
            )
    rows = []
    for (m, p), rs in runs.items():
        row: dict[str, Any] = {"method": m, "precision": p, "runs": rs}
        if (m, p) in skipped:
            row["skipped"] = skipped[(m, p)]
        if rs:
            row["trainable_params"] = rs[0]["trainable_params"]
            for key in ("step_s", "peak_rss_mib", "forward_s", "merged_forward_s"):
                value = _median(rs, key)
                if value is not None:
                    row[key] = value
        rows.append(row)
    for p in precisions:
        ref = {r["method"]: r for r in rows if r["precision"] == p}
        for r in rows:
            if r["precision"] != p:
                continue
            lora, frozen = ref.get("peft-lora", {}), ref.get("frozen", {})
            if "step_s" in r and "step_s" in lora:
                r["x_peft_lora_step"] = r["step_s"] / lora["step_s"]
                r["x_peft_lora_rss"] = r["peak_rss_mib"] / lora["peak_rss_mib"]
            if "forward_s" in frozen:
                for key in ("forward_s", "merged_forward_s"):
                    if key in r:
                        r[f"x_frozen_{key.removesuffix('_s')}"] = r[key] / frozen["forward_s"]
    return {"model": model_name, "batch": batch, "seq": seq, "steps": steps, "repeats": repeats, "rows": rows}
