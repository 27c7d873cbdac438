"""``test_predictions.jsonl``: a finished run's prediction for each test example, for paired statistics.

One JSON object per line, in the order the test examples were scored:

* classification: ``{"id": 17, "prediction": 1, "label": 0, "correct": false}`` (label ids);
* generation: ``{"id": 17, "prediction": "...", "label": "<reference>", "score": 0.0}``, where
  ``score`` is the task metric of that example alone (its mean over examples is the metric for
  accuracy-like metrics).

``id`` is the example's source id (:attr:`moreft.tasks.TextExample.id`): runs with the same seed
have the same test examples, so two arms' files pair up by id (:mod:`moreft.train.statistics`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moreft.errors import ConfigError
from moreft.safe_write import atomic_write_text
from moreft.tasks import Example, Task, TaskKind
from moreft.train.evaluate import references

PREDICTIONS_FILE = "test_predictions.jsonl"
#: A line of the file is a few dozen bytes (a generated answer more); anything this big is not ours.
MAX_PREDICTION_BYTES = 256 * 2**20


def prediction_records(
    task: Task, examples: Sequence[Example], predictions: Sequence[Any]
) -> list[dict[str, Any]]:
    """One record per example (see the module docstring).

    Raises:
        ValueError: ``predictions`` and ``examples`` differ in length.
    """
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} test examples")
    refs = references(task, examples)
    if task.kind is TaskKind.CLASSIFICATION:
        return [
            {"id": ex.id, "prediction": int(p), "label": int(r), "correct": int(p) == int(r)}
            for ex, p, r in zip(examples, predictions, refs, strict=True)
        ]
    return [
        {
            "id": ex.id,
            "prediction": p,
            "label": r,
            "score": float(task.compute_metrics([p], [r])[task.metric_name]),
        }
        for ex, p, r in zip(examples, predictions, refs, strict=True)
    ]


def write_predictions(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write the records as JSON lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a ``test_predictions.jsonl``.

    Raises:
        ConfigError: The file is missing (a run that finished before moreft saved predictions: train
            it again), too large, or not one object with ``id`` and ``prediction`` per line.
    """
    if not path.is_file():
        raise ConfigError(
            f"{str(path)!r} does not exist: the run finished before moreft saved test predictions, "
            "or did not finish; train it again (--overwrite) for paired statistics"
        )
    if path.stat().st_size > MAX_PREDICTION_BYTES:
        raise ConfigError(
            f"{str(path)!r} is larger than {MAX_PREDICTION_BYTES // 2**20} MiB; not a moreft file"
        )
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or "id" not in record or "prediction" not in record:
            raise ConfigError(f"{str(path)!r} line {number} is not a prediction record (id, prediction, ...)")
        out.append(record)
    return out
