"""Fine-tuning real models with moreft adapters: run configs, training, evaluation, comparison.

    from moreft.train import resolve_config, train
    config = resolve_config("recipes/demo.yaml", {"max_steps": 50})
    result = train(config)            # fills runs/<name>/ (config, metrics, adapter, loss.png)
    print(result.metrics["test_accuracy"], result.metrics["trainable_params"])

The submodule that holds ``compare`` is named ``comparison`` so that ``moreft.train.compare`` is
always the function (a submodule of the same name would shadow it once imported).

Everything runs offline: models and data come from installed packages or local paths, loaded with
``local_files_only``; the ``moreft`` command also sets ``HF_HUB_OFFLINE`` for its own process. Names
are imported on first use, so ``import moreft.train`` (and ``moreft --help``) stays fast. The search
over runs is :mod:`moreft.search`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CompareResult": "comparison",
    "compare": "comparison",
    "parse_method_spec": "arms",
    "TrainConfig": "config",
    "field_names": "config",
    "InspectReport": "inspection",
    "inspect_run": "inspection",
    "RunResult": "loop",
    "train": "loop",
    "dump_config": "recipes",
    "parse_task_options": "recipes",
    "read_recipe": "recipes",
    "resolve_config": "recipes",
    "RunDir": "rundir",
    "load_trained": "rundir",
    "read_run_config": "rundir",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"moreft.train.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'moreft.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
