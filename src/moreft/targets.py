"""Which modules an adapter config selects in a model: moreft's matching rules, used by every injection path."""

from __future__ import annotations

import time
from collections.abc import Sequence

import regex
from torch import nn

from .config import ALL_LINEAR, AdapterConfig
from .errors import TargetError
from .layers import AdapterLayer, is_linear

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


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


# Task heads that "all-linear" leaves alone, as peft does: they are new or tied, not adapted.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def _output_head_names(model: nn.Module) -> set[str]:
    """The output embedding and any module inside a task head (``HEAD_NAMES`` at top level)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {
        n
        for n, m in model.named_modules()
        if (head is not None and m is head) or n.split(".")[0] in HEAD_NAMES
    }


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
        raise TargetError(
            f"target_modules={spec!r} took more than {MATCH_SECONDS:g} s to match "
            f"{len(candidates):,} module names (nested repetition backtracks exponentially); "
            "simplify the regex or list the names"
        ) from None
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
            raise TargetError(
                f"no default target_modules for model type {model_type!r}; pass "
                f"target_modules (names, a regex, or {ALL_LINEAR!r}). Known defaults: "
                f"{sorted(DEFAULT_TARGETS)}"
            )
        spec = DEFAULT_TARGETS[model_type]
    modules = dict(model.named_modules())
    inside_adapter = {
        f"{n}.{sub}"
        for n, m in modules.items()
        if isinstance(m, AdapterLayer)
        for sub, _ in m.named_modules()
        if sub
    }
    candidates = [n for n in modules if n and n not in inside_adapter]
    if spec == ALL_LINEAR:
        skip = _output_head_names(model) | {
            n for n in candidates if _matches(n, config.modules_to_save or ())
        }
        names = [
            n
            for n in candidates
            if (is_linear(modules[n]) or isinstance(modules[n], AdapterLayer)) and n not in skip
        ]
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
            raise TargetError(
                f"target module {n!r} is a {type(modules[n]).__name__}; moreft adapts "
                "only nn.Linear and transformers Conv1D layers"
            )
    return names


def modules_to_save_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Qualified names of the modules ``config.modules_to_save`` selects (trained in full)."""
    return [n for n, _ in model.named_modules() if n and _matches(n, config.modules_to_save or ())]


def check_disjoint(targets: list[str], saved: list[str]) -> None:
    """A module is adapted or trained in full, never both: training it in full would unfreeze the
    base weight an adapter wraps (and merging would then add the update twice).

    Raises:
        TargetError: a target is a ``modules_to_save`` module, or one lies inside the other.
    """
    for t in targets:
        for s in saved:
            if t == s or t.startswith(s + ".") or s.startswith(t + "."):
                raise TargetError(
                    f"target module {t!r} overlaps modules_to_save module {s!r}; a module is either "
                    "adapted (target_modules) or trained in full (modules_to_save), not both"
                )
