"""Convert an adapter saved by :func:`moreft.save_adapter` (format ``moreft-adapter``) to peft's layout.

The result loads with ``PeftModel.from_pretrained(base, dir)`` (after ``import moreft``) and gives
the same outputs; :func:`moreft.load_adapter` keeps reading the old format too. The tensors are
renamed, not changed: ``lin.blkdiag1`` becomes ``base_model.model.lin.more_blkdiag1``, a
``modules_to_save`` tensor ``classifier.weight`` becomes ``base_model.model.classifier.weight``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from .adapter_files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from .errors import AdapterFileError, ConfigError
from .layers import LAYER_CLASSES
from .safe_write import atomic_dir_write
from .shapes import adapter_shapes

PEFT_PREFIX = "base_model.model."


def convert_to_peft(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write the ``moreft-adapter`` directory ``source`` to ``target`` in peft's layout, atomically.

    Returns:
        ``target`` as a Path.

    Raises:
        AdapterFileError: ``source`` is not a valid moreft adapter (see :func:`moreft.read_adapter_config`),
            its tensors do not match its config, or a MoRA adapter's layers use different sharing
            layouts (ReMoRA), which one peft config cannot express.
    """
    source = Path(source)
    meta, config = read_adapter_config(source)
    layouts = {entry["sharing_layout"] for entry in meta.get("layer_state", {}).values()}
    if len(layouts) > 1:
        raise AdapterFileError(
            f"{str(source)!r} holds MoRA layers with different sharing layouts {sorted(layouts)}; "
            "a peft config has one sharing_layout, so it cannot be converted"
        )
    changes: dict[str, Any] = {
        "target_modules": tuple(meta["modules"]),
        "base_model_name_or_path": meta.get("base_model"),
    }
    if layouts:
        changes["sharing_layout"] = layouts.pop()
    config = dataclasses.replace(config, **changes)
    try:
        implied = adapter_shapes(config, meta["modules"])
    except ConfigError as exc:
        raise AdapterFileError(
            f"config in {str(source / CONFIG_NAME)!r} does not fit its modules: {exc}"
        ) from None
    prefix = LAYER_CLASSES[config.method].prefix
    try:
        with safe_open(str(source / WEIGHTS_NAME), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys() but is not iterable
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise AdapterFileError(
            f"{str(source / WEIGHTS_NAME)!r} is not a readable safetensors file: {exc}"
        ) from None
    missing = sorted(set(implied) - set(tensors))
    wrong = sorted(k for k, shape in implied.items() if k in tensors and tuple(tensors[k].shape) != shape)
    if missing or wrong:
        raise AdapterFileError(
            f"{str(source / WEIGHTS_NAME)!r} does not match its config: missing {missing[:5]}, "
            f"wrong shape {wrong[:5]}"
        )
    renamed = {}
    for key, tensor in tensors.items():
        if key in implied:
            module, _, param = key.rpartition(".")
            key = f"{module}.{prefix}{param}"
        renamed[PEFT_PREFIX + key] = tensor.contiguous()
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    target = Path(target)
    atomic_dir_write(
        target,
        {
            WEIGHTS_NAME: lambda p: save_file(renamed, str(p), metadata={"format": "pt"}),
            CONFIG_NAME: lambda p: p.write_text(text),
        },
    )
    return target
