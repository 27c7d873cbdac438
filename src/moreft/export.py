"""Export any moreft adapter as an HF peft LoRA directory, servable wherever LoRA is.

MoRe is exactly a LoRA of rank ``nblocks * block_rank``: ``A`` is the block-diagonal
``blkdiag1`` and ``B = P1·blkdiag2·P2`` (:func:`moreft.ops.monarch.fold_factors`), so the export is
lossless. Its variants are exact LoRAs too (:meth:`moreft.MoReLinear.lora_factors`): the output
scale goes into ``B``, the principal init's frozen product is a second term (rank ``2 * nblocks *
block_rank``), and the multiplicative ``c·M·W`` is ``(c·B) @ (A·W)``, relative to the base weight
it was exported from. LoRA exports itself. MoRA is high rank, so it is exported by truncated SVD of its
``ΔW`` at a chosen rank, and the relative Frobenius error of each layer is reported
(:class:`ExportReport`). A lossy export is refused unless the caller asked for it: a ``rank``
(accept the loss at that rank) or a ``tolerance`` (accept a relative error up to it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .adapter_files import CONFIG_NAME, WEIGHTS_NAME, base_model_name
from .config import AdapterConfig, InitMode, LoRAConfig, Method, MoRAConfig, MoReConfig
from .errors import AdapterFileError, ConfigError, ExportError
from .inject import adapter_config, adapter_layers, modules_to_save_names
from .layers import AdapterLayer, LoRALinear, MoReLinear, is_conv1d, linear_shape
from .safe_write import FolderKind, atomic_dir_write
from .version import __version__

#: safetensors metadata key that marks an export as moreft's (peft ignores it).
EXPORT_MARK = "moreft_export"


def _export_names(folder: Path) -> set[str] | None:
    """The files an export holds, when ``folder``'s weights carry moreft's export mark; else None."""
    weights = folder / WEIGHTS_NAME
    if weights.is_symlink() or not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as f:
            marked = EXPORT_MARK in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - safetensors raises its own error types for files that are not its own
        return None
    return {WEIGHTS_NAME, CONFIG_NAME} if marked else None


#: What :func:`export_lora` may replace: a folder holding only an export it wrote.
EXPORT_KIND = FolderKind("peft LoRA export", _export_names)

#: The largest relative error an export still counts as exact (float rounding of the SVD factors).
EXACT_ERROR = 1e-6


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_lora` wrote.

    Attributes:
        path: the peft adapter directory.
        rank: the LoRA rank ``r`` written (``lora_alpha == r``, so scaling is 1).
        relative_errors: per layer, ``||ΔW - B·A||_F / ||ΔW||_F`` (0 for exact exports).
    """

    path: Path
    rank: int
    relative_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)

    @property
    def exact(self) -> bool:
        """Every layer's ``B·A`` equals its ``ΔW`` up to rounding (relative error <= :data:`EXACT_ERROR`)."""
        return self.max_relative_error <= EXACT_ERROR

    def summary(self) -> str:
        """One line in words: the rank, exact or lossy, and the per-layer relative errors (max, median, min)."""
        head = f"LoRA export of {len(self.relative_errors)} layers at rank {self.rank}"
        if self.exact:
            return f"{head}: exact (relative Frobenius error <= {EXACT_ERROR:g} on every layer)"
        ranked = sorted(self.relative_errors.items(), key=lambda kv: kv[1])
        (low, lo), (high, hi) = ranked[0], ranked[-1]
        median = ranked[len(ranked) // 2][1]
        return (
            f"{head}: lossy, relative Frobenius error ||ΔW - B·A|| / ||ΔW|| per layer: max {hi:.3g} "
            f"({high}), median {median:.3g}, min {lo:.3g} ({low})"
        )


def export_rank(config: AdapterConfig, rank: int | None) -> int:
    """The LoRA rank an export of ``config`` uses (exact for MoRe/LoRA, chosen for MoRA).

    Raises:
        ConfigError: a ``rank`` for a lossless method that differs from its exact rank.
    """
    if isinstance(config, MoRAConfig):
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"rank={rank!r} must be an integer >= 1")
        return rank if rank is not None else config.rank
    if isinstance(config, MoReConfig):
        natural = config.nblocks * config.block_rank * (2 if config.init_mode is InitMode.PRINCIPAL else 1)
    elif isinstance(config, LoRAConfig):
        natural = config.rank
    else:
        raise TypeError(f"{type(config).__name__} is not a moreft adapter config")
    if rank not in (None, natural):
        raise ConfigError(
            f"rank={rank} cannot be used to export {config.method.value}: its exact LoRA rank is {natural}"
        )
    return natural


def check_tolerance(tolerance: float | None) -> None:
    """Raise unless ``tolerance`` is None or a finite number >= 0.

    Raises:
        ConfigError: names the value and the rule.
    """
    if tolerance is None:
        return
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float))
        or not math.isfinite(tolerance)
        or tolerance < 0
    ):
        raise ConfigError(
            f"tolerance={tolerance!r} must be a finite number >= 0 (the largest relative "
            "Frobenius error ||ΔW - B·A|| / ||ΔW|| accepted per layer)"
        )


def accept_loss(report: ExportReport, rank: int | None, tolerance: float | None, exact_rank: int) -> None:
    """Raise unless ``report``'s loss was accepted: exact, within ``tolerance``, or a ``rank`` was asked for.

    Args:
        report: The export about to be written.
        rank: The rank the caller asked for (None: the config's).
        tolerance: The largest relative error the caller accepts (None: none asked for).
        exact_rank: A rank at which the export is exact, named in the message.

    Raises:
        ExportError: the error is above ``tolerance``, or the export is lossy and neither ``rank``
            nor ``tolerance`` was given.
    """
    if report.exact:  # rounding of the factors is not a loss, whatever the tolerance
        return
    if tolerance is not None:
        if report.max_relative_error <= tolerance:
            return
        raise ExportError(
            f"{report.summary()}: more than tolerance={tolerance:g}. Export at a higher rank "
            f"(rank={exact_rank} is exact; CLI --rank) or accept a larger tolerance; nothing was written"
        )
    if rank is not None:
        return
    raise ExportError(
        f"{report.summary()}. A MoRA adapter is high rank, so a LoRA of rank {report.rank} "
        f"loses part of it: pass rank=R to accept the loss at rank R (rank={exact_rank} is exact) "
        "or tolerance=T to accept a relative error up to T (CLI: --rank / --tolerance); "
        "nothing was written"
    )


def lora_factors(layer: AdapterLayer, rank: int) -> tuple[Tensor, Tensor, float]:
    """``(A (rank, in), B (out, rank), relative error)`` with ``B @ A`` approximating ``ΔW``."""
    with torch.no_grad():
        if isinstance(layer, MoReLinear):
            a, b = layer.lora_factors()
            if a.shape[0] < rank:  # block_rule "official" dropped fully padded blocks: zero rank-1 terms
                a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
                b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
            return a, b, 0.0
        if isinstance(layer, LoRALinear):
            return layer.lora_A, layer.lora_B * layer.scaling, 0.0
        delta = layer.delta_weight().double()  # (out, in)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel())
        b = u[:, :k] * s[:k]  # (out, k)
        a = vh[:k]  # (k, in)
        norm = torch.linalg.matrix_norm(delta)
        err = float(torch.linalg.matrix_norm(delta - b @ a) / norm) if norm > 0 else 0.0
        if k < rank:  # a thin layer: pad with zero rank-1 terms so every layer has the same r
            a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        return a.to(layer.weight_dtype), b.to(layer.weight_dtype), err


def export_lora(
    model: nn.Module, path: str | os.PathLike, rank: int | None = None, tolerance: float | None = None
) -> ExportReport:
    """Write ``model``'s adapter as a peft LoRA directory that ``PeftModel.from_pretrained`` loads.

    MoRe and LoRA export exactly. A MoRA export is a truncated SVD; when it is not exact
    (:attr:`ExportReport.exact`) it is written only if the caller accepted the loss: by asking for
    a ``rank``, or by a ``tolerance`` the largest per-layer relative error stays within.

    Args:
        model: a model carrying a moreft adapter.
        path: output directory (written atomically). It may be missing, empty, or an earlier
            export (replaced); a link to a folder is written through.
        rank: LoRA rank for a MoRA export (default: the config's ``rank``); MoRe and LoRA
            export at their exact rank. Asking for a rank accepts the loss at that rank.
        tolerance: the largest relative Frobenius error ``||ΔW - B·A|| / ||ΔW||`` accepted on any
            layer (checked whether or not ``rank`` is given).

    Returns:
        An :class:`ExportReport` with the per-layer relative error (``summary()`` says it in words).

    Raises:
        AdapterFileError: ``model`` has no adapter, or mixes Linear and Conv1D targets
            (peft's ``fan_in_fan_out`` is one flag per adapter).
        ConfigError: a bad ``rank`` or ``tolerance``, or a rank above every layer's ``min(out, in)``.
        ExportError: the export is lossy and above ``tolerance``, or lossy with neither ``rank`` nor
            ``tolerance`` given (nothing is written).
        OutputError: ``path`` is a file, or a non-empty folder that is not an earlier export
            (nothing is written).
    """
    config = adapter_config(model)
    layers = adapter_layers(model)
    if config is None or not layers:
        raise AdapterFileError("model carries no moreft adapter to export; call moreft.inject first")
    if any(layer.merged for layer in layers.values()):
        raise AdapterFileError("some adapter layers are merged; unmerge them before exporting")
    r = export_rank(config, rank)
    check_tolerance(tolerance)
    widest = max(min(linear_shape(layer.base_layer)) for layer in layers.values())
    if config.method is Method.MORA and r > widest:  # every layer would get zero rank-1 terms only
        raise ConfigError(
            f"rank={r} is more than any adapted layer can hold: min(out_features, in_features) is "
            f"at most {widest} over the {len(layers)} layers; export at rank <= {widest}"
        )
    fan_in_fan_out = {is_conv1d(layer.base_layer) for layer in layers.values()}
    if len(fan_in_fan_out) > 1:
        raise AdapterFileError("cannot export a mix of Linear and Conv1D targets as one peft adapter")
    tensors: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    for name, layer in layers.items():
        a, b, errors[name] = lora_factors(layer, r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    saved = modules_to_save_names(model, config)
    for n in saved:
        for p, t in model.get_submodule(n).named_parameters():
            tensors[f"base_model.model.{n}.{p}"] = t.detach().cpu().contiguous()
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "target_modules": sorted(layers),
        "fan_in_fan_out": fan_in_fan_out.pop(),
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) or None,
        "init_lora_weights": True,
        "base_model_name_or_path": base_model_name(model),
        "inference_mode": True,
    }
    out = Path(path)
    report = ExportReport(out, r, errors)
    accept_loss(report, rank, tolerance, widest)
    mark = {"format": "pt", EXPORT_MARK: __version__}
    atomic_dir_write(
        out,
        {
            WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata=mark),
            CONFIG_NAME: lambda p: p.write_text(json.dumps(peft_config, indent=2) + "\n"),
        },
        EXPORT_KIND,
    )
    return report
