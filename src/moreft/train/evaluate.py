"""Scoring a model on task examples: argmax labels for classification, greedy decoding for generation
(or the reference answers' loss, for a teacher-forced task), the loss of held-out blocks for language
modelling (perplexity)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from moreft.tasks import Example, PromptExample, ReferencedExample, Task, TaskKind, TextExample
from moreft.train.data import (
    IGNORE_INDEX,
    PadCollator,
    char_budget,
    encode_classification,
    encode_generation,
    pack_documents,
    prompt_ids,
)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device(model).type, dtype=dtype)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _by_length(lengths: Sequence[int]) -> list[int]:
    """Indices in order of length: batches of similar lengths waste little padding."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def _unsort(values: Sequence[Any], order: Sequence[int]) -> list[Any]:
    """Put ``values`` (computed in ``order``) back in the original order."""
    out: list[Any] = [None] * len(values)
    for value, index in zip(values, order, strict=True):
        out[index] = value
    return out


@torch.no_grad()
def predict_labels(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[TextExample],
    batch_size: int,
    max_length: int,
    autocast: torch.dtype | None = None,
) -> list[int]:
    """Predicted label ids (argmax of the logits), one per example, in order."""
    was_training = model.training
    model.eval()
    data = encode_classification(examples, tokenizer, max_length).items
    order = _by_length([len(f["input_ids"]) for f in data])
    data = [data[i] for i in order]
    collate = PadCollator(tokenizer.pad_token_id)
    preds: list[int] = []
    try:
        for chunk in _batches(data, batch_size):
            batch = collate([{k: v for k, v in f.items() if k != "labels"} for f in chunk])
            with _autocast(model, autocast):
                logits = model(**{k: v.to(_device(model)) for k, v in batch.items()}).logits
            preds += logits.argmax(-1).tolist()
    finally:
        model.train(was_training)
    return _unsort(preds, order)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[PromptExample],
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    autocast: torch.dtype | None = None,
) -> list[str]:
    """Greedy completions of each prompt (the completion only, special tokens removed)."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    collate = PadCollator(tokenizer.pad_token_id, left=True)
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    budget = char_budget(tokenizer, max_length)
    prompts = [prompt_ids(tokenizer, ex.prompt[-budget:])[-max_length:] for ex in examples]
    order = _by_length([len(p) for p in prompts])
    out: list[str] = []
    try:
        for chunk in _batches([prompts[i] for i in order], batch_size):
            batch = collate([{"input_ids": ids} for ids in chunk])
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            with _autocast(model, autocast):
                ids = model.generate(**batch, generation_config=gen)
            new = ids[:, batch["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return _unsort(out, order)


@torch.no_grad()
def block_losses(
    model: nn.Module,
    tokenizer: Any,
    documents: Sequence[Any],
    batch_size: int,
    max_length: int,
    autocast: torch.dtype | None = None,
) -> tuple[list[float], list[int]]:
    """``(summed next-token loss, predicted tokens)`` of each ``max_length`` block of the packed documents.

    A block of ``T`` tokens predicts ``T - 1`` of them (the first has no context in the block).
    """
    was_training = model.training
    model.eval()
    blocks = pack_documents([d.text for d in documents], tokenizer, max_length)
    losses: list[float] = []
    try:
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start : start + batch_size].long().to(_device(model))  # (batch, max_length)
            with _autocast(model, autocast):
                logits = model(input_ids=ids).logits
            nll = torch.nn.functional.cross_entropy(  # (batch * (T - 1),) per-token losses
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            )
            losses += nll.view(ids.shape[0], -1).sum(dim=1).tolist()  # (batch,)
    finally:
        model.train(was_training)
    return losses, [max_length - 1] * len(losses)


@torch.no_grad()
def answer_losses(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[PromptExample],
    batch_size: int,
    max_length: int,
    autocast: torch.dtype | None = None,
) -> list[float]:
    """Each example's mean next-token loss over its answer tokens (and EOS) given its prompt, teacher-forced.

    The sequences are those training sees (:func:`~moreft.train.data.encode_generation`: the same
    clipping to ``max_length``), so the score is the training loss of held-out examples, per example.
    """
    was_training = model.training
    model.eval()
    data = encode_generation(examples, tokenizer, max_length).items
    order = _by_length([len(f["input_ids"]) for f in data])
    collate = PadCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    out: list[float] = []
    try:
        for chunk in _batches([data[i] for i in order], batch_size):
            batch = {k: v.to(_device(model)) for k, v in collate(chunk).items()}
            labels = batch.pop("labels")[:, 1:]  # (batch, T - 1): token t + 1 is predicted at t
            with _autocast(model, autocast):
                logits = model(**batch).logits[:, :-1]  # (batch, T - 1, vocab)
            nll = torch.nn.functional.cross_entropy(  # (batch, T - 1), 0 where the label is masked
                logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
            )
            counts = (labels != IGNORE_INDEX).sum(dim=1)  # (batch,) answer tokens, >= 1 (EOS or answer)
            out += (nll.sum(dim=1) / counts.clamp(min=1)).tolist()
    finally:
        model.train(was_training)
    return _unsort(out, order)


def predict(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    autocast: torch.dtype | None = None,
) -> list[Any]:
    """Predictions for ``examples``: label ids (classification), completions (generation), or answer
    losses (a teacher-forced generation task)."""
    if task.kind is TaskKind.CLASSIFICATION:
        return predict_labels(model, tokenizer, examples, batch_size, max_length, autocast)
    if task.teacher_forced:
        return answer_losses(model, tokenizer, examples, batch_size, max_length, autocast)
    return generate_answers(model, tokenizer, examples, batch_size, max_length, max_new_tokens, autocast)


def references(task: Task, examples: Sequence[Example]) -> list[Any]:
    """What predictions are scored against: label ids, or answer strings (a
    :class:`~moreft.tasks.ReferencedExample`'s ``reference`` when it has one)."""
    if task.kind is TaskKind.CLASSIFICATION:
        return [ex.label for ex in examples]
    return [
        ex.reference if isinstance(ex, ReferencedExample) and ex.reference else ex.answer for ex in examples
    ]


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """``task.compute_metrics`` of the model's predictions on ``examples``.

    Raises:
        ValueError: ``examples`` is empty.
    """
    if not examples:
        raise ValueError("cannot evaluate on 0 examples; the split is empty (raise max_examples)")
    if task.kind is TaskKind.LANGUAGE_MODELING:
        losses, counts = block_losses(model, tokenizer, examples, batch_size, max_length, autocast)
        if not losses:
            raise ValueError(
                f"the {len(examples)} held-out documents fill no block of max_length={max_length} "
                "tokens (raise eval_examples or lower max_length)"
            )
        return {k: float(v) for k, v in task.compute_metrics(losses, counts).items()}
    preds = predict(model, tokenizer, task, examples, batch_size, max_length, max_new_tokens, autocast)
    return score_predictions(task, examples, preds)


def score_predictions(
    task: Task, examples: Sequence[Example], predictions: Sequence[Any]
) -> dict[str, float]:
    """``task.compute_metrics`` of ``predictions`` (one per example, from :func:`predict`) as floats.

    Raises:
        ValueError: ``examples`` is empty.
    """
    if not examples:
        raise ValueError("cannot evaluate on 0 examples; the split is empty (raise max_examples)")
    return {k: float(v) for k, v in task.compute_metrics(predictions, references(task, examples)).items()}
