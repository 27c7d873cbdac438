"""``moreft search`` flags and command (argument parsing only here; heavy imports happen when it runs).

    moreft search --config recipes/demo.yaml --space recipes/search-sentiment-cpu.yaml --trials 8
    moreft search --task sentiment --max-steps 60 --eval-every 15 --methods more lora --max-params 100000

``--config`` is a train recipe (the settings every trial shares; train flags override it);
``--space`` is a search file with ``space:`` (what to sample, :mod:`moreft.search.space`)
and ``search:`` (how, :class:`moreft.search.driver.SearchSettings`); search flags override it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moreft.errors import ConfigError
from moreft.train.bounded import load_yaml, read_text_file
from moreft.train.config import SEARCHED_SETTINGS

#: Train settings a search sets for each trial (so ``moreft search`` has no flag for them); declared with
#: ``searched=True`` in :class:`~moreft.train.config.TrainConfig`.
SEARCHED_FIELDS = SEARCHED_SETTINGS
SEARCH_FILE_KEYS = ("description", "space", "search")
_FLAGS = {
    "trials": int,
    "jobs": int,
    "pruner": str,
    "reduction_factor": int,
    "min_steps": int,
    "max_params": int,
    "storage": str,
    "sampler": str,
    "sampler_seed": int,
    "name": str,
    "timeout": float,
}


def add_search_flags(parser: argparse.ArgumentParser) -> None:
    """The search's own flags (each overrides the ``search:`` entry of ``--space``)."""
    parser.add_argument(
        "--space",
        metavar="SEARCH.yaml",
        help="search file: `space:` (what to sample) and `search:` (trials, pruner, ...)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        type=str.lower,  # choices in any case, as everywhere
        choices=("more", "lora", "mora"),
        default=argparse.SUPPRESS,
        help="methods the search may pick, with the space's sizes (overrides space.methods)",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        metavar="SPEC",
        default=argparse.SUPPRESS,
        help="method specs tried as they are, any method incl. peft (e.g. lora:rank=8 peft:vera:r=256); "
        "overrides space.arms (without --methods: only these)",
    )
    helps = {
        "trials": "trials to finish (complete or pruned; failed ones do not count)",
        "jobs": "worker processes sharing the study",
        "pruner": "asha (default), hyperband or none",
        "reduction_factor": "keep the best 1/N at each rung (default 3)",
        "min_steps": "steps of the first rung (default eval_every)",
        "max_params": "exclude architectures with more trainable adapter parameters, before training",
        "storage": "Optuna storage URL (default: sqlite in the search directory)",
        "sampler": "tpe (default) or random",
        "sampler_seed": "sampler seed (default 0)",
        "name": "search directory / study name (default search-<task>-<model>)",
        "timeout": "stop starting trials after this many seconds",
    }
    for name, kind in _FLAGS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"search_{name}",
            type=kind,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=helps[name],
        )


def read_search_file(path: str | None) -> dict[str, Any]:
    """The mapping of a search file (empty without one).

    Raises:
        ConfigError: Missing file, invalid YAML, not a mapping, or unknown top-level keys.
    """
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"search file {path!r} does not exist")
    data = load_yaml(read_text_file(file, "search file"), f"search file {path!r}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"search file {path!r} must be a mapping with `space:` and `search:`")
    unknown = sorted(set(data) - set(SEARCH_FILE_KEYS))
    if unknown:
        raise ConfigError(
            f"search file {path!r} has unknown key(s) {unknown}; valid keys are {list(SEARCH_FILE_KEYS)} "
            "(train settings go in the --config recipe)"
        )
    return data


def cmd_search(args: argparse.Namespace) -> int:
    """``moreft search``: resolve base config, space and settings, run (or resume) the search."""
    from moreft.cli.commands import command_line, run_overrides
    from moreft.search import SearchSettings, run_search
    from moreft.search.space import SearchSpace
    from moreft.train.recipes import resolve_config

    data = read_search_file(args.space)
    space_data = dict(data.get("space") or {})
    if hasattr(args, "methods"):
        space_data["methods"] = args.methods
    if hasattr(args, "arms"):
        space_data["arms"] = args.arms
        if not hasattr(args, "methods"):
            space_data.pop("methods", None)
    space = SearchSpace.from_dict(space_data)
    settings_data = dict(data.get("search") or {})
    for name in _FLAGS:
        if hasattr(args, f"search_{name}"):
            settings_data["seed" if name == "sampler_seed" else name] = getattr(args, f"search_{name}")
    settings = SearchSettings.from_dict(settings_data)
    base = resolve_config(args.config, run_overrides(args))
    try:
        result = run_search(base, space, settings, command=command_line(args))  # the argv main() was given
    except KeyboardInterrupt:
        print("moreft: search interrupted; run the same command again to resume it", file=sys.stderr)
        return 130
    print((result.path / "search.md").read_text().split("## All trials")[0], end="")
    return 0
