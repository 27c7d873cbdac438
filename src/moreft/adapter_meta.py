"""Reading and checking ``adapter_config.json``, the metadata half of an adapter folder.

:mod:`moreft.adapter_files` writes and loads whole adapters; this module holds the file names and
format constants they share and :func:`read_adapter_config`, which validates the JSON before any
model is touched. ``moreft.adapter_files`` re-exports all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .config import AdapterConfig, Method, SharingLayout, config_from_dict
from .errors import AdapterFileError, ConfigError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "moreft-adapter"
FORMAT_VERSION = 1
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: adapter_config.json holds names and a few numbers; anything bigger is not ours.
MAX_CONFIG_BYTES = 16 * 2**20


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (only finite numbers are)")


def fingerprint(shapes: dict[str, list[int]]) -> str:
    """A short hash of the adapted modules' names and shapes."""
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]


def read_adapter_config(path: str | os.PathLike) -> tuple[dict[str, Any], AdapterConfig]:
    """Read and validate ``adapter_config.json`` in ``path``; returns ``(metadata, config)``.

    Raises:
        AdapterFileError: not an adapter directory, a pickle file present instead, bad JSON,
            another format, or an invalid config.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(
            f"{str(path)!r} is not a directory; an adapter is a directory with "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    unsafe = sorted(p.name for p in path.iterdir() if p.suffix in UNSAFE_SUFFIXES)
    if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
        why = (
            (
                f"; found {unsafe}, which moreft refuses to read: pickle files can run code when "
                "loaded, only safetensors is accepted"
            )
            if unsafe
            else ""
        )
        raise AdapterFileError(
            f"{str(path)!r} is not a moreft adapter directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}{why}"
        )
    size = (path / CONFIG_NAME).stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(
            f"{str(path / CONFIG_NAME)!r} is {size:,} bytes; an adapter config is at most "
            f"{MAX_CONFIG_BYTES:,} bytes"
        )
    try:
        meta = json.loads((path / CONFIG_NAME).read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise AdapterFileError(f"{str(path / CONFIG_NAME)!r} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(
            f"{str(path / CONFIG_NAME)!r} is not a {FORMAT!r} file (format="
            f"{meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"format_version={meta.get('format_version')!r} is not supported "
            f"(this moreft reads version {FORMAT_VERSION})"
        )
    modules = meta.get("modules")
    if (
        not isinstance(modules, dict)
        or not modules
        or not all(
            isinstance(n, str)
            and n
            and isinstance(s, list)
            and len(s) == 2
            and all(type(d) is int and d > 0 for d in s)
            for n, s in modules.items()
        )
    ):
        raise AdapterFileError(
            f"'modules' in {str(path / CONFIG_NAME)!r} must map module names to "
            "[out_features, in_features] positive integer pairs"
        )
    if meta.get("fingerprint") != fingerprint(modules):
        raise AdapterFileError(
            f"fingerprint={meta.get('fingerprint')!r} in {str(path / CONFIG_NAME)!r} does not "
            f"match its 'modules' ({fingerprint(modules)!r}); the file was edited or is corrupt"
        )
    if not isinstance(meta.get("base_model"), (str, type(None))):
        raise AdapterFileError(f"base_model={meta.get('base_model')!r} must be a model name or null")
    try:
        config = config_from_dict(meta.get("config"))
    except ConfigError as exc:
        raise AdapterFileError(f"bad config in {str(path / CONFIG_NAME)!r}: {exc}") from None
    if config.method.value != meta.get("method"):
        raise AdapterFileError(
            f"method={meta.get('method')!r} disagrees with config method {config.method.value!r}"
        )
    _check_layer_state(meta.get("layer_state", {}), modules, config)
    return meta, config


def _check_layer_state(state: Any, modules: dict[str, Any], config: AdapterConfig) -> None:
    """``layer_state`` may only set a valid MoRA ``sharing_layout`` on modules the file lists."""
    valid = [layout.value for layout in SharingLayout]
    if not isinstance(state, dict) or (state and config.method is not Method.MORA):
        raise AdapterFileError(
            f"'layer_state' must be a mapping, and only MoRA adapters have one; got {state!r}"
        )
    for name, entry in state.items():
        if name not in modules:
            raise AdapterFileError(f"'layer_state' names module {name!r}, which is not in 'modules'")
        if (
            not isinstance(entry, dict)
            or "sharing_layout" not in entry
            or not set(entry) <= {"sharing_layout", "sharing_output_layout"}
            or any(v not in valid for v in entry.values())
        ):
            raise AdapterFileError(
                f"'layer_state' of {name!r} is {entry!r}; it must be "
                f"{{'sharing_layout': one of {valid}}}, optionally with "
                "'sharing_output_layout'"
            )
