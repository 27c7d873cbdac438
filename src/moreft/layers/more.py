"""MoRe layer: a Monarch-rectangular adapter around a linear layer (MoRe paper, Section 3, Appendices C, E)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import Tensor, nn

from ..config import BlockRule, Composition, InitMode, Method, MoReConfig
from ..errors import ConfigError, MergeError
from ..ops.fused import more_linear
from ..ops.monarch import (
    block_shapes,
    fold_factors,
    fold_more_a,
    fold_more_b,
    more_delta_weight,
    more_forward,
)
from ..ops.monarch_project import monarch_project
from ..ops.more_variants import (
    Term,
    additive_term,
    multiplicative_term,
    terms_delta,
    terms_forward,
    terms_lora,
)
from ..ops.triton_more import more_triton, use_triton
from .base import AdapterLayer
from .linear import adapter_dtype
from .merging import DeltaAdder, blocked_lowrank_adder, lowrank_adder
from .quantized import quantized_kind


class MoReLinear(AdapterLayer[MoReConfig]):
    """``y = base(x) + dropout(x · ΔWᵀ)`` with ``ΔW = P1·blkdiag2·P2·blkdiag1``; no alpha.

    Parameters (named as in the paper's pseudocode, per adapter in ``more_blkdiag1`` /
    ``more_blkdiag2``): ``blkdiag1 (nblocks, block_rank, in_block)`` applied first, Kaiming-uniform
    per block; ``blkdiag2 (nblocks, out_block, block_rank)``, zero, so ΔW = 0 at the start.
    Dropout acts on the adapter output, as in the authors' code.

    ``config.block_rule`` picks the block shapes (``moreft.ops.monarch.block_shapes``); under the
    official rules the layer may hold fewer than ``nblocks`` blocks and neither check below applies.

    Variants (:class:`moreft.MoReConfig`, docs/more-variants.md), with ``M = P1·blkdiag2·P2·blkdiag1``
    and the output scale ``c = alpha`` (``alpha · s`` with ``learnable_scale``, ``s`` the parameter
    ``more_scale`` of shape ``(1,)``):

    * additive: ``ΔW = c·M``;
    * additive, ``init_mode="principal"``: ``ΔW = c·M - c0·M0`` where ``M0`` is the product of the
      frozen starting factors ``more_init_blkdiag1/2`` (buffers saved with the adapter) and ``c0``
      the starting scale. The factors start at the best MoRe approximation of ``W / c0``, so the
      adapter starts holding W's principal Monarch part and ``ΔW`` is exactly 0 at step 0. The base
      weight is never rewritten (PiSSA stores ``W - c0·M0`` in it instead; equal training), so
      disabling, unloading, saving and loading onto a fresh base stay correct;
    * multiplicative: ``W' = (I + c·M)·W`` with a square ``M (out, out)`` (blocks over the output
      width), i.e. ``ΔW = c·M·W`` with ``W`` the base weight without this layer's merged adapters.
      Merging adds ``ΔW`` as usual and keeps ``c·B`` and ``A·W`` (``N*r`` rows each) of what it
      added, so ``delta_weight()`` of a merged adapter and ``unmerge`` use the pre-merge ``W``.
      Several active multiplicative adapters add their ``c_a·M_a·W`` (they are not chained).

    Only the default adapter takes the fused and Triton paths; a variant always runs the reference
    path (``base(x)`` plus its low-rank terms, :mod:`moreft.ops.more_variants`) and merges a dense
    ``ΔW``. The multiplicative composition and the principal init need a dense (not quantised) base
    weight.

    Raises:
        ConfigError: ``nblocks > in_features`` (``out_features`` when multiplicative), or
            ``block_rank`` above the smaller block size (extra rank could never be used); a
            quantised base weight for a variant that reads ``W``.
    """

    method = Method.MORE
    prefix = "more_"
    adapter_param_names = ("blkdiag1", "blkdiag2", "scale")
    adapter_buffer_names = ("init_blkdiag1", "init_blkdiag2")
    other_param_names = (*AdapterLayer.other_param_names, "more_init_blkdiag1", "more_init_blkdiag2")
    more_blkdiag1: nn.ParameterDict
    more_blkdiag2: nn.ParameterDict
    more_scale: nn.ParameterDict
    more_init_blkdiag1: BufferDict
    more_init_blkdiag2: BufferDict

    blkdiag1 = property(
        lambda self: self.more_blkdiag1[self.resolve_adapter()], doc="The active adapter's blkdiag1."
    )
    blkdiag2 = property(
        lambda self: self.more_blkdiag2[self.resolve_adapter()], doc="The active adapter's blkdiag2."
    )

    def _new_params(self, config: MoReConfig, adapter_name: str) -> dict[str, Tensor]:
        n, r, name = config.nblocks, config.block_rank, self.name
        multiplicative = config.composition is Composition.MULTIPLICATIVE
        in_f = (
            self.out_features if multiplicative else self.in_features
        )  # M is (out, out) when multiplicative
        side = "out_features (the multiplicative factor is out x out)" if multiplicative else "in_features"
        moreft_rule = config.block_rule is BlockRule.MOREFT
        if moreft_rule and n > in_f:
            raise ConfigError(f"nblocks={n} must be <= {side}={in_f} of {name!r}")
        n, in_block, out_block = block_shapes(in_f, self.out_features, n, config.block_rule)
        if moreft_rule and r > min(in_block, out_block):
            raise ConfigError(
                f"block_rank={r} must be <= min(in_block, out_block)="
                f"{min(in_block, out_block)} for {name!r} "
                f"({in_f}->{self.out_features} in {n} blocks)"
            )
        weight = self._base_weight()
        kind = quantized_kind(weight)
        if kind is not None and (multiplicative or config.init_mode is InitMode.PRINCIPAL):
            raise ConfigError(
                f"composition={config.composition.value!r} with init_mode={config.init_mode.value!r} "
                f"reads the dense base weight, but {name!r} has a quantised one ({kind}); use "
                "the default MoRe adapter on quantised bases"
            )
        device, dtype = weight.device, adapter_dtype(weight)
        shapes: dict[str, tuple[int, ...]] = {"blkdiag1": (n, r, in_block), "blkdiag2": (n, out_block, r)}
        if config.learnable_scale:
            shapes["scale"] = (1,)
        if config.init_mode is InitMode.PRINCIPAL:
            shapes.update(init_blkdiag1=(n, r, in_block), init_blkdiag2=(n, out_block, r))
        return {name: torch.empty(shape, device=device, dtype=dtype) for name, shape in shapes.items()}

    @torch.no_grad()
    def _init_params(self, adapter_name: str, init_weights: bool) -> None:
        """Kaiming-uniform ``blkdiag1`` with each block's own fan-in; ``blkdiag2`` zero (or alike, for ΔW != 0).

        With a learnable scale starting at 0, ``blkdiag2`` is Kaiming-uniform too (the scale is the
        zero, as in the authors' ``Scaler``); with ``init_mode="principal"`` both start at the
        Monarch projection of ``W / c0`` and the frozen copy equals them (``ΔW = 0``).
        ``init_weights=False`` (tests) perturbs whatever makes ΔW zero.
        """
        config = self.adapter_configs[adapter_name]
        b1, b2 = self.more_blkdiag1[adapter_name], self.more_blkdiag2[adapter_name]
        bound = 1.0 / math.sqrt(b1.shape[-1])  # kaiming_uniform_(a=sqrt(5)) per block
        b1.uniform_(-bound, bound)
        zero_scale = config.learnable_scale and config.scale_init == 0.0
        if init_weights and not zero_scale:
            b2.zero_()
        else:
            b2.uniform_(-1.0 / math.sqrt(b2.shape[-1]), 1.0 / math.sqrt(b2.shape[-1]))
        if config.learnable_scale:
            start = config.scale_init if init_weights or not zero_scale else 1.0
            self.more_scale[adapter_name].fill_(start)
        if config.init_mode is InitMode.PRINCIPAL and not b1.is_meta:
            weight = self._oriented_weight()
            coeff0 = config.alpha * config.scale_init if config.learnable_scale else config.alpha
            p1, p2 = monarch_project(weight / coeff0, config.nblocks, config.block_rank, config.block_rule)
            b1.copy_(p1)
            b2.copy_(p2)
            self.more_init_blkdiag1[adapter_name].copy_(p1)
            self.more_init_blkdiag2[adapter_name].copy_(p2)
            if not init_weights:
                b1.add_(torch.rand_like(b1) - 0.5)
                b2.add_(torch.rand_like(b2) - 0.5)

    # -- variants (docs/more-variants.md) -----------------------------------------------------------
    def _coeffs(self, adapter_name: str) -> tuple[Tensor | float, Tensor | float]:
        """The output scale ``c`` now and ``c0`` at the start (equal tensors when ``s`` is at its start value)."""
        config = self.adapter_configs[adapter_name]
        if not config.learnable_scale:
            return config.alpha, config.alpha
        s = self.more_scale[adapter_name]
        return config.alpha * s, config.alpha * torch.full_like(s, config.scale_init)

    def _merged_terms(self) -> dict[str, list[Term]]:
        """What merging added per multiplicative adapter (``c·B``, ``A·W`` of the pre-merge ``W``)."""
        return self.__dict__.setdefault("_more_merged_terms", {})

    def _unmerged_weight(self, dtype: torch.dtype) -> Tensor:
        """The base weight ``(out, in)`` without the ΔW of this layer's merged adapters, in ``dtype``."""
        weight = self._oriented_weight().to(dtype)
        merged = [m for m in self.merged_adapters if m in self.adapter_configs]
        for name in merged:
            weight = weight - terms_delta(self._terms(name)).to(dtype)
        return weight

    def _terms(self, adapter_name: str) -> list[Term]:
        """``ΔW`` of one adapter as low-rank terms (:mod:`moreft.ops.more_variants`)."""
        config = self.adapter_configs[adapter_name]
        multiplicative = config.composition is Composition.MULTIPLICATIVE
        if multiplicative and adapter_name in self.merged_adapters:
            terms = self._merged_terms().get(adapter_name)
            if terms is None:
                raise MergeError(
                    f"multiplicative MoRe adapter {adapter_name!r} of {self.name!r} is marked merged "
                    "but was not merged by merge(); its ΔW = c·M·W needs the pre-merge W"
                )
            return terms
        b1, b2 = self.more_blkdiag1[adapter_name], self.more_blkdiag2[adapter_name]
        coeff, coeff0 = self._coeffs(adapter_name)
        if multiplicative:
            return [multiplicative_term(b1, b2, self._unmerged_weight(b1.dtype), coeff)]
        terms = [additive_term(b1, b2, self.in_features, self.out_features, coeff)]
        if config.init_mode is InitMode.PRINCIPAL:
            terms.append(
                additive_term(
                    self.more_init_blkdiag1[adapter_name],
                    self.more_init_blkdiag2[adapter_name],
                    self.in_features,
                    self.out_features,
                    coeff0,
                    sign=-1.0,
                )
            )
        return terms

    def lora_factors(self, adapter_name: str | None = None) -> tuple[Tensor, Tensor]:
        """``(A (K, in), B (out, K))`` with ``B @ A == ΔW`` exactly in exact arithmetic (the LoRA export).

        ``K = N*r``, or ``2*N*r`` with the principal init (the frozen product is a second term).
        """
        name = self.resolve_adapter(adapter_name)
        if self.adapter_configs[name].is_default_variant:
            return fold_factors(
                self.more_blkdiag1[name], self.more_blkdiag2[name], self.in_features, self.out_features
            )
        return terms_lora(self._terms(name))

    @torch.no_grad()
    def merge(
        self, safe_merge: bool = False, adapter_names: list[str] | None = None, *, safe: bool | None = None
    ) -> None:
        """:meth:`AdapterLayer.merge`, keeping the terms a multiplicative adapter adds (``unmerge`` subtracts them)."""
        names = self._to_merge(adapter_names)
        for name in names:
            if self.adapter_configs[name].composition is Composition.MULTIPLICATIVE:
                self._merged_terms()[name] = [
                    Term(t.b.detach().clone(), t.a.detach().clone(), t.sign) for t in self._terms(name)
                ]
        super().merge(safe_merge, names, safe=safe)

    @torch.no_grad()
    def unmerge(self) -> None:
        """:meth:`AdapterLayer.unmerge`; what merging kept is dropped after."""
        super().unmerge()
        self._merged_terms().clear()

    def _marked_merged(self) -> None:
        """Marked by hand (ReMoRA, quant): the kept terms no longer describe the base weight."""
        self._merged_terms().clear()

    # -- the layer ------------------------------------------------------------------------------------
    def _delta_weight(self, adapter_name: str) -> Tensor:
        if not self.adapter_configs[adapter_name].is_default_variant:
            return terms_delta(self._terms(adapter_name))
        return more_delta_weight(
            self.more_blkdiag1[adapter_name],
            self.more_blkdiag2[adapter_name],
            self.in_features,
            self.out_features,
        )

    def _adapter_forward(self, x: Tensor, adapter_name: str) -> Tensor:
        dropout = self.adapter_dropout[adapter_name]
        if not self.adapter_configs[adapter_name].is_default_variant:
            return dropout(terms_forward(x, self._terms(adapter_name)))
        b1, b2 = self.more_blkdiag1[adapter_name], self.more_blkdiag2[adapter_name]
        if use_triton(x):  # CUDA: both products and both permutations in fused Triton kernels
            return dropout(more_triton(x, b1, b2, self.out_features))
        return dropout(more_forward(x, b1, b2, self.out_features))

    def _delta_adder(self, dtype: torch.dtype, adapter_name: str) -> DeltaAdder:
        if not self.adapter_configs[adapter_name].is_default_variant:
            return super()._delta_adder(
                dtype, adapter_name
            )  # the dense ΔW, exactly what delta_weight() gives
        device = self._base_weight().device
        b1 = self.more_blkdiag1[adapter_name].detach().to(device=device, dtype=dtype)
        b2 = self.more_blkdiag2[adapter_name].detach().to(device=device, dtype=dtype)
        b = fold_more_b(b2, self.out_features)  # (out, N·r)
        if b1.shape[0] * b1.shape[2] == self.in_features:
            return blocked_lowrank_adder(b, b1)
        return lowrank_adder(b, fold_more_a(b1, self.in_features), 1.0)

    def _fused_forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, adapter_name: str
    ) -> Tensor | None:
        if not self.adapter_configs[adapter_name].is_default_variant:
            return None  # no fused kernel for the variants: the reference path
        b1, b2 = self.more_blkdiag1[adapter_name], self.more_blkdiag2[adapter_name]
        if use_triton(x):
            y = F.linear(x, weight, bias)  # (..., out); not saved by autograd, so added to in place
            return y.add_(more_triton(x, b1, b2, self.out_features))
        return more_linear(x, weight, bias, b1, b2)
