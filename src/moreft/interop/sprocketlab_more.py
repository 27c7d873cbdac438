"""Checkpoints of the MoRe authors' code (SprocketLab/sparse_matrix_fine_tuning).

Their ``MonarchLinear`` replaces a linear layer in place and holds ``blkdiag1 (N, r, I)``,
``blkdiag2 (N, O, r)``, the frozen base weight ``dense (out, in)`` and ``bias``; a checkpoint is the
model's state dict (``model.safetensors`` or ``pytorch_model.bin`` from the HF Trainer), so each
adapted layer appears as ``<module>.blkdiag1`` / ``<module>.blkdiag2``. The factors mean what
moreft's mean (``more_reference`` is the same product); only the block shapes differ, so the
reader finds the ``nblocks`` and block rule (``moreft.config.BlockRule``) that rebuild them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..config import BlockRule, MoReConfig
from ..errors import AdapterFileError, ConfigError
from ..ops import ceil_div
from ..ops.monarch import block_shapes
from .common import Imported, Shapes
from .tensors import find_weights, read_tensors, strip_prefix

WEIGHT_NAMES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
PREFIXES = ("base_model.model.", "module.")
FACTORS = ("blkdiag1", "blkdiag2")
#: Entries of their layer that change its output and have no moreft counterpart.
UNSUPPORTED = ("blkdiag_mult", "scaler")
#: Rules tried in order; MOREFT first so that a file it rebuilds exactly gets the default rule.
RULES = (BlockRule.MOREFT, BlockRule.OFFICIAL, BlockRule.OFFICIAL_INT)


def _nblocks_range(in_f: int, in_block: int) -> tuple[int, float]:
    """The ``N`` with ``ceil(in / N) == in_block``: ``[ceil(in / I), ceil(in / (I - 1)) - 1]``."""
    low = ceil_div(in_f, in_block)
    return low, math.inf if in_block == 1 else ceil_div(in_f, in_block - 1) - 1


def _fit(rule: BlockRule, found: dict[str, tuple[int, int, int]], shapes: Shapes, rank: int) -> int | None:
    """The ``nblocks`` that makes ``rule`` rebuild every layer's ``(N, I, O)`` exactly, or None."""
    high: float  # math.inf: no upper bound
    if rule is BlockRule.MOREFT:  # all N blocks kept: N is the file's, the same on every layer
        counts = {n for n, _, _ in found.values()}
        if len(counts) != 1:
            return None
        low = high = counts.pop()
    else:  # blocks dropped: any N with ceil(in / N) == I on every layer gives the same shapes
        low, high = 1, math.inf
        for module, (_, in_block, _) in found.items():
            lo, hi = _nblocks_range(shapes[module][1], in_block)
            low, high = max(low, lo), min(high, hi)
    if low > high:
        return None
    for module, got in found.items():
        out_f, in_f = shapes[module]
        if block_shapes(in_f, out_f, low, rule) != got:
            return None
        if rule is BlockRule.MOREFT and (low > in_f or rank > min(got[1], got[2])):
            return None
    return low


def read(path: str | os.PathLike, allow_bin: bool = False, modules_to_save: tuple[str, ...] = ()) -> Imported:
    """Read a checkpoint (a state-dict file, or a directory holding one) of the MoRe repository.

    Args:
        path: the file, or a directory with one of ``model.safetensors``, ``adapter_model.safetensors``,
            ``pytorch_model.bin``, ``adapter_model.bin``.
        allow_bin: read a pickle ``.bin`` (with ``torch.load(weights_only=True)``).
        modules_to_save: modules trained in full with the adapter (e.g. a classifier head); their
            tensors are taken from the checkpoint too.

    Raises:
        AdapterFileError: no factors, a layer with one factor only, factors whose shapes disagree,
            or entries moreft cannot express (``scaler``, ``blkdiag_mult``).
    """
    weights = find_weights(Path(path), WEIGHT_NAMES)
    tensors = {strip_prefix(k, PREFIXES): v for k, v in read_tensors(weights, allow_bin).items()}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf in FACTORS:
            layers.setdefault(module, {})[leaf] = value
    if not layers:
        raise AdapterFileError(f"{str(weights)!r} holds no <module>.blkdiag1 / <module>.blkdiag2 tensors")
    for module, factors in sorted(layers.items()):
        bad = [
            k
            for k in tensors
            if k.startswith(module + ".") and k[len(module) + 1 :].split(".")[0] in UNSUPPORTED
        ]
        if bad:
            raise AdapterFileError(
                f"{str(weights)!r}: {bad[0]!r}: the layer was trained with a scaler or a "
                "multiplicative factor, which a moreft MoRe adapter cannot express"
            )
        if set(factors) != set(FACTORS):
            raise AdapterFileError(
                f"{str(weights)!r}: {module} has {sorted(factors)} but needs both {list(FACTORS)}"
            )
        b1, b2 = factors["blkdiag1"], factors["blkdiag2"]
        if b1.dim() != 3 or b2.dim() != 3 or b1.shape[0] != b2.shape[0] or b1.shape[1] != b2.shape[2]:
            raise AdapterFileError(
                f"{str(weights)!r}: {module} has blkdiag1 {list(b1.shape)} and blkdiag2 "
                f"{list(b2.shape)}; they must be (N, r, I) and (N, O, r)"
            )
    ranks = sorted({f["blkdiag1"].shape[1] for f in layers.values()})
    if len(ranks) > 1:
        raise AdapterFileError(
            f"{str(weights)!r}: block ranks {ranks} differ between layers (their 'square' "
            "option); one moreft config has one block_rank"
        )
    saved_names = tuple(modules_to_save)
    extra = {
        k: v
        for k, v in tensors.items()
        if any(k.rpartition(".")[0] == s or k.rpartition(".")[0].endswith("." + s) for s in saved_names)
    }
    if saved_names and not extra:
        raise AdapterFileError(f"{str(weights)!r} holds no tensor of modules_to_save {list(saved_names)}")
    base_weights = {m: tensors[m + ".dense"] for m in layers if m + ".dense" in tensors}
    found = {
        m: (f["blkdiag1"].shape[0], f["blkdiag1"].shape[2], f["blkdiag2"].shape[1]) for m, f in layers.items()
    }
    rank = ranks[0]

    def resolve(shapes: Shapes) -> tuple[MoReConfig, list[str]]:
        for rule in RULES:
            nblocks = _fit(rule, found, shapes, rank)
            if nblocks is None:
                continue
            try:
                config = MoReConfig(
                    target_modules=tuple(sorted(layers)),
                    modules_to_save=list(saved_names),
                    nblocks=nblocks,
                    block_rank=rank,
                    block_rule=rule,
                )
            except ConfigError as exc:
                raise AdapterFileError(f"{str(weights)!r}: {exc}") from None
            shapes_seen = sorted(set(found.values()))
            return config, [
                (
                    f"block shapes (N, in_block, out_block) {shapes_seen} -> nblocks={nblocks}, "
                    f"block_rank={rank}, block_rule={rule.value}"
                )
            ]
        detail = "; ".join(
            f"{m} ({shapes[m][1]}->{shapes[m][0]}): {list(s)}" for m, s in sorted(found.items())[:4]
        )
        raise AdapterFileError(
            f"no nblocks and block rule (moreft, official, official-int) rebuild the file's block "
            f"shapes (N, I, O): {detail}; they were made for another base model or with an "
            "explicit blk_sz, which moreft cannot express"
        )

    ignored = len(tensors) - 2 * len(layers) - len(base_weights) - len(extra)
    notes = [
        f"read {weights.name}: {len(layers)} MoRe layers (<module>.blkdiag1/2 kept as they are)",
        (
            f"{len(base_weights)} frozen base weights (<module>.dense) read for comparison, "
            f"{ignored} other entries of the checkpoint ignored"
        ),
    ]
    if extra:
        notes.append(f"{len(extra)} tensors of modules_to_save {list(saved_names)} kept")
    return Imported(
        "sprocketlab-more",
        str(weights),
        {m: dict(f) for m, f in layers.items()},
        extra,
        resolve,
        notes,
        base_weights=base_weights,
    )
