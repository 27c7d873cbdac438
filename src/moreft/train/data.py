"""Turning task examples into model inputs: tokenization, label masking, padding collators.

Classification: ``text`` (or a text pair) ``-> input_ids`` truncated to ``max_length``, the label id
in ``labels``.

Generation (causal LM): ``prompt + answer + eos`` with the prompt tokens' labels set to -100, so
the loss is on the answer only. Prompt and answer are tokenized separately (the answer keeps its
leading space), so the label boundary is exact; an over-long example loses prompt tokens from the
left first, so the answer is kept.

Language modelling (pretraining): documents are tokenized, each followed by the EOS token, joined into
one stream and cut into blocks of ``max_length`` tokens (:func:`encode_blocks`); every token is a
label. The blocks are one int32 tensor, so a corpus of billions of tokens costs 4 bytes a token.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from moreft.errors import ConfigError
from moreft.tasks import Document, PairExample, PromptExample, TextExample

IGNORE_INDEX = -100


class ListDataset(Dataset):
    """A list of feature dicts as a torch ``Dataset``."""

    def __init__(self, items: Sequence[dict[str, Any]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


#: Cap on the characters one token may stand for when clipping text (a vocabulary's longest entry, at most this).
MAX_TOKEN_CHARS = 1024
_TOKEN_CHARS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def char_budget(tokenizer: Any, max_length: int) -> int:
    """Characters of text that can hold ``max_length`` tokens: ``max_length`` x the longest vocabulary entry.

    Text is clipped to this before tokenising, so a 5 MB line costs a few KB, not a tokenisation of
    all of it; the first ``max_length`` tokens are those of the whole text (a word longer than the
    clip, which a WordPiece tokenizer reads as one ``[UNK]``, is the exception).
    """
    try:
        longest = _TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
        longest = min(max((len(t) for t in vocab), default=MAX_TOKEN_CHARS), MAX_TOKEN_CHARS)
        with contextlib.suppress(TypeError):  # not weak-referenceable: recomputed next time
            _TOKEN_CHARS[tokenizer] = longest
    return max_length * max(longest, 1) + 16


def encode_classification(examples: Sequence[TextExample], tokenizer: Any, max_length: int) -> ListDataset:
    """Tokenize classification examples (no padding; the collator pads per batch).

    Sentence pairs (:class:`moreft.tasks.PairExample`) are encoded as the tokenizer's two segments,
    truncating the longer one first. Each text is first clipped to :func:`char_budget` characters.
    """
    budget = char_budget(tokenizer, max_length)
    texts = [ex.text[:budget] for ex in examples]
    if examples and all(isinstance(ex, PairExample) for ex in examples):
        enc = tokenizer(
            texts,
            [ex.text_pair[:budget] for ex in examples],
            truncation="longest_first",
            max_length=max_length,
        )
    else:
        enc = tokenizer(texts, truncation=True, max_length=max_length)
    items = [
        {"input_ids": ids, "labels": ex.label} for ids, ex in zip(enc["input_ids"], examples, strict=True)
    ]
    if examples and isinstance(examples[0], PairExample) and "token_type_ids" in enc:  # BERT's segment ids
        for item, types in zip(items, enc["token_type_ids"], strict=True):
            item["token_type_ids"] = types
    return ListDataset(items)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's usual special tokens (e.g. BOS) in front."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if (
        ids
        and tokenizer.eos_token_id is not None
        and ids[-1] == tokenizer.eos_token_id
        and tokenizer.eos_token_id != tokenizer.bos_token_id
    ):
        ids = ids[:-1]  # some tokenizers append EOS to every text; a prompt must not end the sequence
    return list(ids)


def encode_generation(examples: Sequence[PromptExample], tokenizer: Any, max_length: int) -> ListDataset:
    """Tokenize prompt + answer + eos with prompt labels masked to -100 (texts clipped to :func:`char_budget`)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    budget = char_budget(tokenizer, max_length)
    items = []
    for ex in examples:
        prompt = prompt_ids(tokenizer, ex.prompt[-budget:])  # the prompt's end is what is kept
        answer = list(tokenizer(ex.answer[:budget], add_special_tokens=False)["input_ids"]) + eos
        answer = answer[: max_length - 1]
        prompt = prompt[-(max_length - len(answer)) :]
        items.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return ListDataset(items)


#: Documents tokenized per call of the tokenizer by :func:`pack_documents`.
TOKENIZE_CHUNK = 256


class BlockDataset(Dataset):
    """Fixed-length token blocks, ``(n_blocks, block)`` int32; each item is its own label sequence."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.blocks[index].tolist()
        return {"input_ids": ids, "labels": ids}


def pack_documents(texts: Sequence[str], tokenizer: Any, block: int) -> torch.Tensor:
    """Tokenize ``texts`` (no special tokens), put EOS after each, join and cut into ``block``-token rows.

    A tokenizer without EOS (BERT's) separates documents with its SEP token. The tail that does not
    fill a whole block is dropped. Returns a ``(n_blocks, block)`` int32 tensor.

    Raises:
        ConfigError: The tokenizer has neither EOS nor SEP, or an id does not fit int32.
    """
    import numpy as np

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ConfigError("packing documents needs a tokenizer with an EOS (or SEP) token to separate them")
    if max(len(tokenizer), eos + 1) >= 2**31:
        raise ConfigError(f"a vocabulary of {len(tokenizer):,} tokens does not fit int32 ids")
    parts = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = [str(t) for t in texts[start : start + TOKENIZE_CHUNK]]
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            parts.append(np.asarray([*ids, eos], dtype=np.int32))  # 4 bytes a token
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    n = stream.size // block
    return torch.from_numpy(stream[: n * block]).view(n, block)  # (n_blocks, block)


def encode_blocks(examples: Sequence[Document], tokenizer: Any, max_length: int) -> BlockDataset:
    """Documents as :func:`pack_documents` blocks of ``max_length`` tokens.

    Raises:
        ConfigError: The documents do not fill one block.
    """
    blocks = pack_documents([ex.text for ex in examples], tokenizer, max_length)
    if not len(blocks):
        raise ConfigError(
            f"{len(examples)} documents hold fewer than max_length={max_length} tokens: not one "
            "block to train on (add text, raise max_examples or lower max_length)"
        )
    return BlockDataset(blocks)


@dataclass
class PadCollator:
    """Pad ``input_ids`` (``token_type_ids`` with 0, list ``labels`` with -100) to the batch's longest.

    Attributes:
        pad_token_id: Id used to pad ``input_ids``.
        left: Pad on the left (generation prompts) instead of the right.
    """

    pad_token_id: int
    left: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list[Any]] = {"input_ids": [], "attention_mask": []}
        has_labels = "labels" in features[0]
        seq_labels = has_labels and isinstance(features[0]["labels"], (list, tuple))
        labels: list[Any] = []
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = []
        for f in features:
            ids = list(f["input_ids"])
            pad = width - len(ids)
            batch["input_ids"].append(self._pad(ids, [self.pad_token_id] * pad))
            batch["attention_mask"].append(self._pad([1] * len(ids), [0] * pad))
            if "token_type_ids" in batch:
                batch["token_type_ids"].append(self._pad(list(f["token_type_ids"]), [0] * pad))
            if seq_labels:
                labels.append(self._pad(list(f["labels"]), [IGNORE_INDEX] * pad))
            elif has_labels:
                labels.append(f["labels"])
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if has_labels:
            out["labels"] = torch.tensor(labels, dtype=torch.long)
        return out

    def _pad(self, values: list[Any], padding: list[Any]) -> list[Any]:
        return padding + values if self.left else values + padding
