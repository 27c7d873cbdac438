"""The pretraining study's report (MoRA Section 5.3): loss curves, perplexity table, rank of ΔW.

    python -m moreft.train.pretrain_report runs/pretrain-cpu docs/results/pretraining-report.md

reads a ``moreft compare`` folder whose arms are pretraining runs (``compare.json`` lists them) and
writes, next to ``OUT.md``:

* ``<stem>-loss.png``: the training loss of every arm in one plot, and the held-out perplexity
  at each evaluation (MoRA Figure 4);
* a table of validation / test perplexity per arm, with trainable parameters (MoRA Table 3);
* ``<stem>-sv.png`` and a table: per module type (``q_proj`` ... ``down_proj``) the number of
  singular values of ΔW = W_trained - W_initial above 0.1, averaged over the layers, and the same
  per layer (MoRA Figure 5; :func:`moreft.train.inspection.run_deltas`, so a ReLoRA / ReMoRA arm counts
  its merged cycles too and the full-rank arm its whole change).

Curves and ΔW come from each arm's first seed; the perplexities are means over the seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moreft.analysis import DEFAULT_SV_THRESHOLD
from moreft.errors import ConfigError, MoreftError
from moreft.safe_write import atomic_write_text
from moreft.train.bounded import read_json_file
from moreft.train.plots import plot_curves, plot_grouped_bars
from moreft.train.rundir import RunDir
from moreft.train.trainer import read_jsonl

#: Module types in the order of MoRA Figure 5 (a run's other module names follow, sorted).
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def sv_counts(run_dir: str | Path, threshold: float = DEFAULT_SV_THRESHOLD) -> dict[str, dict[int, int]]:
    """``{module type: {layer index: singular values of ΔW above threshold}}`` of one finished run."""
    from moreft.train.inspection import run_deltas

    _, _, deltas = run_deltas(run_dir)
    out: dict[str, dict[int, int]] = {}
    for name, (delta, _, _) in deltas.items():
        match = _LAYER.search(f".{name}.")
        layer = int(match.group(1)) if match else 0
        sv = torch.linalg.svdvals(delta.double())
        out.setdefault(name.rsplit(".", 1)[-1], {})[layer] = int((sv > threshold).sum())
    return out


def _module_types(counts: dict[str, dict[str, dict[int, int]]]) -> list[str]:
    found = {t for per_arm in counts.values() for t in per_arm}
    return [t for t in MODULE_ORDER if t in found] + sorted(found - set(MODULE_ORDER))


def _mean_text(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def build_report(compare_dir: str | Path, out: str | Path, threshold: float = DEFAULT_SV_THRESHOLD) -> Path:
    """Write ``out`` (Markdown) and its two figures from the comparison in ``compare_dir``.

    Raises:
        ConfigError: ``compare_dir`` has no ``compare.json``, or an arm's runs are missing or unfinished.
    """
    folder = Path(compare_dir)
    summary = (
        read_json_file(folder / "compare.json", "comparison summary")
        if (folder / "compare.json").is_file()
        else None
    )
    if not isinstance(summary, dict) or not isinstance(summary.get("rows"), list) or not summary["rows"]:
        raise ConfigError(
            f"{str(folder)!r} holds no compare.json with runs; run the `moreft compare` command "
            "the recipe names first"
        )
    rows: list[dict[str, Any]] = summary["rows"]
    arms = []
    for row in rows:
        runs = [RunDir(Path(r)) for r in row["runs"]]
        unfinished = [str(r.path) for r in runs if not (r.metrics.is_file() and r.finished())]
        if unfinished:
            raise ConfigError(
                f"arm {row['label']!r}: run(s) {unfinished} did not finish; rerun the comparison"
            )
        metrics = [read_json_file(r.metrics, "metrics") for r in runs]
        arms.append((row["label"], runs, metrics))
    metric = summary.get("metric") or "perplexity"
    out = Path(out)
    stem = out.with_suffix("")
    loss_png, sv_png = Path(f"{stem}-loss.png"), Path(f"{stem}-sv.png")

    curves: dict[str, list[tuple[float, float]]] = {}
    evals: dict[str, list[tuple[float, float]]] = {}
    for label, runs, _ in arms:
        records = read_jsonl(runs[0].metrics_log)
        curves[label] = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
        evals[label] = sorted(
            {
                r["step"]: r[f"eval_{metric}"]
                for r in records
                if isinstance(r.get(f"eval_{metric}"), (int, float))
            }.items()
        )
    plot_curves(
        [("training loss", curves), (f"validation {metric}", evals)],
        loss_png,
        title="pretraining from scratch: every arm",
        log_y=False,
    )

    counts = {label: sv_counts(runs[0].path, threshold) for label, runs, _ in arms}
    types = _module_types(counts)
    means = {
        label: [statistics.fmean(c[t].values()) if t in c else 0.0 for t in types]
        for label, c in counts.items()
    }
    plot_grouped_bars(
        types,
        means,
        sv_png,
        f"singular values of ΔW > {threshold:g} (mean over layers)",
        title="rank of the learned update ΔW = W_trained - W_initial (MoRA Figure 5)",
    )

    first = arms[0][2][0]
    lines = [
        f"# Pretraining from scratch: {first['model']} on {first['task']} ({len(arms)} arms)",
        "",
        "MoRA paper, Section 5.3 (Figure 4, Table 3, Figure 5), at the size of this comparison. Generated by "
        f"`python -m moreft.train.pretrain_report {folder} {out}` from the runs in `{folder}`.",
        "",
    ]
    if summary.get("command"):
        lines += ["```", summary["command"], "```", ""]
    lines += [
        f"## Loss ({loss_png.name})",
        "",
        f"![loss curves]({loss_png.name})",
        "",
        f"## {metric.capitalize()} (lower is better)",
        "",
        f"| arm | trainable adapter params | trained in full | validation {metric} | test {metric} | "
        "final train loss | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, _, metrics in arms:
        m = metrics[0]
        full = label.split(":")[0] == "full"  # every parameter trains: none of them is an adapter's
        adapter, in_full = (
            ("–", m["trainable_params"])
            if full
            else (f"{m['trainable_params']:,}", m["other_trainable_params"])
        )
        lines.append(
            f"| {label} | {adapter} | {in_full:,} | "
            f"{_mean_text([x[f'eval_{metric}'] for x in metrics])} | "
            f"{_mean_text([x[f'test_{metric}'] for x in metrics])} | "
            f"{_mean_text([x['train_loss'] for x in metrics])} | "
            f"{statistics.fmean(x['train_seconds'] for x in metrics):.0f} |"
        )
    seeds = len(arms[0][2])
    lines += [
        "",
        f"{seeds} seed(s); ± is the sample standard deviation over seeds. The full-rank arm trains every "
        "parameter (all in the third column); the adapter arms also train the embeddings and norms in "
        "full (`train_unadapted`), counted in the third column.",
        "",
        f"## Rank of ΔW ({sv_png.name})",
        "",
        f"![singular values]({sv_png.name})",
        "",
        f"Singular values of ΔW above {threshold:g}, mean over layers per module type:",
        "",
        "| arm | " + " | ".join(types) + " |",
        "|---|" + "---:|" * len(types),
    ]
    for label, values in means.items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    lines += ["", "Per layer (layer index: count):", ""]
    for label, per_type in counts.items():
        cells = [
            f"{t} " + " ".join(f"{i}:{n}" for i, n in sorted(per_type[t].items()))
            for t in types
            if t in per_type
        ]
        lines.append(f"- {label}: " + "; ".join(cells))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moreft.train.pretrain_report COMPARE_DIR OUT.md [--sv-threshold T]``."""
    parser = argparse.ArgumentParser(
        prog="python -m moreft.train.pretrain_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("compare_dir", metavar="COMPARE_DIR", help="the `moreft compare` folder of the arms")
    parser.add_argument("out", metavar="OUT.md", help="the Markdown report to write (figures go beside it)")
    parser.add_argument(
        "--sv-threshold",
        type=float,
        default=DEFAULT_SV_THRESHOLD,
        metavar="T",
        help="count singular values of ΔW above T (default 0.1, as MoRA Figure 5)",
    )
    args = parser.parse_args(argv)
    try:
        path = build_report(args.compare_dir, args.out, args.sv_threshold)
    except MoreftError as exc:
        print(f"moreft: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"report": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
