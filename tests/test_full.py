"""``method: full`` (full fine-tuning, the reference arm): config, training, saving, resume, eval, merge,
export-lora's refusal, inspect's ΔW = W_trained - W_initial, parameter counts and compare, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_char_llama, make_tiny_bert
from transformers import TrainerCallback

import moreft
from moreft.cli import main
from moreft.config import Method
from moreft.errors import ConfigError
from moreft.train import load_trained, parse_method_spec, resolve_config, train
from moreft.train.checkpoints import checkpoint_complete
from moreft.train.choices import METHODS, TRAIN_METHODS, RunMethod
from moreft.train.config import TrainConfig
from moreft.train.inspection import inspect_run, run_deltas
from moreft.train.weights import FULL_WEIGHTS_FILE, full_state, load_full_weights, save_full_weights


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return make_char_llama(tmp_path_factory.mktemp("char-llama"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def lm_config(model: str, out: Path, **changes) -> TrainConfig:
    base = {
        "task": "pretrain",
        "model": model,
        "method": "full",
        "max_steps": 4,
        "batch_size": 4,
        "max_examples": 12,
        "eval_examples": 2,
        "eval_batch_size": 32,
        "max_length": 32,
        "lr": 3e-3,
        "log_every": 1,
        "output_dir": str(out),
        "progress": False,
    }
    return resolve_config(None, {**base, **changes})


def test_full_is_a_run_method_not_an_adapter_method():
    assert {m.value for m in RunMethod} == {m.value for m in Method} | {"full", "peft"}
    assert "full" in TRAIN_METHODS and "full" not in METHODS  # search chooses among adapters only
    config = TrainConfig(task="sentiment", method="FULL", rank=64)  # adapter settings do not apply
    assert config.full and config.method == "full" and config.method_label() == "full"
    assert config.run_name == "sentiment-minilm-full-seed0"
    with pytest.raises(
        ConfigError, match=r"method full trains every base parameter and has no adapter config"
    ):
        config.adapter_config()
    with pytest.raises(
        ConfigError, match=r"merge_every=10 merges an adapter .* method full .* has no adapter"
    ):
        TrainConfig(task="sentiment", method="full", merge_every=10)
    assert parse_method_spec("full") == {"method": "full"}


def test_full_run_saves_weights_and_eval_merge_export_inspect(llama, tmp_path, capsys):
    result = train(lm_config(llama, tmp_path), quiet=True)
    run = result.run_dir
    assert (run / FULL_WEIGHTS_FILE).is_file() and not (run / "adapter").exists()
    m = result.metrics
    assert m["method"] == "full" and m["label"] == "full" and m["metric_goal"] == "minimize"
    assert m["trainable_params"] == m["total_params"] and m["other_trainable_params"] == 0
    base = load_file(str(Path(llama) / "model.safetensors"))
    trained = load_file(str(run / FULL_WEIGHTS_FILE))
    assert set(trained) == set(base)  # tied lm_head stored once, like save_pretrained
    assert not torch.equal(
        trained["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )

    assert main(["eval", str(run)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["test"]["perplexity"] == pytest.approx(m["test_perplexity"], rel=1e-6)

    out = tmp_path / "merged"
    assert main(["merge", str(run), str(out)]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert "nothing was merged" in merged["note"] and merged["method"] == "full"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    for name, tensor in full_state(reloaded).items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)

    assert main(["export-lora", str(run), str(tmp_path / "lora")]) == 2
    assert (
        "is full fine-tuning: it trained every weight, so there is no low-rank adapter to export"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "lora").exists()

    _, _, deltas = run_deltas(run)
    q = "model.layers.0.self_attn.q_proj"
    assert set(deltas) == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"
    }  # llama default
    delta, initial_w, params = deltas[q]
    torch.testing.assert_close(delta, trained[f"{q}.weight"] - base[f"{q}.weight"])
    torch.testing.assert_close(initial_w, base[f"{q}.weight"])
    assert params == 32 * 32
    report = inspect_run(run, heatmap=tmp_path / "q.png")
    assert report.method == {"method": "full"} and report.layers[0].name == q and report.layers[0].rank > 1
    assert (tmp_path / "q.png").is_file() and report.weights == {}
    assert main(["inspect", str(run), "--heatmap", str(tmp_path / "q.png")]) == 0
    assert (
        "full fine-tuning: ΔW = W_trained - W_initial of 6 targeted linear layers" in capsys.readouterr().out
    )


def test_full_weights_round_trip_and_misfit(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama, local_files_only=True)
    with torch.no_grad():
        model.model.norm.weight.fill_(3.0)
    save_full_weights(model, tmp_path / "w.safetensors", step=7)
    fresh = AutoModelForCausalLM.from_pretrained(llama, local_files_only=True)
    assert load_full_weights(fresh, tmp_path / "w.safetensors") == len(full_state(model))
    assert torch.equal(fresh.model.norm.weight, torch.full((32,), 3.0))
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    other = AutoModelForCausalLM.from_config(
        fresh.config.__class__(**{**fresh.config.to_dict(), "hidden_size": 16, "head_dim": 8})
    )
    before = full_state(other)
    with pytest.raises(moreft.AdapterFileError, match=r"does not fit the model: .* other shapes"):
        load_full_weights(other, tmp_path / "w.safetensors")
    assert all(torch.equal(before[k], v) for k, v in full_state(other).items())  # left as it was
    with pytest.raises(moreft.AdapterFileError, match=r"did not finish"):
        load_full_weights(fresh, tmp_path / "missing.safetensors")


class StopAt(TrainerCallback):
    """Simulates an interruption: training stops after ``step`` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_full_resume_matches_an_uninterrupted_run(llama, tmp_path):
    whole = train(lm_config(llama, tmp_path / "a", save_every=2), quiet=True)
    checkpoint = whole.run_dir / "checkpoints" / "checkpoint-4"
    assert checkpoint_complete(checkpoint) and (checkpoint / FULL_WEIGHTS_FILE).is_file()
    assert not (checkpoint / "adapter").exists()
    part = lm_config(llama, tmp_path / "b", save_every=2)
    train(part, callbacks=[StopAt(2)], quiet=True)
    resumed = train(part.replace(resume=True), quiet=True)
    assert resumed.metrics["resumed_from"] == "checkpoint-2"
    a, b = (
        load_file(str(whole.run_dir / FULL_WEIGHTS_FILE)),
        load_file(str(resumed.run_dir / FULL_WEIGHTS_FILE)),
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)  # bit-exact on CPU
    torn = checkpoint.parent / "checkpoint-6"
    torn.mkdir()
    for f in checkpoint.iterdir():
        (torn / f.name).write_bytes(f.read_bytes())
    (torn / FULL_WEIGHTS_FILE).write_bytes(b"not safetensors")
    state = json.loads((torn / "trainer_state.json").read_text())
    (torn / "trainer_state.json").write_text(json.dumps({**state, "global_step": 6}))
    assert not checkpoint_complete(torn)


def test_full_classification_trains_everything(bert, tmp_path):
    config = resolve_config(
        None,
        {
            "task": "sentiment",
            "model": bert,
            "method": "full",
            "max_steps": 2,
            "batch_size": 8,
            "max_examples": 60,
            "eval_examples": 6,
            "max_length": 24,
            "output_dir": str(tmp_path),
            "progress": False,
        },
    )
    result = train(config, quiet=True)
    assert result.metrics["trainable_params"] == result.metrics["total_params"]
    _, _, model, _ = load_trained(result.run_dir)
    assert not moreft.adapter_layers(model)


def test_compare_full_against_lora(llama, tmp_path, capsys):
    argv = [
        "compare",
        "--task",
        "pretrain",
        "--model",
        llama,
        "--methods",
        "full",
        "lora:rank=4",
        "--seeds",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-examples",
        "12",
        "--eval-examples",
        "2",
        "--max-length",
        "32",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
        "--name",
        "c",
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "c" / "compare.json").read_text())
    full, lora = summary["rows"]
    assert (full["label"], lora["label"]) == ("full", "lora:rank=4")
    assert full["params"] == 23_968 > 10 * lora["params"] and summary["metric"] == "perplexity"
    stamp = (Path(full["runs"][0]) / FULL_WEIGHTS_FILE).stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # a finished full run is reused, not trained again
    assert (Path(full["runs"][0]) / FULL_WEIGHTS_FILE).stat().st_mtime_ns == stamp
