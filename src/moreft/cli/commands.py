"""What each ``moreft`` subcommand does (argument parsing lives in :mod:`moreft.cli`).

Heavy imports (torch, transformers) happen inside the commands, so ``moreft --help`` is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from moreft.errors import ConfigError, OutputError
from moreft.safe_write import FolderKind, writable_folder, write_folder

#: The file that marks a ``moreft merge`` output and lists every file in it.
MERGED_MARK = "moreft_merged.json"


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings the command-line flags give."""
    from moreft.train.config import TrainConfig
    from moreft.train.flags import overrides

    return overrides(args, TrainConfig)


def cmd_train(args: argparse.Namespace) -> int:
    """``moreft train``: resolve the config (defaults < recipe < flags) and run it."""
    from moreft.train.recipes import dump_config, resolve_config

    config = resolve_config(args.config, run_overrides(args))
    if args.dry_run:
        from moreft.train.plan import describe_run

        print(dump_config(config), end="")
        print(describe_run(config))
        return 0
    from moreft.train.loop import train

    train(config)
    return 0


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name}={value} must be an integer >= 1")


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """``moreft eval RUN_DIR``: score the saved adapter on the run's saved split."""
    from moreft.train.evaluate import evaluate
    from moreft.train.rundir import load_splits, load_trained, precision_dtype

    _check_positive("--eval-examples", args.eval_examples)
    _check_positive("--batch-size", args.batch_size)
    config, task, model, tokenizer = load_trained(args.run_dir)
    splits = load_splits(args.run_dir, config, task)
    cap = args.eval_examples or config.eval_examples
    chosen = {"validation": splits.validation, "test": splits.test}
    if args.split != "both":
        chosen = {args.split: chosen[args.split]}
    autocast = precision_dtype(config.precision) if config.precision != "fp32" else None
    batch = args.batch_size or config.eval_batch_size or 2 * config.batch_size
    result: dict[str, Any] = {"run_dir": str(args.run_dir), "metric": task.metric_name}
    for name, examples in chosen.items():
        examples = examples[:cap]
        result[name] = {
            "examples": len(examples),
            **evaluate(
                model, tokenizer, task, examples, batch, config.max_length, config.max_new_tokens, autocast
            ),
        }
    return result


def _merged_names(folder: Path) -> set[str] | None:
    """The files a ``moreft merge`` output holds, per its :data:`MERGED_MARK`; None if it has no valid one."""
    mark = folder / MERGED_MARK
    if mark.is_symlink() or not mark.is_file() or mark.stat().st_size > 2**20:
        return None
    try:
        meta = json.loads(mark.read_bytes())
    except (ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != "moreft-merged":
        return None
    if not isinstance(meta.get("files"), list):
        return None
    return {str(n) for n in meta["files"]} | {MERGED_MARK}


#: What ``moreft merge`` may replace (with --overwrite): a folder holding only files an earlier merge wrote.
MERGED_KIND = FolderKind("merged model", _merged_names)


def _outside_run(out: Path, run_dir: Path) -> None:
    """Refuse an output that is the run being read, inside it, or holds it.

    Raises:
        OutputError: names both paths.
    """
    o, r = Path(os.path.realpath(out)), Path(os.path.realpath(run_dir))
    where = "is" if o == r else "is inside" if r in o.parents else "holds" if o in r.parents else None
    if where:
        raise OutputError(
            f"output {str(out)!r} {where} the run being read ({str(run_dir)!r}); moreft never "
            "writes into or over the run it reads. Choose a path outside it"
        )


def cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    """``moreft merge RUN_DIR OUT``: base + ΔW saved with ``save_pretrained`` (and the tokenizer).

    A full fine-tuning run has no adapter to merge: OUT gets its trained model as it is (and says so).
    """
    import moreft
    from moreft.train.rundir import load_trained

    out = Path(args.out)
    _outside_run(out, Path(args.run_dir))
    real = writable_folder(out, MERGED_KIND)
    if real.is_dir() and any(real.iterdir()) and not args.overwrite:
        raise ConfigError(
            f"output {str(out)!r} already exists; pass --overwrite to replace it or choose another path"
        )
    config, _, model, tokenizer = load_trained(args.run_dir, moreft_only="moreft merge")
    if not config.full:
        moreft.merge(model, safe=True)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.iterdir())
        mark = {
            "format": "moreft-merged",
            "moreft_version": moreft.__version__,
            "run": str(args.run_dir),
            "files": files,
        }
        (tmp / MERGED_MARK).write_text(json.dumps(mark, indent=2) + "\n")

    write_folder(out, fill, MERGED_KIND)  # an existing OUT (ours) is swapped out atomically, never missing
    result = {"merged": str(out), "base_model": config.model, "method": config.method_label()}
    if config.full:
        result["note"] = (
            "full fine-tuning has no adapter: nothing was merged, OUT holds the trained model as it is"
        )
    return result


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    """``moreft export-lora RUN_DIR OUT [--rank R] [--tolerance ERR]``: a peft LoRA directory.

    The export's error is printed in words on stderr (the JSON result goes to stdout).

    Raises:
        ExportError: a lossy MoRA export with neither ``--rank`` nor ``--tolerance``, or above the tolerance.
    """
    import moreft
    from moreft.export import EXPORT_KIND
    from moreft.train.reinit import MERGED_BASE_FILE
    from moreft.train.rundir import load_trained, read_run_config

    if read_run_config(args.run_dir).full:
        raise ConfigError(
            f"{args.run_dir!r} is full fine-tuning: it trained every weight, so there is no low-rank "
            "adapter to export; use `moreft merge` to save the trained model"
        )
    if (Path(args.run_dir) / MERGED_BASE_FILE).is_file():
        raise ConfigError(
            f"{args.run_dir!r} was trained with merge_every: its update is the merged cycles in "
            f"{MERGED_BASE_FILE} plus the last adapter, not one LoRA; use `moreft merge` instead"
        )
    _outside_run(Path(args.out), Path(args.run_dir))
    writable_folder(Path(args.out), EXPORT_KIND)  # refuse before the slow model load
    config, _, model, _ = load_trained(args.run_dir, moreft_only="moreft export-lora")
    report = moreft.export_lora(model, args.out, rank=args.rank, tolerance=args.tolerance)
    print(f"moreft: {report.summary()}", file=sys.stderr)
    return {
        "exported": str(report.path),
        "method": config.method_label(),
        "lora_rank": report.rank,
        "exact": report.exact,
        "max_relative_error": report.max_relative_error,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    """``moreft inspect RUN_DIR``: per-layer table, weight fits, a |ΔW| heat map (and the weights plot)."""
    from moreft.train.choices import RunMethod
    from moreft.train.inspection import inspect_run

    report = inspect_run(
        args.run_dir,
        layer=args.layer,
        heatmap=args.heatmap,
        sv_threshold=args.sv_threshold,
        subspace_rank=args.subspace_rank,
        plots=args.plots,
        weights_plot=args.weights_plot,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    settings = {k: v for k, v in report.method.items() if k != "target_modules"}
    if settings.get("method") == RunMethod.FULL.value:
        print(f"full fine-tuning: ΔW = W_trained - W_initial of {len(report.layers)} targeted linear layers")
    else:
        print(f"adapter: {settings} on {len(report.layers)} layers")
    print(report.to_markdown())
    print(
        f"φ: subspace similarity of the top-r singular vectors of ΔW and W (1 = inside W's top directions; "
        f"random subspaces give about r / width), r = min({report.subspace_rank}, rank of ΔW)"
    )
    if report.weights:
        print(report.weights_markdown())
    print(f"heat map of |ΔW| for {report.heatmap_layer}: {report.heatmap}")
    if report.weights_plot is not None:
        print(f"adapter weights against fitted Gaussians: {report.weights_plot}")
    return 0


def parse_seeds(text: str) -> int | list[int]:
    """``"3"`` -> 3 (seeds 0, 1, 2); ``"0,5,7"`` -> [0, 5, 7].

    Raises:
        ConfigError: Not a count or a comma list of integers.
    """
    try:
        if len(text) > 10_000:
            raise ValueError(text)
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return int(text)
    except ValueError:
        raise ConfigError(
            f"--seeds {text[:80]!r} must be a count (e.g. 3) or a comma list (e.g. 0,1,2)"
        ) from None


def command_line(args: argparse.Namespace) -> str | None:
    """``moreft ARGS...`` as run (the argv :func:`moreft.cli.main` was given, quoted), or None without one."""
    argv = getattr(args, "argv", None)
    return "moreft " + shlex.join(argv) if argv else None


def cmd_compare(args: argparse.Namespace) -> int:
    """``moreft compare``: every method spec x seed, then ``compare.md`` / ``compare.png``."""
    from moreft.train.arms import parse_method_spec
    from moreft.train.comparison import compare
    from moreft.train.recipes import resolve_config

    seeds = parse_seeds(args.seeds)
    for spec in args.methods:  # fail on a bad spec before anything trains
        parse_method_spec(spec)
    base = resolve_config(args.config, run_overrides(args))
    result = compare(
        base,
        args.methods,
        seeds,
        name=args.name,
        command=command_line(args),
        reference=args.reference,
        log=lambda line: print(line, flush=True),
        jobs=args.jobs,
    )
    print((result.path / "compare.md").read_text(), end="")
    print(f"wrote {result.path / 'compare.md'} and {result.path / 'compare.png'}")
    return 0
