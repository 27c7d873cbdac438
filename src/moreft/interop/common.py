"""What a reader of the authors' files hands to :mod:`moreft.interop.apply`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from ..config import AdapterConfig

#: ``{module name: (out_features, in_features)}`` of the base model's adapted layers.
Shapes = Mapping[str, tuple[int, int]]


@dataclass
class Imported:
    """An adapter read from a foreign file, not yet tied to a base model.

    Attributes:
        source: the format's name (``kongds-mora``, ``sprocketlab-more``).
        path: the file the tensors came from.
        layers: ``{module: {moreft parameter name: tensor}}`` for each adapted linear layer.
        extra: other trained tensors moreft keeps (``modules_to_save``), ``{"<module>.<param>": tensor}``.
        resolve: given the base model's layer shapes, the moreft config that builds exactly these
            tensors, and lines saying which options were chosen and why (raises ``AdapterFileError``
            when no config can).
        notes: what the reader did (key mapping, ignored entries).
        base_model: the base model the file names, if any.
        base_weights: ``{module: weight}`` the file carries for the base layers (MoRe's ``dense``).
    """

    source: str
    path: str
    layers: dict[str, dict[str, Tensor]]
    extra: dict[str, Tensor]
    resolve: Callable[[Shapes], tuple[AdapterConfig, list[str]]]
    notes: list[str] = field(default_factory=list)
    base_model: str | None = None
    base_weights: dict[str, Tensor] = field(default_factory=dict)
