"""moreft.train.statistics: the paired bootstrap against hand-computed cases, and the metrics from confusion counts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef

from moreft.errors import ConfigError
from moreft.tasks.classification import classification_metrics
from moreft.train.statistics import (
    Interval,
    mean_std,
    metric_from_confusion,
    paired_bootstrap,
    verdict,
    verdict_text,
)


def labelled(predictions, labels, first_id=0):
    return [
        {"id": first_id + i, "prediction": int(p), "label": int(y), "correct": int(p) == int(y)}
        for i, (p, y) in enumerate(zip(predictions, labels, strict=True))
    ]


def scored(scores, first_id=0):
    return [
        {"id": first_id + i, "prediction": "x", "label": "x", "score": float(s)} for i, s in enumerate(scores)
    ]


def test_identical_arms_give_a_degenerate_interval_at_zero():
    rng = np.random.default_rng(0)
    arm = {s: labelled(rng.integers(0, 2, 50), rng.integers(0, 2, 50), 100 * s) for s in range(3)}
    for metric in ("accuracy", "macro_f1", "matthews"):
        interval = paired_bootstrap(arm, arm, metric, resamples=500)
        assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
        assert verdict(interval) == "within" and (interval.seeds, interval.examples) == (3, 150)


def test_a_constant_shift_puts_the_interval_at_the_shift():
    rng = np.random.default_rng(1)
    base = {s: rng.random(40) for s in range(4)}
    reference = {s: scored(v) for s, v in base.items()}
    arm = {s: scored(v + 0.25) for s, v in base.items()}  # every example 0.25 better
    interval = paired_bootstrap(arm, reference, "char_accuracy", resamples=300)
    assert interval.estimate == pytest.approx(0.25) and interval.low == pytest.approx(0.25)
    assert interval.high == pytest.approx(0.25)
    assert verdict(interval) == "better"


def test_one_seed_two_examples_matches_the_enumerated_bootstrap():
    """Arm right on example 0 only, reference on neither: resampled accuracy differences are 1, .5, .5, 0
    with probability 1/4 each, so the 95% interval is [0, 1] around the observed 0.5."""
    arm = {0: labelled([1, 0], [1, 1])}
    reference = {0: labelled([0, 0], [1, 1])}
    interval = paired_bootstrap(arm, reference, "accuracy", resamples=20_000, seed=3)
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.0, 1.0)
    assert verdict(interval) == "not worse"  # the interval starts at 0: not below -0.5 pt


def test_seeds_are_resampled_jointly_with_examples():
    """Seed 0: the arms agree everywhere (difference 0); seed 1: the arm is better by 1 on every example.
    Drawing 2 seeds with replacement gives mean differences 0, .5, 1 with probabilities 1/4, 1/2, 1/4."""
    reference = {0: scored([0.5, 0.5, 0.5]), 1: scored([0.0, 0.0], first_id=10)}
    arm = {0: scored([0.5, 0.5, 0.5]), 1: scored([1.0, 1.0], first_id=10)}
    interval = paired_bootstrap(arm, reference, "accuracy", resamples=4000, seed=0)
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.0, 1.0)


def test_the_same_seed_gives_the_same_interval():
    rng = np.random.default_rng(2)
    labels = {s: rng.integers(0, 3, 80) for s in range(2)}
    arm = {s: labelled(np.where(rng.random(80) < 0.8, y, (y + 1) % 3), y, 80 * s) for s, y in labels.items()}
    ref = {s: labelled(np.where(rng.random(80) < 0.7, y, (y + 2) % 3), y, 80 * s) for s, y in labels.items()}
    first = paired_bootstrap(arm, ref, "macro_f1", resamples=1000)
    assert paired_bootstrap(arm, ref, "macro_f1", resamples=1000) == first
    assert first.low <= first.estimate <= first.high
    assert paired_bootstrap(arm, ref, "macro_f1", resamples=1000, seed=9) != first


@pytest.mark.parametrize("classes", [2, 5])
def test_metrics_from_confusion_counts_equal_the_tasks(classes):
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, 200)
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, classes, 200))
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (preds, labels), 1)
    expected = classification_metrics(preds, labels, classes)
    assert metric_from_confusion(confusion, "accuracy") == pytest.approx(expected["accuracy"])
    assert metric_from_confusion(confusion, "macro_f1") == pytest.approx(expected["macro_f1"])
    assert metric_from_confusion(confusion, "matthews") == pytest.approx(matthews_corrcoef(labels, preds))
    constant = np.zeros((classes, classes), dtype=np.int64)
    constant[0] = np.bincount(
        labels, minlength=classes
    )  # always predicts class 0: Matthews is 0 by convention
    assert metric_from_confusion(constant, "matthews") == 0.0


def test_unpaired_arms_are_refused():
    arm = {0: labelled([1, 0], [1, 1])}
    with pytest.raises(ConfigError, match="same seeds"):
        paired_bootstrap(arm, {1: labelled([1, 0], [1, 1])}, "accuracy")
    with pytest.raises(ConfigError, match="not tested on the same examples"):
        paired_bootstrap(arm, {0: labelled([1, 0], [1, 1], first_id=5)}, "accuracy")
    with pytest.raises(ConfigError, match="labels differ"):
        paired_bootstrap(arm, {0: labelled([1, 0], [0, 1])}, "accuracy")
    with pytest.raises(ConfigError, match="per-example 'score'"):
        paired_bootstrap({0: [{"id": 0, "prediction": "a"}]}, {0: [{"id": 0, "prediction": "b"}]}, "accuracy")
    with pytest.raises(ConfigError, match="resamples=0"):
        paired_bootstrap(arm, arm, "accuracy", resamples=0)


@pytest.mark.parametrize(
    "low, high, expected",
    [
        (-0.004, 0.005, "within"),
        (0.006, 0.02, "better"),
        (-0.03, -0.006, "worse"),
        (-0.002, 0.03, "not worse"),
        (-0.02, 0.01, "undecided"),
    ],
)
def test_verdicts(low, high, expected):
    interval = Interval((low + high) / 2, low, high, 0.95, 10, 1, 10)
    assert verdict(interval) == expected
    assert "0.5 pt" in verdict_text(interval)


def test_mean_std():
    assert mean_std([1.0]) == (1.0, 0.0)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
