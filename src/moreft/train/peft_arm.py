"""Any peft method as a run's adapter: ``method: peft`` with ``peft_type`` and ``peft_options``.

``moreft compare --methods peft:vera:r=256`` (or a recipe's ``method: peft``, ``peft_type: vera``,
``peft_options: {r: 256}``) trains peft's own VeRA. The config is peft's class for that type
(``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``); each option is converted by that class's field
type (:mod:`.peft_options`; an unknown type or option is a ConfigError naming the close matches),
and the class's own checks run when the run config is made. What moreft sets itself, as for its own methods:

* ``target_modules``: the run's ``target_modules`` (or the model's default), resolved by moreft's
  rules to full module names, so a peft arm adapts exactly the layers moreft's methods adapt;
* ``modules_to_save``: the task head (trained in full; not counted as adapter parameters);
* ``task_type``: ``SEQ_CLS`` or ``CAUSAL_LM`` from the task.

The model is wrapped with ``peft.get_peft_model``; the adapter is saved with peft's
``save_pretrained`` into the run's ``adapter/`` (``adapter_config.json``, ``adapter_model.safetensors``,
``README.md``) and ``moreft eval`` loads it with ``PeftModel.from_pretrained``. Adapter parameters
are counted as for moreft's methods: trainable tensors, each once, outside the head.
Prompt-learning types (prefix tuning, ...) and moreft's own types (use ``more`` / ``mora`` /
``lora``) are not peft arms.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from moreft.config import MoreftPeftType
from moreft.errors import AdapterFileError, ConfigError
from moreft.inject import ParameterCounts
from moreft.safe_write import FolderKind, write_folder
from moreft.train.peft_options import convert_value

#: peft config fields moreft sets itself (see the module docstring) or that do not choose the adapter.
RESERVED = (
    "peft_type",
    "task_type",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
)
#: What peft's ``save_pretrained`` writes into a folder.
PEFT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md"})
_MAX_CONFIG_BYTES = 16 * 2**20


@functools.cache
def peft_types() -> dict[str, type]:
    """The peft types a run may use, by lower-case name (``vera``, ``boft``, ...), with their config classes."""
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    own = {t.value for t in MoreftPeftType}
    out = {}
    for key, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        name = str(getattr(key, "value", key))
        if name not in own and not issubclass(cls, PromptLearningConfig):
            out[name.lower()] = cls
    return dict(sorted(out.items()))


def config_class(peft_type: Any) -> tuple[str, type]:
    """``(normalised name, config class)`` of a peft type given in any case.

    Raises:
        ConfigError: Not a peft type a run may use (close names suggested).
    """
    types_ = peft_types()
    name = peft_type.lower() if isinstance(peft_type, str) else peft_type
    if name not in types_:
        close = difflib.get_close_matches(str(name), list(types_), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        mine = (
            " (moreft's own methods are method more / mora / lora)"
            if str(name).upper() in {t.value for t in MoreftPeftType}
            else ""
        )
        raise ConfigError(
            f"peft_type={peft_type!r} is not a peft method of the installed peft{mine}{hint} "
            f"Valid: {', '.join(types_)}"
        )
    return name, types_[name]


def option_fields(cls: type) -> dict[str, Any]:
    """The options of a peft config class a run may set: ``name -> resolved type``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name not in RESERVED}


def convert_options(peft_type: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` converted by the field types of ``peft_type``'s config class (plain, YAML-ready values).

    Raises:
        ConfigError: An unknown or reserved option (close names suggested), or a value its field refuses.
    """
    name, cls = config_class(peft_type)
    fields = option_fields(cls)
    out = {}
    for key, value in options.items():
        if key in RESERVED:
            raise ConfigError(
                f"peft_options {key!r} of peft:{name} is set by moreft (target_modules from the "
                "run's target_modules, the head in modules_to_save, task_type from the task); "
                "leave it out"
            )
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"peft_options {key!r} is not an option of peft's {cls.__name__} (peft:{name}){hint} "
                f"Options: {', '.join(fields)}"
            )
        out[key] = convert_value(f"peft:{name} option {key}", value, fields[key])
    return out


def check_peft(peft_type: Any, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Normalise and check a peft arm: ``(type name, converted options)``; peft's own checks run too.

    Raises:
        ConfigError: No ``peft_type``, an unknown type or option, or a value peft's config refuses.
    """
    if peft_type is None:
        raise ConfigError(
            f"method peft needs peft_type (one of {', '.join(peft_types())}), e.g. "
            "--peft-type vera --peft-option r=256, or the spec peft:vera:r=256"
        )
    name, _ = config_class(peft_type)
    converted = convert_options(name, options)
    make_config(name, converted, None, ())  # the config class's own __post_init__ checks
    return name, converted


def make_config(
    peft_type: str,
    options: Mapping[str, Any],
    target_modules: list[str] | None,
    modules_to_save: tuple[str, ...],
    task_type: str | None = None,
) -> Any:
    """peft's config object for an arm.

    Raises:
        ConfigError: peft's config refuses the combination (its message is quoted).
    """
    name, cls = config_class(peft_type)
    try:
        return cls(
            target_modules=target_modules,
            modules_to_save=list(modules_to_save) or None,
            task_type=task_type,
            **options,
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"peft:{name} with {dict(options)} is refused by peft's {cls.__name__}: {exc}"
        ) from None


def label(peft_type: str, options: Mapping[str, Any]) -> str:
    """``peft:vera:r=256`` (options in the order given)."""
    return f"peft:{peft_type}:" + ",".join(f"{k}={_text(v)}" for k, v in options.items())


def _text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def wrap(
    model: nn.Module,
    peft_type: str,
    options: Mapping[str, Any],
    target_names: list[str],
    heads: tuple[str, ...],
    task_type: str,
) -> nn.Module:
    """``peft.get_peft_model`` of ``model`` with the arm's config on ``target_names`` (full names).

    Raises:
        ConfigError: The method does not fit the model (e.g. a block size that does not divide a width).
    """
    import peft

    config = make_config(peft_type, options, list(target_names), heads, task_type)
    try:
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError, RuntimeError, KeyError, AssertionError) as exc:
        raise ConfigError(
            f"{label(peft_type, options)} does not fit this model: {type(exc).__name__}: {str(exc)[:300]}"
        ) from None


def attach(
    model: nn.Module,
    peft_type: str,
    options: Mapping[str, Any],
    target_modules: Any,
    heads: tuple[str, ...],
    classification: bool,
) -> tuple[nn.Module, list[str]]:
    """Wrap ``model`` with a peft arm on the layers moreft's methods would adapt: ``(peft model, target names)``.

    Args:
        target_modules: The run's ``target_modules``, or the model's default (None: moreft's per-family
            default), resolved by moreft's matching rules (:func:`moreft.resolve_targets`).
        heads: Modules trained in full (the task head).
        classification: ``SEQ_CLS`` when True, else ``CAUSAL_LM``.

    Raises:
        ConfigError / moreft.TargetError: The targets match nothing, or the method does not fit the model.
    """
    from moreft.config import LoRAConfig
    from moreft.targets import resolve_targets

    names = resolve_targets(model, LoRAConfig(target_modules=target_modules, modules_to_save=heads))
    return wrap(model, peft_type, options, names, heads, "SEQ_CLS" if classification else "CAUSAL_LM"), names


def is_peft_model(model: nn.Module) -> bool:
    """True for a model wrapped by ``peft.get_peft_model`` / ``PeftModel.from_pretrained``."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Adapter (trainable, outside the trained-in-full heads), other trainable, and all parameters;
    shared tensors counted once, as :func:`moreft.count_parameters` counts moreft's methods."""
    from peft.utils.other import ModulesToSaveWrapper

    heads = {id(p) for m in model.modules() if isinstance(m, ModulesToSaveWrapper) for p in m.parameters()}
    unique = list({id(p): p for p in model.parameters()}.values())
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    adapter = sum(p.numel() for p in unique if p.requires_grad and id(p) not in heads)
    return ParameterCounts(adapter, trainable - adapter, trainable, sum(p.numel() for p in unique))


def _peft_names(folder: Path) -> set[str] | None:
    """What a peft adapter folder holds, when its ``adapter_config.json`` names a peft type; else None."""
    config = folder / "adapter_config.json"
    if config.is_symlink() or not config.is_file() or config.stat().st_size > _MAX_CONFIG_BYTES:
        return None
    try:
        meta = json.loads(config.read_bytes())
    except (ValueError, RecursionError):
        return None
    return (
        set(PEFT_FILES)
        if isinstance(meta, dict) and str(meta.get("peft_type", "")).lower() in peft_types()
        else None
    )


#: A run's ``adapter/`` written by peft's ``save_pretrained`` for a peft arm.
PEFT_ADAPTER_KIND = FolderKind("peft adapter", _peft_names)


def is_peft_adapter(folder: Path) -> bool:
    """True when ``folder`` holds a peft arm's saved adapter (its config names a peft type)."""
    return folder.is_dir() and _peft_names(folder) is not None


def save(model: nn.Module, folder: Path) -> Path:
    """peft's ``save_pretrained`` of ``model``'s adapter (and head) into ``folder``, swapped in whole."""
    return write_folder(folder, lambda tmp: model.save_pretrained(str(tmp)), PEFT_ADAPTER_KIND)


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load a saved peft adapter's weights into the (already wrapped) ``model``: resume, best checkpoint.

    Raises:
        moreft.AdapterFileError: ``folder`` holds no peft adapter, or its tensors do not fit ``model``.
    """
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    if not is_peft_adapter(folder):
        raise AdapterFileError(
            f"{str(folder)!r} holds no peft adapter (adapter_config.json naming a peft type)"
        )
    try:
        weights = load_peft_weights(str(folder), device="cpu")
        result = set_peft_model_state_dict(model, weights)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise AdapterFileError(
            f"the peft adapter in {str(folder)!r} does not fit this model: {exc}"
        ) from None
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise AdapterFileError(
            f"the peft adapter in {str(folder)!r} has tensors this model lacks: {unexpected[:5]}"
        )


def load_model(base: nn.Module, folder: Path) -> nn.Module:
    """``PeftModel.from_pretrained(base, folder)``: a finished peft arm's model, for evaluation.

    Raises:
        moreft.AdapterFileError: The folder holds no peft adapter, or it does not fit ``base``.
    """
    from peft import PeftModel

    if not is_peft_adapter(folder):
        raise AdapterFileError(
            f"{str(folder)!r} holds no peft adapter (adapter_config.json naming a peft type)"
        )
    try:
        return PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise AdapterFileError(
            f"the peft adapter in {str(folder)!r} does not fit the base model: {exc}"
        ) from None
