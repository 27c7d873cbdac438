"""Put adapters into any PyTorch / transformers model, count them, and merge them away.

One model carries at most one moreft adapter (one config); its config is kept on the model as
``model.moreft_config`` so that :func:`moreft.save_adapter` can write it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import regex
from torch import nn

from .config import ALL_LINEAR, AdapterConfig
from .errors import TargetError
from .layers import LAYER_CLASSES, AdapterLayer, is_linear

CONFIG_ATTR = "moreft_config"
#: Time a ``target_modules`` regex may take to match all module names of a model.
MATCH_SECONDS = 2.0

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value"),
    "roberta": ("query", "key", "value"),
    "xlm-roberta": ("query", "key", "value"),
    "distilbert": ("q_lin", "k_lin", "v_lin"),
    "llama": ("q_proj", "k_proj", "v_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj"),
    "gpt2": ("c_attn",),
}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


# Task heads that "all-linear" leaves alone, as peft does: they are new or tied, not adapted.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def _output_head_names(model: nn.Module) -> set[str]:
    """The output embedding and any module inside a task head (``HEAD_NAMES`` at top level)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {n for n, m in model.named_modules()
            if (head is not None and m is head) or n.split(".")[0] in HEAD_NAMES}


def _regex_matches(spec: str, candidates: list[str]) -> list[str]:
    """The names ``spec`` fully matches, within :data:`MATCH_SECONDS` for all of them together.

    A regex with nested repetition (``(a|aa)+c``) backtracks exponentially; the ``regex`` package's
    ``timeout`` bounds it, where ``re`` would hang.

    Raises:
        TargetError: the matching ran out of time.
    """
    pattern = regex.compile(spec)
    deadline = time.monotonic() + MATCH_SECONDS
    names = []
    try:
        for n in candidates:
            if pattern.fullmatch(n, timeout=max(deadline - time.monotonic(), 1e-6)):
                names.append(n)
    except TimeoutError:
        raise TargetError(f"target_modules={spec!r} took more than {MATCH_SECONDS:g} s to match "
                          f"{len(candidates):,} module names (nested repetition backtracks exponentially); "
                          "simplify the regex or list the names") from None
    return names


def resolve_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Qualified names of the modules ``config.target_modules`` selects in ``model``.

    Raises:
        TargetError: nothing matches (the error lists the linear layers that exist), a match is
            not a linear layer, or the model family has no default and none was given.
    """
    spec = config.target_modules
    if spec is None:
        model_type = _model_type(model)
        if model_type not in DEFAULT_TARGETS:
            raise TargetError(f"no default target_modules for model type {model_type!r}; pass "
                              f"target_modules (names, a regex, or {ALL_LINEAR!r}). Known defaults: "
                              f"{sorted(DEFAULT_TARGETS)}")
        spec = DEFAULT_TARGETS[model_type]
    modules = dict(model.named_modules())
    inside_adapter = {f"{n}.{sub}" for n, m in modules.items() if isinstance(m, AdapterLayer)
                      for sub, _ in m.named_modules() if sub}
    candidates = [n for n in modules if n and n not in inside_adapter]
    if spec == ALL_LINEAR:
        skip = _output_head_names(model) | {n for n in candidates if _matches(n, config.modules_to_save)}
        names = [n for n in candidates if is_linear(modules[n]) and n not in skip]
    elif isinstance(spec, str):
        names = _regex_matches(spec, candidates)
    else:
        names = [n for n in candidates if _matches(n, spec)]
    if not names:
        linear = [n for n in candidates if is_linear(modules[n])]
        shown = ", ".join(linear[:12]) + (f", ... ({len(linear)} in all)" if len(linear) > 12 else "")
        raise TargetError(f"target_modules={spec!r} matches no module; linear layers are: {shown or 'none'}")
    for n in names:
        if not (is_linear(modules[n]) or isinstance(modules[n], AdapterLayer)):
            raise TargetError(f"target module {n!r} is a {type(modules[n]).__name__}; moreft adapts "
                              "only nn.Linear and transformers Conv1D layers")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the targeted layers of ``model`` with ``config``'s adapter, in place.

    Every parameter is frozen except the adapter's and those of ``config.modules_to_save``.
    All layers are built before any is swapped in, so a failure leaves the model untouched.

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
        raise TargetError(f"model already carries a moreft adapter (e.g. on {again}); merge it with "
                          "moreft.merge(model) or load a fresh model before injecting again")
    layer_cls = LAYER_CLASSES[config.method]
    new_layers = {n: layer_cls(model.get_submodule(n), config, name=n) for n in names}
    save_names = modules_to_save_names(model, config)
    missing = [t for t in config.modules_to_save if not any(_matches(n, (t,)) for n in save_names)]
    if missing:
        raise TargetError(f"modules_to_save {missing} match no module of the model")
    _check_disjoint(names, save_names)
    for p in model.parameters():
        p.requires_grad_(False)
    for n, layer in new_layers.items():
        _set_submodule(model, n, layer)
        for p in layer.adapter_params().values():
            p.requires_grad_(True)
    for n in save_names:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    return model


def _check_disjoint(targets: list[str], saved: list[str]) -> None:
    """A module is adapted or trained in full, never both: training it in full would unfreeze the
    base weight an adapter wraps (and merging would then add the update twice).

    Raises:
        TargetError: a target is a ``modules_to_save`` module, or one lies inside the other.
    """
    for t in targets:
        for s in saved:
            if t == s or t.startswith(s + ".") or s.startswith(t + "."):
                raise TargetError(f"target module {t!r} overlaps modules_to_save module {s!r}; a module is either "
                                  "adapted (target_modules) or trained in full (modules_to_save), not both")


def modules_to_save_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Qualified names of the modules ``config.modules_to_save`` selects (trained in full)."""
    return [n for n, _ in model.named_modules() if n and _matches(n, config.modules_to_save)]


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
        return (f"adapter params: {self.adapter:,} | other trainable: {self.other_trainable:,} | "
                f"trainable: {self.trainable:,} of {self.total:,} ({share:.3f}%)")


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def trainable_parameters(model: nn.Module) -> ParameterCounts:
    """Count adapter, other trainable, and all parameters (shared tensors counted once)."""
    adapter_ids = {id(p) for layer in adapter_layers(model).values()
                   for p in layer.adapter_params().values() if p.requires_grad}
    params = _unique(model.parameters())
    adapter = sum(p.numel() for p in params if id(p) in adapter_ids)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return ParameterCounts(adapter, trainable - adapter, trainable, sum(p.numel() for p in params))


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge every adapter into its base weight and put the plain base layers back.

    With ``safe=True`` every merged weight is checked for NaN/Inf before any is written. The
    model then has no moreft layer left and costs nothing extra at inference.

    Returns:
        The same ``model`` object.

    Raises:
        MergeError: with ``safe=True``, a layer would get NaN/Inf (the model is left unchanged).
    """
    layers = adapter_layers(model)
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
    """Put each layer's base layer back in its place and forget the model's adapter config."""
    for name, layer in layers.items():
        _set_submodule(model, name, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model
