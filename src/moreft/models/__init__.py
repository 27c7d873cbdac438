"""The base models a run fine-tunes: the packaged ones (MiniLM, SmolLM2 GGUF) and any local folder.

:mod:`.packaged` finds and loads models fully offline (converting SmolLM2's GGUF once into a cached
transformers folder); :mod:`.folder` checks a model folder before and while transformers reads it.
"""

from .packaged import (
    MARKER,
    MODELS,
    ModelSpec,
    cached_gguf_dir,
    convert_gguf,
    default_cache_dir,
    head_modules,
    load_model,
    minilm_dir,
    model_dir,
    smollm2_gguf,
)

__all__ = ["MARKER", "MODELS", "ModelSpec", "cached_gguf_dir", "convert_gguf", "default_cache_dir", "head_modules",
           "load_model",
           "minilm_dir", "model_dir", "smollm2_gguf"]
