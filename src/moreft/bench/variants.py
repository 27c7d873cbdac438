"""The layer variants that ``moreft bench`` times: one frozen ``nn.Linear``, wrapped by each method.

Every variant wraps an identical copy of the same frozen base layer (with bias). Ours are moreft's
layers (fused path, the default); the peers are HF peft's own ``LoraConfig`` and ``BOFTConfig``
layers (BOFT is the MoRe paper's baseline, Table 4). Each variant carries its *FLOP floor*: one
plus the adapter's FLOPs per step (straightforward factored computation, structured: MoRe's and
MoRA's block-diagonal factors count only their non-zeros) over the base layer's.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import LoRAConfig, MoRAConfig, MoRAOperator, MoReConfig, SharingLayout
from ..layers import LoRALinear, MoRALinear, MoReLinear
from ..ops.monarch import more_reference

RANK = 8  # LoRA rank, MoRA's rank budget; MoRe's block_rank varies
LORA_ALPHA = 16.0
MORE_NBLOCKS = 4  # the MoRe paper's default
MORE_BLOCK_RANKS = (1, 4, 8)
BOFT_BLOCK_SIZE = 4  # BOFT_{b=4}^{m=4}, the MoRe paper's Table 3/4 configuration
BOFT_BUTTERFLY = 4
MORA_OPERATORS = {
    "mora": (MoRAOperator.ROTATION, SharingLayout.STRIDED),  # the default operator
    "mora-truncation": (MoRAOperator.TRUNCATION, SharingLayout.STRIDED),
    "mora-sharing": (MoRAOperator.SHARING, SharingLayout.STRIDED),
    "mora-sharing-adjacent": (MoRAOperator.SHARING, SharingLayout.ADJACENT),
    "mora-decouple": (MoRAOperator.DECOUPLE, SharingLayout.STRIDED),
}
LAYER_METHODS = (
    "base",
    "lora",
    *(f"more-r{r}" for r in MORE_BLOCK_RANKS),
    "more-r8-unfused",
    "more-r8-paper",
    *MORA_OPERATORS,
    "peft-lora",
    "peft-boft",
)
#: ``torch.compile``d twins (``--compile``): ours with ``fullgraph=True``, peft's as peft allows.
COMPILED_METHODS = tuple(f"{m}-compiled" for m in ("lora", "more-r8", "mora-sharing", "peft-lora"))
ADAPTER_INIT_STD = 0.02  # nonzero adapters, as after some training (values do not change the speed)


@dataclass
class Variant:
    """One module to time: ``module(x).backward(g)`` is a step."""

    name: str
    module: nn.Module
    params: int  # trainable parameters
    flop_floor: float  # 1 + adapter FLOPs / base FLOPs
    note: str


class PaperMoRe(nn.Module):
    """``base(x) + more_reference(x)``: the Appendix G pseudocode, as the MoRe authors run it."""

    def __init__(self, layer: MoReLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        return layer.base_layer(x) + more_reference(x, layer.blkdiag1, layer.blkdiag2, layer.out_features)


class _Holder(nn.Module):
    """A one-layer model, so that ``peft.get_peft_model`` can wrap ``proj``."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def lowrank_flops(tokens: int, in_f: int, out_f: int, rank: int) -> float:
    """Six ``T·rank·width`` products per step: ``xAᵀ``, ``hBᵀ``; ``gB``, ``∂A``, ``∂B``, ``gB·A``."""
    return 6.0 * tokens * rank * (in_f + out_f)


def peft_layer(base: nn.Linear, which: str) -> tuple[nn.Module, str]:
    """HF peft's LoRA r=8 or BOFT layer around ``base``, and a note on its configuration."""
    import peft

    if which == "lora":
        cfg = peft.LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["proj"])
        note = f"HF peft {peft.__version__} LoRA r={RANK}"
    else:
        cfg = peft.BOFTConfig(
            boft_block_size=BOFT_BLOCK_SIZE,
            boft_n_butterfly_factor=BOFT_BUTTERFLY,
            boft_dropout=0.0,
            target_modules=["proj"],
        )
        note = f"HF peft {peft.__version__} BOFT b={BOFT_BLOCK_SIZE} m={BOFT_BUTTERFLY}"
    with warnings.catch_warnings():  # BOFT warns that its CUDA extension is missing (noted below)
        warnings.simplefilter("ignore")
        layer = peft.get_peft_model(_Holder(base), cfg).base_model.model.proj
    if which == "boft" and not getattr(layer, "fbd_cuda_available", True):
        note += " (peft uses m=1 without its CUDA extension)"
    return layer, note


def build_variants(
    in_f: int, out_f: int, tokens: int, methods: tuple[str, ...], seed: int = 0
) -> list[Variant]:
    """An identical frozen ``nn.Linear(in_f, out_f)`` copy wrapped by each method in ``methods``.

    Raises:
        ValueError: an unknown method name.
    """
    unknown = [m for m in methods if m not in LAYER_METHODS + COMPILED_METHODS]
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown}; choose from {', '.join(LAYER_METHODS + COMPILED_METHODS)}"
        )
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f).requires_grad_(False)
    base_flops = 4.0 * tokens * in_f * out_f  # forward and input gradient
    return [_variant(m, base, tokens, base_flops) for m in methods]


def _randomized(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in layer.adapter_params().values():
            p.normal_(0.0, ADAPTER_INIT_STD)
    return layer


def compiled_variant(v: Variant) -> Variant:
    """``v`` under ``torch.compile`` (default inductor): ``fullgraph=True`` for moreft's layers."""
    fullgraph = not v.name.startswith("peft-")
    module = torch.compile(v.module, fullgraph=fullgraph)
    return Variant(
        f"{v.name}-compiled",
        module,
        v.params,
        v.flop_floor,
        f"{v.note}; torch.compile(fullgraph={fullgraph})",
    )


def mora_flop_floor(layer: MoRALinear, tokens: int, base_flops: float) -> float:
    """1 + MoRA's FLOPs per step over the base's: three products over ΔW's non-zero blocks (forward,
    ``∂x``, ``∂M``); for SHARING three ``T·r²`` products and four group-sum passes (``T·(in + out)`` adds each way).
    """
    form = layer.block_form()
    if form is None:
        adapter = 6.0 * tokens * layer.r_hat**2 + 2.0 * tokens * (layer.in_features + layer.out_features)
    else:
        nnz = sum(s.count * (s.row1 - s.row0) * (s.col1 - s.col0) for s in form[1])  # non-zeros of ΔW
        adapter = 3 * 2.0 * tokens * nnz
    return 1.0 + adapter / base_flops


def _variant(name: str, base: nn.Linear, tokens: int, base_flops: float) -> Variant:
    out_f, in_f = base.weight.shape
    if name.endswith("-compiled"):
        return compiled_variant(_variant(name.removesuffix("-compiled"), base, tokens, base_flops))
    lowrank_floor = 1.0 + lowrank_flops(tokens, in_f, out_f, RANK) / base_flops
    if name == "base":
        return Variant(name, base, 0, 1.0, "frozen nn.Linear alone")
    if name == "lora":
        layer = _randomized(LoRALinear(copy.deepcopy(base), LoRAConfig(rank=RANK, alpha=LORA_ALPHA)))
        return Variant(name, layer, _trainable(layer), lowrank_floor, f"moreft LoRA r={RANK}")
    if name.startswith("more-r"):
        r = int(name.split("-")[1][1:])
        layer = _randomized(MoReLinear(copy.deepcopy(base), MoReConfig(nblocks=MORE_NBLOCKS, block_rank=r)))
        note = f"moreft MoRe nblocks={MORE_NBLOCKS} block_rank={r}"
        module: nn.Module = layer
        if name.endswith("-unfused"):
            layer.fused = False
            note += ", unfused (folded factors through autograd)"
        elif name.endswith("-paper"):
            module = PaperMoRe(layer)
            note += ", paper pseudocode (more_reference)"
        floor = 1.0 + lowrank_flops(tokens, in_f, out_f, r) / base_flops
        return Variant(name, module, _trainable(layer), floor, note)
    if name in MORA_OPERATORS:
        operator, layout = MORA_OPERATORS[name]
        cfg = MoRAConfig(rank=RANK, operator=operator, sharing_layout=layout)
        layer = _randomized(MoRALinear(copy.deepcopy(base), cfg))
        note = f"moreft MoRA rank={RANK} (r_hat={layer.r_hat}, {operator.value}"
        note += f", {layout.value})" if operator is MoRAOperator.SHARING else ")"
        return Variant(name, layer, _trainable(layer), mora_flop_floor(layer, tokens, base_flops), note)
    layer, note = peft_layer(copy.deepcopy(base), name.removeprefix("peft-"))
    if name == "peft-lora":
        return Variant(name, layer, _trainable(layer), lowrank_floor, note)
    # BOFT forms R (in x in) and W·R every step (dense), then the product's gradients.
    floor = 1.0 + 3 * 2.0 * in_f * in_f * out_f / base_flops
    return Variant(name, layer, _trainable(layer), floor, note)
