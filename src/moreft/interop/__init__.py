"""Adapters trained with the papers' own code, loaded exactly and converted to moreft's format.

* ``kongds-mora``: the MoRA authors' peft fork (kongds/MoRA), ``adapter_config.json`` with
  ``use_mora`` / ``mora_type`` and the square matrices as ``lora_A.weight``.
* ``sprocketlab-more``: checkpoints of the MoRe authors' code (SprocketLab/sparse_matrix_fine_tuning),
  ``<module>.blkdiag1`` / ``<module>.blkdiag2`` per layer.

Usage::

    moreft.interop.load_official(model, "kongds-mora", "path/to/adapter")   # onto a base model
    moreft.interop.convert("sprocketlab-more", "ckpt/", "out/", base="my-model/")  # to a moreft adapter

See docs/interop.md for what each option reproduces.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..config import coerce_enum
from ..errors import ConfigError
from . import kongds_mora, sprocketlab_more
from .apply import ImportReport, convert_imported, load_imported
from .common import Imported


class Source(str, enum.Enum):
    """The foreign formats moreft reads."""

    KONGDS_MORA = "kongds-mora"
    SPROCKETLAB_MORE = "sprocketlab-more"


def read(
    source: Source | str,
    path: str | os.PathLike,
    allow_bin: bool = False,
    modules_to_save: tuple[str, ...] = (),
) -> Imported:
    """Read a foreign adapter file (see :class:`Source`), not yet tied to a model.

    Raises:
        ConfigError: unknown ``source``, or ``modules_to_save`` for kongds-mora (its config names them).
        AdapterFileError: see the format's ``read``.
    """
    source = coerce_enum(Source, source, "source")
    if source is Source.KONGDS_MORA:
        if modules_to_save:
            raise ConfigError(
                "modules_to_save cannot be given for kongds-mora: its adapter_config.json names them"
            )
        return kongds_mora.read(path, allow_bin)
    return sprocketlab_more.read(path, allow_bin, tuple(modules_to_save))


def load_official(
    model: nn.Module,
    source: Source | str,
    path: str | os.PathLike,
    allow_bin: bool = False,
    modules_to_save: tuple[str, ...] = (),
) -> ImportReport:
    """Inject and load a foreign adapter into ``model`` (outputs equal to the authors' code's).

    Raises:
        ConfigError, AdapterFileError: see :func:`read` and :func:`moreft.interop.apply.load_imported`.
    """
    return load_imported(model, read(source, path, allow_bin, modules_to_save))


def convert(
    source: Source | str,
    path: str | os.PathLike,
    out: str | os.PathLike,
    base: str | os.PathLike | None = None,
    allow_bin: bool = False,
    modules_to_save: tuple[str, ...] = (),
    resolve: Callable[[str], Path] | None = None,
) -> ImportReport:
    """Write a foreign adapter as a moreft adapter directory (``moreft.load_adapter`` reads it).

    Only the base model's ``config.json`` is read (its layers are built on the ``meta`` device).
    ``base`` (default: the base the file names) is a local model directory, or anything ``resolve``
    maps to one (``moreft convert`` passes :func:`moreft.models.model_dir`).

    Raises:
        ConfigError, AdapterFileError: see :func:`read` and :func:`moreft.interop.apply.convert_imported`.
    """
    return convert_imported(read(source, path, allow_bin, modules_to_save), out, base, resolve)


__all__ = ["ImportReport", "Imported", "Source", "convert", "load_official", "read"]
