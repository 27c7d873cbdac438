"""``moreft search``: space and settings validation, parameter budget, Pareto front, pruning, resume, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from tiny import make_tiny_bert

import moreft
from moreft.cli import main
from moreft.errors import ConfigError
from moreft.models import load_model
from moreft.search import SearchSettings, SearchSpace, StudyMismatchError, count_adapter_params, run_search
from moreft.search.driver import candidates, square_block_rank
from moreft.search.report import pareto_front
from moreft.tasks import MetricGoal
from moreft.train import loop, resolve_config

BEST_LR = 3e-3
STEPS = 8


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-search"))


def _base(model: str, out: Path, **changes):
    base = {
        "task": "sentiment",
        "model": model,
        "max_steps": STEPS,
        "eval_every": 2,
        "max_examples": 120,
        "eval_examples": 8,
        "max_length": 32,
        "log_every": 2,
        "output_dir": str(out),
        "progress": False,
    }
    return resolve_config(None, {**base, **changes})


# -- space and settings ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"methods": ["more", "dora"]},
            r"search space methods: 'dora' is not one of \['more', 'mora', 'lora'\]",
        ),
        ({"batch_size": []}, r"search space batch_size=\[\] is empty"),
        ({"lr": {"low": 1e-3, "high": 1e-4}}, r"search space lr: low=0.001 must be <= high=0.0001"),
        ({"lr": {"low": "fast", "high": 1e-3}}, r"search space lr.low='fast' must be a number"),
        ({"more": {"block_rank": [2, 2]}}, r"search space more.block_rank=\[2, 2\] repeats a choice"),
        (
            {"more": {"block_shape": ["round"]}},
            r"more.block_shape='round' is not one of 'rectangular', 'square'",
        ),
        ({"mora": {"operator": ["spin"]}}, r"mora.operator='spin' is not one of"),
        (
            {"lora": {"ranks": [8]}},
            r"search space 'lora' has unknown key\(s\) \['ranks'\]; valid keys are \['rank'",
        ),
        ({"epochs": [1]}, r"search space 'space' has unknown key\(s\) \['epochs'\]"),
    ],
)
def test_bad_spaces_name_the_entry_and_rule(data, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_dict(data)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"reduction_factor": 1}, "search reduction_factor=1 must be an integer >= 2"),
        ({"trials": 0}, "search trials=0 must be an integer >= 1"),
        ({"pruner": "median"}, r"search pruner='median' is not one of 'asha', 'hyperband', 'none'"),
        ({"storage": "study.db"}, "search storage='study.db' must be a database URL"),
        ({"pruners": "asha"}, r"search settings have unknown key\(s\) \['pruners'\]"),
    ],
)
def test_bad_settings_name_the_entry_and_rule(data, message):
    with pytest.raises(ConfigError, match=message):
        SearchSettings.from_dict(data)


def test_space_defaults_follow_the_more_paper_and_round_trip():
    space = SearchSpace()
    assert (space.lr.low, space.lr.high, space.lr.log) == (1e-4, 6.6e-4, True)
    assert (
        space.batch_size == (16, 32) and space.more.block_rank == (1, 2, 4, 8) and space.more.nblocks == (4,)
    )
    assert SearchSpace.from_dict(yaml.safe_load(yaml.safe_dump(space.to_dict()))) == space
    keys = SearchSpace(
        methods=("more", "lora", "mora"),
        target_modules=("default", "query"),
        more={"block_rank": [2], "block_shape": ["rectangular", "square"], "square_nblocks": [8]},
        lora={"rank": [4]},
        mora={"operator": ["sharing"]},
    ).architectures()
    assert list(keys) == [
        f"{m} on {t}"
        for m in (
            "more:nblocks=4,block_rank=2",
            "more:square,nblocks=8",
            "lora:rank=4",
            "mora:rank=8,operator=sharing",
        )
        for t in ("default", "query")
    ]
    assert keys["lora:rank=4 on query"] == {
        "method": "lora",
        "rank": 4,
        "alpha": 8.0,
        "target_modules": "query",
    }


# -- counting without training -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [
        {"method": "more", "nblocks": 4, "block_rank": 2},
        {"method": "lora", "rank": 4, "target_modules": "all-linear"},
        {"method": "mora", "rank": 8, "operator": "sharing"},
    ],
)
def test_meta_count_equals_the_real_model(tiny_bert, tmp_path, changes):
    config = _base(tiny_bert, tmp_path).replace(**changes)
    model, _ = load_model(tiny_bert, "classification", num_labels=2)
    targets = ("query", "key", "value") if config.target_modules is None else config.target_modules
    moreft.inject(model, config.adapter_config(targets, ("classifier",)))
    assert count_adapter_params(config) == moreft.count_parameters(model).adapter > 0


def test_square_blocks_and_the_budget_are_resolved_before_training(tiny_bert, tmp_path):
    base = _base(tiny_bert, tmp_path)
    assert square_block_rank(base, 4, None) == 8  # 32-wide layers in 4 blocks of 8 x 8
    space = SearchSpace(
        methods=("more", "lora"),
        more={"block_rank": [1, 8], "block_shape": ["rectangular", "square"], "square_nblocks": [4, 64]},
        lora={"rank": [2]},
    )
    found = {c.key.removesuffix(" on default"): c for c in candidates(base, space, max_params=1000)}
    assert (
        found["more:nblocks=4,block_rank=1"].params == 6 * 64
        and found["more:nblocks=4,block_rank=1"].excluded is None
    )
    assert found["more:nblocks=4,block_rank=8"].excluded == "3,072 params > max_params 1,000"
    assert found["more:square,nblocks=4"].changes["block_rank"] == 8
    assert (
        "nblocks=64 exceeds the width of a targeted layer (smallest is 32)"
        in found["more:square,nblocks=64"].excluded
    )
    assert found["lora:rank=2"].params == 6 * 2 * 64
    with pytest.raises(ConfigError, match="max_params=10 but the smallest valid one has 384 adapter params"):
        candidates(base, space, max_params=10)


def test_pareto_front_keeps_only_undominated_trials():
    rows = [
        {"number": n, "state": s, "params": p, "value": v}
        for n, s, p, v in [
            (0, "complete", 100, 0.70),
            (1, "complete", 50, 0.60),
            (2, "complete", 200, 0.65),
            (3, "pruned", 10, 0.90),
            (4, "complete", 300, 0.80),
            (5, "complete", 50, 0.60),
        ]
    ]
    assert [r["number"] for r in pareto_front(rows)] == [1, 0, 4]
    # perplexity-like: lower is better, so only 1 (fewest params) and 2 (lower at more params) survive
    assert [r["number"] for r in pareto_front(rows, MetricGoal.MINIMIZE)] == [1]
    rows[2]["value"] = 0.5
    assert [r["number"] for r in pareto_front(rows, MetricGoal.MINIMIZE)] == [1, 2]


# -- searches with a scripted trainer (no training: the pruning and bookkeeping are under test) ------------
def _scripted_train(calls: list, interrupt_first: bool = False):
    """Stands in for moreft.train.train: reports a score that is best at lr = BEST_LR at each eval step."""

    def fake(config, callbacks=(), quiet=False):
        calls.append(config)
        if interrupt_first and len(calls) == 1:
            raise KeyboardInterrupt
        score = max(0.0, 0.9 - 0.3 * abs(math.log10(config.lr / BEST_LR)))
        for step in range(config.eval_every, STEPS + 1, config.eval_every):
            value = score * step / STEPS
            state = SimpleNamespace(global_step=step, max_steps=STEPS)
            for cb in callbacks:
                cb.on_evaluate(None, state, None, metrics={"eval_accuracy": value})
        metrics = {"eval_accuracy": score, "test_accuracy": score - 0.01, "train_seconds": 0.0}
        return loop.RunResult(config.run_dir, metrics, config)

    return fake


def test_asha_prunes_and_the_report_has_front_plot_and_best_recipe(tiny_bert, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(loop, "train", _scripted_train(calls))
    base = _base(tiny_bert, tmp_path)
    space = SearchSpace(
        methods=("more", "lora"),
        lr=(1e-4, 1e-1),
        batch_size=(8, 16),
        more={"block_rank": [1, 2]},
        lora={"rank": [4]},
    )
    settings = SearchSettings(trials=10, reduction_factor=2, sampler="random", max_params=1000)
    result = run_search(base, space, settings, command="moreft search ...", quiet=True)
    states = [r["state"] for r in result.rows]
    assert len(states) == 10 and states.count("pruned") >= 2 and states.count("complete") >= 2
    assert all(r["step"] < STEPS for r in result.rows if r["state"] == "pruned")
    assert all(c.params <= 1000 for c in result.candidates if c.excluded is None)
    assert {c.method for c in calls} == {
        "more"
    }  # lora rank 4 (1,536 params) is over the budget: never trained
    for name in ("search.md", "search.png", "search.json", "best.yaml", "study.db"):
        assert (result.path / name).is_file(), name
    best = max((r for r in result.rows if r["state"] == "complete"), key=lambda r: r["value"])
    recipe = resolve_config(result.path / "best.yaml")
    assert recipe.lr == pytest.approx(best["lr"]) and recipe.batch_size == best["batch_size"]
    assert recipe.replace(run_name=None) == result.best_config.replace(
        run_name=None, output_dir="runs", progress=True, overwrite=False
    )
    report = (result.path / "search.md").read_text()
    assert (
        "moreft search ..." in report and "## Pareto front" in report and "lora:rank=4 on default" in report
    )
    saved = json.loads((result.path / "search.json").read_text())
    assert saved["front"] == [r["number"] for r in pareto_front(result.rows)]

    again = run_search(base, space, SearchSettings(**{**settings.to_dict(), "trials": 12}), quiet=True)
    assert len(again.rows) == 12 and len(calls) == 12  # resumed from the SQLite study: 2 new trials only
    assert {c.lr for c in calls[10:]}.isdisjoint(c.lr for c in calls[:10])  # new draws, not the first ones
    with pytest.raises(StudyMismatchError, match=r"made with a different base \(max_steps: 8 -> 6\)"):
        run_search(base.replace(max_steps=6), space, settings, quiet=True)
    with pytest.raises(ConfigError, match=r"different max_params \(max_params: 1000 -> 2000\)"):
        run_search(base, space, SearchSettings(**{**settings.to_dict(), "max_params": 2000}), quiet=True)
    # a range for a method this search does not sample changes nothing: the study resumes
    other = dataclasses.replace(space, lr_by_method={"peft:hira": (1e-3, 1e-1), "mora": (1e-3, 1e-2)})
    assert (
        len(run_search(base, other, SearchSettings(**{**settings.to_dict(), "trials": 12}), quiet=True).rows)
        == 12
    )
    with pytest.raises(
        ConfigError,
        match=r"different space \(lora:rank=4 on default: lr \[0\.0001, 0\.1\] -> \[0\.001, 0\.01\]\)",
    ):
        run_search(
            base, dataclasses.replace(space, lr_by_method={"lora": (1e-3, 1e-2)}), settings, quiet=True
        )
    with pytest.raises(ConfigError, match=r"architectures added: lora:rank=8 on default\)"):
        run_search(base, dataclasses.replace(space, lora={"rank": [4, 8]}), settings, quiet=True)


def test_an_interrupted_trial_is_retried_on_resume(tiny_bert, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(loop, "train", _scripted_train(calls, interrupt_first=True))
    base = _base(tiny_bert, tmp_path)
    settings = SearchSettings(trials=2, pruner="none", sampler="random")
    with pytest.raises(KeyboardInterrupt):
        run_search(base, SearchSpace(), settings, quiet=True)
    result = run_search(base, SearchSpace(), settings, quiet=True)
    assert [r["state"] for r in result.rows] == ["fail", "complete", "complete"]
    assert result.rows[1]["note"] == "retry of trial 0"
    assert calls[1].lr == calls[0].lr and calls[1].block_rank == calls[0].block_rank
    # the resumed worker draws anew: not the first session's values again
    assert calls[2].lr != calls[0].lr


def test_a_trial_left_running_by_a_killed_search_does_not_hold_a_place_in_the_budget():
    from moreft.search.settings import SESSION
    from moreft.search.study import started

    study = optuna.create_study()
    study.tell(study.ask(), 0.5)  # finished: counted for every session
    study.ask().set_user_attr(SESSION, "killed")  # running since a killed search: never finishes
    study.ask().set_user_attr(SESSION, "now")  # running in this search
    assert started(study, "now") == 2 and started(study, "killed") == 2 and started(study, "other") == 1


def test_pruning_needs_eval_every(tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match="pruner 'asha' needs intermediate scores: set eval_every"):
        run_search(_base(tiny_bert, tmp_path, eval_every=None), quiet=True)


def test_cli_search(tiny_bert, tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(loop, "train", _scripted_train(calls))
    spec = tmp_path / "space.yaml"
    spec.write_text(
        "space:\n  methods: [more, mora]\n  lr: {low: 1e-3, high: 1e-2}\n"
        "search:\n  trials: 3\n  pruner: hyperband\n"
    )
    flags = [
        "--task",
        "sentiment",
        "--model",
        tiny_bert,
        "--max-steps",
        str(STEPS),
        "--eval-every",
        "2",
        "--max-examples",
        "120",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    ]
    argv = ["search", *flags, "--space", str(spec), "--trials", "2", "--name", "s"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "# Search: sentiment" in out and "## Best trials" in out
    # the command recorded is the argv main() was given (not sys.argv, which is pytest's here)
    assert f"```\nmoreft {shlex.join(argv)}\n```" in (tmp_path / "s" / "search.md").read_text()
    assert len(calls) == 2 and all(1e-3 <= c.lr <= 1e-2 for c in calls)
    spec.write_text("space: {}\nsearch_space: {}\n")
    assert main(["search", *flags, "--space", str(spec)]) == 2
    assert (
        "has unknown key(s) ['search_space']; valid keys are ['description', 'space', 'search']"
        in capsys.readouterr().err
    )


# -- real trials -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_search_with_two_worker_processes(tiny_bert, tmp_path):
    base = _base(tiny_bert, tmp_path, max_steps=4)
    space = SearchSpace(methods=("more", "lora"), lr=(1e-3, 1e-2), batch_size=(8,), lora={"rank": [2]})
    result = run_search(base, space, SearchSettings(trials=3, jobs=2, pruner="none"), quiet=True)
    done = [r for r in result.rows if r["state"] == "complete"]
    # the second worker to finish does not start a 4th trial while the 3rd runs
    assert len(result.rows) == len(done) == 3 and all(0.0 <= r["value"] <= 1.0 for r in done)
    assert all((result.path / "trials" / f"trial-{r['number']:04d}" / "metrics.json").is_file() for r in done)
    assert optuna.load_study(
        study_name=result.path.name, storage=f"sqlite:///{result.path / 'study.db'}"
    ).trials
