"""``moreft search`` with arms (any method spec, peft too), per-method lr ranges, and the range-edge warning."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import optuna
import pytest
import yaml
from tiny import make_tiny_bert

from moreft.cli import main
from moreft.errors import ConfigError
from moreft.search import SearchSettings, SearchSpace, run_search
from moreft.search.driver import candidates
from moreft.search.report import lr_edges
from moreft.search.space import FloatRange, family_of
from moreft.train import loop, resolve_config

STEPS = 4


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-arms"))


def _base(model, out, **changes):
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


def test_arms_and_per_method_ranges():
    space = SearchSpace.from_dict(
        {
            "arms": ["lora:rank=8", "peft:VeRA:r=256"],
            "lr": [1e-4, 1e-3],
            "lr_by_method": {
                "peft:vera": {"low": 1e-3, "high": 1e-1},
                "PEFT": [1e-2, 2e-2],
                "more": {"low": 1e-4, "high": 3e-2},
            },
        }
    )
    assert space.methods == () and list(space.architectures()) == [
        "lora:rank=8 on default",
        "peft:VeRA:r=256 on default",
    ]
    assert space.architectures()["peft:VeRA:r=256 on default"] == {
        "method": "peft",
        "peft_type": "vera",
        "peft_options": {"r": 256},
    }
    assert space.architectures()["lora:rank=8 on default"] == {
        "method": "lora",
        "rank": 8,
        "peft_type": None,
        "peft_options": {},
    }
    assert space.lr_for("peft:vera") == FloatRange(low=1e-3, high=1e-1)
    assert space.lr_for("peft:boft") == FloatRange(low=1e-2, high=2e-2)  # the method's range
    assert space.lr_for("lora") == FloatRange(low=1e-4, high=1e-3)  # the space's range
    assert space.lr_for("more") == FloatRange(low=1e-4, high=3e-2)
    assert SearchSpace.from_dict(yaml.safe_load(yaml.safe_dump(space.to_dict()))) == space
    assert "arms" not in SearchSpace().to_dict() and "lr_by_method" not in SearchSpace().to_dict()
    assert [
        family_of(k) for k in ("more:nblocks=4,block_rank=1 on default", "peft:VeRA:r=256 on query", "lora")
    ] == ["more", "peft:vera", "lora"]
    # both: the sized methods and the arms
    both = SearchSpace.from_dict({"methods": ["lora"], "lora": {"rank": [4]}, "arms": ["peft:hira:r=2"]})
    assert list(both.architectures()) == ["lora:rank=4 on default", "peft:hira:r=2 on default"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"arms": ["lora:rank=8", "lora:rank=8"]}, "are the same arm"),
        ({"arms": ["lora:rank=8,lr=0.1"]}, r"sets \['lr'\]; a search arm chooses the adapter only"),
        ({"arms": ["peft:verra:r=8"]}, "did you mean 'vera'"),
        ({"methods": ["peft"]}, "other methods, and peft ones, go in arms"),
        ({"lr_by_method": {"dora": [1e-4, 1e-3]}}, "lr_by_method key 'dora' must be a method"),
        ({"lr_by_method": {"peft:verra": [1e-4, 1e-3]}}, "did you mean 'vera'"),
        ({"lr_by_method": {"more:x": [1e-4, 1e-3]}}, "only peft arms have a type"),
        ({"lr_by_method": {"more": {"low": 1e-2, "high": 1e-3}}}, "low=0.01 must be <= high=0.001"),
    ],
)
def test_bad_arms_and_ranges_name_the_entry(data, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_dict(data)


def test_each_architecture_samples_its_own_range():
    space = SearchSpace.from_dict(
        {
            "arms": ["lora:rank=8", "more:block_rank=1"],
            "lr": [1e-4, 1e-3],
            "lr_by_method": {"more": [1e-2, 1e-1]},
        }
    )
    keys = list(space.architectures())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(30):
        trial = study.ask()
        key, lr, _ = space.suggest(trial, keys)
        seen.append((family_of(key), lr))
        study.tell(trial, 0.0)
    assert all((1e-2 <= lr <= 1e-1) if f == "more" else (1e-4 <= lr <= 1e-3) for f, lr in seen)
    assert {f for f, _ in seen} == {"more", "lora"}


def test_the_report_flags_a_best_lr_on_the_edge_of_its_range():
    space = SearchSpace.from_dict(
        {
            "arms": ["lora:rank=8", "more:block_rank=1", "mora:rank=8"],
            "lr": [1e-4, 1e-2],
            "lr_by_method": {"more": [1e-3, 1e-1]},
        }
    )

    def row(number, label, lr, value, state="complete"):
        return {
            "number": number,
            "state": state,
            "label": label,
            "method": label.split(":")[0],
            "lr": lr,
            "value": value,
        }

    rows = [
        row(0, "lora:rank=8", 1.1e-4, 0.9),
        row(1, "lora:rank=8", 1e-3, 0.8),  # best at the low edge
        row(2, "more:block_rank=1", 1e-2, 0.85),
        row(3, "more:block_rank=1", 9e-2, 0.7),  # best in the middle
        row(4, "mora:rank=8", 9e-3, 0.6),
        row(5, "mora:rank=8", 1e-4, 0.99, state="pruned"),
    ]  # high edge
    edges = {e["family"]: e for e in lr_edges(rows, space)}
    assert edges["lora"]["edge"] == "low" and "widen the range below" in edges["lora"]["warning"]
    assert edges["lora"]["best_trial"] == 0 and edges["lora"]["position"] == pytest.approx(
        math.log10(1.1) / 2, abs=1e-4
    )
    assert edges["more"]["edge"] is None and edges["more"]["warning"] is None
    assert edges["mora"]["edge"] == "high" and edges["mora"]["best_trial"] == 4  # pruned trials do not count


def _fake_train(calls):
    def fake(config, callbacks=(), quiet=False):
        calls.append(config)
        score = 0.9 - 0.1 * abs(math.log10(config.lr / 1e-2))
        for step in (2, 4):
            for cb in callbacks:
                cb.on_evaluate(
                    None,
                    SimpleNamespace(global_step=step, max_steps=STEPS),
                    None,
                    metrics={"eval_accuracy": score},
                )
        return loop.RunResult(
            config.run_dir, {"eval_accuracy": score, "test_accuracy": score, "train_seconds": 0.0}, config
        )

    return fake


def test_a_search_over_arms_counts_peft_arms_and_reports_the_edges(tiny_bert, tmp_path, monkeypatch, capsys):
    base = _base(tiny_bert, tmp_path)
    space = SearchSpace.from_dict(
        {
            "arms": ["lora:rank=2", "peft:vera:r=8"],
            "lr": [1e-4, 1e-3],
            "lr_by_method": {"peft:vera": [1e-3, 1e-1]},
            "batch_size": [8],
        }
    )
    found = {c.key: c.params for c in candidates(base, space, None)}
    assert found == {"lora:rank=2 on default": 768, "peft:vera:r=8 on default": 6 * (32 + 8)}
    calls: list = []
    monkeypatch.setattr(loop, "train", _fake_train(calls))
    result = run_search(base, space, SearchSettings(trials=6, pruner="none", sampler="random"), quiet=True)
    assert {c.method_label() for c in calls} == {"lora:rank=2", "peft:vera:r=8"}
    assert all(1e-3 <= c.lr <= 1e-1 for c in calls if c.method == "peft")
    report = (result.path / "search.md").read_text()
    assert (
        "## Learning rate against its range" in report
        and "| peft:vera | [1.00e-03, 1.00e-01] log |" in report
    )
    saved = json.loads((result.path / "search.json").read_text())
    assert {e["family"] for e in saved["lr_edges"]} == {"lora", "peft:vera"}
    # the command line: --arms replaces the space's methods
    capsys.readouterr()
    assert (
        main(
            [
                "search",
                "--task",
                "sentiment",
                "--model",
                tiny_bert,
                "--max-steps",
                "4",
                "--eval-every",
                "2",
                "--max-examples",
                "120",
                "--eval-examples",
                "8",
                "--max-length",
                "32",
                "--output-dir",
                str(tmp_path),
                "--arms",
                "lora:rank=2",
                "peft:vera:r=8",
                "--trials",
                "2",
                "--pruner",
                "none",
                "--name",
                "cli",
                "--no-progress",
            ]
        )
        == 0
    )
    assert {c.method_label() for c in calls[6:]} <= {"lora:rank=2", "peft:vera:r=8"} and len(calls) == 8
