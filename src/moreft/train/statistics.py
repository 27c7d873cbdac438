"""Statistics of a comparison: mean ± std over seeds, and a paired bootstrap interval against a reference arm.

Every arm of a comparison is trained with the same seeds, and a seed fixes the data split, so two
arms' runs with one seed were tested on the same examples (their ``test_predictions.jsonl`` pair
up by example id). :func:`paired_bootstrap` resamples seeds and examples jointly, the same draws
for both arms:

1. draw ``S`` seeds with replacement from the ``S`` seeds;
2. for each drawn seed, draw that seed's ``n`` test examples with replacement (a fresh draw each
   time a seed is drawn again);
3. score both arms on exactly those examples (the task metric: accuracy, macro-F1 and Matthews
   correlation from the confusion counts, or the mean per-example ``score`` of generation tasks)
   and average the per-seed differences ``arm - reference``.

The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``resamples`` such differences give the
interval (percentile bootstrap); the estimate is the observed mean difference. The generator is
seeded, so the interval is the same every time. Everything here is a pure function of its inputs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moreft.errors import ConfigError

#: Bootstrap defaults of ``moreft compare`` / ``moreft study``.
RESAMPLES, LEVEL, BOOTSTRAP_SEED = 10_000, 0.95, 0
#: "Within 0.5 points": the margin of the verdict, in metric units (metrics lie in [0, 1]).
MARGIN = 0.005
#: Metrics computed from label predictions (confusion counts); any other metric averages ``score``.
LABEL_METRICS = ("accuracy", "macro_f1", "matthews")
#: Resampled example sets scored at once (bounds the memory of one step).
_CHUNK = 2048

Records = Sequence[Mapping[str, Any]]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample standard deviation)``; the deviation of one value is 0."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Interval:
    """A paired bootstrap interval of ``arm - reference`` (metric units; ``× 100`` for points).

    Attributes:
        estimate: The observed mean (over seeds) difference.
        low, high: The interval's bounds.
        level: Its confidence level.
        resamples: Bootstrap resamples drawn.
        seeds: Seeds paired.
        examples: Test examples paired (all seeds together).
    """

    estimate: float
    low: float
    high: float
    level: float
    resamples: int
    seeds: int
    examples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict(interval: Interval, margin: float = MARGIN) -> str:
    """Where the interval lies against ``±margin``: ``within``, ``better``, ``worse``, ``not worse``
    (above ``-margin``, possibly better by more) or ``undecided`` (it reaches past ``-margin``)."""
    if -margin <= interval.low and interval.high <= margin:
        return "within"
    if interval.low > margin:
        return "better"
    if interval.high < -margin:
        return "worse"
    if interval.low >= -margin:
        return "not worse"
    return "undecided"


VERDICT_TEXT = {
    "within": "yes: within ±{m} pt",
    "better": "no: better by > {m} pt",
    "worse": "no: worse by > {m} pt",
    "not worse": "not worse by > {m} pt (may be better)",
    "undecided": "undecided (CI reaches below -{m} pt)",
}


def verdict_text(interval: Interval, margin: float = MARGIN) -> str:
    """:func:`verdict` in words, e.g. ``yes: within ±0.5 pt``."""
    return VERDICT_TEXT[verdict(interval, margin)].format(m=f"{margin * 100:g}")


def _pairs(
    arm: Mapping[int, Records], reference: Mapping[int, Records], metric: str
) -> list[dict[str, np.ndarray]]:
    """Per seed, the two arms' records aligned by example id, as arrays.

    Raises:
        ConfigError: Other seeds, other example ids, other labels, or records without what ``metric`` needs.
    """
    if set(arm) != set(reference) or not arm:
        raise ConfigError(
            f"paired statistics need the same seeds for both arms; got {sorted(arm)} and {sorted(reference)}"
        )
    out = []
    for seed in sorted(arm):
        mine = {r["id"]: r for r in arm[seed]}
        theirs = {r["id"]: r for r in reference[seed]}
        if set(mine) != set(theirs) or len(mine) != len(arm[seed]) or not mine:
            raise ConfigError(
                f"seed {seed}: the arms were not tested on the same examples ({len(mine)} and "
                f"{len(theirs)} ids, {len(set(mine) & set(theirs))} shared); paired statistics "
                "need the same split (same seed, max_examples, eval_fraction, eval_examples)"
            )
        ids = sorted(mine)
        if metric in LABEL_METRICS and all("correct" in mine[i] for i in ids):
            labels = np.array([mine[i]["label"] for i in ids], dtype=np.int64)
            if not np.array_equal(labels, [theirs[i]["label"] for i in ids]):
                raise ConfigError(f"seed {seed}: the arms' test labels differ; the data changed between runs")
            out.append(
                {
                    "arm": np.array([mine[i]["prediction"] for i in ids], dtype=np.int64),
                    "ref": np.array([theirs[i]["prediction"] for i in ids], dtype=np.int64),
                    "label": labels,
                }
            )
        elif all("score" in mine[i] and "score" in theirs[i] for i in ids):
            out.append(
                {
                    "arm_score": np.array([mine[i]["score"] for i in ids], dtype=np.float64),
                    "ref_score": np.array([theirs[i]["score"] for i in ids], dtype=np.float64),
                }
            )
        else:
            raise ConfigError(
                f"metric {metric!r}: the predictions need 'correct' and labels (metrics "
                f"{list(LABEL_METRICS)}) or a per-example 'score'"
            )
    return out


def metric_from_confusion(confusion: np.ndarray, metric: str) -> np.ndarray:
    """``metric`` of confusion matrices ``(..., K, K)`` (``[prediction, label]`` counts), as the tasks compute
    it: accuracy; macro-F1 over the classes present in predictions or labels; Matthews correlation (0 when
    undefined)."""
    c = confusion.astype(np.float64)
    n = c.sum(axis=(-2, -1))
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    if metric == "accuracy":
        return tp.sum(-1) / n
    predicted, true = c.sum(-1), c.sum(-2)
    if metric == "macro_f1":
        denominator = predicted + true  # 2tp + fp + fn
        present = denominator > 0
        f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=present)
        return f1.sum(-1) / present.sum(-1)
    if metric == "matthews":
        correct = tp.sum(-1)
        numerator = correct * n - (true * predicted).sum(-1)
        denominator = np.sqrt((n**2 - (predicted**2).sum(-1)) * (n**2 - (true**2).sum(-1)))
        return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
    raise ConfigError(f"metric {metric!r} is not one of {list(LABEL_METRICS)}")


def _diffs(pair: dict[str, np.ndarray], index: np.ndarray, metric: str) -> np.ndarray:
    """``metric(arm) - metric(reference)`` on each row of example indices ``index`` ``(m, n)``."""
    if "arm_score" in pair:
        return pair["arm_score"][index].mean(1) - pair["ref_score"][index].mean(1)
    k = int(max(pair["arm"].max(), pair["ref"].max(), pair["label"].max())) + 1
    cell = (pair["arm"] * k + pair["ref"]) * k + pair["label"]  # one joint confusion cell per example
    rows = index.shape[0]
    flat = (cell[index] + (np.arange(rows) * k**3)[:, None]).ravel()
    joint = np.bincount(flat, minlength=rows * k**3).reshape(rows, k, k, k)  # [arm, ref, label]
    return metric_from_confusion(joint.sum(2), metric) - metric_from_confusion(joint.sum(1), metric)


def paired_bootstrap(
    arm: Mapping[int, Records],
    reference: Mapping[int, Records],
    metric: str,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """The paired bootstrap interval of ``arm - reference`` (see the module docstring).

    Args:
        arm: Per seed, the arm's ``test_predictions.jsonl`` records (:mod:`moreft.train.predictions`).
        reference: The same for the reference arm (same seeds, same example ids).
        metric: The task metric (``accuracy``, ``macro_f1``, ``matthews``, or any metric of ``score`` records).
        resamples: Bootstrap resamples.
        level: Confidence level, in (0, 1).
        seed: Seed of the resampling generator.

    Raises:
        ConfigError: The arms are not paired (other seeds or examples), or bad ``resamples`` / ``level``.
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ConfigError(f"resamples={resamples!r} must be an integer >= 1")
    if not 0 < level < 1:
        raise ConfigError(f"level={level!r} must lie in (0, 1)")
    pairs = _pairs(arm, reference, metric)
    sizes = [len(next(iter(p.values()))) for p in pairs]
    observed = float(
        np.mean([_diffs(p, np.arange(n)[None, :], metric)[0] for p, n in zip(pairs, sizes, strict=True)])
    )
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(pairs), size=(resamples, len(pairs)))  # step 1: seeds, with replacement
    diffs = np.empty(drawn.shape)
    for s, (pair, n) in enumerate(zip(pairs, sizes, strict=True)):
        where = np.flatnonzero(drawn == s)  # every (resample, position) that drew seed s
        for start in range(0, len(where), _CHUNK):
            chunk = where[start : start + _CHUNK]
            index = rng.integers(0, n, size=(len(chunk), n))  # step 2: a fresh draw of its examples
            diffs.flat[chunk] = _diffs(pair, index, metric)  # step 3
    means = diffs.mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(observed, float(low), float(high), level, resamples, len(pairs), int(sum(sizes)))


def points(value: float) -> str:
    """A metric difference in points, signed: ``+0.42``."""
    return "–" if value is None or not math.isfinite(value) else f"{value * 100:+.2f}"


def signed(value: float, in_points: bool = True) -> str:
    """A difference as reports show it: in points (× 100) for a score in [0, 1], else as it is (a loss)."""
    return points(value) if in_points or value is None or not math.isfinite(value) else f"{value:+.4f}"
