"""UUID key -> value memorisation, the knowledge-memorisation task of MoRA (Jiang et al., 2024).

``num_pairs`` random (version-4) UUID pairs are drawn from ``random.Random(data_seed)``. The model
is trained on ``"Key: <key>\\nValue:"`` -> ``" <value>"`` and scored on the same pairs: the task
measures how much an adapter can memorise, so **validation and test are the training set**
(:attr:`Task.memorization` is True; :meth:`Task.load` returns the same tuple three times,
in canonical order; its ``seed`` only picks the sample when ``max_examples`` < ``num_pairs``).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from moreft.tasks.base import PromptExample, Task, TaskKind, check_int, check_pairs

PROMPT = "Key: {key}\nValue:"
UUID_LENGTH = 36


def make_pairs(num_pairs: int, data_seed: int) -> list[tuple[str, str]]:
    """Draw distinct random UUID keys, each with a random UUID value.

    Args:
        num_pairs: Number of pairs.
        data_seed: Seed of the ``random.Random`` generator.

    Returns:
        ``[(key, value), ...]``, 36-character lowercase UUID strings, keys all distinct.
    """
    rng = random.Random(data_seed)
    keys: set[str] = set()
    pairs = []
    while len(pairs) < num_pairs:
        key = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if key not in keys:
            keys.add(key)
            pairs.append((key, value))
    return pairs


def first_token(text: str) -> str:
    """The first whitespace-separated token of a generated text (``""`` if there is none)."""
    parts = text.split(maxsplit=1)
    return parts[0] if parts else ""


@dataclass(frozen=True)
class UUIDTask(Task):
    """Memorise ``num_pairs`` random UUID key -> value pairs.

    Attributes:
        num_pairs: Number of pairs (default 200), >= 1.
        data_seed: Seed of the pair generator (default 0), independent of the run seed.
    """

    name: ClassVar[str] = "uuid"
    kind: ClassVar[TaskKind] = TaskKind.GENERATION
    metric_name: ClassVar[str] = "char_accuracy"
    memorization: ClassVar[bool] = True

    num_pairs: int = 200
    data_seed: int = 0

    def __post_init__(self) -> None:
        check_int("uuid num_pairs", self.num_pairs, minimum=1)
        check_int("uuid data_seed", self.data_seed)

    def examples(self) -> tuple[PromptExample, ...]:
        """The pairs as prompts ``"Key: <key>\\nValue:"`` with answers ``" <value>"``."""
        return tuple(
            PromptExample(id=i, prompt=PROMPT.format(key=key), answer=f" {value}")
            for i, (key, value) in enumerate(make_pairs(self.num_pairs, self.data_seed))
        )

    def compute_metrics(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Character-level accuracy and exact match of the generated values.

        The predicted value is the first whitespace-separated token of the generated text (so
        ``" 1b4e...\\nKey: ..."`` gives ``"1b4e..."``). Character accuracy compares it with the
        reference position by position over the reference's 36 characters (missing characters
        count as wrong, extra ones are ignored) and averages over examples.

        Args:
            predictions: Generated completions, shape ``(n,)``.
            references: True values (``Example.answer``, surrounding whitespace ignored), shape ``(n,)``.

        Returns:
            ``{"char_accuracy": float, "exact_match": float}``, both in [0, 1].

        Raises:
            ValueError: If the lengths differ or are 0, or a reference is empty.
            TypeError: If a prediction or reference is not a string.
        """
        preds, refs = check_pairs(predictions, references)
        char_scores, exact = [], 0
        for i, (pred, ref) in enumerate(zip(preds, refs)):
            if not isinstance(pred, str) or not isinstance(ref, str):
                raise TypeError(f"predictions[{i}] and references[{i}] must be str, got {pred!r}, {ref!r}")
            ref = ref.strip()
            if not ref:
                raise ValueError(f"references[{i}] is empty; expected a {UUID_LENGTH}-character UUID")
            value = first_token(pred)
            char_scores.append(sum(a == b for a, b in zip(value, ref)) / len(ref))
            exact += value == ref
        return {"char_accuracy": sum(char_scores) / len(refs), "exact_match": exact / len(refs)}
