"""The ``math`` task scored by its answers' teacher-forced loss (``metric: answer_nll``): the per-example
loss against a literal computation, the task's metric, goal and errors, and a run and a comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny import make_char_llama

from moreft.cli import main
from moreft.errors import ConfigError
from moreft.tasks import MetricGoal, PromptExample, get_task
from moreft.train.evaluate import answer_losses, predict
from moreft.train.predictions import read_predictions


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return make_char_llama(tmp_path_factory.mktemp("char-llama"))


def _literal_loss(model, tokenizer, example: PromptExample) -> float:
    """The mean loss of the answer's tokens and EOS, one unpadded sequence, by hand."""
    prompt = tokenizer(example.prompt)["input_ids"]
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer])  # (1, T)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)  # (T, vocab)
    start = len(prompt)
    return -sum(logp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1])) / len(answer)


def test_answer_losses_match_a_literal_computation_at_any_batch_size(llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(llama), AutoTokenizer.from_pretrained(llama)
    examples = [
        PromptExample(0, "Question: 2 + 2?\nAnswer:", " 4"),
        PromptExample(1, "Q: 10 * 3\nA:", " 30"),
        PromptExample(2, "What is one hundred and five minus five?\nAnswer:", " 100"),
    ]
    want = [_literal_loss(model, tokenizer, ex) for ex in examples]
    model.train()
    for batch_size in (1, 2, 3):
        got = answer_losses(model, tokenizer, examples, batch_size, max_length=64)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert model.training  # the mode is restored
    assert all(v > 0 for v in want)


def test_math_answer_nll_option_sets_metric_goal_and_scoring():
    task = get_task("math", size=20, metric="answer_nll")
    assert (task.metric_name, task.metric_goal, task.teacher_forced) == (
        "answer_nll",
        MetricGoal.MINIMIZE,
        True,
    )
    plain = get_task("math", size=20)
    assert (plain.metric_name, plain.metric_goal, plain.teacher_forced) == (
        "accuracy",
        MetricGoal.MAXIMIZE,
        False,
    )
    assert not get_task("uuid").teacher_forced
    assert task.compute_metrics([0.5, 1.5, 1.0], [" 1", " 2", " 3"]) == {"answer_nll": 1.0}


@pytest.mark.parametrize(
    ("losses", "error", "message"),
    [
        ([float("nan")], ValueError, r"losses\[0\] = nan; an answer loss is a finite number >= 0"),
        ([1.0, -0.5], ValueError, r"losses\[1\] = -0.5; an answer loss is a finite number >= 0"),
        ([float("inf")], ValueError, r"losses\[0\] = inf"),
        (["1.0"], TypeError, r"losses\[0\] = '1.0' is not a number"),
        ([True], TypeError, r"losses\[0\] = True is not a number"),
    ],
)
def test_math_answer_nll_rejects_bad_losses(losses, error, message):
    task = get_task("math", size=20, metric="answer_nll")
    with pytest.raises(error, match=message):
        task.compute_metrics(losses, [" 1"] * len(losses))


def test_math_metric_option_is_validated():
    with pytest.raises(ConfigError, match=r"math metric='loss' is not one of \['accuracy', 'answer_nll'\]"):
        get_task("math", metric="loss")


def test_predict_returns_losses_for_a_teacher_forced_task(llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(llama), AutoTokenizer.from_pretrained(llama)
    task = get_task("math", size=20, metric="answer_nll")
    examples = list(task.load(seed=0).test)
    preds = predict(model, tokenizer, task, examples, 4, max_length=48, max_new_tokens=4)
    assert len(preds) == len(examples) and all(isinstance(p, float) and math.isfinite(p) for p in preds)


def test_compare_on_answer_nll_reports_the_loss_difference_unscaled(llama, tmp_path):
    argv = ["compare", "--task", "math", "--task-option", "size=24", "--task-option", "metric=answer_nll"]
    argv += ["--model", llama, "--methods", "lora:rank=2", "more:block_rank=1", "--seeds", "2"]
    argv += ["--max-steps", "2", "--batch-size", "4", "--max-length", "48", "--lr", "1e-2"]
    argv += ["--output-dir", str(tmp_path), "--no-progress", "--name", "c", "--reference", "lora:rank=2"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "c" / "compare.json").read_text())
    lora, more = summary["rows"]
    assert summary["metric"] == "answer_nll" and more["delta_in_points"] is False
    run = Path(lora["runs"][0])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metric_goal"] == "minimize" and metrics["test_answer_nll"] > 0
    records = read_predictions(run / "test_predictions.jsonl")
    assert sum(r["score"] for r in records) / len(records) == pytest.approx(metrics["test_answer_nll"])
    d = more["delta"]
    assert d["low"] <= d["estimate"] <= d["high"]
    assert d["estimate"] == pytest.approx(more["mean"] - lora["mean"], abs=1e-9)
    table = (tmp_path / "c" / "compare.md").read_text()
    assert f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] | –" in table
    assert "Δ vs lora:rank=2 [95% CI]" in table and "pts" not in table and "× 100" not in table
    assert "in the metric's own units (a loss: lower is better)" in table
