"""Typed task objects: examples, seeded splits, and the :class:`Task` base class.

Every task reads its whole source into a *canonical* tuple of examples (a fixed order that never
depends on dict or hash ordering; the position in that tuple is the example's ``id``), then
:meth:`Task.load` samples and splits it with :class:`random.Random` seeded by ``seed``:

* ``max_examples`` (optional) first draws that many examples with ``Random(seed).sample``;
* the remaining ids are shuffled with the same generator and cut into train/validation/test:
  validation and test get ``max(1, round(eval_fraction * n))`` examples each (``eval_fraction``
  0.1 by default: 80/10/10), train the rest.

The same ``(task options, seed, max_examples, eval_fraction)`` therefore always gives the same
split, and
:attr:`Splits.split_ids` says which source ids went where so a run can save it.
"""

from __future__ import annotations

import dataclasses
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from moreft.errors import ConfigError

#: Smallest number of examples a non-memorisation task can be split into (one per split).
MIN_SPLIT_EXAMPLES = 3
#: The share of the examples in each of validation and test unless a run says otherwise (80/10/10).
EVAL_FRACTION = 0.1
#: Largest ``eval_fraction``: validation and test together leave at least a tenth for training.
MAX_EVAL_FRACTION = 0.45


class TaskKind(str, Enum):
    """What a model is trained to produce for a task."""

    CLASSIFICATION = "classification"
    """One label id per input text (a sequence-classification head)."""
    GENERATION = "generation"
    """A text completion of a prompt (a causal language model)."""
    LANGUAGE_MODELING = "language-modeling"
    """Next-token prediction on documents packed into fixed-length blocks (causal-LM pretraining)."""


class MetricGoal(str, Enum):
    """Which way a task's metric improves: accuracy-like scores are maximised, perplexity minimised.

    The values are Optuna's study directions, so a search can pass them on as they are.
    """

    MAXIMIZE = "maximize"
    MINIMIZE = "minimize"

    def score(self, value: float) -> float:
        """``value`` as a number to maximise: itself, or negated for a lower-is-better metric."""
        return value if self is MetricGoal.MAXIMIZE else -value

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is a better score than ``b``."""
        return self.score(a) > self.score(b)


@dataclass(frozen=True)
class TextExample:
    """One classification example.

    Attributes:
        id: Position of the example in its task's canonical example tuple.
        text: The input text.
        label: Label id, an index into ``Task.labels``.
    """

    id: int
    text: str
    label: int


@dataclass(frozen=True)
class PromptExample:
    """One generation example: the model sees ``prompt`` and should continue with ``answer``.

    Attributes:
        id: Position of the example in its task's canonical example tuple.
        prompt: Text given to the model.
        answer: Target completion, appended verbatim to ``prompt`` for training (so it usually
            starts with a space, e.g. ``" 42"``).
    """

    id: int
    prompt: str
    answer: str


@dataclass(frozen=True)
class Document:
    """One document of a language-modelling corpus (documents are split, then packed into blocks).

    Attributes:
        id: Position of the document in its task's canonical tuple.
        text: The whole text.
    """

    id: int
    text: str


Example = TextExample | PromptExample | Document
"""Any example type; a task yields only one of them (see :attr:`Task.kind`)."""


@dataclass(frozen=True)
class Splits:
    """A seeded train/validation/test split of one task.

    Attributes:
        task: Name of the task the examples come from.
        seed: Seed the split (and the ``max_examples`` sample) was drawn with.
        train: Training examples, in shuffled order.
        validation: Validation examples (model selection).
        test: Held-out test examples. For memorisation tasks all three splits are the same set.
    """

    task: str
    seed: int
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]

    @property
    def split_ids(self) -> dict[str, list[int]]:
        """Source ids per split, JSON-ready: ``{"train": [...], "validation": [...], "test": [...]}``."""
        return {
            "train": [ex.id for ex in self.train],
            "validation": [ex.id for ex in self.validation],
            "test": [ex.id for ex in self.test],
        }

    @property
    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def split_ids(
    ids: Sequence[int], seed: int, max_examples: int | None = None, eval_fraction: float = EVAL_FRACTION
) -> dict[str, list[int]]:
    """Sample and split ids with ``random.Random(seed)``: ``eval_fraction`` each to validation and test.

    Args:
        ids: Source ids in canonical order, length ``n >= 3`` after the cap.
        seed: Seed of the generator that samples and shuffles.
        max_examples: If not None and smaller than ``len(ids)``, draw this many ids first.
        eval_fraction: Share of the ids in each of validation and test (``max(1, round(f * n))``
            each), in ``(0, MAX_EVAL_FRACTION]``; 0.1 gives 80/10/10.

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``, disjoint, in shuffled order.

    Raises:
        ConfigError: If fewer than 3 ids remain to split, or ``eval_fraction`` is out of range.
    """
    check_eval_fraction(eval_fraction)
    rng = random.Random(seed)
    chosen = list(ids)
    if max_examples is not None and max_examples < len(chosen):
        chosen = rng.sample(chosen, max_examples)
    if len(chosen) < MIN_SPLIT_EXAMPLES:
        raise ConfigError(
            f"cannot split {len(chosen)} examples into train/validation/test; "
            f"need at least {MIN_SPLIT_EXAMPLES} (raise max_examples)"
        )
    rng.shuffle(chosen)
    n = len(chosen)
    n_eval = max(1, round(eval_fraction * n))
    n_train = n - 2 * n_eval
    if n_train < 1:  # only for a handful of ids: keep one training example
        n_eval = (n - 1) // 2
        n_train = n - 2 * n_eval
    return {
        "train": chosen[:n_train],
        "validation": chosen[n_train : n_train + n_eval],
        "test": chosen[n_train + n_eval :],
    }


def check_eval_fraction(value: Any) -> float:
    """Check an ``eval_fraction``: a number in ``(0, MAX_EVAL_FRACTION]``.

    Raises:
        ConfigError: names the value and the rule.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_EVAL_FRACTION:
        raise ConfigError(
            f"eval_fraction={value!r} must be a number in (0, {MAX_EVAL_FRACTION}] (the share of "
            "the examples in each of validation and test)"
        )
    return float(value)


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Check that an option is an int (not a bool) of at least ``minimum``.

    Args:
        name: Option name, used in the error message.
        value: The value given.
        minimum: Smallest allowed value, or None for no bound.

    Returns:
        ``value`` unchanged.

    Raises:
        ConfigError: If ``value`` is not an int or is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Task(ABC):
    """A data set plus the metric that scores predictions on it.

    Subclasses set the class attributes below, declare their options as dataclass fields (with
    defaults), and implement :meth:`examples` and :meth:`compute_metrics`.

    Attributes:
        name: Registry name, e.g. ``"sentiment"``.
        kind: :class:`TaskKind` of the task.
        labels: Label names indexed by label id (classification only; ``()`` otherwise).
        metric_name: Key of :meth:`compute_metrics`' result used for model selection.
        metric_goal: Whether ``metric_name`` is better higher (the default) or lower (perplexity).
        memorization: If True, :meth:`load` returns the same examples as train, validation and test.
    """

    name: ClassVar[str]
    kind: ClassVar[TaskKind]
    labels: ClassVar[tuple[str, ...]] = ()
    metric_name: ClassVar[str]
    metric_goal: ClassVar[MetricGoal] = MetricGoal.MAXIMIZE
    memorization: ClassVar[bool] = False

    @property
    def teacher_forced(self) -> bool:
        """True for a generation task scored by the loss of its reference answers, not by generating
        (its "predictions" are per-example answer losses; see :func:`moreft.train.evaluate.answer_losses`)."""
        return False

    @property
    def num_labels(self) -> int | None:
        """``len(labels)`` for classification tasks, None for generation tasks."""
        return len(self.labels) if self.kind is TaskKind.CLASSIFICATION else None

    @property
    def options(self) -> dict[str, Any]:
        """The task's options (its dataclass fields) as a plain dict, e.g. to save with a run."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @abstractmethod
    def examples(self) -> tuple[Example, ...]:
        """Read every example of the source, in canonical order (``examples()[i].id == i``).

        Raises:
            FileNotFoundError: If the data package or a data file is missing.
            ValueError: If a data file is malformed (the message names the file and line).
        """

    @abstractmethod
    def compute_metrics(self, predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
        """Score predictions against references; every value lies in [0, 1] unless the task says otherwise
        (perplexity).

        Raises:
            ValueError: If the sequences are empty, of different lengths, or of the wrong type.
        """

    def load(
        self, seed: int, max_examples: int | None = None, eval_fraction: float = EVAL_FRACTION
    ) -> Splits:
        """Read the data and split it (see the module docstring for the procedure).

        Args:
            seed: Seed of the sample and the split.
            max_examples: Optional cap on the number of examples, drawn with ``seed`` before splitting.
            eval_fraction: Share of the examples in each of validation and test (not used by
                memorisation tasks, whose three splits are the same set).

        Returns:
            The :class:`Splits`.

        Raises:
            ConfigError: If ``seed`` is not an int, or ``max_examples`` is not None or an int >= 3
                (>= 1 for memorisation tasks).
            FileNotFoundError: If the data package or a data file is missing.
            ValueError: If a data file is malformed.
        """
        check_int("seed", seed)
        if max_examples is not None:
            check_int("max_examples", max_examples, 1 if self.memorization else MIN_SPLIT_EXAMPLES)
        examples = self.examples()
        if self.memorization:
            ids = list(range(len(examples)))
            if max_examples is not None and max_examples < len(ids):
                ids = random.Random(seed).sample(ids, max_examples)
            chosen = tuple(examples[i] for i in ids)
            return Splits(self.name, seed, chosen, chosen, chosen)
        parts = split_ids([ex.id for ex in examples], seed, max_examples, eval_fraction)
        return Splits(
            task=self.name,
            seed=seed,
            train=tuple(examples[i] for i in parts["train"]),
            validation=tuple(examples[i] for i in parts["validation"]),
            test=tuple(examples[i] for i in parts["test"]),
        )


def check_pairs(predictions: Sequence[Any], references: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Turn predictions and references into lists of equal, non-zero length.

    Args:
        predictions: Any sized iterable (list, tuple, numpy array, 1-D tensor).
        references: Same length as ``predictions``.

    Returns:
        ``(list(predictions), list(references))``.

    Raises:
        ValueError: If either is empty or their lengths differ.
    """
    preds, refs = list(predictions), list(references)
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions for {len(refs)} references; lengths must match")
    if not refs:
        raise ValueError("cannot compute metrics on 0 predictions; pass at least one")
    return preds, refs
