"""The base models a run trains: the packaged ones (MiniLM, SmolLM2 GGUF), any local folder, and
LLaMA architectures with random weights for pretraining from scratch.

:mod:`.packaged` finds and loads models fully offline (:mod:`.gguf` converting SmolLM2's GGUF once
into a cached transformers folder); :mod:`.folder` checks a model folder before and while transformers reads it;
:mod:`.scratch` builds the from-scratch architectures (``llama-tiny``, ``llama-250m``).
"""

from .gguf import MARKER, cached_gguf_dir, convert_gguf
from .packaged import (
    MODELS,
    ModelSpec,
    default_cache_dir,
    head_modules,
    load_model,
    load_tokenizer,
    minilm_dir,
    model_dir,
    smollm2_gguf,
)
from .scratch import ARCHITECTURES, Architecture, build_random, init_digest
from .skeleton import model_skeleton

__all__ = [
    "ARCHITECTURES",
    "MARKER",
    "MODELS",
    "Architecture",
    "ModelSpec",
    "build_random",
    "cached_gguf_dir",
    "convert_gguf",
    "default_cache_dir",
    "head_modules",
    "init_digest",
    "load_model",
    "load_tokenizer",
    "minilm_dir",
    "model_dir",
    "model_skeleton",
    "smollm2_gguf",
]
