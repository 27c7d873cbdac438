"""Checking a Trainer checkpoint before ``--resume`` uses it: complete by content, state fitting the model.

A checkpoint ``checkpoint-<step>/`` holds ``adapter/`` (the :func:`moreft.save_adapter` format, or
peft's for a peft arm; a full fine-tuning run's holds ``model.safetensors`` instead),
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
from moreft.train.weights import FULL_WEIGHTS_FILE as FULL_WEIGHTS

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
    like what wrote them: two zip archives (``torch.save``) and a readable adapter directory (or, for
    full fine-tuning, a safetensors file whose header reads). A
    checkpoint that fails any of this does not count, so ``--resume`` takes the one before it.
    """
    step = step_of(path)
    if step is None or not path.is_dir():
        return False
    full = (path / FULL_WEIGHTS).is_file() and not (path / "adapter").exists()
    try:
        if not full and not all(
            (path / name).is_file() and (path / name).stat().st_size > 0 for name in ADAPTER_FILES
        ):
            return False
        if not all(zipfile.is_zipfile(path / name) for name in (OPTIMIZER_FILE, SCHEDULER_FILE)):
            return False
        if (path / STATE_FILE).stat().st_size > MAX_STATE_BYTES:
            return False
        state = json.loads((path / STATE_FILE).read_bytes().decode("utf-8"))
    except (
        OSError,
        ValueError,
        RecursionError,
        zipfile.BadZipFile,
    ):  # a corrupt zip64 record; bad UTF-8/JSON
        return False
    if not _valid_trainer_state(state, step):
        return False
    if full:
        return _safetensors_header_reads(path / FULL_WEIGHTS)
    from moreft.adapter_files import read_adapter_config
    from moreft.errors import AdapterFileError
    from moreft.train.peft_arm import is_peft_adapter

    if is_peft_adapter(path / "adapter"):  # a peft arm's checkpoint (peft's save_pretrained)
        return True
    try:
        read_adapter_config(path / "adapter")
    except AdapterFileError:
        return False
    return True


def _safetensors_header_reads(path: Path) -> bool:
    """True when ``path`` opens as safetensors (its header and tensor table read; the data is not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return bool(list(f.keys()))
    except Exception:  # noqa: BLE001 - safetensors raises its own error types for a torn file
        return False


_NUMBER, _INT, _BOOL, _TEXT, _DICT = (int, float), (int,), (bool,), (str,), (dict,)
#: ``TrainerState`` fields and the types ``trainer_state.json`` may give them (None allowed where the default is).
_STATE_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    "epoch": (_NUMBER, True),
    "global_step": (_INT, False),
    "max_steps": (_INT, False),
    "logging_steps": (_NUMBER, False),
    "eval_steps": (_NUMBER, False),
    "save_steps": (_NUMBER, False),
    "train_batch_size": (_INT, True),
    "num_train_epochs": (_NUMBER, False),
    "num_input_tokens_seen": (_INT, False),
    "total_flos": (_NUMBER, False),
    "log_history": ((list,), False),
    "best_metric": (_NUMBER, True),
    "best_global_step": (_INT, True),
    "best_model_checkpoint": (_TEXT, True),
    "is_local_process_zero": (_BOOL, False),
    "is_world_process_zero": (_BOOL, False),
    "is_hyper_param_search": (_BOOL, False),
    "trial_name": (_TEXT, True),
    "trial_params": (_DICT, True),
    "stateful_callbacks": (_DICT, True),
}
_CONTROL_FLAGS = ("should_training_stop", "should_epoch_stop", "should_save", "should_evaluate", "should_log")


def _valid_trainer_state(state: Any, step: int) -> bool:
    """``trainer_state.json`` content the Trainer can resume from: known fields of the right types, the
    folder's step, a log of objects, and a ``TrainerControl`` state of booleans (the Trainer rebuilds it)."""
    if not isinstance(state, dict) or not set(state) <= set(_STATE_TYPES) or state.get("global_step") != step:
        return False
    for key, value in state.items():
        types, optional = _STATE_TYPES[key]
        if value is None and optional:
            continue
        if (isinstance(value, bool) and types is not _BOOL) or not isinstance(value, types):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
    if not all(isinstance(entry, dict) for entry in state.get("log_history", [])):
        return False
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl", {})
    for entry in control if isinstance(control, list) else [control]:
        if not isinstance(entry, dict) or not set(entry) <= {"args", "attributes"}:
            return False
        for part in (entry.get("args", {}), entry.get("attributes", {})):
            if not isinstance(part, dict) or not all(
                k in _CONTROL_FLAGS and isinstance(v, bool) for k, v in part.items()
            ):
                return False
    return True


def _load(path: Path, what: str, max_bytes: int) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with a size cap and a clear error."""
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(
            f"{str(path)!r} is {size:,} bytes; the {what} of this model is at most "
            f"{max_bytes:,} bytes, so it belongs to another (larger) run"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt or hostile file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a readable {what} (torch.load with weights_only=True: {first[:300]})"
        ) from None


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
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("state"), dict)
        or not isinstance(state.get("param_groups"), list)
    ):
        raise CheckpointError(
            f"{where} is not an optimizer state (a mapping with 'state' and 'param_groups')"
        )
    saved = state["param_groups"]
    if len(saved) != len(groups) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and all(type(i) is int for i in g["params"])
        for g in saved
    ):
        raise CheckpointError(
            f"{where} has {len(saved)} parameter groups (or malformed ones); this run's optimizer "
            f"has {len(groups)}: the checkpoint belongs to another run"
        )
    params: dict[Any, torch.Tensor] = {}
    for number, (group, live) in enumerate(zip(saved, groups, strict=True)):
        if len(group["params"]) != len(live):
            raise CheckpointError(
                f"{where}: parameter group {number} holds {len(group['params'])} parameters; this "
                f"run trains {len(live)} there: the checkpoint belongs to another run"
            )
        bad = sorted(k for k, v in group.items() if k != "params" and not _finite_number(v))
        if bad:
            raise CheckpointError(
                f"{where}: parameter group {number} has non-finite or malformed hyperparameters {bad}"
            )
        params.update(zip(group["params"], live, strict=True))
    for key, moments in state["state"].items():
        if key not in params or not isinstance(moments, dict):
            raise CheckpointError(f"{where}: state entry {key!r} names no parameter of its groups")
        param = params[key]
        for name, value in moments.items():
            if not isinstance(value, torch.Tensor):
                if not _finite_number(value):
                    raise CheckpointError(
                        f"{where}: {name!r} of parameter {key} is {value!r}, not a finite number"
                    )
                continue
            scalar = (
                name == "step"
            )  # AdamW's step count; every other entry is a moment shaped like the parameter
            if (
                value.numel() != 1 if scalar else tuple(value.shape) != tuple(param.shape)
            ) or not value.is_floating_point():
                raise CheckpointError(
                    f"{where}: {name!r} of parameter {key} has shape {list(value.shape)} "
                    f"({value.dtype}); the parameter is {list(param.shape)} ({param.dtype}): the "
                    "checkpoint belongs to another run or model"
                )
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(
                    f"{where}: {name!r} of parameter {key} holds NaN/Inf values; resuming would train on them"
                )


def _same_kind(saved: Any, live: Any) -> bool:
    """Whether a saved scheduler value has the structure of the live one (numbers finite)."""
    if isinstance(live, bool):
        return isinstance(saved, bool)
    if isinstance(live, int):
        return type(saved) is int and saved >= -1
    if isinstance(live, float):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(live, list):
        return (
            isinstance(saved, list)
            and len(saved) == len(live)
            and all(_same_kind(s, v) for s, v in zip(saved, live, strict=True))
        )
    if isinstance(live, dict) or live is None:  # LambdaLR keeps {} (or None) per group for its lambdas
        return saved is None or (
            isinstance(saved, dict)
            and all(isinstance(k, str) and _finite_number(v) for k, v in saved.items())
        )
    return _finite_number(saved)


def check_scheduler_state(state: Any, live: dict[str, Any], path: Path) -> None:
    """Check a scheduler ``state_dict`` against the live scheduler's: the same keys, each value of the
    same kind (per-group lists of the same length, finite numbers).

    ``LambdaLR.load_state_dict`` copies every key onto the scheduler object, so a stray key or a
    value of another type would break the run later, mid-training.

    Raises:
        CheckpointError: Not a mapping, other keys, or a value of another kind.
    """
    where = repr(str(path))
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is not a learning-rate scheduler state (a mapping)")
    if set(state) != set(live):
        raise CheckpointError(
            f"{where} has keys {sorted(map(str, state))}; this run's scheduler has "
            f"{sorted(live)}: the checkpoint belongs to another run or version"
        )
    for key, value in live.items():
        if not _same_kind(state[key], value):
            shown = repr(state[key])
            raise CheckpointError(
                f"{where}: {key}={shown[:80]} does not fit this run's scheduler, whose {key} is "
                f"{value!r} ({len(value)} parameter groups)"
                if isinstance(value, list)
                else f"{where}: {key}={shown[:80]} does not fit this run's scheduler, whose {key} is "
                f"a {type(value).__name__}"
            )


def check_optimizer_files(
    checkpoint: Path, groups: Sequence[Sequence[torch.Tensor]], scheduler_state: dict[str, Any] | None
) -> None:
    """Read ``optimizer.pt`` / ``scheduler.pt`` of ``checkpoint`` and check them against the live
    optimizer's ``groups`` and the live scheduler's ``scheduler_state`` (None: not checked).

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
    if scheduler_state is not None:
        check_scheduler_state(scheduler, scheduler_state, checkpoint / SCHEDULER_FILE)
