"""Tables and goal checks of ``moreft bench`` (the same numbers also go to the JSON file)."""

from __future__ import annotations

import math
from typing import Any

# The targets (fp32, 2 threads); checked on every shape, reported per shape.
GOAL_MORE_OVER_PEFT_LORA = 0.85
GOAL_MORE_OVER_BASE = 1.12
GOAL_MORE_EXTRA_PEAK_MIB = 2.0
GOAL_LORA_OVER_PEFT_LORA = 1.0
GOAL_MORA_OVER_FLOOR = 1.3
GOAL_MERGE_OVER_ADD = 2.0


def _num(row: dict[str, Any], key: str) -> float:
    return row.get(key, math.nan)


def format_shape(res: dict[str, Any]) -> str:
    """The table of one layer shape."""
    title = (f"\n{res['in']} -> {res['out']}, T={res['tokens']} tokens, {res['rounds']} interleaved rounds "
             "(x ... = median of per-round paired ratios)")
    header = (f"{'method':<16}{'params':>9}{'median ms':>10}{'min ms':>8}{'x base':>8}{'x peft-LoRA':>12}"
              f"{'FLOP floor':>11}{'x floor':>8}{'peak MiB':>9}{'extra MiB':>10}")
    lines = [title, header]
    for r in res["rows"]:
        lines.append(f"{r['method']:<16}{r['trainable_params']:>9,}{r['median_ms']:>10.1f}{r['min_ms']:>8.1f}"
                     f"{_num(r, 'x_base'):>8.3f}{_num(r, 'x_peft_lora'):>12.3f}{r['flop_floor']:>11.3f}"
                     f"{_num(r, 'x_floor'):>8.3f}{r['peak_mib']:>9.2f}{_num(r, 'extra_peak_mib'):>10.2f}")
    return "\n".join(lines)


def format_merge(merge: dict[str, Any]) -> str:
    title = (f"\nmerge into a {merge['size']}x{merge['size']} fp32 weight, in place ({merge['rounds']} rounds): "
             "ms per merge, paired ratio over one W.add_(D)")
    lines = [title]
    lines += [f"  {r['what']:<10}{r['median_ms']:>8.2f} ms{r['x_add']:>7.2f}x" for r in merge["rows"]]
    return "\n".join(lines)


def format_e2e(e2e: dict[str, Any]) -> str:
    title = (f"\nend to end: {e2e['model']}, batch {e2e['batch']} x seq {e2e['seq']}, "
             f"median of {e2e['repeats']} runs x {e2e['steps']} steps")
    header = (f"{'method':<11}{'trainable':>11}{'steps/s':>9}{'x frozen time':>14}{'peak RSS MiB':>13}"
              f"{'extra MiB':>10}")
    lines = [title, header]
    for r in e2e["rows"]:
        lines.append(f"{r['method']:<11}{r['trainable_params']:>11,}{r['steps_per_s']:>9.3f}"
                     f"{_num(r, 'x_frozen_time'):>14.3f}{r['peak_rss_mib']:>13.0f}{_num(r, 'extra_rss_mib'):>10.0f}")
    return "\n".join(lines)


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked on one shape's results."""
    by = {r["method"]: r for r in res["rows"]}
    shape = f"{res['in']}x{res['out']} T={res['tokens']}"
    out: list[dict[str, Any]] = []

    def check(method: str, key: str, what: str, limit: float) -> None:
        if method in by and key in by[method]:
            value = by[method][key]
            out.append({"shape": shape, "goal": what, "value": value, "limit": limit, "met": value <= limit})

    check("more-r8", "x_peft_lora", "MoRe r8 time / peft LoRA r8", GOAL_MORE_OVER_PEFT_LORA)
    check("more-r8", "x_base", "MoRe r8 time / frozen base", GOAL_MORE_OVER_BASE)
    check("more-r8", "extra_peak_mib", "MoRe r8 extra peak MiB", GOAL_MORE_EXTRA_PEAK_MIB)
    check("lora", "x_peft_lora", "our LoRA / peft LoRA", GOAL_LORA_OVER_PEFT_LORA)
    check("mora", "x_floor", "MoRA time / its FLOP floor", GOAL_MORA_OVER_FLOOR)
    return out


def merge_goals(merge: dict[str, Any]) -> list[dict[str, Any]]:
    size = merge["size"]
    return [{"shape": f"{size}x{size}", "goal": f"merge {r['what']} / W.add_", "value": r["x_add"],
             "limit": GOAL_MERGE_OVER_ADD, "met": r["x_add"] <= GOAL_MERGE_OVER_ADD}
            for r in merge["rows"] if r["what"] != "W.add_(D)"]


def format_goals(checked: list[dict[str, Any]]) -> str:
    lines = ["\ngoals:"]
    lines += [f"  [{'met' if g['met'] else 'MISSED'}] {g['shape']}: {g['goal']} = {g['value']:.3f} (<= {g['limit']})"
              for g in checked]
    return "\n".join(lines)
