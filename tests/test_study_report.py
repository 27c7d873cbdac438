"""The study report's answers: the smallest budget per method that matches the reference, and the Pareto
front of the arms, on made-up rows (``moreft.search.study_report``)."""

from __future__ import annotations

import pytest

from moreft.search.study_report import arm_verdict, equal_size_pairs, front_arms, smallest_budgets
from moreft.tasks import MetricGoal


def row(arm: str, family: str, params: int, mean: float, low: float | None, high: float | None) -> dict:
    """An arm with a paired interval [low, high] against the reference (None: the reference itself)."""
    r = {"arm": arm, "family": family, "params": params, "mean": mean, "std": 0.01}
    if low is None:
        return {**r, "reference": True, "delta": None}
    interval = {"estimate": (low + high) / 2, "low": low, "high": high, "level": 0.95}
    return {**r, "reference": False, "delta": {**interval, "resamples": 100, "seeds": 5, "examples": 1000}}


ROWS = [
    row("lora:rank=8", "lora", 800, 0.900, None, None),
    row("lora:rank=1", "lora", 100, 0.880, -0.030, -0.010),  # worse
    row("lora:rank=4", "lora", 400, 0.898, -0.004, 0.001),  # within
    row("more:block_rank=1", "more", 100, 0.897, -0.008, 0.002),  # undecided
    row("more:block_rank=2", "more", 200, 0.903, -0.002, 0.008),  # not worse (may be better)
    row("more:block_rank=4", "more", 400, 0.901, -0.003, 0.004),  # within
    row("mora:rank=8", "mora", 790, 0.870, -0.040, -0.020),  # worse
    row("peft:vera:r=256", "peft:vera", 90, 0.920, 0.010, 0.030),  # better
]

#: What an arm's search adds to its row (a learning rate found well inside its range).
SEARCH = {"lr_low": 1e-4, "lr_high": 1e-2, "best_lr": 1e-3, "best_trial": 0, "best_eval": 0.9, "edge": None}


def test_verdicts_come_from_the_interval_and_the_reference_has_none():
    assert [arm_verdict(r) for r in ROWS] == [
        None,
        "worse",
        "within",
        "undecided",
        "not worse",
        "within",
        "worse",
        "better",
    ]


def test_smallest_budget_per_family_not_worse_and_within():
    got = {f["family"]: f for f in smallest_budgets(ROWS)}
    assert list(got) == ["lora", "more", "mora", "peft:vera"]  # the reference's own row is not an arm here
    assert got["lora"]["arms"] == 2 and got["lora"]["not_worse"]["arm"] == "lora:rank=4"
    assert got["lora"]["within"]["arm"] == "lora:rank=4"
    assert got["more"]["not_worse"]["arm"] == "more:block_rank=2"  # undecided at 100 does not count
    assert got["more"]["within"]["arm"] == "more:block_rank=4"
    assert got["mora"]["not_worse"] is None and got["mora"]["within"] is None
    assert got["peft:vera"]["not_worse"]["arm"] == "peft:vera:r=256" and got["peft:vera"]["within"] is None


def test_equal_size_pairs_meet_the_nearest_arm_of_the_references_method_within_the_tolerance():
    got = [(a["arm"], b["arm"]) for a, b in equal_size_pairs(ROWS)]
    assert got == [
        ("more:block_rank=1", "lora:rank=1"),  # more:block_rank=2 (200) lies 50% from 100 and from 400
        ("more:block_rank=4", "lora:rank=4"),
        ("mora:rank=8", "lora:rank=8"),  # 790 against 800: 1.25% apart; the reference itself is a partner
        ("peft:vera:r=256", "lora:rank=1"),  # 90 against 100: 10% of the larger
    ]
    assert [a["arm"] for a, _ in equal_size_pairs(ROWS, tolerance=0.1)] == [a for a, _ in got]  # at the edge
    assert [a["arm"] for a, _ in equal_size_pairs(ROWS, tolerance=0.05)] == [
        "more:block_rank=1",
        "more:block_rank=4",
        "mora:rank=8",
    ]
    assert (
        equal_size_pairs([{**r, "reference": False} for r in ROWS]) == []
    )  # no reference, no method to meet


def test_the_report_shows_each_equal_size_pair_and_why_one_has_no_interval(tmp_path):
    from types import SimpleNamespace

    from moreft.search.study import SearchSettings
    from moreft.search.study_report import write_task
    from moreft.train.config import TrainConfig

    rows = [{**r, **SEARCH, "verdict": None} for r in ROWS]
    interval = {
        "estimate": 0.012,
        "low": 0.002,
        "high": 0.021,
        "level": 0.95,
        "resamples": 100,
        "seeds": 5,
        "examples": 1000,
    }
    rows[3]["same_size"] = {
        "baseline": "lora:rank=1",
        "baseline_params": 100,
        "delta": interval,
        "verdict": "better",
    }
    rows[6]["same_size"] = {
        "baseline": "lora:rank=8",
        "baseline_params": 800,
        "delta": None,
        "delta_note": "other seeds",
    }
    plan = SimpleNamespace(name="s", description="d", search=SearchSettings(), seeds=5)
    write_task(plan, "t", TrainConfig(task="sentiment", output_dir=str(tmp_path)), rows, "accuracy", None)
    text = (tmp_path / "study.md").read_text()
    assert "| arm | params | against | params | Δ, pts [95% CI] | within 0.5 pt? |" in text
    assert "| more:block_rank=1 | 100 | lora:rank=1 | 100 | +1.20 [+0.20, +2.10] | better |" in text
    assert "| mora:rank=8 | 790 | lora:rank=8 | 800 | n/a (other seeds) | – |" in text


@pytest.mark.parametrize(
    ("goal", "want"),
    [
        (MetricGoal.MAXIMIZE, ["peft:vera:r=256"]),  # the smallest arm is also the best
        (MetricGoal.MINIMIZE, ["peft:vera:r=256", "lora:rank=1", "mora:rank=8"]),
    ],
)
def test_the_front_keeps_arms_no_smaller_arm_beats(goal, want):
    assert [r["arm"] for r in front_arms(ROWS, goal)] == want


def test_the_front_of_a_rising_curve_is_every_improvement():
    rows = [
        row(f"a{i}", "x", p, m, None, None)
        for i, (p, m) in enumerate([(10, 0.5), (20, 0.4), (40, 0.7), (80, 0.9)])
    ]
    assert [r["arm"] for r in front_arms(rows)] == ["a0", "a2", "a3"]


def test_a_loss_metric_has_no_verdict_and_its_difference_is_not_in_points():
    from moreft.search.study_report import _table

    loss = {**row("b", "more", 100, 0.9, -0.03, -0.01), "delta_in_points": False}
    ref = row("a", "lora", 800, 0.95, None, None)
    assert arm_verdict(loss) is None
    assert smallest_budgets([ref, loss])[0]["not_worse"] is None
    table = "\n".join(_table([{**ref, **SEARCH}, {**loss, **SEARCH, "verdict": "–"}], "answer_nll"))
    assert "-0.0200 [-0.0300, -0.0100]" in table and "-2.00" not in table
    assert "Δ vs a [95% CI]" in table and "pts" not in table


def test_a_loss_studys_report_keeps_the_lowest_arms_on_its_front(tmp_path):
    from types import SimpleNamespace

    from moreft.search.study import SearchSettings
    from moreft.search.study_report import write_task
    from moreft.train.config import TrainConfig

    rows = [{**r, **SEARCH, "verdict": None, "delta_in_points": False} for r in ROWS]
    plan = SimpleNamespace(name="s", description="d", search=SearchSettings(), seeds=5)
    write_task(
        plan, "t", TrainConfig(task="math", output_dir=str(tmp_path)), rows, "loss", None, MetricGoal.MINIMIZE
    )
    text = (tmp_path / "study.md").read_text()
    assert "no arm has fewer parameters and a lower test loss" in text
    assert "peft:vera:r=256 (90: 0.9200), lora:rank=1 (100: 0.8800), mora:rank=8 (790: 0.8700)" in text
    assert (tmp_path / "study.png").is_file()


def test_the_pareto_front_is_drawn_in_parameter_order_and_only_when_there_is_one():
    from moreft.train.plots import draw_pareto_front, subplots

    _fig, ax = subplots()
    draw_pareto_front(ax, [], value="mean")
    assert ax.get_lines() == []
    draw_pareto_front(ax, [{"params": 400, "mean": 0.9}, {"params": 100, "mean": 0.8}], value="mean")
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [100, 400] and list(line.get_ydata()) == [0.8, 0.9]
    assert line.get_label() == "Pareto front"
