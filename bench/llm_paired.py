"""Paired, in-process A/B of SmolLM2-135M training steps: two adapted models, steps alternated.

``moreft bench --llm`` runs every method in a fresh subprocess (its own peak RSS) and compares
medians of 2 runs x 3 steps; a drift of the machine between subprocesses lands in the ratio.
Here both models live in one process and take turns, so each round gives a paired ratio of two
steps taken moments apart (as the layer benchmark does), at the cost of no per-method memory.

    python bench/llm_paired.py --methods more,peft-lora --precision bf16 --rounds 8

Prints every round's step times and the median of the per-round ratios (first method over the
second). Methods are those of ``moreft.bench.llm`` (``lora``, ``more``, ``mora-sharing``,
``peft-lora``, ...).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moreft.bench.llm import _adapt, _batches
from moreft.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="more,peft-lora", help="two methods, A,B (ratio A / B)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.methods.split(",")
    if len(names) != 2:
        p.error("--methods takes exactly two methods, A,B")
    models, opts = {}, {}
    batches = None
    for name in names:
        torch.manual_seed(0)
        model, tokenizer = load_model("smollm2", "generation")
        batches = batches or _batches(tokenizer, args.batch, args.seq, 2)
        models[name] = _adapt(model, name).train()
        opts[name] = torch.optim.AdamW([q for q in models[name].parameters() if q.requires_grad], lr=1e-4)
    assert batches is not None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(name: str, batch: dict[str, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        with autocast:
            loss = models[name](**batch).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in names:  # warm-up
        step(name, batches[0])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(step(name, batches[1]))
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    a, b = names
    ratio = statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
    print(
        f"{args.precision}: {a} median {statistics.median(times[a]):.2f} s, {b} median "
        f"{statistics.median(times[b]):.2f} s; paired {a} / {b} = {ratio:.3f} ({args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
