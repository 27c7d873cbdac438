"""What every adapter layer shares: wrapping a linear base layer, named adapters, the fused forward, merging.

A layer is a peft ``BaseTunerLayer``: it holds any number of named adapters of one method (the
parameters in ``nn.ParameterDict`` s keyed by adapter name, listed in ``adapter_layer_names``),
some of them active. ``y = base(x) + Σ_active x · ΔW_aᵀ``; merged adapters live in the base weight.

A concrete layer declares ``adapter_param_names`` (the short names, ``blkdiag1``; the dicts are
``prefix + name``) and implements, per adapter name, ``_new_params`` (shapes, checked),
``_init_params``, ``_delta_weight`` (dense ``ΔW (out, in)``: the definition that export,
inspect, the quantised merge, the default merge and the tests rely on) and ``_adapter_forward`` (``x · ΔWᵀ`` plus dropout). For speed it may also
implement ``_fused_forward`` (base and adapter as one autograd Function, ``moreft.ops.fused``,
``moreft.ops.blocks``; used for the first active adapter where it applies) and ``_delta_adder``
(its ΔW added into a weight in place from its factors; ``moreft.layers.merging``). With one active
adapter, ``layer.blkdiag1`` etc. are that adapter's parameters. An adapter may lack an optional
parameter (e.g. MoRe's learnable scale), and may hold frozen tensors (``adapter_buffer_names``,
persistent ``BufferDict`` s saved with it, never trained).
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar, cast

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from ..config import AdapterConfig, Method
from ..errors import MergeError, TargetError
from ..ops import fused as _fused
from .fusing import fused_weight_bias
from .linear import adapter_dtype, is_conv1d, is_linear, linear_shape
from .merging import DeltaAdder, accumulate_dtype, add_delta_, count_nonfinite, dense_adder
from .protocol import AdapterModule as AdapterModule  # re-exported: moreft.layers.base.AdapterModule
from .quantized import refuse_quantized

#: The config class of a concrete layer (``MoReLinear`` holds ``MoReConfig`` s).
ConfigT = TypeVar("ConfigT", bound=AdapterConfig)


class AdapterLayer(nn.Module, BaseTunerLayer, Generic[ConfigT]):
    """Base of the concrete layers: owns ``base_layer``, the named adapters and the merge mechanics.

    Raises:
        TargetError: (from ``__init__``) the base is already an adapter layer or not a linear layer.
        ConfigError: (from ``__init__`` / ``update_layer``) the config does not fit the layer's shape.
    """

    method: ClassVar[Method]
    prefix: ClassVar[str]
    adapter_param_names: ClassVar[tuple[str, ...]]
    #: Frozen per-adapter tensors (short names; ``BufferDict`` s ``prefix + name``, in ``other_param_names``).
    adapter_buffer_names: ClassVar[tuple[str, ...]] = ()
    other_param_names: tuple[str, ...] = ("adapter_configs", "adapter_dropout")  # peft: an instance attribute
    #: Fused forward/backward (``moreft.ops.fused``) where it applies; ``None`` follows the
    #: module-wide switch ``moreft.ops.fused.set_fused_enabled``, ``False`` forces the reference.
    fused: bool | None = None
    _setters: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "adapter_param_names" in cls.__dict__:
            cls.adapter_layer_names = tuple(cls.prefix + n for n in cls.adapter_param_names)
        cls._setters = frozenset(
            n
            for k in cls.__mro__
            for n, v in vars(k).items()
            if isinstance(v, property) and v.fset is not None
        )

    def __init__(
        self, base_layer: nn.Module, config: ConfigT, name: str = "", adapter_name: str = "default"
    ) -> None:
        if isinstance(base_layer, AdapterLayer):
            raise TargetError(
                f"module {name!r} already has a {base_layer.method.value} adapter; "
                "merge it or start from a fresh model before injecting again"
            )
        if not is_linear(base_layer):
            raise TargetError(
                f"module {name!r} is a {type(base_layer).__name__}; moreft adapts only "
                "nn.Linear and transformers Conv1D layers"
            )
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.name = name
        self.out_features, self.in_features = linear_shape(base_layer)
        self.adapter_configs: dict[str, ConfigT] = {}
        self.adapter_dropout = nn.ModuleDict()
        for dict_name in self.adapter_layer_names:
            setattr(self, dict_name, nn.ParameterDict())
        for short in self.adapter_buffer_names:
            setattr(self, self.prefix + short, BufferDict(persistent=True))
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._setters:  # nn.Module.__setattr__ would bypass a property's setter for modules
            getattr(type(self), name).fset(self, value)
            return
        super().__setattr__(name, value)

    # -- defined by each method -------------------------------------------------------------
    def _new_params(self, config: ConfigT, adapter_name: str) -> dict[str, Tensor]:
        """Uninitialised tensors of a new adapter, by short name; raises ConfigError if it does not fit."""
        raise NotImplementedError

    def _init_params(self, adapter_name: str, init_weights: bool) -> None:
        """Initialise an adapter: ΔW = 0 (``init_weights=True``) or a random non-zero ΔW."""
        raise NotImplementedError

    def _delta_weight(self, adapter_name: str) -> Tensor:
        """Dense ``ΔW`` of one adapter, shape ``(out_features, in_features)``, in the adapter's dtype."""
        raise NotImplementedError

    def _adapter_forward(self, x: Tensor, adapter_name: str) -> Tensor:
        """One adapter's branch ``x · ΔWᵀ`` (with dropout when training), in the adapter's dtype."""
        raise NotImplementedError

    def _fused_forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, adapter_name: str
    ) -> Tensor | None:
        """``base(x) + adapter(x)`` through one fused Function, or None where this layer has none.

        Called only when :meth:`_base_weight_bias` allows it; ``weight`` is the base weight as
        ``(out, in)`` (a transposed view for Conv1D). Must equal the reference path up to rounding.
        """
        return None

    def _delta_adder(self, dtype: torch.dtype, adapter_name: str) -> DeltaAdder:
        """How to add ``alpha · ΔW`` of one adapter into (rows of) a weight in place, factors in ``dtype``.

        The default builds the dense ΔW once; layers with a cheaper structure override it.
        """
        weight = self._base_weight()
        return dense_adder(self._delta_weight(adapter_name).detach().to(device=weight.device, dtype=dtype))

    # -- named adapters ---------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: ConfigT, inference_mode: bool = False) -> None:
        """Add (or replace) adapter ``adapter_name`` built from ``config``; active adapters stay as they were.

        Raises:
            ConfigError: the config does not fit this layer's shape (nothing is changed).
        """
        params = self._new_params(config, adapter_name)
        self.adapter_configs[adapter_name] = config
        self.adapter_dropout[adapter_name] = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )
        # a replaced adapter's old tensors
        for short in (*self.adapter_param_names, *self.adapter_buffer_names):
            if adapter_name in getattr(self, self.prefix + short):
                del getattr(self, self.prefix + short)[adapter_name]
        for short, tensor in params.items():
            frozen = short in self.adapter_buffer_names
            getattr(self, self.prefix + short)[adapter_name] = tensor if frozen else nn.Parameter(tensor)
        self._init_params(adapter_name, config.init_weights)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _active_here(self) -> list[str]:
        """The active adapters this layer holds, in activation order."""
        return [a for a in self.active_adapters if a in self.adapter_configs]

    def resolve_adapter(self, adapter_name: str | None = None) -> str:
        """``adapter_name``, or the one active adapter of this layer.

        Raises:
            ValueError: no name given and not exactly one adapter active here.
        """
        if adapter_name is not None:
            if adapter_name not in self.adapter_configs:
                raise KeyError(
                    f"layer {self.name!r} has no adapter {adapter_name!r} "
                    f"(it has {sorted(self.adapter_configs)})"
                )
            return adapter_name
        active = self._active_here()
        if len(active) != 1:
            raise ValueError(f"layer {self.name!r} has {len(active)} active adapters {active}; name one")
        return active[0]

    @property
    def config(self) -> ConfigT:
        return self.adapter_configs[self.resolve_adapter()]

    def _base_weight(self) -> Tensor:
        """The base layer's weight as stored: ``(out, in)``, or ``(in, out)`` for Conv1D."""
        return cast(Tensor, self.base_layer.weight)

    @property
    def dropout(self) -> nn.Module:
        return self.adapter_dropout[self.resolve_adapter()]

    @dropout.setter
    def dropout(self, module: nn.Module) -> None:
        self.adapter_dropout[self.resolve_adapter()] = module

    def adapter_params(self, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
        """One adapter's trainable parameters by short name (``blkdiag1``, ...); default: the active one."""
        name = self.resolve_adapter(adapter_name)
        return {
            n: getattr(self, self.prefix + n)[name]
            for n in self.adapter_param_names
            if name in getattr(self, self.prefix + n)
        }

    def adapter_state(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """What an adapter file holds of one adapter: its parameters and frozen buffers, by short name."""
        name = self.resolve_adapter(adapter_name)
        buffers = {
            n: getattr(self, self.prefix + n)[name]
            for n in self.adapter_buffer_names
            if name in getattr(self, self.prefix + n)
        }
        return {**self.adapter_params(name), **buffers}

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        """Dense ``ΔW (out_features, in_features)`` of one adapter, or the sum over the active ones."""
        if adapter_name is not None:
            return self._delta_weight(self.resolve_adapter(adapter_name))
        names = self._active_here()
        if not names:
            return self._base_weight().new_zeros(self.out_features, self.in_features)
        return sum(self._delta_weight(a) for a in names[1:]) + self._delta_weight(names[0])

    def adapter_forward(self, x: Tensor, adapter_name: str | None = None) -> Tensor:
        """The branch ``x · ΔWᵀ`` of one adapter (default: the active one), with dropout when training."""
        return self._adapter_forward(x, self.resolve_adapter(adapter_name))

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str | None = None) -> None:
        """ΔW = 0 again for one adapter (default: every active one)."""
        for name in [adapter_name] if adapter_name is not None else self._active_here():
            self._init_params(name, True)

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """Move an adapter to the base layer's device; it stays fp32 on bf16/fp16 bases (peft would cast it)."""
        weight = self._base_weight()
        for dict_name in (*self.adapter_layer_names, *(self.prefix + n for n in self.adapter_buffer_names)):
            params = getattr(self, dict_name)
            if adapter_name in params and params[adapter_name].device != torch.device("meta"):
                params[adapter_name] = params[adapter_name].to(
                    device or weight.device, dtype=adapter_dtype(weight)
                )

    @property
    def weight_dtype(self) -> torch.dtype:
        return next(iter(self.adapter_params(self._active_here()[0]).values())).dtype

    # -- forward ----------------------------------------------------------------------------
    def _base_weight_bias(self, x: Tensor, adapter_name: str) -> tuple[Tensor, Tensor | None] | None:
        """The base ``(weight (out, in), bias)`` when the fused path may run on ``x``, else None.

        It may not where it could differ from ``base_layer(x) + adapter_forward(x)``: a base of
        another type (parametrised, bitsandbytes) or with hooks, a weight that is a tensor subclass
        (torchao quantised, DTensor), active dropout (the reference path draws the masks), mixed
        dtypes, autocast or ``torch.func`` transforms (``moreft.ops.fused.fusable``).
        """
        fused = self.fused if self.fused is not None else _fused.fused_enabled()
        return fused_weight_bias(
            self.base_layer,
            x,
            self.in_features,
            self.adapter_dropout[adapter_name],
            self.adapter_params(adapter_name).values(),
            fused,
        )

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disable_adapters:
            self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        names = [] if self.merged else self._active_here()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        wb = self._base_weight_bias(x, names[0])
        y = None if wb is None else self._fused_forward(x, *wb, names[0])
        rest = names[1:] if y is not None else names
        if y is None:
            y = self.base_layer(x, *args, **kwargs)
        for name in rest:
            dtype = next(iter(self.adapter_params(name).values())).dtype
            y = y + self._adapter_forward(x.to(dtype), name).to(y.dtype)
        return y

    # -- merging ----------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @merged.setter
    def merged(self, value: bool) -> None:
        """Mark the active adapters merged (their ΔW already in the base weight) or none (ReMoRA, quant)."""
        self.merged_adapters = self._active_here() if value else []
        self._marked_merged()

    def _marked_merged(self) -> None:
        """Called after ``merged`` is set by hand: a layer that keeps what merge() added drops it here."""

    def _oriented_weight(self) -> Tensor:
        """The base weight as ``(out, in)``: itself, or a transposed view for Conv1D."""
        weight = self._base_weight()
        return weight.T if is_conv1d(self.base_layer) else weight

    def _adder(self, names: list[str]) -> DeltaAdder:
        """The adder of ``Σ ΔW`` over ``names``."""
        dtype = accumulate_dtype(self._base_weight())
        adders = [self._delta_adder(dtype, name) for name in names]

        def add(out: Tensor, row0: int, alpha: float) -> None:
            for adder in adders:
                adder(out, row0, alpha)

        return add

    def _to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = self._active_here() if adapter_names is None else list(adapter_names)
        return [n for n in names if n in self.adapter_configs and n not in self.merged_adapters]

    @torch.no_grad()
    def check_mergeable(self, adapter_names: list[str] | None = None) -> None:
        """Raise if merging (default: the active, unmerged adapters) would write NaN/Inf; changes nothing.

        Works by row chunks of about 4 MiB, so it needs no weight-sized memory.

        Raises:
            MergeError: if ``W + ΔW``, cast to the base weight's dtype, holds NaN/Inf, or the base
                weight is quantised (:mod:`moreft.quant`).
        """
        names = self._to_merge(adapter_names)
        if not names:
            return
        refuse_quantized(self)
        bad = count_nonfinite(self._oriented_weight(), self._adder(names), +1.0)
        if bad:
            raise MergeError(
                f"merging adapter layer {self.name!r} would write {bad} NaN/Inf values "
                f"into its {self._base_weight().dtype} weight; nothing was merged"
            )

    @torch.no_grad()
    def merge(
        self, safe_merge: bool = False, adapter_names: list[str] | None = None, *, safe: bool | None = None
    ) -> None:
        """Add ΔW of the active (or named) adapters into the base weight, in place, from the factors.

        Idempotent: merged adapters are skipped. ``safe`` (peft: ``safe_merge``) checks for NaN/Inf
        first. The sum is formed in float32 (float64 kept) and cast back, so a bf16/fp16 weight is
        rounded once.

        Raises:
            MergeError: with ``safe=True``, if the result would not be finite (nothing changes); a
                quantised base weight (:func:`moreft.quant.merge_quantized` merges into one).
        """
        names = self._to_merge(adapter_names)
        if not names:
            return
        refuse_quantized(self)
        if safe_merge if safe is None else safe:
            self.check_mergeable(names)
        add_delta_(self._oriented_weight(), self._adder(names), +1.0)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW of every merged adapter from the base weight again (idempotent); exact up to rounding."""
        while self.merged_adapters:  # popped after: a ΔW may depend on being merged (MoRe multiplicative)
            add_delta_(self._oriented_weight(), self._adder([self.merged_adapters[-1]]), -1.0)
            self.merged_adapters.pop()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={sorted(self.adapter_configs)}, merged={self.merged}"
        )
