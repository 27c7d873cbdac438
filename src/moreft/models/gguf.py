"""Converting a GGUF causal LM once into a float32 safetensors folder, cached and written atomically.

transformers dequantises a GGUF file on every load, which is slow; :func:`cached_gguf_dir` converts it
once (:func:`convert_gguf`, through :func:`moreft.safe_write.write_folder`) and marks the folder with
:data:`MARKER` naming the source, so later loads read the folder. :mod:`.packaged` resolves model names
to these folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moreft.safe_write import FolderKind, writable_folder, write_folder

logger = logging.getLogger(__name__)
MARKER = "moreft_gguf_source.json"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars; exceptions still propagate."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _source_record(gguf_path: Path) -> dict[str, Any]:
    return {"gguf_file": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size, "dtype": "float32"}


def _is_cached(out_dir: Path, gguf_path: Path) -> bool:
    try:
        return json.loads((out_dir / MARKER).read_text()) == _source_record(gguf_path)
    except (OSError, ValueError):
        return False


def _dequantize_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Load a GGUF causal LM with transformers, dequantised to dense float32 ``nn.Linear`` weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("converting %s to safetensors once (~40 s on 2 CPU cores)", gguf_path)
    with _quiet_transformers():
        kw = {"gguf_file": gguf_path.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kw
        )
    packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:
        raise RuntimeError(f"{gguf_path}: transformers kept {len(packed)} modules packed ({packed[:3]}...)")
    if getattr(model, "hf_quantizer", None) is not None:  # weights are dense; drop the GGUF tag
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def _conversion_names(folder: Path) -> set[str] | None:
    """Every entry of ``folder`` when it holds :data:`MARKER` (an earlier conversion by moreft), else None."""
    return set(os.listdir(folder)) if (folder / MARKER).is_file() else None


#: What :func:`convert_gguf` may replace: an earlier conversion (a folder with :data:`MARKER`) or an empty folder.
GGUF_KIND = FolderKind("GGUF conversion", _conversion_names)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM to a float32 safetensors directory, atomically.

    The model and tokenizer are written with a marker file naming the source (file name and size)
    through :func:`moreft.safe_write.write_folder` (a temp sibling swapped in, replacing a stale
    conversion). If another process finished the same conversion first, its directory is kept.

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: Directory to create.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: If ``gguf_path`` does not exist.
        RuntimeError: If transformers kept some weights packed in GGUF blocks.
        OutputError: ``out_dir`` exists and is not an earlier conversion (nothing is written).
    """
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    writable_folder(out_dir, GGUF_KIND)  # refuse before the slow dequantisation
    model, tokenizer = _dequantize_gguf(gguf_path)
    if _is_cached(out_dir, gguf_path):  # a concurrent conversion finished first
        return out_dir

    def fill(tmp: Path) -> None:
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(_source_record(gguf_path), indent=2))

    write_folder(out_dir, fill, GGUF_KIND)
    return out_dir


def cached_gguf_dir(gguf_path: Path, out_dir: Path) -> Path:
    """``out_dir`` holding the conversion of ``gguf_path``, converting it first if needed.

    Raises:
        FileNotFoundError: If ``gguf_path`` does not exist.
        RuntimeError: If the conversion fails.
    """
    return out_dir if _is_cached(out_dir, gguf_path) else convert_gguf(gguf_path, out_dir)
