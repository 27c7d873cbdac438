"""Flags and driver of ``moreft bench``; the measurements themselves live in :mod:`moreft.bench`."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Any

import torch

from moreft.bench import report
from moreft.bench.e2e import E2E_METHODS, bench_e2e, e2e_child
from moreft.bench.layer import AUTOCAST_DTYPES, INFERENCE_METHODS, bench_inference, bench_merge, bench_shape
from moreft.bench.llm import LLM_METHODS, PRECISIONS, bench_llm, llm_child
from moreft.bench.variants import COMPILED_METHODS, LAYER_METHODS
from moreft.errors import ConfigError
from moreft.safe_write import atomic_write_text

FULL_SHAPES = ((1024, 1024, 4096), (4096, 4096, 1024), (1024, 4096, 4096))  # (in, out, tokens)
QUICK_SHAPES = ((1024, 1024, 4096),)
FULL_ROUNDS, QUICK_ROUNDS = 9, 5
MERGE_SIZE, QUICK_MERGE_SIZE = 4096, 2048
MERGE_ROUNDS, QUICK_MERGE_ROUNDS = 7, 3
E2E_STEPS, QUICK_E2E_STEPS = 6, 2
E2E_REPEATS, QUICK_E2E_REPEATS = 3, 1
E2E_WARMUP = 2
LLM_STEPS, LLM_REPEATS = 3, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``moreft bench``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one shape (1024x1024, T=4096), few rounds, a 2048^2 merge (about a minute)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"interleaved rounds per shape (default {FULL_ROUNDS}; quick {QUICK_ROUNDS})",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument(
        "--shapes",
        default=None,
        metavar="INxOUTxT,...",
        help="layer shapes (default 1024x1024x4096,4096x4096x1024,1024x4096x4096)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        metavar="M,...",
        help=f"layer variants (default all: {','.join(LAYER_METHODS)}); base is always added",
    )
    parser.add_argument(
        "--autocast",
        choices=tuple(AUTOCAST_DTYPES),
        type=str.lower,
        default=None,
        help="run the layer steps under CPU autocast to this dtype (fp32 parameters), as a bf16 "
        "training loop does (default: off, fp32)",
    )
    parser.add_argument("--no-merge", action="store_true", help="skip the merge benchmark")
    parser.add_argument(
        "--merge-size",
        type=int,
        default=None,
        help=f"merge a SIZE x SIZE layer (default {MERGE_SIZE}; quick {QUICK_MERGE_SIZE})",
    )
    parser.add_argument("--e2e", action="store_true", help="also time a MiniLM fine-tune per method")
    parser.add_argument("--e2e-only", action="store_true", help="only the MiniLM fine-tune")
    parser.add_argument(
        "--e2e-methods",
        default=",".join(E2E_METHODS),
        metavar="M,...",
        help=f"end-to-end methods (default {','.join(E2E_METHODS)})",
    )
    parser.add_argument("--e2e-batch", type=int, default=16, help="sequences per step (default 16)")
    parser.add_argument("--e2e-seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument(
        "--e2e-steps",
        type=int,
        default=None,
        help=f"timed steps per run (default {E2E_STEPS}; quick {QUICK_E2E_STEPS})",
    )
    parser.add_argument(
        "--e2e-repeats",
        type=int,
        default=None,
        help=f"runs per method (default {E2E_REPEATS}; quick {QUICK_E2E_REPEATS})",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help=f"also time torch.compile'd variants ({','.join(COMPILED_METHODS)}) against eager",
    )
    parser.add_argument(
        "--inference",
        action="store_true",
        help="also time forward-only inference per shape: merged vs frozen, no_grad vs training forward",
    )
    parser.add_argument(
        "--llm",
        action="store_true",
        help="also run the SmolLM2-135M end-to-end benchmark (all linear layers, ours and peft's peers)",
    )
    parser.add_argument("--llm-only", action="store_true", help="only the SmolLM2-135M end-to-end benchmark")
    parser.add_argument(
        "--llm-methods",
        default=",".join(LLM_METHODS),
        metavar="M,...",
        help=f"LLM methods (default {','.join(LLM_METHODS)})",
    )
    parser.add_argument(
        "--llm-precisions",
        default=",".join(PRECISIONS),
        metavar="P,...",
        help="fp32 and/or bf16 (autocast) (default fp32,bf16)",
    )
    parser.add_argument(
        "--llm-model", default="smollm2", help="model name or local directory (default smollm2)"
    )
    parser.add_argument("--llm-batch", type=int, default=8, help="LLM sequences per step (default 8)")
    parser.add_argument("--llm-seq", type=int, default=256, help="LLM tokens per sequence (default 256)")
    parser.add_argument(
        "--llm-steps", type=int, default=LLM_STEPS, help=f"timed LLM steps per run (default {LLM_STEPS})"
    )
    parser.add_argument(
        "--llm-repeats",
        type=int,
        default=LLM_REPEATS,
        help=f"LLM runs per method and precision (default {LLM_REPEATS})",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="everything: all shapes and variants with --compile, --inference, merge, --e2e and --llm",
    )
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write every result as JSON")
    parser.add_argument("--e2e-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--llm-child", default=None, help=argparse.SUPPRESS)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def parse_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """``"1024x1024x4096,..."`` as ``((in, out, tokens), ...)``.

    Raises:
        ConfigError: a part is not three positive integers joined by ``x``.
    """
    shapes = []
    for part in text.split(","):
        try:
            dims = tuple(int(v) for v in part.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 3 or min(dims) < 1:
            raise ConfigError(f"bad shape {part!r} in --shapes; use INxOUTxTOKENS, e.g. 1024x1024x4096")
        shapes.append(dims)
    return tuple(shapes)


def _methods(text: str | None, known: tuple[str, ...], flag: str) -> tuple[str, ...]:
    methods = tuple(m for m in text.split(",") if m) if text else known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"unknown {flag} {unknown}; choose from {', '.join(known)}")
    return methods


def _header(args: argparse.Namespace) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["moreft", "bench", *getattr(args, "argv", ())[1:]]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_avg_start": os.getloadavg(),
        },
        "versions": {
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        },
        "dtype": "float32",
        "autocast": args.autocast,
        "step": "layer(x).backward(g); x (T, in) requires grad; base frozen",
    }


def run(args: argparse.Namespace) -> int:
    """Run the benchmark that ``args`` (from :func:`add_arguments`) describes; returns the exit status.

    Raises:
        ConfigError: a bad shape, method name or count.
    """
    for name in (
        "threads",
        "rounds",
        "warmup",
        "merge_size",
        "e2e_batch",
        "e2e_seq",
        "e2e_steps",
        "e2e_repeats",
        "llm_batch",
        "llm_seq",
        "llm_steps",
        "llm_repeats",
    ):
        _positive(name, getattr(args, name))
    torch.set_num_threads(args.threads)
    if args.e2e_child:
        print(
            json.dumps(
                e2e_child(
                    args.e2e_child, args.e2e_batch, args.e2e_seq, args.e2e_steps or E2E_STEPS, E2E_WARMUP
                )
            )
        )
        return 0
    if args.llm_child:
        print(
            json.dumps(
                llm_child(args.llm_child, args.llm_model, args.llm_batch, args.llm_seq, args.llm_steps)
            )
        )
        return 0
    if args.full:
        args.compile = args.inference = args.e2e = args.llm = True
    shapes = parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if args.quick else FULL_SHAPES)
    default = LAYER_METHODS + COMPILED_METHODS if args.compile else LAYER_METHODS
    methods = _methods(args.methods or ",".join(default), LAYER_METHODS + COMPILED_METHODS, "method(s)")
    methods = methods if "base" in methods else ("base", *methods)
    e2e_methods = _methods(args.e2e_methods, E2E_METHODS, "--e2e-methods")
    llm_methods = _methods(args.llm_methods, LLM_METHODS, "--llm-methods")
    precisions = _methods(args.llm_precisions, PRECISIONS, "--llm-precisions")
    layers = not (args.e2e_only or args.llm_only)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)
    out = _header(args)
    out.update(shapes=[], goals=[], inference=[])
    print(
        f"moreft bench: {out['machine']['cpus']} CPUs, {args.threads} threads, torch {torch.__version__}, "
        f"peft {out['versions']['peft']}, load average {out['machine']['load_avg_start'][0]:.1f}",
        flush=True,
    )
    if layers:
        for in_f, out_f, tokens in shapes:
            print(
                f"  timing {in_f}->{out_f}, T={tokens}: {len(methods)} variants x {rounds} rounds",
                file=sys.stderr,
                flush=True,
            )
            res = bench_shape(in_f, out_f, tokens, methods, rounds, args.warmup, autocast=args.autocast)
            out["shapes"].append(res)
            out["goals"] += report.goals(res)
            print(report.format_shape(res), flush=True)
        if args.inference:
            for in_f, out_f, tokens in shapes:
                res = bench_inference(in_f, out_f, tokens, INFERENCE_METHODS, rounds, args.warmup)
                out["inference"].append(res)
                out["goals"] += report.inference_goals(res)
                print(report.format_inference(res), flush=True)
        if out["shapes"]:
            print(f"\npeak memory: {out['shapes'][0]['rows'][0]['memory_method']} (moreft.bench.measure)")
        if not args.no_merge:
            size = args.merge_size or (QUICK_MERGE_SIZE if args.quick else MERGE_SIZE)
            out["merge"] = bench_merge(size, QUICK_MERGE_ROUNDS if args.quick else MERGE_ROUNDS)
            out["goals"] += report.merge_goals(out["merge"])
            print(report.format_merge(out["merge"]), flush=True)
    if (args.e2e or args.e2e_only) and not args.llm_only:
        out["e2e"] = bench_e2e(
            e2e_methods,
            args.e2e_batch,
            args.e2e_seq,
            args.e2e_steps or (QUICK_E2E_STEPS if args.quick else E2E_STEPS),
            args.e2e_repeats or (QUICK_E2E_REPEATS if args.quick else E2E_REPEATS),
            args.threads,
            lambda msg: print(msg, file=sys.stderr, flush=True),
        )
        print(report.format_e2e(out["e2e"]))
    if args.llm or args.llm_only:
        out["llm"] = bench_llm(
            llm_methods,
            precisions,
            args.llm_model,
            args.llm_batch,
            args.llm_seq,
            args.llm_steps,
            args.llm_repeats,
            args.threads,
            lambda msg: print(msg, file=sys.stderr, flush=True),
        )
        out["goals"] += report.llm_goals(out["llm"])
        print(report.format_llm(out["llm"]))
    if out["goals"]:
        print(report.format_goals(out["goals"]))
    out["machine"]["load_avg_end"] = os.getloadavg()
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=1))
        print(f"\nwrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m moreft.bench``: parse ``argv`` and :func:`run`; a bad flag value exits with 2."""
    import moreft.bench

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bench never downloads
    parser = argparse.ArgumentParser(
        prog="moreft bench",
        description=moreft.bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        args.argv = ["bench", *argv]
        return run(args)
    except ConfigError as exc:
        print(f"moreft bench: error: {exc}", file=sys.stderr)
        return 2
