"""Combine several ``moreft bench --out`` JSON reports into the Markdown tables of docs/performance.md.

    python bench/summarize.py run1.json run2.json run3.json > tables.md

Every figure is the median over the reports of that report's own figure (itself a median of
interleaved rounds); the runs column says how many reports had it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

LAYER_COLUMNS = (
    ("x_base", "x base", 3),
    ("x_peft_lora", "x peft LoRA", 3),
    ("flop_floor", "FLOP floor", 3),
    ("x_floor", "x floor", 3),
    ("median_ms", "median ms", 1),
    ("extra_peak_mib", "extra peak MiB", 2),
)
E2E_COLUMNS = (
    ("steps_per_s", "steps/s", 3),
    ("x_frozen_time", "x frozen step", 2),
    ("peak_rss_mib", "peak RSS MiB", 0),
    ("extra_rss_mib", "extra RSS MiB", 0),
)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _table(title: str, keyed: dict[str, dict[str, list[float]]], columns: tuple) -> str:
    head = "| method | " + " | ".join(c[1] for c in columns) + " | runs |"
    lines = [f"**{title}**", "", head, "|" + "---|" * (len(columns) + 2)]
    for method, values in keyed.items():
        cells = [f"{_median(values[key]):.{digits}f}" for key, _, digits in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(values['runs'])} |")
    return "\n".join(lines)


def summarize(reports: list[dict[str, Any]]) -> str:
    """Markdown: one table per layer shape, the merge table, the end-to-end table, the goals."""
    out = []
    shapes: dict[tuple[int, int, int], dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    merges: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    e2e: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    goals: dict[tuple[str, str], list[float]] = defaultdict(list)
    limits: dict[tuple[str, str], float] = {}
    for rep in reports:
        for shape in rep.get("shapes", []):
            table = shapes[(shape["in"], shape["out"], shape["tokens"])]
            for row in shape["rows"]:
                for key, *_ in LAYER_COLUMNS:
                    if key in row:
                        table[row["method"]][key].append(row[key])
                table[row["method"]]["runs"].append(1.0)
        for row in rep.get("merge", {}).get("rows", []):
            merges[row["what"]]["median_ms"].append(row["median_ms"])
            merges[row["what"]]["x_add"].append(row["x_add"])
            merges[row["what"]]["runs"].append(1.0)
        for row in rep.get("e2e", {}).get("rows", []):
            for key, *_ in E2E_COLUMNS:
                if key in row:
                    e2e[row["method"]][key].append(row[key])
            e2e[row["method"]]["runs"].append(1.0)
        for g in rep.get("goals", []):
            goals[(g["shape"], g["goal"])].append(g["value"])
            limits[(g["shape"], g["goal"])] = g["limit"]
    for (i, o, t), table in shapes.items():
        out.append(_table(f"{i} -> {o}, T = {t}", table, LAYER_COLUMNS))
    if merges:
        sizes = sorted({rep["merge"]["size"] for rep in reports if "merge" in rep})
        out.append(
            _table(
                f"merge, {' / '.join(map(str, sizes))}² fp32, ms per merge",
                merges,
                (("median_ms", "ms", 2), ("x_add", "x one W.add_", 2)),
            )
        )
    if e2e:
        out.append(_table("end to end (MiniLM fine-tune)", e2e, E2E_COLUMNS))
    if goals:
        lines = [
            "**goals** (median over runs)",
            "",
            "| shape | goal | value | limit | met |",
            "|---|---|---|---|---|",
        ]
        for (shape, goal), values in goals.items():
            value, limit = _median(values), limits[(shape, goal)]
            lines.append(
                f"| {shape} | {goal} | {value:.3f} | {limit} | {'yes' if value <= limit else 'no'} |"
            )
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="JSON files written by moreft bench --out")
    args = parser.parse_args(argv)
    sys.stdout.write(summarize([json.loads(p.read_text()) for p in args.reports]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
