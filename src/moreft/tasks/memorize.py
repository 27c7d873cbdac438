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

from moreft.errors import ConfigError
from moreft.tasks.base import PromptExample, Task, TaskKind, check_int, check_pairs

PROMPT = "Key: {key}\nValue:"
UUID_LENGTH = 36


def make_pairs(num_pairs: int, data_seed: int, chars: int = UUID_LENGTH) -> list[tuple[str, str]]:
    """Draw distinct random UUID keys, each with a random UUID value.

    Args:
        num_pairs: Number of pairs.
        data_seed: Seed of the ``random.Random`` generator.
        chars: Keep the first ``chars`` characters of each UUID (36: the whole UUID).

    Returns:
        ``[(key, value), ...]``, ``chars``-character lowercase UUID prefixes, keys all distinct.
    """
    rng = random.Random(data_seed)
    keys: set[str] = set()
    pairs = []
    while len(pairs) < num_pairs:
        key = str(uuid.UUID(int=rng.getrandbits(128), version=4))[:chars]
        value = str(uuid.UUID(int=rng.getrandbits(128), version=4))[:chars]
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
        chars: Characters kept of each key and value UUID (default 36, the whole UUID); fewer
            give shorter sequences for small CPU runs (8 = the first hex group).
    """

    name: ClassVar[str] = "uuid"
    kind: ClassVar[TaskKind] = TaskKind.GENERATION
    metric_name: ClassVar[str] = "char_accuracy"
    memorization: ClassVar[bool] = True

    num_pairs: int = 200
    data_seed: int = 0
    chars: int = UUID_LENGTH

    def __post_init__(self) -> None:
        check_int("uuid num_pairs", self.num_pairs, minimum=1)
        check_int("uuid data_seed", self.data_seed)
        check_int("uuid chars", self.chars, minimum=1)
        if self.chars > UUID_LENGTH:
            raise ConfigError(f"uuid chars must be <= {UUID_LENGTH} (a UUID's length), got {self.chars}")
        hex_group = 8  # the first UUID group is 8 random hex digits
        if self.chars < hex_group and self.num_pairs > 16**self.chars:
            raise ConfigError(
                f"uuid num_pairs={self.num_pairs} needs more than chars={self.chars}: there "
                f"are only {16**self.chars} distinct {self.chars}-character keys"
            )

    def examples(self) -> tuple[PromptExample, ...]:
        """The pairs as prompts ``"Key: <key>\\nValue:"`` with answers ``" <value>"``."""
        return tuple(
            PromptExample(id=i, prompt=PROMPT.format(key=key), answer=f" {value}")
            for i, (key, value) in enumerate(make_pairs(self.num_pairs, self.data_seed, self.chars))
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
        for i, (pred, ref) in enumerate(zip(preds, refs, strict=True)):
            if not isinstance(pred, str) or not isinstance(ref, str):
                raise TypeError(f"predictions[{i}] and references[{i}] must be str, got {pred!r}, {ref!r}")
            ref = ref.strip()
            if not ref:
                raise ValueError(f"references[{i}] is empty; expected a {UUID_LENGTH}-character UUID")
            value = first_token(pred)
            char_scores.append(sum(a == b for a, b in zip(value, ref, strict=False)) / len(ref))
            exact += value == ref
        return {"char_accuracy": sum(char_scores) / len(refs), "exact_match": exact / len(refs)}
