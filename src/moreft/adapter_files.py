"""Adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``, never a pickle.

The JSON holds the method and every hyperparameter, the exact adapted module names with their
``(out, in)`` shapes (the fingerprint), the base model's name and the moreft version. Loading
checks all of it, and the tensor names and shapes in the safetensors header, before the model is
touched; any mismatch is an :class:`AdapterFileError` and the model stays as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter_meta import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    MAX_CONFIG_BYTES,
    WEIGHTS_NAME,
    fingerprint,
    read_adapter_config,
)
from .adapter_meta import UNSAFE_SUFFIXES as UNSAFE_SUFFIXES  # re-exported
from .config import PEFT_CONFIG_FIELDS, AdapterConfig, SharingLayout
from .errors import AdapterFileError, ConfigError
from .inject import adapter_config, adapter_layers, eject, inject, modules_to_save_names
from .layers import MoRALinear, is_linear, linear_shape
from .safe_write import FolderKind, atomic_dir_write
from .shapes import adapter_shapes
from .version import __version__

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _adapter_names(folder: Path) -> set[str] | None:
    """The files a moreft adapter folder holds, when ``folder``'s config says moreft wrote it; else None."""
    config = folder / CONFIG_NAME
    if config.is_symlink() or not config.is_file() or config.stat().st_size > MAX_CONFIG_BYTES:
        return None
    try:
        meta = json.loads(config.read_bytes())
    except (ValueError, RecursionError):
        return None
    return {WEIGHTS_NAME, CONFIG_NAME} if isinstance(meta, dict) and meta.get("format") == FORMAT else None


#: What :func:`save_adapter` may replace: a folder holding only an adapter it wrote.
ADAPTER_KIND = FolderKind("moreft adapter", _adapter_names)


def base_model_name(model: nn.Module) -> str | None:
    """The ``name_or_path`` a transformers model was loaded from, or None."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return str(name) if name else None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter parameters (with frozen adapter buffers) and ``modules_to_save`` parameters, by qualified name."""
    config = adapter_config(model)
    state: dict[str, torch.Tensor] = {
        f"{n}.{p}": t for n, layer in adapter_layers(model).items() for p, t in layer.adapter_state().items()
    }
    for n in modules_to_save_names(model, config) if config else ():
        state.update({f"{n}.{p}": t for p, t in model.get_submodule(n).named_parameters()})
    return state


def _gathered(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(whole tensor, was sharded)``: a DTensor shard (FSDP2 ``fully_shard``) is all-gathered."""
    if not torch.distributed.is_available():
        return tensor, False
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor(), True
    return tensor, False


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter of ``model`` (weights + config only) to directory ``path``, atomically.

    ``path`` may be missing, empty, or hold an adapter moreft saved before (it is replaced); a
    link to a folder is written through. Anything else is refused, so a tokenizer or other files
    saved in ``path`` are never deleted.

    Under FSDP (``fully_shard``) every rank must call it: the shards are gathered (a collective)
    and rank 0 writes the directory.

    Raises:
        AdapterFileError: ``model`` carries no moreft adapter.
        OutputError: ``path`` is a file, or a non-empty folder that is not a moreft adapter
            (nothing is written).
    """
    config = adapter_config(model)
    if config is None:
        raise AdapterFileError("model carries no moreft adapter to save; call moreft.inject first")
    layers = adapter_layers(model)
    shapes = {n: list(linear_shape(layer.base_layer)) for n, layer in layers.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "moreft_version": __version__,
        "method": config.method.value,
        "config": config.to_dict(),
        "base_model": base_model_name(model),
        "modules": shapes,
        "fingerprint": fingerprint(shapes),
        "layer_state": {
            n: _layer_state(layer) for n, layer in layers.items() if isinstance(layer, MoRALinear)
        },
    }
    gathered = {k: _gathered(v.detach()) for k, v in adapter_state_dict(model).items()}
    tensors = {k: t.to("cpu").contiguous() for k, (t, _) in gathered.items()}
    path = Path(path)
    if any(sharded for _, sharded in gathered.values()) and torch.distributed.get_rank() != 0:
        return path
    atomic_dir_write(
        path,
        {
            WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
            CONFIG_NAME: lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"),
        },
        ADAPTER_KIND,
    )
    return path


def _layer_state(layer: MoRALinear) -> dict[str, str]:
    """A MoRA layer's current groupings; the output one only where it differs (mixed layouts)."""
    state = {"sharing_layout": layer.sharing_layout.value}
    if layer.sharing_output_layout is not layer.sharing_layout:
        state["sharing_output_layout"] = layer.sharing_output_layout.value
    return state


def _check_model_fits(
    model: nn.Module, meta: dict[str, Any], config: AdapterConfig, check_base: bool
) -> None:
    saved_base, base = meta.get("base_model"), base_model_name(model)
    if check_base and saved_base and base and saved_base != base:
        raise AdapterFileError(
            f"adapter was trained on base model {saved_base!r} but this model is "
            f"{base!r}; pass check_base=False to load it anyway"
        )
    existing = adapter_layers(model)
    if existing:
        current = adapter_config(model)
        if current is None or current.method is not config.method or set(existing) != set(meta["modules"]):
            raise AdapterFileError(
                f"model already carries a different adapter "
                f"({current.method.value if current else '?'} on {len(existing)} "
                f"modules); the file holds {config.method.value} on "
                f"{len(meta['modules'])} modules"
            )
        # Hyperparameters the tensor shapes do not pin down (LoRA alpha, MoRA operator) change
        # what the loaded tensors mean, so they must agree too.
        ignored = {
            "target_modules",
            "modules_to_save",
            "dropout",
            "sharing_layout",
            "sharing_output_layout",
            "init_weights",
            *PEFT_CONFIG_FIELDS,
        }
        ours, theirs = current.to_dict(), config.to_dict()
        differ = sorted(k for k in theirs if k not in ignored and ours.get(k) != theirs[k])
        if differ:
            mine = ", ".join(f"{k}={ours.get(k)!r}" for k in differ)
            filed = ", ".join(f"{k}={theirs[k]!r}" for k in differ)
            raise AdapterFileError(
                f"model already carries a {current.method.value} adapter with {mine}; "
                f"the file was saved with {filed}"
            )
        return
    modules = dict(model.named_modules())
    for name, shape in meta["modules"].items():
        module = modules.get(name)
        if module is None or not is_linear(module):
            raise AdapterFileError(f"adapter module {name!r} is not a linear layer of this model")
        if list(linear_shape(module)) != shape:
            raise AdapterFileError(
                f"adapter module {name!r} was made for shape {shape} (out, in) but "
                f"this model's is {list(linear_shape(module))}"
            )


def load_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Load an adapter directory into ``model``, injecting it from the saved config if needed.

    Loading is strict: every saved tensor must match a parameter of the same shape and every
    adapter parameter must be in the file. On any error the model is left as it was.

    Returns:
        The same ``model`` object.

    Raises:
        AdapterFileError: see :func:`read_adapter_config`; a different base model (unless
            ``check_base=False``), modules or shapes that do not fit, missing or unexpected keys,
            or NaN/Inf values in a tensor.
    """
    path = Path(path)
    meta, config = read_adapter_config(path)
    _check_model_fits(model, meta, config, check_base)
    _check_header(path / WEIGHTS_NAME, meta, config)
    injected = not adapter_layers(model)
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    if injected:
        inject(model, dataclasses.replace(config, target_modules=tuple(meta["modules"])))
    try:
        _load_tensors(model, path / WEIGHTS_NAME, meta)
    except BaseException:
        if injected:
            eject(model)
            for p in model.parameters():
                p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
        raise
    return model


def _read_header(file: Path) -> dict[str, tuple[list[int], str]]:
    """``{key: (shape, dtype)}`` from a safetensors header, reading no tensor data."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 - safe_open has keys() but is not iterable
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise AdapterFileError(f"{str(file)!r} is not a readable safetensors file: {exc}") from None


def _check_header(file: Path, meta: dict[str, Any], config: AdapterConfig) -> None:
    """Check the file's adapter tensors against the shapes the config implies, before anything is allocated.

    The shapes come from :func:`moreft.shapes.adapter_shapes` (layers built on the meta device), so
    a crafted config (``rank: 1000000000``) is refused here rather than by running out of memory.
    """
    try:
        implied = adapter_shapes(config, meta["modules"])
    except ConfigError as exc:
        raise AdapterFileError(
            f"config in {str(file.parent / CONFIG_NAME)!r} does not fit its modules: {exc}"
        ) from None
    header = _read_header(file)
    for key, (_shape, dtype) in sorted(header.items()):
        if dtype not in FLOAT_DTYPES:
            raise AdapterFileError(
                f"tensor {key!r} in {str(file)!r} has dtype {dtype}; adapter tensors must be "
                f"floating point ({', '.join(FLOAT_DTYPES)})"
            )
    for key, shape in implied.items():
        if key in header and header[key][0] != list(shape):
            raise AdapterFileError(
                f"tensor {key!r} has shape {header[key][0]} in {str(file)!r} but the "
                f"model expects {list(shape)} (the shape its config implies)"
            )


def _load_tensors(model: nn.Module, file: Path, meta: dict[str, Any]) -> None:
    expected = adapter_state_dict(model)
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or unexpected:
                raise AdapterFileError(
                    f"{str(file)!r} does not fit the model: missing keys {missing[:5]}, "
                    f"unexpected keys {unexpected[:5]}"
                )
            for key in sorted(keys):
                shape = list(f.get_slice(key).get_shape())
                if shape != list(expected[key].shape):
                    raise AdapterFileError(
                        f"tensor {key!r} has shape {shape} in {str(file)!r} but the "
                        f"model expects {list(expected[key].shape)}"
                    )
            tensors = {k: f.get_tensor(k) for k in keys}
    except AdapterFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise AdapterFileError(f"{str(file)!r} is not a readable safetensors file: {exc}") from None
    bad = sorted(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
    if bad:
        raise AdapterFileError(
            f"{str(file)!r} holds NaN/Inf values in {len(bad)} tensor(s) (e.g. {bad[:3]}); "
            "an adapter must be finite: the run that saved it diverged or the file is corrupt"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value)
    for name, state in meta.get("layer_state", {}).items():
        layer = adapter_layers(model).get(name)
        if isinstance(layer, MoRALinear):
            layer.sharing_layout = SharingLayout(state["sharing_layout"])
            layer.sharing_output_layout = SharingLayout(
                state.get("sharing_output_layout", state["sharing_layout"])
            )
