"""Reading the authors' files as data: JSON with a size cap, tensors from safetensors (or, on request, a
``.bin`` through ``torch.load(weights_only=True)``), validated before anything uses them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from ..errors import AdapterFileError

MAX_JSON_BYTES = 16 * 2**20
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (at most 16 MiB, finite numbers only).

    Raises:
        AdapterFileError: missing, too large, not JSON, or not an object.
    """
    if not path.is_file():
        raise AdapterFileError(f"{str(path)!r} does not exist")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise AdapterFileError(
            f"{str(path)!r} is {path.stat().st_size:,} bytes; a config is at most {MAX_JSON_BYTES:,}"
        )

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterFileError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{str(path)!r} must hold a JSON object, not {type(data).__name__}")
    return data


def find_weights(path: Path, names: tuple[str, ...]) -> Path:
    """``path`` itself if it is a file, else the first of ``names`` inside the directory ``path``.

    Raises:
        AdapterFileError: nothing found (the message lists what was looked for).
    """
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise AdapterFileError(f"{str(path)!r} holds none of {list(names)}")


def read_tensors(path: Path, allow_bin: bool = False) -> dict[str, Tensor]:
    """All tensors of a safetensors file, or of a pickle ``.bin`` when ``allow_bin`` is set.

    A ``.bin`` is read only with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler
    (tensors, numbers, strings and containers; no code objects), and only when asked for: a pickle
    is still a program format, so the default is to refuse it and ask for a safetensors copy.

    Raises:
        AdapterFileError: unreadable file, a refused pickle, a non-tensor entry or a non-float tensor.
    """
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_bin:
            raise AdapterFileError(
                f"{str(path)!r} is a pickle file; moreft reads it only when asked (--allow-bin, "
                "allow_bin=True), and then with torch.load(weights_only=True); a safetensors "
                "copy needs no such step"
            )
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - the unpickler raises many types for bad files
            raise AdapterFileError(
                f"{str(path)!r} is not a plain tensor file torch.load(weights_only=True) "
                f"accepts: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
            raw = raw["state_dict"]
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in raw.items()
        ):
            raise AdapterFileError(f"{str(path)!r} must hold a flat mapping of names to tensors")
        tensors = dict(raw)
    else:
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys() but is not iterable
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
            raise AdapterFileError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
    for key, value in tensors.items():
        if value.dtype not in FLOAT_DTYPES:
            raise AdapterFileError(
                f"tensor {key!r} in {str(path)!r} has dtype {value.dtype}; expected floating point"
            )
    return tensors


def strip_prefix(key: str, prefixes: tuple[str, ...]) -> str:
    """``key`` without the first of ``prefixes`` it starts with (wrapper names: peft, DDP)."""
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key
