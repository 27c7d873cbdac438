"""The public interface of an adapter layer (:class:`AdapterModule`), apart from its implementation."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class AdapterModule(Protocol):
    """What an adapter layer offers code outside moreft: a runtime-checkable Protocol, as in torchtune.

    Every :class:`AdapterLayer` satisfies it. moreft itself works with :class:`AdapterLayer`
    (``moreft.adapter_layers``, merging, saving); this Protocol is public API so that user code
    can annotate or ``isinstance``-check the interface without depending on that class.
    """

    base_layer: nn.Module
    merged: bool

    def delta_weight(self) -> Tensor: ...

    def adapter_params(self) -> dict[str, nn.Parameter]: ...

    def merge(self, safe: bool = False) -> None: ...

    def unmerge(self) -> None: ...
