"""Comparing methods on one task over seeds: ``compare.md`` (table) and ``compare.png`` (metric vs params).

    from moreft.train import compare, resolve_config
    base = resolve_config(None, {"task": "sentiment", "model": "minilm", "max_steps": 100})
    result = compare(base, ["lora:rank=8", "more:block_rank=1", "more:block_rank=4", "mora:rank=8"], seeds=3)

Each method x seed is an ordinary run in ``<output_dir>/<name>/runs/``; a run that already
finished with the same config is reused, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moreft.errors import ConfigError
from moreft.safe_write import atomic_write_text
from moreft.train.bounded import load_yaml
from moreft.train.config import ADAPTER_SETTINGS, TRAIN_METHODS, TrainConfig, field_names
from moreft.train.fields import MAX_SEED, check_folder_name
from moreft.train.loop import RunResult, train
from moreft.train.plots import plot_compare
from moreft.train.rundir import RunDir, read_run_config

#: Fields a method spec may not set (the comparison owns them).
#: Seeds one comparison may train (each trains every method once).
MAX_SEEDS = 1000
_RESERVED = ("task", "task_options", "model", "seed", "run_name", "output_dir", "resume", "overwrite")


def parse_method_spec(spec: str) -> dict[str, Any]:
    """Parse ``"more:block_rank=4,nblocks=2"`` into ``{"method": "more", "block_rank": 4, "nblocks": 2}``.

    Raises:
        ConfigError: Unknown method, a malformed ``key=value``, or a key that is not a config field.
    """
    method, _, rest = spec.partition(":")
    method = method.lower()  # choices are accepted in any case, as everywhere
    if method not in TRAIN_METHODS:
        raise ConfigError(f"method spec {spec!r}: unknown method {method!r}; valid methods are {list(TRAIN_METHODS)} "
                          "(e.g. lora:rank=8, more:block_rank=4, mora:rank=8, full)")
    out: dict[str, Any] = {"method": method}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"method spec {spec!r}: {item!r} must look like key=value")
        if key not in field_names() or key in _RESERVED:
            allowed = [k for k in field_names() if k not in _RESERVED and k != "method"]
            raise ConfigError(f"method spec {spec!r}: {key!r} is not a setting a method may change; "
                              f"valid keys are {allowed}")
        out[key] = load_yaml(raw, f"method spec {spec!r}")
    return out


#: Spec keys that choose the adapter (the adapter settings); any other key in a spec overrides a shared
#: training setting.
_ADAPTER_KEYS = ADAPTER_SETTINGS


def _slug(spec: dict[str, Any]) -> str:
    parts = [spec["method"]] + [f"{k}{v}" for k, v in spec.items() if k != "method"]
    return "-".join(str(p).replace("/", "_").replace("_", "") for p in parts)


@dataclass(frozen=True)
class CompareResult:
    """What :func:`compare` produced.

    Attributes:
        path: The comparison directory (``compare.md``, ``compare.png``, ``compare.json``, ``runs/``).
        rows: Per method: ``label``, ``params``, ``mean``, ``std``, ``eval_mean``, ``eval_std``,
            ``values``, ``seconds``, ``runs``.
        metric: The task metric compared (test split).
    """

    path: Path
    rows: list[dict[str, Any]]
    metric: str


def _finished(config: TrainConfig) -> dict[str, Any] | None:
    """The metrics of an identical, finished run, or None."""
    run = RunDir(config.run_dir)
    try:
        same = read_run_config(run.path).to_dict() == config.to_dict()
    except ConfigError:
        return None
    if same and run.metrics.is_file() and run.finished():
        return json.loads(run.metrics.read_text())
    return None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(base: TrainConfig, methods: Sequence[str], seeds: int | Sequence[int] = 3,
            output_dir: str | os.PathLike | None = None, name: str | None = None,
            run: Callable[[TrainConfig], RunResult] | None = None, command: str | None = None) -> CompareResult:
    """Train every method spec with every seed on ``base``'s task and summarise.

    Args:
        base: Shared settings (task, model, steps, lr, ...); ``method`` and its hyperparameters
            come from each spec.
        methods: Specs such as ``"lora:rank=8"`` (see :func:`parse_method_spec`).
        seeds: A count ``n`` (seeds ``0..n-1``) or explicit seeds.
        output_dir: Parent of the comparison directory (default ``base.output_dir``).
        name: Comparison directory name (default ``compare-<task>-<model>``).
        run: The training function (default :func:`moreft.train.train`); for tests.
        command: The command line to show at the top of ``compare.md``.

    Returns:
        A :class:`CompareResult`; ``compare.md``, ``compare.png`` and ``compare.json`` are written.

    Raises:
        ConfigError: No methods, a bad spec, or bad seeds.
    """
    if not methods:
        raise ConfigError("compare needs at least one method spec, e.g. lora:rank=8 more:block_rank=4")
    if isinstance(seeds, int) and not isinstance(seeds, bool) and not 1 <= seeds <= MAX_SEEDS:
        raise ConfigError(f"seeds={seeds} must be a count in [1, {MAX_SEEDS}]")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or len(seed_list) > MAX_SEEDS or any(
            isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED for s in seed_list):
        raise ConfigError(f"seeds={seeds!r} must be a count in [1, {MAX_SEEDS}] or a list of at most {MAX_SEEDS} "
                          f"integers in [0, {MAX_SEED}]")
    specs = [parse_method_spec(m) for m in methods]
    model_name = Path(base.model).name.removesuffix(".gguf")
    folder = check_folder_name("name", name) if name is not None else f"compare-{base.task}-{model_name}"
    path = Path(output_dir if output_dir is not None else base.output_dir) / folder
    configs = [[base.replace(**spec, seed=s, run_name=f"{_slug(spec)}-seed{s}", output_dir=str(path / "runs"),
                             resume=False, overwrite=True) for s in seed_list] for spec in specs]
    run = run or train
    rows, metric = [], ""
    for spec_text, spec, group in zip(methods, specs, configs, strict=True):
        results = []
        for config in group:
            done = _finished(config)
            results.append(done if done is not None else run(config).metrics)
        metric = results[0]["metric"]
        values = [r[f"test_{metric}"] for r in results]
        evals = [r.get(f"eval_{metric}", float("nan")) for r in results]
        mean, std = _mean_std(values)
        eval_mean, eval_std = _mean_std(evals)
        rows.append({"label": group[0].method_label() if ":" not in spec_text else spec_text,
                     "params": results[0]["trainable_params"], "mean": mean, "std": std, "eval_mean": eval_mean,
                     "eval_std": eval_std, "values": values, "seeds": seed_list,
                     "seconds": statistics.fmean(r["train_seconds"] for r in results),
                     "runs": [str(c.run_dir) for c in group],
                     "overrides": {k: v for k, v in spec.items() if k not in _ADAPTER_KEYS}})
    write_report(path, rows, metric, base, command)
    return CompareResult(path, rows, metric)


def write_report(path: Path, rows: Sequence[dict[str, Any]], metric: str, base: TrainConfig,
                 command: str | None = None) -> None:
    """Write ``compare.md``, ``compare.json`` and ``compare.png`` into ``path``.

    Args:
        path: The comparison directory.
        rows: As in :attr:`CompareResult.rows`.
        metric: The task metric compared.
        base: The shared settings (shown in the heading).
        command: The command line that made the comparison, shown first when given.
    """
    steps = f"max_steps={base.max_steps}" if base.max_steps else f"epochs={base.epochs:g}"
    seeds = rows[0]["seeds"] if rows else []
    lines = [f"# {base.task}: {metric} by method ({base.model}, {len(seeds)} seeds)", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"Shared settings: {steps}, batch_size={base.batch_size}, lr={base.lr:g} ({base.lr_scheduler}), "
              f"max_examples={base.max_examples}, eval_examples={base.eval_examples}, seeds {seeds}.", "",
              f"| method | trainable params | params / {rows[0]['label'] if rows else '-'} | test {metric} "
              f"(mean ± std) | eval {metric} (mean ± std) | test {metric} per seed | train s / run |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per_seed = ", ".join(f"{v:.3f}" for v in r["values"])
        lines.append(f"| {r['label']} | {r['params']:,} | {r['params'] / rows[0]['params']:.2f} | "
                     f"{r['mean']:.4f} ± {r['std']:.4f} | {r['eval_mean']:.4f} ± {r['eval_std']:.4f} | {per_seed} | "
                     f"{r['seconds']:.1f} |")
    tuned = [f"{r['label']} ({', '.join(f'{k}={v}' for k, v in r['overrides'].items())})"
             for r in rows if r.get("overrides")]
    settings = ("Every method uses the same shared settings (no per-method tuning)." if not tuned else
                "These methods override shared settings: " + "; ".join(tuned) + ".")
    lines += ["", "Trainable params count adapter parameters only (a classification head, trained in full, "
              "is excluded). std is the sample standard deviation over seeds; each seed also draws its own "
              f"data split. {settings}", ""]
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "compare.md", "\n".join(lines))
    atomic_write_text(path / "compare.json", json.dumps({"metric": metric, "command": command, "rows": list(rows)},
                                                        indent=2) + "\n")
    plot_compare(rows, f"test {metric}", path / "compare.png", title=f"{base.task} ({base.model}, {steps})")
