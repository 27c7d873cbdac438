"""``moreft study`` flags and command (heavy imports happen when it runs).

moreft study --plan recipes/fidelity/sentiment.yaml --dry-run
moreft study --plan recipes/fidelity/sentiment.yaml --skip-arms full
"""

from __future__ import annotations

import argparse
import sys


def add_study_flags(parser: argparse.ArgumentParser) -> None:
    """The study's flags."""
    parser.add_argument(
        "--plan", required=True, metavar="PLAN.yaml", help="the study plan (moreft.search.studyplan)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the arms and the estimated cost, then stop"
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        default=(),
        metavar="PATTERN",
        help="run only these arms: a spec, a method (more) or a peft family (peft:vera)",
    )
    parser.add_argument(
        "--skip-arms",
        nargs="+",
        default=(),
        metavar="PATTERN",
        help="leave these arms out (same patterns), e.g. full where this moreft lacks it",
    )
    parser.add_argument(
        "--tasks", nargs="+", default=(), metavar="TASK", help="run only these tasks of the plan"
    )
    parser.add_argument("--output-dir", default=None, help="parent of the study folder (default: the plan's)")


def cmd_study(args: argparse.Namespace) -> int:
    """``moreft study``: read the plan, print the estimate, run (or continue) the study."""
    from moreft.cli.commands import command_line
    from moreft.search.studyplan import read_plan, task_configs
    from moreft.search.studyrun import run_study

    plan = read_plan(args.plan)
    arms = plan.selected(args.arms, args.skip_arms)
    if not arms:
        print("moreft: every arm is left out; nothing to run", file=sys.stderr)
        return 2
    configs = task_configs(plan, output_dir=args.output_dir, only=args.tasks)
    try:
        run_study(
            plan,
            configs,
            arms,
            dry_run=args.dry_run,
            command=command_line(args),
            say=lambda line: print(line, flush=True),
        )
    except KeyboardInterrupt:
        print("moreft: study interrupted; run the same command again to continue it", file=sys.stderr)
        return 130
    return 0
