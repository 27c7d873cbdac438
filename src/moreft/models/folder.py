"""Checking a local model folder before and while transformers loads it, with errors that name the folder.

transformers reports a broken folder with whatever its readers raise (``OSError``, ``TypeError``,
``SafetensorError``, a "size mismatch" ``RuntimeError``); :func:`model_dir_errors` turns each into one
:class:`~moreft.errors.ConfigError` naming the folder and the problem. :func:`check_size_fits_weights`
builds the model on the ``meta`` device first, so a ``config.json`` that implies far more parameters
than the weights files hold (``intermediate_size: 10**9``) is refused before any memory is allocated.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moreft.errors import ConfigError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: config.json of a model is a few KB; anything this large is not one.
MAX_MODEL_CONFIG_BYTES = 16 * 2**20


def check_model_dir(path: Path) -> None:
    """Check a model folder before transformers reads it: a ``config.json`` object naming its
    ``model_type``, and a weights file.

    Raises:
        ConfigError: naming the folder and what is wrong with it.
    """
    config_file = path / "config.json"
    try:
        size = config_file.stat().st_size
        if size > MAX_MODEL_CONFIG_BYTES:
            raise ConfigError(
                f"model folder {str(path)!r}: config.json is {size:,} bytes, not a model config"
            )
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"model folder {str(path)!r}: config.json cannot be read ({exc.strerror or exc})"
        ) from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON
        raise ConfigError(
            f"model folder {str(path)!r}: config.json is not valid JSON ({str(exc)[:200]})"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(
            f"model folder {str(path)!r}: config.json must be a JSON object with a 'model_type' "
            "(as save_pretrained writes it)"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"model folder {str(path)!r} has no weights: none of {list(WEIGHT_FILES)}")


def _saved_labels(path: Path) -> str:
    """The number of labels a saved classifier's config.json names (``?`` when it names none)."""
    try:
        config = json.loads((path / "config.json").read_bytes().decode("utf-8"))
        return str(len(config.get("id2label") or {}) or config.get("num_labels") or "?")
    except (OSError, ValueError, AttributeError):
        return "?"


@contextlib.contextmanager
def model_dir_errors(path: Path, num_labels: int | None) -> Iterator[None]:
    """Turn transformers' errors on a broken model folder into one clear :class:`ConfigError`."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers/safetensors/tokenizers raise many types here
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        if "mismatch" in text.lower() and num_labels is not None:
            raise ConfigError(
                f"model folder {str(path)!r} holds a classifier for {_saved_labels(path)} labels; this "
                f"task has {num_labels}. Train on the base model (without the head), or use a task "
                "with the same labels"
            ) from None
        raise ConfigError(
            f"model folder {str(path)!r} cannot be loaded ({type(exc).__name__}: {text}); its "
            "weights or tokenizer files are missing, truncated or of another model"
        ) from None


#: Parameters a model may have beyond one per byte of its weights files (a new task head, tied weights).
HEAD_SLACK_PARAMS = 10_000_000


def check_size_fits_weights(path: Path, auto: Any, extra: dict[str, Any]) -> None:
    """Refuse a config that implies more parameters than its weights files could hold (1 byte each at least).

    Raises:
        ConfigError: The config implies ``N`` parameters and the folder's weights hold far fewer bytes.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, **extra)
    with torch.device("meta"):
        model = auto.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    stored = sum(
        f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin")
    )
    if params > stored + HEAD_SLACK_PARAMS:
        raise ConfigError(
            f"model folder {str(path)!r}: config.json implies {params:,} parameters but the weights "
            f"files hold {stored:,} bytes; the config is not the one the weights were saved with"
        )
