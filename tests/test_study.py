"""``moreft study``: plans, the cost estimate, the per-arm searches, the final seeds, the report, and continuing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import make_tiny_bert

from moreft.cli import main
from moreft.errors import ConfigError
from moreft.search.study_report import arm_verdict
from moreft.search.studyplan import check_arms, read_plan, run_cost, run_seconds, task_configs
from moreft.search.studyrun import estimate
from moreft.train import loop
from moreft.train.choices import TRAIN_METHODS as METHODS
from moreft.train.compare_report import delta_text
from moreft.train.statistics import VERDICT_TEXT

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-study"))


def write_plan(path: Path, model: str, **changes) -> Path:
    plan = {
        "description": "tiny study",
        "name": "tiny",
        "output_dir": str(path.parent / "out"),
        "settings": {
            "model": model,
            "max_steps": 4,
            "batch_size": 8,
            "max_examples": 120,
            "eval_examples": 8,
            "max_length": 32,
            "eval_every": 2,
            "save_every": 2,
            "best_checkpoint": True,
            "log_every": 2,
        },
        "tasks": {"sent": {"settings": {"task": "sentiment", "eval_fraction": 0.2}}},
        "arms": ["lora:rank=2", "peft:vera:r=8", "more:block_rank=2"],
        "reference": "lora:rank=2",
        "search": {"trials": 2, "sampler": "random", "pruner": "none"},
        "space": {
            "lr": {"low": 1e-3, "high": 1e-2},
            "lr_by_method": {"peft:vera": [1e-2, 1e-1]},
            "batch_size": [8],
        },
        "seeds": 2,
        "budget": {
            "seconds_per_step": {"default": 0.5, "peft:vera": 1.0},
            "seconds_per_eval_example": 0.01,
            "seconds_per_run": 2,
            "measured": "made up for the test",
        },
    }
    plan.update(changes)
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def test_plans_are_checked(tiny_bert, tmp_path):
    plan = read_plan(write_plan(tmp_path / "p.yaml", tiny_bert))
    assert plan.selected(("peft",)) == ("peft:vera:r=8",) and plan.selected((), ("more", "lora:rank=2")) == (
        "peft:vera:r=8",
    )
    with pytest.raises(ConfigError, match="arm pattern 'full' matches none"):
        plan.selected(("full",))
    for changes, message in [
        ({"arms": ["lora:rank=2", "lora:rank=2"]}, "repeat an arm"),
        ({"search": {"trials": 2, "name": "x"}}, r"search has key\(s\) \['name'\]"),
        ({"space": {"arms": ["lora"]}}, "may not list arms"),
        ({"seeds": 0}, "seeds=0 must be an integer >= 1"),
        ({"tasks": {}}, "needs tasks"),
        ({"budget": {"seconds_per_step": -1}}, "must be a number of seconds"),
        ({"colour": 1}, r"unknown key\(s\) \['colour'\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            read_plan(write_plan(tmp_path / "bad.yaml", tiny_bert, **changes))
    with pytest.raises(ConfigError, match=r"unknown method 'dora'.*--skip-arms dora"):
        check_arms(["dora:rank=2"], None)
    with pytest.raises(ConfigError, match="reference 'lora:rank=4' is not one of the arms"):
        check_arms(["lora:rank=2"], "lora:rank=4")


def test_the_estimate_counts_steps_evaluations_and_runs(tiny_bert, tmp_path):
    plan = read_plan(
        write_plan(
            tmp_path / "p.yaml",
            tiny_bert,
            settings={
                "model": tiny_bert,
                "epochs": 2,
                "batch_size": 8,
                "max_examples": 120,
                "eval_every": 5,
                "save_every": 5,
                "best_checkpoint": True,
            },
        )
    )
    config = task_configs(plan)["sent"]
    assert config.output_dir == str(tmp_path / "out" / "tiny" / "sent") and config.eval_fraction == 0.2
    cost = run_cost(config)  # 120 examples: 72 / 24 / 24; 9 batches of 8 per epoch, 2 epochs
    assert (
        cost.train_examples,
        cost.validation_examples,
        cost.test_examples,
        cost.steps,
        cost.evaluations,
    ) == (72, 24, 24, 18, 3)  # evaluations at steps 5, 10, 15; the best one is reused at the end
    budget = plan.task_budget("sent")
    assert run_seconds(cost, budget, "lora") == pytest.approx(18 * 0.5 + (3 * 24 + 24) * 0.01 + 2)
    assert run_seconds(cost, budget, "peft:vera") == pytest.approx(18 * 1.0 + (3 * 24 + 24) * 0.01 + 2)
    (row,) = estimate(plan, {"sent": config}, plan.arms)
    assert row["runs"] == 3 * (2 + 2) and row["seconds"] == pytest.approx(4 * sum(row["per_arm"].values()))


def test_a_study_searches_each_arm_runs_seeds_reports_and_continues(tiny_bert, tmp_path, capsys, monkeypatch):
    path = write_plan(tmp_path / "p.yaml", tiny_bert)
    assert main(["study", "--plan", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "study tiny: 1 task(s) x 3 arms, 2 trials per arm, 2 seeds" in out and "| sent | 72 / 8 / 8 |" in out
    )
    assert not (tmp_path / "out").exists()  # a dry run trains nothing

    assert main(["study", "--plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[sent] search 1/3 lora:rank=2: 2 trials" in out and "study: 12/12 runs done" in out
    folder = tmp_path / "out" / "tiny" / "sent"
    assert sorted(p.name for p in folder.iterdir()) == [
        "final",
        "search-lora-rank2",
        "search-more-blockrank2",
        "search-peft-vera-r8",
        "study.json",
        "study.md",
        "study.png",
    ]
    rows = json.loads((folder / "study.json").read_text())["rows"]
    assert [r["arm"] for r in rows] == ["lora:rank=2", "peft:vera:r=8", "more:block_rank=2"]
    vera = rows[1]
    assert 1e-2 <= vera["best_lr"] <= 1e-1 and vera["params"] == 6 * (32 + 8) and len(vera["values"]) == 2
    assert vera["delta"]["seeds"] == 2 and rows[0]["reference"]
    # every arm's interval is a score's, in points, with a verdict the budget table counts
    assert all(r["delta_in_points"] is True for r in rows)
    assert all(arm_verdict(r) in VERDICT_TEXT for r in rows if not r["reference"])
    searched = json.loads((folder / "search-peft-vera-r8" / "search.json").read_text())["rows"]
    best = max(searched, key=lambda r: (r["value"], -r["number"]))
    compare_rows = json.loads((folder / "final" / "compare.json").read_text())["rows"]
    run_config = yaml.safe_load((Path(compare_rows[1]["runs"][0]) / "config.yaml").read_text())
    assert run_config["lr"] == best["lr"] and run_config["method"] == "peft"  # the final runs use the best lr
    table = (folder / "study.md").read_text()
    assert "| lora:rank=2 | 768 |" in table and "| reference |" in table and "within 0.5 pt?" in table
    assert "| Δ vs lora:rank=2, pts [95% CI] |" in table
    assert "| method | arms | smallest not worse by > 0.5 pt | smallest within ±0.5 pt |" in table
    assert "| peft:vera | 1 |" in table and "| more | 1 |" in table and "Pareto front (" in table
    assert all(r["peak_rss_mb"] > 0 and r["seconds"] > 0 for r in rows)
    # MoRe block_rank 2 has LoRA r=2's size: its equal-size pair is the reference, with the same interval
    more = rows[2]
    assert more["params"] == rows[0]["params"] and "same_size" not in rows[1]  # VeRA: 240, no partner
    assert more["same_size"]["baseline"] == "lora:rank=2" and more["same_size"]["delta"] == more["delta"]
    assert f"| more:block_rank=2 | 768 | lora:rank=2 | 768 | {delta_text(more)} |" in table
    assert "## sent" in (tmp_path / "out" / "tiny" / "study.md").read_text()

    # again: everything is found done, nothing trains
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("trained again"))
    assert main(["study", "--plan", str(path)]) == 0
    assert "study: 12/12 runs done" in capsys.readouterr().out
    # a range for a method no arm uses changes no search; a new range for one arm stops at that arm
    space = {
        "lr": [1e-3, 1e-2],
        "lr_by_method": {"peft:vera": [1e-2, 1e-1], "mora": [1e-4, 1e-3]},
        "batch_size": [8],
    }
    assert main(["study", "--plan", str(write_plan(path, tiny_bert, space=space))]) == 0
    space["lr_by_method"] = {"peft:vera": [2e-2, 1e-1]}
    assert main(["study", "--plan", str(write_plan(path, tiny_bert, space=space))]) != 0
    assert (
        "[sent] the search of peft:vera:r=8: study 'search-peft-vera-r8'" in (err := capsys.readouterr().err)
        and "peft:vera:r=8 on default: lr [0.01, 0.1] -> [0.02, 0.1]" in err
        and f"move {folder / 'search-peft-vera-r8'} aside" in err
    )


def test_full_fine_tuning_is_searched_and_counted_like_its_runs(tiny_bert, tmp_path, capsys):
    space = {"lr": {"low": 1e-3, "high": 1e-2}, "lr_by_method": {"full": [1e-5, 1e-4]}, "batch_size": [8]}
    path = write_plan(
        tmp_path / "p.yaml",
        tiny_bert,
        arms=["lora:rank=2", "full"],
        search={"trials": 1, "sampler": "random", "pruner": "none"},
        space=space,
        seeds=1,
    )
    assert main(["study", "--plan", str(path)]) == 0
    assert "study: 4/4 runs done" in capsys.readouterr().out
    folder = tmp_path / "out" / "tiny" / "sent"
    full = json.loads((folder / "study.json").read_text())["rows"][1]
    compare_row = json.loads((folder / "final" / "compare.json").read_text())["rows"][1]
    metrics = json.loads((Path(compare_row["runs"][0]) / "metrics.json").read_text())
    assert full["arm"] == "full" and 1e-5 <= full["best_lr"] <= 1e-4
    assert full["params"] == metrics["trainable_params"] == compare_row["params"] > 100_000


def test_an_interrupted_study_continues_where_it_stopped(tiny_bert, tmp_path, capsys, monkeypatch):
    path = write_plan(
        tmp_path / "p.yaml", tiny_bert, arms=["lora:rank=2", "more:block_rank=1"], reference=None, seeds=2
    )
    real, calls = loop.train, []

    def stop_at_the_second_final_run(config, callbacks=(), quiet=False):
        calls.append(config.run_name)
        if len([c for c in calls if "seed" in c]) == 2:
            raise KeyboardInterrupt
        return real(config, callbacks=callbacks, quiet=quiet)

    monkeypatch.setattr(loop, "train", stop_at_the_second_final_run)
    assert main(["study", "--plan", str(path)]) == 130
    assert "run the same command again" in capsys.readouterr().err
    trained = []
    monkeypatch.setattr(
        loop, "train", lambda config, **k: trained.append(config.run_name) or real(config, **k)
    )
    assert main(["study", "--plan", str(path)]) == 0
    # the searches and the first final run were done: the 3 other final runs train, nothing else
    assert len(trained) == 3 and trained[0].startswith("lora-rank2-lr") and trained[0].endswith("-seed1")
    assert all("seed" in name for name in trained)


def test_the_gpu_plan_dry_runs_on_a_cpu(monkeypatch, capsys):
    monkeypatch.setenv("ROBERTA_LARGE", "/models/roberta-large")
    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    plan = str(RECIPES / "fidelity" / "gpu-glue-roberta-large.yaml")
    assert main(["study", "--plan", plan, "--dry-run", "--skip-arms", "full"]) == 0
    out = capsys.readouterr().out
    assert "7 task(s) x 4 arms, 4 trials per arm, 5 seeds" in out and "| mnli | – |" in out  # no data here


def test_every_fidelity_plan_resolves_and_estimates():
    """The plans validate, every arm included, and each CPU plan's arms are counted on the packaged model
    as the study counts them before its searches (full fine-tuning: every parameter)."""
    from moreft.search.driver import count_adapter_params
    from moreft.train.arms import arm_changes, parse_method_spec

    plans = sorted((RECIPES / "fidelity").glob("*.yaml"))
    assert {p.stem for p in plans} >= {"sentiment", "news", "spam", "gpu-glue-roberta-large"}
    for file in plans:
        plan = read_plan(file)
        arms = plan.arms
        assert all(a.split(":")[0].lower() in METHODS for a in arms), file
        parsed = check_arms(arms, plan.reference)
        assert plan.seeds >= 5 and plan.search.trials >= 2
        assert all(p["method"] != "lora" or p.get("alpha") for p in parsed if p["method"] == "lora"), file
        if plan.requires:  # the GPU plan: checked by resolving it with stand-in paths
            env = {name: "/nonexistent" for name in plan.requires}
            configs = task_configs(plan, env=env)
            assert all(c.model == "/nonexistent" for c in configs.values())
            assert all(c.best_checkpoint and c.precision == "fp32" for c in configs.values())
            with pytest.raises(ConfigError, match=r"needs (ROBERTA_LARGE|GLUE_DIR)"):
                task_configs(plan, env={})
        else:
            configs = task_configs(plan)
            (row,) = estimate(plan, configs, arms)
            assert row["seconds"] is not None and row["test"] >= 500, file
            (base,) = configs.values()
            sizes = {a: count_adapter_params(base.replace(**arm_changes(parse_method_spec(a)))) for a in arms}
            assert sizes["lora:rank=8,alpha=16"] == 110_592 and sizes["full"] > 22_000_000, file
            assert all(n > 0 for n in sizes.values()), file


def test_the_gpu_plan_arms_have_the_sizes_of_table_3(tmp_path):
    """LoRA r=8 on query/value and MoRe N=4 block_rank 4 / 1 on q, k, v of RoBERTa-large (a config, no weights:
    counted on the meta device)."""
    from transformers import RobertaConfig

    from moreft.search.driver import count_adapter_params
    from moreft.train.arms import arm_changes, parse_method_spec
    from moreft.train.config import TrainConfig

    RobertaConfig(
        vocab_size=50265,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=514,
        type_vocab_size=1,
    ).save_pretrained(tmp_path)
    base = TrainConfig(task="sentiment", model=str(tmp_path), target_modules=("query", "key", "value"))
    plan = read_plan(RECIPES / "fidelity" / "gpu-glue-roberta-large.yaml")
    sizes = {
        arm: count_adapter_params(base.replace(**arm_changes(parse_method_spec(arm))))
        for arm in plan.arms
        if not arm.startswith(("full", "peft:boft"))
    }
    assert sizes == {
        "lora:rank=8,alpha=16,target_modules=query value": 786_432,
        "more:block_rank=4": 589_824,
        "more:block_rank=1": 147_456,
    }
