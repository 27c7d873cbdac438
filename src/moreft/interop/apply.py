"""Putting an :class:`~moreft.interop.common.Imported` adapter onto a base model, and converting files."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter_files import adapter_state_dict, save_adapter
from ..config import AdapterConfig
from ..errors import AdapterFileError, ConfigError
from ..inject import adapter_layers, eject, inject
from ..layers import is_linear, linear_shape
from ..shapes import adapter_shapes
from .common import Imported


@dataclass
class ImportReport:
    """What a load or conversion did: the moreft config chosen, why, and what was read or left."""

    source: str
    path: str
    config: AdapterConfig
    layers: int
    options: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    written: str | None = None

    def lines(self) -> list[str]:
        """Human-readable lines, as ``moreft convert`` prints them."""
        out = [
            f"source: {self.source} ({self.path}), {self.layers} adapted layers",
            f"moreft config: {self.config.method.value} "
            + ", ".join(
                f"{k}={v}" for k, v in self.config.to_dict().items() if k not in ("method", "target_modules")
            ),
        ]
        out += [f"option: {line}" for line in self.options] + [f"note: {line}" for line in self.notes]
        if self.written:
            out.append(f"wrote {self.written} (adapter_model.safetensors + adapter_config.json)")
        return out


def _layer_shapes(model: nn.Module, imported: Imported) -> dict[str, tuple[int, int]]:
    modules = dict(model.named_modules())
    shapes = {}
    for name in sorted(imported.layers):
        module = modules.get(name)
        if module is None or not is_linear(module):
            what = "no such module" if module is None else type(module).__name__
            raise AdapterFileError(
                f"{imported.path!r} adapts {name!r}, which is not a linear layer of this base "
                f"model ({what}); the file belongs to another model"
            )
        shapes[name] = linear_shape(module)
    return shapes


def _check_shapes(imported: Imported, config: AdapterConfig, shapes: dict[str, tuple[int, int]]) -> None:
    try:
        implied = adapter_shapes(config, shapes)
    except ConfigError as exc:
        raise AdapterFileError(f"{imported.path!r}: {exc}") from None
    for module, params in sorted(imported.layers.items()):
        for name, tensor in params.items():
            expected = implied.get(f"{module}.{name}")
            if expected != tuple(tensor.shape):
                raise AdapterFileError(
                    f"{imported.path!r}: {module}.{name} has shape {list(tensor.shape)} but the "
                    f"chosen config builds {list(expected) if expected else 'no such tensor'}"
                )


@torch.no_grad()
def _assign(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy into each named parameter (replacing it where the model is a ``meta`` skeleton).

    Every value is converted first, so a failure leaves all parameters untouched.
    """
    # an adapter tensor ``<layer>.<short name>`` lives in the layer's per-adapter dict, under the adapter's name
    slots: dict[str, tuple[Any, str]] = {
        f"{n}.{p}": (getattr(layer, layer.prefix + p), layer.resolve_adapter())
        for n, layer in adapter_layers(model).items()
        for p in layer.adapter_param_names
    }
    targets = []
    for key, value in tensors.items():
        module_name, _, leaf = key.rpartition(".")
        container, slot = slots.get(key) or (model.get_submodule(module_name)._parameters, leaf)
        old = container[slot]
        assert old is not None  # every key is one of the model's parameters (checked by the caller)
        device = "cpu" if old.is_meta else old.device
        targets.append((container, slot, old, value.to(device=device, dtype=old.dtype).clone()))
    for container, slot, old, value in targets:
        if old.is_meta:
            container[slot] = nn.Parameter(value, requires_grad=old.requires_grad)
        else:
            old.copy_(value)


def load_imported(model: nn.Module, imported: Imported) -> ImportReport:
    """Inject the moreft adapter that reproduces ``imported`` into ``model`` and load its tensors.

    Everything is checked (modules, shapes, the config's own per-layer rules, the set of keys)
    before the model changes; on any error it is left as it was.

    Raises:
        AdapterFileError: the model already has an adapter, lacks a layer, or the file's tensors
            fit no moreft config on this model.
    """
    if adapter_layers(model):
        raise AdapterFileError(
            "the model already carries a moreft adapter; load the file into a fresh base model"
        )
    shapes = _layer_shapes(model, imported)
    config, options = imported.resolve(shapes)
    _check_shapes(imported, config, shapes)
    flat = {
        f"{m}.{p}": t for m, params in imported.layers.items() for p, t in params.items()
    } | imported.extra
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    inject(model, config)
    try:
        expected = adapter_state_dict(model)
        missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
        if missing or unexpected:
            raise AdapterFileError(
                f"{imported.path!r} does not fit the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for key, value in flat.items():
            if tuple(expected[key].shape) != tuple(value.shape):
                raise AdapterFileError(
                    f"{imported.path!r}: {key} has shape {list(value.shape)}, the model's is "
                    f"{list(expected[key].shape)}"
                )
        _assign(model, flat)
    except BaseException:
        eject(model)
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
        raise
    notes = list(imported.notes) + _compare_base(model, imported)
    return ImportReport(imported.source, imported.path, config, len(imported.layers), options, notes)


@torch.no_grad()
def _compare_base(model: nn.Module, imported: Imported) -> list[str]:
    """How far the file's own copy of the frozen base weights is from this model's (MoRe checkpoints)."""
    layers = adapter_layers(model)
    diffs = []
    for name, dense in imported.base_weights.items():
        weight = layers[name]._base_weight()
        if weight.is_meta:
            return []
        weight = weight.T if weight.shape != dense.shape else weight
        diffs.append(
            float((weight.double() - dense.double()).abs().max())
            if weight.shape == dense.shape
            else float("inf")
        )
    if not diffs:
        return []
    return [
        f"the file's frozen base weights (<module>.dense) differ from this base model's by at most {max(diffs):.3g}"
    ]


def skeleton(base: str | os.PathLike, resolve: Callable[[str], Path] | None = None) -> nn.Module:
    """The base model's module tree on the ``meta`` device (no weights read), from its ``config.json``.

    Args:
        base: A local model directory.
        resolve: Maps ``base`` to a local model directory first (the command line passes
            :func:`moreft.models.model_dir`, which also knows the packaged model names).

    Raises:
        ConfigError: not a local model directory with ``config.json`` (nothing is downloaded).
    """
    import transformers

    path = resolve(str(base)) if resolve is not None else Path(base)
    if not (path / "config.json").is_file():
        raise ConfigError(f"base model {str(base)!r} is not a local model directory with config.json")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    model.config._name_or_path = str(path)
    return model


def convert_imported(
    imported: Imported,
    out: str | os.PathLike,
    base: str | os.PathLike | None = None,
    resolve: Callable[[str], Path] | None = None,
) -> ImportReport:
    """Write ``imported`` as a moreft adapter directory ``out``, sized on ``base`` (or the base the file names).

    Raises:
        AdapterFileError: no base model known, or see :func:`load_imported`.
        ConfigError: ``base`` is not a local model.
    """
    base = base if base is not None else imported.base_model
    if base is None:
        raise AdapterFileError(
            f"{imported.path!r} does not name its base model; give one with --base (a local model "
            "directory): the layer shapes decide the config"
        )
    model = skeleton(base, resolve)
    report = load_imported(model, imported)
    report.written = str(save_adapter(model, Path(out)))
    return report
