"""Any peft method as an arm (method peft), test predictions, best checkpoint, eval_fraction, compare's interval."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_bert
from transformers import TrainerCallback

from moreft.cli import main
from moreft.errors import ConfigError
from moreft.tasks import get_task
from moreft.train import compare, load_trained, parse_method_spec, resolve_config, train
from moreft.train.arms import arm_changes, slug
from moreft.train.config import TrainConfig
from moreft.train.peft_arm import PEFT_FILES


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def tiny(model: str, out, **changes) -> TrainConfig:
    base = {
        "task": "sentiment",
        "model": model,
        "method": "lora",
        "rank": 2,
        "max_steps": 6,
        "batch_size": 8,
        "max_examples": 120,
        "eval_examples": 12,
        "max_length": 32,
        "lr": 1e-2,
        "log_every": 2,
        "output_dir": str(out),
        "progress": False,
    }
    return resolve_config(None, {**base, **changes})


# -- specs and settings ---------------------------------------------------------------------------------
def test_peft_specs_use_peft_configs_and_name_close_matches():
    assert parse_method_spec("peft:VeRA:r=256,lr=0.01") == {
        "method": "peft",
        "peft_type": "vera",
        "peft_options": {"r": 256},
        "lr": 0.01,
    }
    assert parse_method_spec("peft:c3a:block_size=64,init_weights=gaussian")["peft_options"] == {
        "block_size": 64,
        "init_weights": "gaussian",
    }
    assert parse_method_spec("peft:boft:boft_block_size=4")["peft_options"] == {"boft_block_size": 4}
    assert parse_method_spec("peft:gralora:r=8,alpha=16")["peft_options"] == {"r": 8, "alpha": 16}
    with pytest.raises(ConfigError, match=r"peft_type='verra' .*did you mean 'vera'"):
        parse_method_spec("peft:verra:r=8")
    with pytest.raises(
        ConfigError, match=r"'rr' is not an option of peft:vera nor a setting.*did you mean 'r'"
    ):
        parse_method_spec("peft:vera:rr=8")
    with pytest.raises(ConfigError, match="peft:vera option r='many' must be an integer"):
        parse_method_spec("peft:vera:r=many")
    with pytest.raises(ConfigError, match="names its type"):
        parse_method_spec("peft")
    with pytest.raises(ConfigError, match="moreft's own methods are method more"):
        parse_method_spec("peft:more:r=8")
    with pytest.raises(ConfigError, match="refused by peft's BOFTConfig"):
        TrainConfig(
            task="sentiment",
            method="peft",
            peft_type="boft",
            peft_options={"boft_block_size": 0, "boft_block_num": 0},
        )
    assert slug(parse_method_spec("peft:vera:r=256,lr=0.01")) == "peft-vera-r256-lr0.01"
    assert slug(parse_method_spec("more:block_rank=4")) == "more-blockrank4"


def test_peft_settings_belong_to_method_peft():
    config = TrainConfig(task="sentiment", method="peft", peft_type="HiRA", peft_options={"r": 4})
    assert (config.peft_type, config.method_label(), config.run_name) == (
        "hira",
        "peft:hira:r=4",
        "sentiment-minilm-peft-hira-seed0",
    )
    with pytest.raises(ConfigError, match="are for method peft, not method 'lora'"):
        TrainConfig(task="sentiment", method="lora", peft_type="vera")
    with pytest.raises(ConfigError, match="needs peft_type"):
        TrainConfig(task="sentiment", method="peft")
    with pytest.raises(ConfigError, match=r"merge_every=10 .* method peft cannot"):
        TrainConfig(task="sentiment", method="peft", peft_type="vera", merge_every=10)
    with pytest.raises(ConfigError, match="no moreft adapter config"):
        config.adapter_config()
    # a moreft arm put on a peft base clears the peft settings
    assert config.replace(**arm_changes(parse_method_spec("lora:rank=8"))).method_label() == "lora:rank=8"


def test_best_checkpoint_and_eval_fraction_rules():
    with pytest.raises(ConfigError, match="best_checkpoint=True needs a checkpoint at every evaluation"):
        TrainConfig(task="sentiment", best_checkpoint=True, eval_every=10, save_every=20)
    with pytest.raises(ConfigError, match=r"eval_fraction=0.5 must be"):
        TrainConfig(task="sentiment", eval_fraction=0.5)
    spam = get_task("spam")
    assert spam.load(0).sizes == {"train": 3610, "validation": 451, "test": 451}  # the default: 80/10/10
    assert spam.load(0, eval_fraction=0.25).sizes == {"train": 2256, "validation": 1128, "test": 1128}
    assert get_task("news").load(0, eval_fraction=0.25).sizes == {
        "train": 1063,
        "validation": 532,
        "test": 532,
    }
    sentiment = get_task("sentiment")
    assert sentiment.load(1, 5, eval_fraction=0.45).sizes == {"train": 1, "validation": 2, "test": 2}
    assert sentiment.load(1, 4, eval_fraction=0.45).sizes == {
        "train": 2,
        "validation": 1,
        "test": 1,
    }  # one kept


# -- runs -------------------------------------------------------------------------------------------------
def test_a_peft_arm_trains_saves_with_peft_evaluates_and_resumes(tiny_bert, tmp_path, capsys):
    config = tiny(tiny_bert, tmp_path, method="peft", peft_type="hira", peft_options={"r": 2}, save_every=2)
    from moreft.search.driver import count_adapter_params

    result = train(config, quiet=True)
    metrics, run = result.metrics, result.run_dir
    assert metrics["label"] == "peft:hira:r=2" and metrics["trainable_params"] == 2 * 3 * 2 * (32 + 32)
    assert metrics["other_trainable_params"] == 32 * 2 + 2  # the classifier, trained in full, not counted
    assert count_adapter_params(config) == metrics["trainable_params"]  # the meta-device count agrees
    assert {p.name for p in (run / "adapter").iterdir()} <= PEFT_FILES
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "HIRA"
    records = [json.loads(line) for line in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert len(records) == metrics["test_examples"] == 12
    assert sum(r["correct"] for r in records) / 12 == pytest.approx(metrics["test_accuracy"])
    assert [r["id"] for r in records] == json.loads((run / "split.json").read_text())["ids"]["test"][:12]
    _, _, model, _ = load_trained(run)
    assert type(model).__name__.startswith("PeftModel")
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 2
    assert "works on moreft's own adapters" in capsys.readouterr().err

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    stopped = config.replace(run_name="stopped")
    with pytest.raises(KeyboardInterrupt):
        train(stopped, callbacks=[Stop()], quiet=True)
    resumed = train(stopped.replace(resume=True), quiet=True)
    assert resumed.metrics["resumed_from"] == "checkpoint-2"
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_checkpoint_scores_the_best_evaluated_adapter(tiny_bert, tmp_path):
    class Spoil(TrainerCallback):  # the last steps ruin the adapter: the best one is an earlier checkpoint
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step >= 5:
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if "lora" in name:
                            p.normal_(0, 50.0)

    config = tiny(tiny_bert, tmp_path, eval_every=2, save_every=2, best_checkpoint=True, eval_examples=40)
    metrics = train(config, callbacks=[Spoil()], quiet=True).metrics
    log = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    periodic = {r["step"]: r["eval_accuracy"] for r in log if "eval_accuracy" in r and r["step"] in (2, 4, 6)}
    best = max(periodic, key=lambda step: (periodic[step], -step))
    assert metrics["best_step"] == best and metrics["eval_accuracy"] == periodic[best]
    saved = load_file(config.run_dir / "adapter" / "adapter_model.safetensors")
    kept = load_file(
        config.run_dir / "checkpoints" / f"checkpoint-{best}" / "adapter" / "adapter_model.safetensors"
    )
    assert all(torch.equal(saved[k], kept[k]) for k in saved)


def test_compare_with_a_peft_arm_reports_the_paired_interval(tiny_bert, tmp_path):
    base = tiny(tiny_bert, tmp_path, max_steps=2, eval_examples=8)
    lines = []
    result = compare(
        base,
        ["lora:rank=2", "peft:vera:r=8", "lora:rank=2,lr=0.02"],
        seeds=2,
        name="cmp",
        reference="lora:rank=2",
        log=lines.append,
    )
    table = (result.path / "compare.md").read_text()
    assert "| lora:rank=2 | 768 | 1.00 |" in table and "| reference | – |" in table
    assert "| peft:vera:r=8 | 240 | 0.31 |" in table and "[95% CI]" in table and "paired bootstrap" in table
    row = result.rows[1]
    assert row["params"] == 2 * 3 * (32 + 8) and row["delta"]["seeds"] == 2 and row["delta"]["examples"] == 16
    assert row["delta"]["low"] <= row["delta"]["estimate"] <= row["delta"]["high"] and row["verdict"]
    assert lines[:2] == ["[1/6] lora:rank=2 seed 0: training", lines[1]] and len(lines) == 12
    assert lines[1].startswith("[1/6] lora:rank=2 seed 0: test accuracy ")
    # the lr override is the same adapter: also a valid reference; an unknown one is refused
    assert compare(
        base,
        ["lora:rank=2", "lora:rank=2,lr=0.02"],
        seeds=2,
        name="cmp",
        reference="lora:rank=2",
        run=lambda c: pytest.fail("trained again"),
    ).rows[0]["reference"]
    with pytest.raises(ConfigError, match="reference 'lora:rank=4' is not one of the arms"):
        compare(base, ["lora:rank=2"], seeds=1, name="cmp", reference="lora:rank=4")


def test_compare_trains_runs_in_worker_processes_with_jobs(tiny_bert, tmp_path):
    base = tiny(tiny_bert, tmp_path, max_steps=2, eval_examples=8)
    lines, finished = [], []
    result = compare(
        base,
        ["lora:rank=2", "peft:vera:r=8"],
        seeds=1,
        name="par",
        jobs=2,
        log=lines.append,
        on_run=lambda config, metrics, seconds: finished.append((config.method_label(), seconds > 0)),
    )
    assert sorted(finished) == [("lora:rank=2", True), ("peft:vera:r=8", True)]
    assert lines[0].startswith("training 2 runs, 2 at a time (") and len(lines) == 3
    sequential = compare(base, ["lora:rank=2", "peft:vera:r=8"], seeds=1, name="seq")
    assert [r["values"] for r in result.rows] == [r["values"] for r in sequential.rows]  # the same runs
    with pytest.raises(ConfigError, match="jobs=0 must be"):
        compare(base, ["lora:rank=2"], seeds=1, name="par", jobs=0)
