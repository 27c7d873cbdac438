"""Checking a Trainer checkpoint before ``--resume`` uses it: complete by content, state fitting the model.

A checkpoint ``checkpoint-<step>/`` holds ``adapter/`` (the :func:`moreft.save_adapter` format),
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and, written last, ``trainer_state.json``.
The ``.pt`` / ``.pth`` files are read by ``transformers.Trainer`` with ``torch.load(weights_only=True)``
(tensors and plain containers, no code). That alone does not make them *fit*: an optimizer state
from another run (other shapes) makes AdamW's fused kernels read past their buffers, and a NaN
moment poisons every later step. So before the Trainer loads them, :func:`check_optimizer_files`
reads them the same way and checks every moment tensor against the live parameter it belongs to.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moreft.errors import CheckpointError

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "trainer_state.json"
ADAPTER_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors")
#: trainer_state.json holds the log history: a few KB per hundred steps; anything this big is not ours.
MAX_STATE_BYTES = 64 * 2**20
#: Slack on top of the optimizer state's size implied by the parameters (pickle framing, hyperparameters).
STATE_SLACK_BYTES = 16 * 2**20


def step_of(path: Path) -> int | None:
    """The step ``N`` of a ``checkpoint-N`` folder, or None for any other name."""
    prefix, _, number = path.name.rpartition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() and len(number) < 19 else None


def checkpoint_complete(path: Path) -> bool:
    """True when a Trainer checkpoint was written to the end, judged by content, not by names.

    ``trainer_state.json`` is written last; it must be a JSON object that ``TrainerState`` reads,
    whose ``global_step`` is the folder's step. The files written before it must be there and look
    like what wrote them: two zip archives (``torch.save``) and a readable adapter directory. A
    checkpoint that fails any of this does not count, so ``--resume`` takes the one before it.
    """
    step = step_of(path)
    if step is None or not path.is_dir():
        return False
    try:
        if not all((path / name).is_file() and (path / name).stat().st_size > 0 for name in ADAPTER_FILES):
            return False
        if not all(zipfile.is_zipfile(path / name) for name in (OPTIMIZER_FILE, SCHEDULER_FILE)):
            return False
        if (path / STATE_FILE).stat().st_size > MAX_STATE_BYTES:
            return False
        state = json.loads((path / STATE_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
    if not isinstance(state, dict) or type(state.get("global_step")) is not int or state["global_step"] != step:
        return False
    from transformers import TrainerState

    try:
        TrainerState(**state)
    except (TypeError, ValueError):
        return False
    from moreft.errors import AdapterFileError
    from moreft.state import read_adapter_config

    try:
        read_adapter_config(path / "adapter")
    except AdapterFileError:
        return False
    return True


def _load(path: Path, what: str, max_bytes: int) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with a size cap and a clear error."""
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{str(path)!r} is {size:,} bytes; the {what} of this model is at most "
                              f"{max_bytes:,} bytes, so it belongs to another (larger) run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt or hostile file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{str(path)!r} is not a readable {what} (torch.load with weights_only=True: "
                              f"{first[:300]})") from None


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_finite_number(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.numel() <= 1 and bool(torch.isfinite(value).all())
    return value is None or isinstance(value, str)


def check_optimizer_state(state: Any, groups: Sequence[Sequence[torch.Tensor]], path: Path) -> None:
    """Check an optimizer ``state_dict`` against the live optimizer's parameter groups.

    Args:
        state: What ``torch.load`` returned.
        groups: The live optimizer's parameters, group by group.
        path: The file (for messages).

    Raises:
        CheckpointError: Another structure, another number of groups or parameters, a moment of
            another shape or dtype than its parameter, or a NaN/Inf value or hyperparameter.
    """
    where = repr(str(path))
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or \
            not isinstance(state.get("param_groups"), list):
        raise CheckpointError(f"{where} is not an optimizer state (a mapping with 'state' and 'param_groups')")
    saved = state["param_groups"]
    if len(saved) != len(groups) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved):
        raise CheckpointError(f"{where} has {len(saved)} parameter groups; this run's optimizer has {len(groups)}: "
                              "the checkpoint belongs to another run")
    params: dict[Any, torch.Tensor] = {}
    for number, (group, live) in enumerate(zip(saved, groups)):
        if len(group["params"]) != len(live):
            raise CheckpointError(f"{where}: parameter group {number} holds {len(group['params'])} parameters; this "
                                  f"run trains {len(live)} there: the checkpoint belongs to another run")
        bad = sorted(k for k, v in group.items() if k != "params" and not _finite_number(v))
        if bad:
            raise CheckpointError(f"{where}: parameter group {number} has non-finite or malformed "
                                  f"hyperparameters {bad}")
        params.update(zip(group["params"], live))
    for key, moments in state["state"].items():
        if key not in params or not isinstance(moments, dict):
            raise CheckpointError(f"{where}: state entry {key!r} names no parameter of its groups")
        param = params[key]
        for name, value in moments.items():
            if not isinstance(value, torch.Tensor):
                if not _finite_number(value):
                    raise CheckpointError(f"{where}: {name!r} of parameter {key} is {value!r}, not a finite number")
                continue
            if value.dim() > 0 and (tuple(value.shape) != tuple(param.shape) or not value.is_floating_point()):
                raise CheckpointError(f"{where}: {name!r} of parameter {key} has shape {list(value.shape)} "
                                      f"({value.dtype}); the parameter is {list(param.shape)} ({param.dtype}): the "
                                      "checkpoint belongs to another run or model")
            if value.dim() == 0 and value.numel() != 1:
                raise CheckpointError(f"{where}: {name!r} of parameter {key} is empty")
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{where}: {name!r} of parameter {key} holds NaN/Inf values; resuming would "
                                      "train on them")


def check_scheduler_state(state: Any, num_groups: int, path: Path) -> None:
    """Check a ``LambdaLR``-style scheduler ``state_dict``: per-group lists and a finite step.

    Raises:
        CheckpointError: Not a mapping, lists of another length, or non-finite values.
    """
    where = repr(str(path))
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is not a learning-rate scheduler state (a mapping)")
    for key in ("base_lrs", "_last_lr"):
        value = state.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != num_groups
                                  or not all(_finite_number(v) and not isinstance(v, bool) for v in value)):
            raise CheckpointError(f"{where}: {key}={value!r} must list {num_groups} finite learning rates, one per "
                                  "parameter group")
    epoch = state.get("last_epoch")
    if epoch is not None and (type(epoch) is not int or epoch < -1):
        raise CheckpointError(f"{where}: last_epoch={epoch!r} must be an integer >= -1")


def check_optimizer_files(checkpoint: Path, groups: Sequence[Sequence[torch.Tensor]]) -> None:
    """Read ``optimizer.pt`` / ``scheduler.pt`` of ``checkpoint`` and check them against ``groups``.

    Raises:
        CheckpointError: A file is missing, too large, unreadable, or does not fit (see above).
    """
    numel = sum(p.numel() for group in groups for p in group)
    for name in (OPTIMIZER_FILE, SCHEDULER_FILE):
        if not (checkpoint / name).is_file():
            raise CheckpointError(f"checkpoint {str(checkpoint)!r} has no {name}")
    optimizer = _load(checkpoint / OPTIMIZER_FILE, "optimizer state", 3 * 8 * numel + STATE_SLACK_BYTES)
    check_optimizer_state(optimizer, groups, checkpoint / OPTIMIZER_FILE)
    scheduler = _load(checkpoint / SCHEDULER_FILE, "scheduler state", STATE_SLACK_BYTES)
    check_scheduler_state(scheduler, len(groups), checkpoint / SCHEDULER_FILE)
