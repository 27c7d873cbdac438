"""Adapter layers: each wraps a linear base layer and is defined by ``delta_weight()``."""

from ..config import Method
from .base import AdapterLayer
from .linear import is_conv1d, is_linear, linear_shape
from .lora import LoRALinear
from .mora import MoRALinear, resolve_r_hat
from .more import MoReLinear
from .protocol import AdapterModule

LAYER_CLASSES: dict[Method, type[AdapterLayer]] = {
    Method.MORE: MoReLinear,
    Method.MORA: MoRALinear,
    Method.LORA: LoRALinear,
}

__all__ = [
    "LAYER_CLASSES",
    "AdapterLayer",
    "AdapterModule",
    "LoRALinear",
    "MoRALinear",
    "MoReLinear",
    "is_conv1d",
    "is_linear",
    "linear_shape",
    "resolve_r_hat",
]
