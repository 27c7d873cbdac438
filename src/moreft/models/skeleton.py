"""A model's architecture without its weights (``meta`` device), for counting parameters before a run.

Used by ``moreft train --dry-run``; reads no weights, allocates nothing and writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moreft.models.folder import model_dir_errors
from moreft.models.gguf import _is_cached, _quiet_transformers
from moreft.models.packaged import (
    MODELS,
    SMOLLM2_CACHE_NAME,
    default_cache_dir,
    model_dir,
    smollm2_gguf,
)
from moreft.models.scratch import build_random
from moreft.tasks.base import TaskKind


def model_skeleton(name_or_path: str | Path, kind: TaskKind, num_labels: int | None = None) -> Any:
    """The model's architecture on the ``meta`` device: shapes only, no weights read, nothing allocated.

    Writes nothing either: a GGUF model not yet converted is read from the GGUF file's metadata (a
    few seconds) rather than converted.

    Raises:
        ConfigError: ``name_or_path`` is not a known model or a readable model folder / GGUF file.
        DataPackageError: The package of a named model is not installed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    spec = MODELS.get(str(name_or_path))
    if spec is not None and spec.architecture is not None:
        return build_random(spec.architecture, 0, meta=True)
    gguf = smollm2_gguf() if str(name_or_path) == "smollm2" else Path(name_or_path).expanduser()
    extra = {"num_labels": num_labels} if kind is TaskKind.CLASSIFICATION else {}
    with _quiet_transformers():
        if (
            gguf.suffix == ".gguf"
            and gguf.is_file()
            and not _is_cached(
                default_cache_dir()
                / (SMOLLM2_CACHE_NAME if str(name_or_path) == "smollm2" else gguf.stem.lower()),
                gguf,
            )
        ):
            hf_config = AutoConfig.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True, **extra
            )
        else:
            path = model_dir(name_or_path)
            with model_dir_errors(path, num_labels):
                hf_config = AutoConfig.from_pretrained(path, local_files_only=True, **extra)
    auto = AutoModelForSequenceClassification if kind is TaskKind.CLASSIFICATION else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(hf_config)
