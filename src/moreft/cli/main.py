"""The ``moreft`` parser and :func:`main`: parse, run one command, turn user errors into exit status 2."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from moreft.cli.commands import (
    cmd_compare,
    cmd_eval,
    cmd_export,
    cmd_inspect,
    cmd_merge,
    cmd_train,
)
from moreft.cli.search import SEARCHED_FIELDS, add_search_flags, cmd_search
from moreft.cli.study import add_study_flags, cmd_study
from moreft.errors import MoreftError
from moreft.train.flags import register_once

EXIT_USER_ERROR = 2
#: Commands that run adapter layers forward, and so read ``$MOREFT_TRITON``.
_RUNS_LAYERS = frozenset({"train", "eval", "compare", "search", "study", "bench"})


def add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """``--config`` and one ``--flag`` per :class:`TrainConfig` setting (:mod:`moreft.train.flags`)."""
    from moreft.train.config import TrainConfig
    from moreft.train.flags import add_setting_flags

    parser.add_argument("--config", metavar="RECIPE.yaml", help="recipe file; flags override its values")
    add_setting_flags(parser, TrainConfig, skip)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, ``moreft: error: ...``, exit status 2, and
    whose single-valued flags may be given once (a repeat is an error, not a silent last-wins)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        register_once(self)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"moreft: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (``bench`` is added when ``moreft.bench`` provides it)."""
    parser = _Parser(prog="moreft", description="Fine-tune models with MoRe / MoRA / LoRA adapters, offline.")
    from moreft.version import __version__

    parser.add_argument("--version", action="version", version=f"moreft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune a model; writes runs/<name>/",
        description="Fine-tune a model. Precedence: defaults < --config recipe < flags. "
        "Each flag may be given once; choices are accepted in any case; 'none' clears an "
        "optional setting. Every setting is listed in docs/settings.md.",
    )
    add_config_flags(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the plan (parameters "
        "counted on a meta-device model, steps, tokens) and exit; reads no data, writes nothing",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="re-evaluate a run's saved adapter on its saved split")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--split", choices=("validation", "test", "both"), default="both")
    p.add_argument(
        "--eval-examples",
        type=int,
        default=None,
        help="cap on examples per split (default: the run's eval_examples)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="merge the adapter into the base model and save it (save_pretrained)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export-lora", help="export the adapter as a peft LoRA directory")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="LoRA rank for MoRA (SVD; accepts its loss); MoRe/LoRA are exact",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="ERR",
        help="largest relative Frobenius error "
        "accepted per layer; a lossy MoRA export needs --rank or --tolerance",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "inspect", help="per-layer params, rank, norm, spectrum and φ of ΔW, weight fits, a |ΔW| heat map"
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--layer", default=None, help="layer for the heat map (default: the first)")
    p.add_argument(
        "--heatmap", default=None, metavar="PNG", help="heat map path (default RUN_DIR/delta_<layer>.png)"
    )
    p.add_argument(
        "--sv-threshold",
        type=float,
        default=0.1,
        metavar="T",
        help="count singular values of ΔW above T per layer (default 0.1, as MoRA Figure 5)",
    )
    p.add_argument(
        "--subspace-rank",
        type=int,
        default=8,
        metavar="R",
        help="top-R singular vectors of ΔW and W compared by φ (LoRA Section 7; default 8, capped at "
        "rank(ΔW))",
    )
    p.add_argument(
        "--plots",
        action="store_true",
        help="also plot the adapter weights against fitted Gaussians (RUN_DIR/weights.png)",
    )
    p.add_argument("--weights-plot", default=None, metavar="PNG", help="that plot's path (implies --plots)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "compare",
        help="train several methods x seeds; writes compare.md and compare.png",
        description="Train each method spec with each seed and tabulate the test metric.",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        required=True,
        metavar="SPEC",
        help="method specs, e.g. lora:rank=8 more:block_rank=4 mora:rank=8,operator=sharing, or any peft "
        "method: peft:vera:r=256 peft:boft:boft_block_size=4",
    )
    p.add_argument("--seeds", default="3", help="number of seeds (0..N-1) or a comma list, e.g. 0,1,2")
    p.add_argument("--name", default=None, help="comparison folder name (default compare-<task>-<model>)")
    p.add_argument(
        "--reference",
        default=None,
        metavar="SPEC",
        help="the arm the others are compared with "
        "(paired bootstrap interval; default lora:rank=8 when it is an arm, else the first)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, in worker processes that share the CPU threads (default 1)",
    )
    add_config_flags(
        p, skip=("method", "peft_type", "peft_options", "run_name", "resume", "overwrite", "seed")
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "search",
        help="search adapter architectures, lr and batch size (Optuna, ASHA pruning)",
        description="Search methods / architectures / lr / batch size; writes search.md, search.png "
        "and best.yaml. --config is the train recipe every trial shares.",
    )
    add_config_flags(p, skip=SEARCHED_FIELDS)
    add_search_flags(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "study",
        help="per task: the same lr search for every arm, seeds at each best lr, a report",
        description="Run (or continue) a study plan: per task, a learning-rate search per arm on "
        "validation (the same trials for each), then seeds at each arm's best lr on test, with mean ± "
        "std and a paired bootstrap interval against the reference arm. Prints the estimated cost "
        "first; running it again skips what is done.",
    )
    add_study_flags(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser(
        "convert",
        help="convert an adapter trained with the papers' code to a moreft adapter",
        description="Read an adapter of the MoRA authors' peft fork (kongds-mora) or a checkpoint of "
        "the MoRe authors' code (sprocketlab-more) and write a moreft adapter directory; prints the "
        "mapping and the options chosen (docs/interop.md).",
    )
    p.add_argument("src", metavar="SRC", help="their adapter directory / checkpoint file or directory")
    p.add_argument("out", metavar="OUT", help="moreft adapter directory to write")
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=("kongds-mora", "sprocketlab-more"),
        help="the format: kongds/MoRA's peft fork, or SprocketLab/sparse_matrix_fine_tuning (MoRe)",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="MODEL",
        help="local base model directory (or minilm/smollm2); default: the base the file names",
    )
    p.add_argument(
        "--allow-bin", action="store_true", help="read a pickle .bin with torch.load(weights_only=True)"
    )
    p.add_argument(
        "--modules-to-save",
        nargs="+",
        default=(),
        metavar="NAME",
        help="sprocketlab-more: modules trained in full to take from the checkpoint (e.g. classifier)",
    )
    p.set_defaults(func=cmd_convert)

    _add_bench(sub)
    return parser


def cmd_convert(args: argparse.Namespace) -> int:
    """``moreft convert SRC OUT --from ...``: write the moreft adapter and print what was done."""
    from moreft.interop import convert
    from moreft.models import model_dir

    report = convert(
        args.source,
        args.src,
        args.out,
        base=args.base,
        allow_bin=args.allow_bin,
        modules_to_save=tuple(args.modules_to_save),
        resolve=model_dir,
    )
    print("\n".join(report.lines()))
    return 0


def _add_bench(sub: Any) -> None:
    """Register ``bench`` (:mod:`moreft.cli.bench`: ``add_arguments(parser)`` and ``run(args)``).

    A benchmark module that fails to import does not break the other commands: ``bench`` then
    reports the import error when it is run.
    """
    try:
        bench = importlib.import_module("moreft.cli.bench")
    except Exception as exc:  # noqa: BLE001 - reported when `moreft bench` is run
        bench, error = None, exc
    if bench is None:
        p = sub.add_parser("bench", help="benchmarks (unavailable: moreft.cli.bench failed to import)")

        def broken(args: argparse.Namespace) -> int:
            raise MoreftError(f"moreft.cli.bench failed to import: {type(error).__name__}: {error}")

        p.set_defaults(func=broken)
        return
    if callable(getattr(bench, "add_arguments", None)) and callable(getattr(bench, "run", None)):
        p = sub.add_parser(
            "bench",
            help="training-step speed and memory of adapted layers, merging and a "
            "real fine-tune, side by side with peft",
        )
        bench.add_arguments(p)
        p.set_defaults(func=bench.run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 130 interrupted).

    The command, not the library, decides how its own process behaves: it never reaches the
    Hugging Face hub (``HF_HUB_OFFLINE``, set before transformers is imported) and its figures use
    matplotlib's non-interactive Agg backend.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0), or a usage error already printed (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    args.argv = list(sys.argv[1:] if argv is None else argv)  # e.g. shown at the top of compare.md
    try:
        if args.command in _RUNS_LAYERS:
            from moreft.ops.triton_more import check_triton_env

            check_triton_env()  # a bad MOREFT_TRITON stops only the commands that run adapter layers
        result = args.func(args)
    except MoreftError as exc:
        print(f"moreft: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(
            "moreft: interrupted (a run with --save-every checkpoints continues with --resume)",
            file=sys.stderr,
        )
        return 130
    if isinstance(result, dict):
        print(json.dumps(result, indent=2))
    return 0 if result is None or isinstance(result, dict) else int(result)


if __name__ == "__main__":
    sys.exit(main())
