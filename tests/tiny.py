"""A tiny BERT classifier on disk and `moreft train` command lines for the run-level tests.

Used by test_crash, test_distributed, test_bad_inputs and test_precision (imported as ``from tiny import ...``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

#: Every subprocess gets the same environment: one thread (bit-stable maths) and no hub access.
SUBPROCESS_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}


def make_tiny_bert(path: Path, dropout: float = 0.0) -> str:
    """Save a 2-layer, 32-wide BERT classifier (random weights, seed 0) with MiniLM's tokenizer to ``path``."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from moreft.models import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def train_flags(model: str, out: Path, **flags: object) -> list[str]:
    """``moreft train`` flags for a short sentiment run on ``model``; ``flags`` add or override (``None`` drops)."""
    base: dict[str, object] = {
        "task": "sentiment",
        "model": model,
        "method": "more",
        "block_rank": 2,
        "max_steps": 4,
        "batch_size": 8,
        "max_examples": 120,
        "eval_examples": 4,
        "max_length": 32,
        "lr": 1e-2,
        "log_every": 1,
        "output_dir": str(out),
    }
    base.update(flags)
    argv = ["train", "--no-progress"]
    for key, value in base.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def free_port() -> int:
    """A TCP port free on this machine now: each distributed launch gets its own, so launches that run side
    by side (or another job on the machine) never meet on the launchers' default 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def moreft_command(*argv: str) -> list[str]:
    """``python -m moreft ARGV`` with this interpreter."""
    return [sys.executable, "-m", "moreft", *argv]


def make_char_llama(path: Path, tie: bool = True) -> str:
    """Save a 2-layer, 32-wide Llama causal LM (random weights, seed 0) with a character-level tokenizer
    (printable ASCII, BOS/EOS/pad) to ``path``: fast to tokenise and to train on a few documents."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)
