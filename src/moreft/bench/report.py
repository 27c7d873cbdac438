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
GOAL_COMPILED_OVER_EAGER = 1.0


def _num(row: dict[str, Any], key: str) -> float:
    return row.get(key, math.nan)


def format_shape(res: dict[str, Any]) -> str:
    """The table of one layer shape."""
    title = (
        f"\n{res['in']} -> {res['out']}, T={res['tokens']} tokens"
        + (f" under {res['autocast']} autocast" if res.get("autocast") else "")
        + f", {res['rounds']} interleaved rounds "
        "(x ... = median of per-round paired ratios)"
    )
    header = (
        f"{'method':<22}{'params':>9}{'median ms':>10}{'min ms':>8}{'x base':>8}{'x peft-LoRA':>12}"
        f"{'FLOP floor':>11}{'x floor':>8}{'peak MiB':>9}{'extra MiB':>10}"
    )
    lines = [title, header]
    for r in res["rows"]:
        lines.append(
            f"{r['method']:<22}{r['trainable_params']:>9,}{r['median_ms']:>10.1f}{r['min_ms']:>8.1f}"
            f"{_num(r, 'x_base'):>8.3f}{_num(r, 'x_peft_lora'):>12.3f}{r['flop_floor']:>11.3f}"
            f"{_num(r, 'x_floor'):>8.3f}{r['peak_mib']:>9.2f}{_num(r, 'extra_peak_mib'):>10.2f}"
        )
    compiled = [r for r in res["rows"] if "x_eager" in r]
    if compiled:
        lines.append(
            "torch.compile (paired ratios): compiled / eager of the same variant; "
            "compiled / compiled peft LoRA"
        )
        lines += [
            f"  {r['method']:<22}{r['x_eager']:>7.3f}x eager{_num(r, 'x_peft_lora_compiled'):>8.3f}x "
            "peft-lora-compiled"
            for r in compiled
        ]
    return "\n".join(lines)


def format_merge(merge: dict[str, Any]) -> str:
    title = (
        f"\nmerge into a {merge['size']}x{merge['size']} fp32 weight, in place ({merge['rounds']} rounds): "
        "ms per merge, paired ratio over one W.add_(D)"
    )
    lines = [title]
    lines += [f"  {r['what']:<10}{r['median_ms']:>8.2f} ms{r['x_add']:>7.2f}x" for r in merge["rows"]]
    return "\n".join(lines)


def format_e2e(e2e: dict[str, Any]) -> str:
    title = (
        f"\nend to end: {e2e['model']}, batch {e2e['batch']} x seq {e2e['seq']}, "
        f"median of {e2e['repeats']} runs x {e2e['steps']} steps"
    )
    header = (
        f"{'method':<11}{'trainable':>11}{'steps/s':>9}{'x frozen time':>14}{'peak RSS MiB':>13}"
        f"{'extra MiB':>10}"
    )
    lines = [title, header]
    for r in e2e["rows"]:
        lines.append(
            f"{r['method']:<11}{r['trainable_params']:>11,}{r['steps_per_s']:>9.3f}"
            f"{_num(r, 'x_frozen_time'):>14.3f}{r['peak_rss_mib']:>13.0f}{_num(r, 'extra_rss_mib'):>10.0f}"
        )
    return "\n".join(lines)


def _shape(res: dict[str, Any]) -> str:
    """``1024x1024 T=4096`` (and ``bf16 autocast`` when the steps ran under it)."""
    text = f"{res['in']}x{res['out']} T={res['tokens']}"
    return text + (f" {res['autocast']} autocast" if res.get("autocast") else "")


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked on one shape's results."""
    by = {r["method"]: r for r in res["rows"]}
    shape = _shape(res)
    out: list[dict[str, Any]] = []

    def check(method: str, key: str, what: str, limit: float) -> None:
        if method in by and key in by[method]:
            value = by[method][key]
            out.append({"shape": shape, "goal": what, "value": value, "limit": limit, "met": value <= limit})

    check("more-r8", "x_peft_lora", "MoRe r8 time / peft LoRA r8", GOAL_MORE_OVER_PEFT_LORA)
    check("more-r8", "x_base", "MoRe r8 time / frozen base", GOAL_MORE_OVER_BASE)
    check("more-r8", "extra_peak_mib", "MoRe r8 extra peak MiB", GOAL_MORE_EXTRA_PEAK_MIB)
    check("lora", "x_peft_lora", "our LoRA / peft LoRA", GOAL_LORA_OVER_PEFT_LORA)
    for method in sorted(m for m in by if m.startswith("mora") and not m.endswith("-compiled")):
        check(
            method,
            "x_floor",
            f"{'MoRA' if method == 'mora' else method} time / its FLOP floor",
            GOAL_MORA_OVER_FLOOR,
        )
    check("more-r8-compiled", "x_eager", "MoRe r8 compiled / eager", GOAL_COMPILED_OVER_EAGER)
    return out


def merge_goals(merge: dict[str, Any]) -> list[dict[str, Any]]:
    size = merge["size"]
    return [
        {
            "shape": f"{size}x{size}",
            "goal": f"merge {r['what']} / W.add_",
            "value": r["x_add"],
            "limit": GOAL_MERGE_OVER_ADD,
            "met": r["x_add"] <= GOAL_MERGE_OVER_ADD,
        }
        for r in merge["rows"]
        if r["what"] != "W.add_(D)"
    ]


def format_goals(checked: list[dict[str, Any]]) -> str:
    lines = ["\ngoals:"]
    lines += [
        f"  [{'met' if g['met'] else 'MISSED'}] {g['shape']}: {g['goal']} = {g['value']:.3f} (<= {g['limit']})"
        for g in checked
    ]
    return "\n".join(lines)


GOAL_MERGED_OVER_BASE = 1.05  # the same GEMM: equal up to timing noise
GOAL_NO_GRAD_OVER_TRAIN_FWD = 1.05


def format_inference(res: dict[str, Any]) -> str:
    lines = [
        f"\ninference, forward only: {res['in']} -> {res['out']}, T={res['tokens']}, {res['rounds']} rounds",
        f"{'what':<30}{'median ms':>10}{'x base':>8}{'x train-fwd':>12}",
    ]
    lines += [
        f"{r['what']:<30}{r['median_ms']:>10.2f}{r['x_base']:>8.3f}{_num(r, 'x_train_fwd'):>12.3f}"
        for r in res["rows"]
    ]
    return "\n".join(lines)


def inference_goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    shape = _shape(res)
    out = []
    for r in res["rows"]:
        if r["what"].endswith(" merged"):
            out.append(
                {
                    "shape": shape,
                    "goal": f"{r['what']} / frozen layer",
                    "value": r["x_base"],
                    "limit": GOAL_MERGED_OVER_BASE,
                    "met": r["x_base"] <= GOAL_MERGED_OVER_BASE,
                }
            )
        if "x_train_fwd" in r:
            out.append(
                {
                    "shape": shape,
                    "goal": f"{r['what']} / training forward",
                    "value": r["x_train_fwd"],
                    "limit": GOAL_NO_GRAD_OVER_TRAIN_FWD,
                    "met": r["x_train_fwd"] <= GOAL_NO_GRAD_OVER_TRAIN_FWD,
                }
            )
    return out


GOAL_MORE_OVER_PEFT_LORA_E2E = 1.0
GOAL_SHARING_OVER_PEFT_LORA_E2E = 1.1


def format_llm(res: dict[str, Any]) -> str:
    title = (
        f"\nLLM end to end: {res['model']}, all linear layers, batch {res['batch']} x seq {res['seq']}, "
        f"median of {res['repeats']} runs x {res['steps']} steps (ratios of medians)"
    )
    header = (
        f"{'method':<14}{'prec':<6}{'trainable':>11}{'s/step':>8}{'x peft-LoRA':>12}{'peak RSS MiB':>13}"
        f"{'x RSS':>7}{'fwd s':>8}{'x frozen':>9}{'merged x frozen':>16}"
    )
    lines = [title, header]
    for r in res["rows"]:
        if "skipped" in r and "trainable_params" not in r:
            lines.append(f"{r['method']:<14}{r['precision']:<6}skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['method']:<14}{r['precision']:<6}{r['trainable_params']:>11,}{_num(r, 'step_s'):>8.2f}"
            f"{_num(r, 'x_peft_lora_step'):>12.3f}{_num(r, 'peak_rss_mib'):>13.0f}"
            f"{_num(r, 'x_peft_lora_rss'):>7.3f}{_num(r, 'forward_s'):>8.2f}{_num(r, 'x_frozen_forward'):>9.3f}"
            f"{_num(r, 'x_frozen_merged_forward'):>16.3f}"
        )
    return "\n".join(lines)


def llm_goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in res["rows"]:
        where = f"{res['model']} {r['precision']}"
        if r["method"] == "more" and "x_peft_lora_step" in r:
            out.append(
                {
                    "shape": where,
                    "goal": "MoRe step / peft LoRA r8 step",
                    "value": r["x_peft_lora_step"],
                    "limit": GOAL_MORE_OVER_PEFT_LORA_E2E,
                    "met": r["x_peft_lora_step"] <= GOAL_MORE_OVER_PEFT_LORA_E2E,
                }
            )
            out.append(
                {
                    "shape": where,
                    "goal": "MoRe peak RSS / peft LoRA r8",
                    "value": r["x_peft_lora_rss"],
                    "limit": 1.0,
                    "met": r["x_peft_lora_rss"] <= 1.0,
                }
            )
        if r["method"] == "mora-sharing" and "x_peft_lora_step" in r:
            out.append(
                {
                    "shape": where,
                    "goal": "MoRA sharing step / peft LoRA r8 step",
                    "value": r["x_peft_lora_step"],
                    "limit": GOAL_SHARING_OVER_PEFT_LORA_E2E,
                    "met": r["x_peft_lora_step"] <= GOAL_SHARING_OVER_PEFT_LORA_E2E,
                }
            )
        if "x_frozen_merged_forward" in r:
            out.append(
                {
                    "shape": where,
                    "goal": f"{r['method']} merged forward / frozen",
                    "limit": GOAL_MERGED_OVER_BASE,
                    "value": r["x_frozen_merged_forward"],
                    "met": r["x_frozen_merged_forward"] <= GOAL_MERGED_OVER_BASE,
                }
            )
    return out
