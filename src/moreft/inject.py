"""Put adapters into any PyTorch / transformers model, count them, and merge them away.

moreft's own API over the peft machinery: :func:`inject` runs the method's peft tuner
(:mod:`moreft.tuners`) with one adapter named ``"default"``, so a model prepared here and one from
``peft.get_peft_model`` carry the same layers. Here a model carries one adapter config, kept on
the model as ``model.moreft_config`` for :func:`moreft.save_adapter`, and ``modules_to_save`` are
trained in place (peft's ``PeftModel`` instead trains a copy of them, ``ModulesToSaveWrapper``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .config import AdapterConfig
from .errors import TargetError
from .layers import AdapterLayer
from .layers.quantized import refuse_quantized_layers
from .targets import DEFAULT_TARGETS, HEAD_NAMES, check_disjoint, modules_to_save_names, resolve_targets
from .tuners.registration import TUNERS

__all__ = [
    "DEFAULT_TARGETS",
    "HEAD_NAMES",
    "ParameterCounts",
    "adapter_config",
    "adapter_layers",
    "eject",
    "inject",
    "merge",
    "modules_to_save_names",
    "resolve_targets",
    "trainable_parameters",
]

CONFIG_ATTR = "moreft_config"
ADAPTER_NAME = "default"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the targeted layers of ``model`` with ``config``'s adapter (named ``"default"``), in place.

    Every parameter is frozen except the adapter's and those of ``config.modules_to_save``.
    Every layer is checked against the config before any is swapped in, so a failure leaves the
    model untouched.

    Returns:
        The same ``model`` object.

    Raises:
        TargetError: see :func:`resolve_targets`; the model already carries an adapter; or a target
            overlaps ``modules_to_save``.
        ConfigError: a hyperparameter does not fit a layer's shape (e.g. ``nblocks > in``).
    """
    existing = adapter_layers(model)
    names = resolve_targets(model, config)
    if existing:
        again = sorted(set(names) & set(existing)) or sorted(existing)[:3]
        raise TargetError(
            f"model already carries a moreft adapter (e.g. on {again}); merge it with "
            "moreft.merge(model) or load a fresh model before injecting again"
        )
    save_names = modules_to_save_names(model, config)
    missing = [
        t for t in config.modules_to_save if not any(n == t or n.endswith("." + t) for n in save_names)
    ]
    if missing:
        raise TargetError(f"modules_to_save {missing} match no module of the model")
    check_disjoint(names, save_names)
    tuner_config = copy.copy(config)  # peft writes into its config; the caller's stays as given
    # moreft trains modules_to_save itself (below); peft is given none to wrap ([] and None alike to peft).
    tuner_config.target_modules, tuner_config.modules_to_save = tuple(names), []
    TUNERS[config.method](model, tuner_config, ADAPTER_NAME)
    for n in save_names:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    return model


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """``{qualified_name: adapter layer}`` for every adapter in ``model``, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The config ``model`` was injected with, or None."""
    return getattr(model, CONFIG_ATTR, None)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model with adapters.

    Attributes:
        adapter: trainable parameters inside adapter layers (what the papers report).
        other_trainable: other trainable parameters (e.g. ``modules_to_save`` heads).
        trainable: ``adapter + other_trainable``.
        total: every parameter of the model, frozen or not.
    """

    adapter: int
    other_trainable: int
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"adapter params: {self.adapter:,} | other trainable: {self.other_trainable:,} | "
            f"trainable: {self.trainable:,} of {self.total:,} ({share:.3f}%)"
        )


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Count adapter, other trainable, and all parameters (shared tensors counted once)."""
    adapter_ids = {
        id(p)
        for layer in adapter_layers(model).values()
        for p in layer.adapter_params().values()
        if p.requires_grad
    }
    params = _unique(model.parameters())
    adapter = sum(p.numel() for p in params if id(p) in adapter_ids)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return ParameterCounts(adapter, trainable - adapter, trainable, sum(p.numel() for p in params))


def trainable_parameters(model: nn.Module) -> ParameterCounts:
    """Deprecated name of :func:`count_parameters` (it returns counts, not parameters)."""
    warnings.warn(
        "moreft.trainable_parameters is deprecated: use moreft.count_parameters (same result)",
        DeprecationWarning,
        stacklevel=2,
    )
    return count_parameters(model)


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge every adapter into its base weight and put the plain base layers back.

    With ``safe=True`` every merged weight is checked for NaN/Inf before any is written. The
    model then has no moreft layer left and costs nothing extra at inference.

    Returns:
        The same ``model`` object.

    Every layer's base is checked for a quantised weight before any weight is written, so the
    merge is all or nothing.

    Raises:
        MergeError: some base weights are quantised (every such layer is named; use
            :func:`moreft.quant.merge_quantized`), or with ``safe=True``, a layer would get NaN/Inf.
            Either way the model is left unchanged.
    """
    layers = adapter_layers(model)
    refuse_quantized_layers({n: layer for n, layer in layers.items() if not layer.merged})
    if safe:
        for layer in layers.values():
            if not layer.merged:
                layer.check_mergeable()
    for layer in layers.values():
        layer.merge(safe=False)
    return _unwrap(model, layers)


def eject(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging it, putting the untouched base layers back.

    Returns:
        The same ``model`` object.
    """
    layers = adapter_layers(model)
    for layer in layers.values():
        layer.unmerge()
    return _unwrap(model, layers)


def _unwrap(model: nn.Module, layers: dict[str, AdapterLayer]) -> nn.Module:
    """Put each layer's base layer back in its place and forget the model's adapter configs."""
    for name, layer in layers.items():
        _set_submodule(model, name, layer.base_layer)
    for attr in (CONFIG_ATTR, "peft_config"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model
