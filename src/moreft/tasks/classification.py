"""Shared base of the text-classification tasks: metrics and example building."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from moreft.tasks.base import Task, TaskKind, TextExample, check_pairs


def make_examples(rows: Iterable[tuple[str, int]]) -> tuple[TextExample, ...]:
    """Number ``(text, label)`` rows into examples, dropping exact duplicate texts.

    Duplicates are dropped (the first occurrence is kept) so the same text can never land in
    both the training and the test split.

    Args:
        rows: ``(text, label_id)`` pairs in canonical order.

    Returns:
        Examples with ``id`` = position in the returned tuple.
    """
    seen: set[str] = set()
    out: list[TextExample] = []
    for text, label in rows:
        if text in seen:
            continue
        seen.add(text)
        out.append(TextExample(id=len(out), text=text, label=label))
    return tuple(out)


def _label_ids(values: Sequence[Any], what: str, num_labels: int) -> list[int]:
    out = []
    for i, value in enumerate(values):
        try:
            label = operator.index(value)
        except TypeError:
            raise ValueError(
                f"{what}[{i}] = {value!r} is not an integer label id; pass label ids "
                f"(e.g. logits.argmax(-1)), not label names or scores"
            ) from None
        if not 0 <= label < num_labels:
            raise ValueError(f"{what}[{i}] = {label} is outside the label range [0, {num_labels - 1}]")
        out.append(label)
    return out


def classification_metrics(
    predictions: Sequence[Any], references: Sequence[Any], num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted label ids.

    Macro-F1 averages the per-class F1 ``2tp / (2tp + fp + fn)`` over the classes that occur in
    the references or the predictions (a class absent from both is skipped, so perfect
    predictions on a small sample score 1.0).

    Args:
        predictions: Predicted label ids, shape ``(n,)``; ints, numpy ints or 0-d int tensors.
        references: True label ids, shape ``(n,)``.
        num_labels: Number of classes; ids must lie in ``[0, num_labels)``.

    Returns:
        ``{"accuracy": float, "macro_f1": float}``, both in [0, 1].

    Raises:
        ValueError: If the lengths differ, are 0, or an id is not an int in range.
    """
    preds, refs = check_pairs(predictions, references)
    preds = _label_ids(preds, "predictions", num_labels)
    refs = _label_ids(refs, "references", num_labels)
    accuracy = sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs)
    f1s = []
    for c in sorted(set(preds) | set(refs)):
        tp = sum(p == c and r == c for p, r in zip(preds, refs, strict=True))
        fp = sum(p == c and r != c for p, r in zip(preds, refs, strict=True))
        fn = sum(p != c and r == c for p, r in zip(preds, refs, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(accuracy), "macro_f1": float(sum(f1s) / len(f1s))}


@dataclass(frozen=True)
class ClassificationTask(Task):
    """A task whose examples are :class:`TextExample` and whose predictions are label ids."""

    kind: ClassVar[TaskKind] = TaskKind.CLASSIFICATION
    metric_name: ClassVar[str] = "accuracy"

    def compute_metrics(self, predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
        """Accuracy and macro-F1 (see :func:`classification_metrics`).

        Args:
            predictions: Predicted label ids, shape ``(n,)``.
            references: True label ids, shape ``(n,)``.

        Returns:
            ``{"accuracy": float, "macro_f1": float}``.

        Raises:
            ValueError: If the lengths differ, are 0, or an id is not an int in ``[0, num_labels)``.
        """
        return classification_metrics(predictions, references, len(self.labels))
