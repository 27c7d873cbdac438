"""Adapters saved by the MoRA authors' peft fork (kongds/MoRA, ``peft-mora``, peft 0.9).

Their ``save_pretrained`` writes a peft LoRA directory: ``adapter_config.json`` with ``use_mora``,
``mora_type`` and ``r``, and ``adapter_model.safetensors`` (or ``.bin``) with, per adapted layer,
``base_model.model.<module>.lora_A.weight``: the square ``r̂ x r̂`` matrix (``lora_A`` is an
``nn.Linear(r̂, r̂)`` and ``lora_B`` is the same module, so ``lora_B.weight`` repeats it). See
``LoraLayer.update_layer`` in their ``peft-mora/src/peft/tuners/lora/layer.py``.

``mora_type`` maps to moreft as 1: SHARING strided/strided, 2: adjacent/adjacent, 3: adjacent in /
strided out, 4: strided in / adjacent out, 6: ROTATION; with ``r_hat_rounding="round"`` and
``cap_r_hat=False`` (their r̂ rule).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..config import MoRAConfig, MoRAOperator, RHatRounding, SharingLayout
from ..errors import AdapterFileError, ConfigError
from ..ops.mora import square_size
from .common import Imported, Shapes
from .tensors import find_weights, read_json, read_tensors, strip_prefix

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIXES = ("base_model.model.",)
_S, _A = SharingLayout.STRIDED, SharingLayout.ADJACENT
#: mora_type -> (operator, input grouping, output grouping): ``_apply_mora``'s branches.
MORA_TYPES = {
    1: (MoRAOperator.SHARING, _S, _S),
    2: (MoRAOperator.SHARING, _A, _A),
    3: (MoRAOperator.SHARING, _A, _S),
    4: (MoRAOperator.SHARING, _S, _A),
    6: (MoRAOperator.ROTATION, _S, _S),
}
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


def _settings(config: dict, where: str) -> tuple[int, int, float]:
    """``(r, mora_type, dropout)`` from their ``adapter_config.json``, refusing what moreft cannot express."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(
            f"{where}: peft_type={config.get('peft_type')!r}; the MoRA fork saves peft_type 'LORA'"
        )
    if config.get("use_mora") is not True:
        raise AdapterFileError(
            f"{where}: use_mora={config.get('use_mora')!r}, so this is a plain LoRA adapter, "
            "not MoRA; load it with peft (PeftModel.from_pretrained)"
        )
    mora_type = config.get("mora_type", 1)
    if mora_type not in MORA_TYPES:
        raise AdapterFileError(
            f"{where}: mora_type={mora_type!r} is not one the authors' forward runs "
            f"(_apply_mora handles {sorted(MORA_TYPES)})"
        )
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterFileError(f"{where}: r={r!r} must be an integer >= 1")
    for key, what in (("use_dora", "DoRA"), ("rank_pattern", "per-layer ranks (rank_pattern)")):
        if config.get(key):
            raise AdapterFileError(
                f"{where}: {key}={config[key]!r}: {what} cannot be expressed by a moreft MoRA adapter"
            )
    if config.get("bias", "none") != "none":
        raise AdapterFileError(
            f"{where}: bias={config['bias']!r} trains base-layer biases, which a moreft adapter "
            "does not hold; only bias='none' converts"
        )
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterFileError(f"{where}: lora_dropout={dropout!r} must be a number in [0, 1)")
    return r, mora_type, float(dropout)


def _modules_to_save(config: dict, where: str) -> tuple[str, ...]:
    names = config.get("modules_to_save") or ()
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise AdapterFileError(f"{where}: modules_to_save={names!r} must be a list of module names")
    return tuple(names)


def read(path: str | os.PathLike, allow_bin: bool = False) -> Imported:
    """Read an adapter directory written by the MoRA fork.

    Raises:
        AdapterFileError: not such a directory, a setting moreft cannot express (DoRA, per-layer
            ranks, trained biases, a ``mora_type`` without a forward), a non-square or mismatched
            ``lora_A``/``lora_B``, or a key that is neither an adapter nor a ``modules_to_save`` tensor.
    """
    path = Path(path)
    where = str(path / CONFIG_NAME)
    config = read_json(path / CONFIG_NAME)
    r, mora_type, dropout = _settings(config, where)
    saved = _modules_to_save(config, where)
    weights = find_weights(path, WEIGHT_NAMES)
    tensors = read_tensors(weights, allow_bin)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = strip_prefix(key, PREFIXES)
        match = _LORA_KEY.fullmatch(name)
        if match:
            pairs.setdefault(match["module"], {})[match["ab"]] = value
            continue
        name = name.replace(".modules_to_save", "")
        module = name.rsplit(".", 1)[0]
        if any(module == s or module.endswith("." + s) for s in saved):
            extra[name] = value
            continue
        raise AdapterFileError(
            f"{str(weights)!r}: key {key!r} is neither a MoRA matrix (<module>.lora_A.weight) nor "
            f"a tensor of modules_to_save {list(saved)}"
        )
    for module, ab in sorted(pairs.items()):
        a = ab["A"] if "A" in ab else ab["B"]  # a pair holds A, B or both
        if a.dim() != 2 or a.shape[0] != a.shape[1]:
            raise AdapterFileError(
                f"{str(weights)!r}: {module}.lora_A.weight has shape {list(a.shape)}; a MoRA "
                "matrix is square (r_hat x r_hat)"
            )
        if "B" in ab and "A" in ab and not torch.equal(ab["A"], ab["B"]):
            raise AdapterFileError(
                f"{str(weights)!r}: {module}.lora_B.weight differs from lora_A.weight; in the "
                "MoRA fork they are one module, so this file is not a MoRA adapter"
            )
        layers[module] = {"matrix": a}
    if not layers:
        raise AdapterFileError(f"{str(weights)!r} holds no <module>.lora_A.weight tensor")
    operator, layout_in, layout_out = MORA_TYPES[mora_type]

    def resolve(shapes: Shapes) -> tuple[MoRAConfig, list[str]]:
        for module, tensors_of in layers.items():
            out_f, in_f = shapes[module]
            expected = square_size(in_f, out_f, r, RHatRounding.ROUND)
            got = tensors_of["matrix"].shape[0]
            if got != expected:
                raise AdapterFileError(
                    f"{module}: the file's square is {got}x{got} but the authors' rule "
                    f"int(sqrt(({in_f} + {out_f}) * {r}) + 0.5) gives {expected}; the file was "
                    "made for another base model or with per-layer ranks"
                )
            if operator is MoRAOperator.ROTATION and got % 2:
                raise AdapterFileError(
                    f"{module}: r_hat={got} is odd; mora_type 6 rotates pairs of coordinates "
                    "and the authors' code cannot run it, so neither can moreft"
                )
        try:
            ours = MoRAConfig(
                target_modules=tuple(sorted(layers)),
                modules_to_save=list(saved),
                dropout=dropout,
                rank=r,
                operator=operator,
                sharing_layout=layout_in,
                sharing_output_layout=None if layout_out is layout_in else layout_out,
                r_hat_rounding=RHatRounding.ROUND,
                cap_r_hat=False,
            )
        except ConfigError as exc:
            raise AdapterFileError(f"{where}: {exc}") from None
        lines = [
            f"mora_type={mora_type} -> operator={operator.value}, sharing_layout={layout_in.value}"
            + (f", sharing_output_layout={layout_out.value}" if layout_out is not layout_in else ""),
            f"r={r} -> rank={r}, r_hat_rounding=round (int(sqrt((in+out)*r)+0.5)), cap_r_hat=false",
        ]
        return ours, lines

    notes = [
        f"read {weights.name}: {len(layers)} MoRA matrices (<module>.lora_A.weight -> <module>.matrix)"
        + (f", {len(extra)} modules_to_save tensors" if extra else "")
    ]
    if any("B" in ab for ab in pairs.values()):
        notes.append(
            "lora_B.weight repeats lora_A.weight (one module in the fork): checked equal, not stored twice"
        )
    base = config.get("base_model_name_or_path")
    return Imported(
        "kongds-mora",
        str(weights),
        layers,
        extra,
        resolve,
        notes,
        base_model=base if isinstance(base, str) and base else None,
    )
