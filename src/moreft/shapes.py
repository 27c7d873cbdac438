"""Sizes an adapter config implies, worked out on the ``meta`` device: nothing is allocated.

A config read from a file (or a recipe) may ask for a matrix no machine can hold, e.g. a MoRA
``rank`` of 10**9 implies a 10**5 x 10**5 square per layer. Building the layers on ``meta`` runs
every per-layer rule of the real layers (``nblocks <= in``, ``block_rank`` within a block,
``r_hat`` bounds) and yields the exact parameter shapes, which are then checked against a file's
header or the base model before anything real is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import nn

from .config import AdapterConfig
from .errors import ConfigError
from .layers import LAYER_CLASSES


def adapter_shapes(config: AdapterConfig, modules: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """``{"<module>.<param>": shape}`` of the adapter ``config`` puts on linear layers of ``(out, in)`` shapes.

    Raises:
        ConfigError: a hyperparameter does not fit a layer (the layer's own rule), or the sizes it
            implies cannot be represented at all.
    """
    layer_cls = LAYER_CLASSES[config.method]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (out_features, in_features) in modules.items():
        base = nn.Linear(in_features, out_features, bias=False, device="meta")
        try:
            layer = layer_cls(base, config, name=name)
        except ConfigError:
            raise
        except (RuntimeError, OverflowError, MemoryError, TypeError, ValueError) as exc:  # beyond int64
            raise ConfigError(
                f"{config.method.value} config implies impossible sizes on {name!r} "
                f"({in_features}->{out_features}): {str(exc).splitlines()[0]}"
            ) from None
        shapes.update({f"{name}.{p}": tuple(t.shape) for p, t in layer.adapter_state().items()})
    return shapes


def check_adapter_size(model: nn.Module, config: AdapterConfig, names: Sequence[str]) -> int:
    """Refuse an adapter with more parameters than the whole model it adapts; returns its parameter count.

    Such a config is always a mistake (a rank meant for another model), and building it could
    exhaust memory before any other check ran.

    Raises:
        ConfigError: the adapter would be larger than ``model``, or see :func:`adapter_shapes`.
    """
    from .layers import linear_shape

    modules = {n: linear_shape(model.get_submodule(n)) for n in names}
    count = sum(math.prod(shape) for shape in adapter_shapes(config, modules).values())
    total = sum(p.numel() for p in model.parameters())
    if count > total:
        raise ConfigError(
            f"this {config.method.value} config would give {count:,} adapter parameters on "
            f"{len(names)} layers of a model with {total:,}; an adapter larger than its base "
            "model is refused (a rank or r_hat too large for these layers?)"
        )
    return count
