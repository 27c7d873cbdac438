"""Which modules an adapter config selects in a model: moreft's matching rules, used by every injection path."""

from __future__ import annotations

import re

from torch import nn

from .config import ALL_LINEAR, AdapterConfig
from .errors import TargetError
from .layers import AdapterLayer, is_linear

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
        skip = _output_head_names(model) | {n for n in candidates if _matches(n, config.modules_to_save or ())}
        names = [n for n in candidates if (is_linear(modules[n]) or isinstance(modules[n], AdapterLayer))
                 and n not in skip]
    elif isinstance(spec, str):
        pattern = re.compile(spec)
        names = [n for n in candidates if pattern.fullmatch(n)]
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


def modules_to_save_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Qualified names of the modules ``config.modules_to_save`` selects (trained in full)."""
    return [n for n, _ in model.named_modules() if n and _matches(n, config.modules_to_save or ())]
