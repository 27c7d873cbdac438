"""The peft tuners of moreft's methods: one ``BaseTuner`` that puts moreft's adapter layers into a model.

``peft.get_peft_model(model, moreft.MoReConfig(...))`` builds a :class:`MoReModel` (found through
the peft type, :mod:`moreft.tuners.registration`); ``moreft.inject`` uses the same class. Targets
follow moreft's rules (:func:`moreft.inject.resolve_targets`), and every layer is checked against
its config before any is swapped in, so a failed injection leaves the model as it was.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import (
    BaseTuner,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from torch import nn

from ..config import ALL_LINEAR, CONFIG_CLASSES, AdapterConfig
from ..errors import AdapterFileError, TargetError
from ..layers import AdapterLayer, LoRALinear, MoRALinear, MoReLinear, linear_shape
from ..layers.quantized import refuse_quantized_layers
from ..shapes import adapter_shapes
from ..targets import DEFAULT_TARGETS, check_disjoint, modules_to_save_names, resolve_targets

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class MoreftTuner(BaseTuner):
    """A peft ``BaseTuner`` for one moreft method (set by the subclass's ``tuner_layer_cls``)."""

    # peft declares these on BaseTuner as instance attributes (so no ClassVar here); read, never written.
    tuner_layer_cls: type[AdapterLayer]
    target_module_mapping = {k: list(v) for k, v in DEFAULT_TARGETS.items()}  # noqa: RUF012

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        return peft_config  # targets are resolved with the model in hand, in _prepare_model

    def _prepare_model(self, peft_config: PeftConfig, model: nn.Module) -> None:
        """Resolve ``target_modules`` by moreft's rules and check every layer fits, before any swap.

        Raises:
            TargetError: nothing or a non-linear module matches, a target overlaps ``modules_to_save``,
                or a layer carries another method.
            ConfigError: a hyperparameter does not fit a layer's shape.
        """
        expected = CONFIG_CLASSES[self.tuner_layer_cls.method]
        if not isinstance(peft_config, expected):
            raise TargetError(
                f"{type(self).__name__} takes a {expected.__name__}, not a {type(peft_config).__name__}"
            )
        names = resolve_targets(model, peft_config)
        check_disjoint(names, modules_to_save_names(model, peft_config))
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, AdapterLayer) and not isinstance(module, self.tuner_layer_cls):
                raise TargetError(
                    f"module {name!r} already carries a {module.method.value} adapter; one layer "
                    f"holds adapters of one method ({peft_config.method.value} asked)"
                )
        fresh = [n for n in names if not isinstance(model.get_submodule(n), AdapterLayer)]
        if self._building is not None and not self._low_cpu_mem_usage:
            # every new layer is built before any is swapped in (an error leaves the model as it was)
            self._prebuilt = {
                n: self.tuner_layer_cls(
                    model.get_submodule(n), peft_config, name=n, adapter_name=self._building
                )
                for n in fresh
            }
        rest = [n for n in names if n not in self._prebuilt]
        adapter_shapes(peft_config, {n: linear_shape(model.get_submodule(n)) for n in rest})  # built on meta
        if peft_config.target_modules is None or peft_config.target_modules == ALL_LINEAR:
            peft_config.target_modules = tuple(names)

    _building: str | None = None
    _low_cpu_mem_usage: bool = False
    _prebuilt: dict[str, AdapterLayer]  # layers built by _prepare_model, swapped in by _create_and_replace

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """peft's injection; on failure the adapter's config is forgotten again (the layers are untouched)."""
        self._building, self._low_cpu_mem_usage = adapter_name, bool(low_cpu_mem_usage)
        self._prebuilt = {}
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except BaseException:
            self.peft_config.pop(adapter_name, None)
            raise
        finally:
            self._building, self._prebuilt = None, {}

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
        **_: Any,
    ) -> None:
        peft_config = cast(AdapterConfig, peft_config)  # its class was checked in _prepare_model
        if isinstance(target, AdapterLayer):
            target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
            return
        new_module = self._prebuilt.pop(current_key, None) or self.tuner_layer_cls(
            target, peft_config, name=current_key, adapter_name=adapter_name
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_mergeable(self, adapter_names: list[str] | None, safe_merge: bool) -> None:
        """Raise before any weight is written if some layer cannot be merged (quantised base; NaN/Inf if safe)."""
        layers = {
            n: m
            for n, m in self.model.named_modules()
            if isinstance(m, AdapterLayer) and m._to_merge(adapter_names)
        }
        refuse_quantized_layers(layers)
        if safe_merge:
            for layer in layers.values():
                layer.check_mergeable(adapter_names)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        """peft's unload, but a merge checks every layer before it writes any (all or nothing).

        Raises:
            MergeError: a base weight is quantised, or with ``safe_merge``, a merged weight would
                hold NaN/Inf (nothing changes).
        """
        if merge:
            self._check_mergeable(adapter_names, safe_merge)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=False, adapter_names=adapter_names
        )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """peft's ``merge_adapter``; with ``safe_merge`` every layer is checked before any is written.

        Raises:
            MergeError: a base weight is quantised, or with ``safe_merge``, a merged weight would
                hold NaN/Inf (nothing changes).
        """
        self._check_mergeable(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=False)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """peft's key mapping, then a strict check of this adapter's tensors before anything is written.

        On a mismatch the adapter being loaded is removed again (so ``PeftModel.from_pretrained``
        leaves the base model as it was) and an :class:`AdapterFileError` is raised.

        Raises:
            AdapterFileError: a tensor of the adapter is missing, has another shape, or is not floating point.
        """
        mapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        model_state = model.state_dict()
        expected = _filter_state_dict_by_key_prefixes(model_state, prefixes)
        problems = [
            f"missing {key!r}"
            for key in sorted(expected)
            if key not in mapped and key.removeprefix("base_model.model.") not in mapped
        ]
        for key, got in sorted(mapped.items()):
            own = model_state.get(key, model_state.get("base_model.model." + key))
            if own is not None and tuple(got.shape) != tuple(own.shape):
                problems.append(
                    f"{key!r} has shape {list(got.shape)} in the file but the model expects {list(own.shape)}"
                )
            elif own is not None and got.dtype not in FLOAT_DTYPES:
                problems.append(f"{key!r} has dtype {got.dtype}; adapter tensors must be floating point")
        if problems:
            _remove_adapter(model, adapter_name)
            raise AdapterFileError(
                f"the {config.peft_type} adapter file does not fit the model "
                f"(nothing was loaded): {'; '.join(problems[:5])}"
            )
        return mapped


def _remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Undo the injection of ``adapter_name`` (a failed load): unload when it is the only adapter."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, MoreftTuner) or adapter_name not in tuner.peft_config:
        return
    if len(tuner.peft_config) == 1:
        tuner.unload()
        tuner.peft_config.clear()
    else:
        tuner.delete_adapter(adapter_name)


class MoReModel(MoreftTuner):
    """MoRe adapters as a peft method (peft type ``"MORE"``)."""

    prefix = MoReLinear.prefix
    tuner_layer_cls = MoReLinear


class MoRAModel(MoreftTuner):
    """MoRA adapters as a peft method (peft type ``"MORA"``)."""

    prefix = MoRALinear.prefix
    tuner_layer_cls = MoRALinear


class LoRAModel(MoreftTuner):
    """moreft's LoRA (the fused baseline) as a peft method (peft type ``"MOREFT_LORA"``)."""

    prefix = LoRALinear.prefix
    tuner_layer_cls = LoRALinear
