"""moreft.train: compare (table, plot, per-method report), the bench subcommand, Monarch row order."""

from __future__ import annotations

import types

import pytest
import torch
from test_train import tiny_config

import moreft
from moreft.cli import build_parser, main
from moreft.errors import ConfigError
from moreft.train import compare, parse_method_spec
from moreft.train.config import TrainConfig


def test_compare_writes_table_and_plot(tiny_bert, tmp_path, monkeypatch):
    base = tiny_config(tiny_bert, tmp_path, max_steps=2, eval_examples=4)
    result = compare(base, ["lora:rank=2", "more:block_rank=1"], seeds=2, name="cmp")
    table = (result.path / "compare.md").read_text()
    assert "| lora:rank=2 | 768 |" in table and "| more:block_rank=1 | 384 |" in table and " ± " in table
    assert "Δ vs lora:rank=2, pts [95% CI]" in table and "in points (× 100)" in table
    assert (result.path / "compare.png").is_file() and len(result.rows[0]["values"]) == 2
    again = compare(
        base,
        ["lora:rank=2"],
        seeds=2,
        name="cmp",
        run=lambda config: pytest.fail("a finished run was trained again"),
    )
    assert again.rows[0]["values"] == result.rows[0]["values"]
    # The CLI reuses the same finished runs and puts its command line at the top of compare.md.
    monkeypatch.setattr("moreft.train.comparison.train", lambda config: pytest.fail("trained again"))
    argv = [
        "compare",
        "--task",
        "sentiment",
        "--model",
        tiny_bert,
        "--methods",
        "lora:rank=2",
        "more:block_rank=1",
        "--seeds",
        "2",
        "--name",
        "cmp",
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--max-examples",
        "120",
        "--eval-examples",
        "4",
        "--max-length",
        "32",
        "--lr",
        "1e-2",
        "--log-every",
        "2",
        "--block-rank",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    table = (result.path / "compare.md").read_text()
    assert table.splitlines()[2:5] == ["```", "moreft " + " ".join(argv), "```"]
    assert "| more:block_rank=1 | 384 | 0.50 |" in table
    assert "Every method uses the same shared settings" in table


def test_compare_report_names_per_method_overrides(tmp_path):
    from moreft.train.comparison import write_report

    row = {
        "label": "more:block_rank=4,lr=4e-3",
        "params": 10,
        "mean": 0.8,
        "std": 0.01,
        "eval_mean": 0.8,
        "eval_std": 0.01,
        "values": [0.8],
        "seeds": [0],
        "seconds": 1.0,
        "overrides": {"lr": 0.004},
    }
    write_report(
        tmp_path,
        [row, {**row, "label": "lora:rank=8", "overrides": {}}],
        "accuracy",
        TrainConfig(task="sentiment", model="minilm"),
    )
    table = (tmp_path / "compare.md").read_text()
    assert "These methods override shared settings: more:block_rank=4,lr=4e-3 (lr=0.004)." in table
    assert "no per-method tuning" not in table


def test_compare_report_shows_each_arms_curve_over_seeds(tmp_path):
    """compare.md gains the validation metric at every evaluated step: mean (min–max) over the seeds."""
    import json

    from moreft.train.comparison import write_report
    from moreft.train.curves import curve_lines

    runs = {}
    for label, per_seed in {
        "mora": [[0.1, 0.7, 1.0], [0.2, 0.9, 1.0]],
        "lora": [[0.1, 0.2], [0.3, 0.2]],
    }.items():
        runs[label] = []
        for seed, values in enumerate(per_seed):
            run = tmp_path / "runs" / f"{label}-seed{seed}"
            run.mkdir(parents=True)
            records = [{"step": 10 * (i + 1), "eval_char_accuracy": v} for i, v in enumerate(values)]
            records.insert(1, {"step": 15, "loss": 1.0})  # training logs are not evaluations
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4')
            runs[label].append(str(run))
    row = {"mean": 1.0, "std": 0.0, "eval_mean": 1.0, "eval_std": 0.0, "values": [1.0, 1.0], "seeds": [0, 1]}
    rows = [
        {**row, "label": "mora", "params": 10, "seconds": 1.0, "runs": runs["mora"]},
        {**row, "label": "lora", "params": 10, "seconds": 1.0, "runs": runs["lora"]},
    ]
    write_report(tmp_path, rows, "char_accuracy", TrainConfig(task="uuid", model="smollm2"))
    table = (tmp_path / "compare.md").read_text()
    assert "| method | step 10 | step 20 | step 30 |" in table
    assert "| mora | 0.1500 (0.1000–0.2000) | 0.8000 (0.7000–0.9000) | 1.0000 (1.0000–1.0000) |" in table
    assert "| lora | 0.2000 (0.1000–0.3000) | 0.2000 (0.2000–0.2000) | – |" in table
    shown = curve_lines([{**rows[0], "runs": runs["mora"][:1]}], "char_accuracy", limit=2)
    assert shown[2] == "| method | step 10 | step 30 |"
    assert curve_lines([{**rows[0], "runs": []}], "char_accuracy") == []


def test_bench_subcommand_is_registered_when_present(monkeypatch):
    calls = []
    bench = types.ModuleType("moreft.cli.bench")
    bench.__doc__ = "Benchmarks."
    bench.add_arguments = lambda parser: parser.add_argument("--quick", action="store_true")
    bench.run = lambda args: calls.append(args.quick) or 0
    monkeypatch.setitem(__import__("sys").modules, "moreft.cli.bench", bench)
    assert "bench" in build_parser().format_help()
    assert main(["bench", "--quick"]) == 0 and calls == [True]


def test_monarch_row_order_lines_up_the_blocks():
    from torch import nn

    from moreft.layers import MoReLinear
    from moreft.train.inspection import monarch_row_order

    torch.manual_seed(0)
    layer = MoReLinear(
        nn.Linear(40, 24), moreft.MoReConfig(nblocks=4, block_rank=1, target_modules=("x",)), name="x"
    )
    with torch.no_grad():
        layer.blkdiag2.normal_()
    order = monarch_row_order(24, 4)
    assert sorted(order) == list(range(24))
    grouped = layer.delta_weight()[order].abs()  # (24, 40): output block b reads only input block b
    mask = torch.block_diag(*[torch.ones(6, 10)] * 4).bool()
    assert grouped[~mask].max() == 0 and grouped[mask].min() > 0


def test_the_reference_arm_matches_the_settings_its_spec_overrides():
    from moreft.train.comparison import reference_index

    arms = ["more:block_rank=4,lr=2e-3", "more:block_rank=4,lr=8e-3", "lora:rank=8,lr=1e-3", "lora:rank=8"]
    specs = [parse_method_spec(a) for a in arms]
    assert reference_index(specs, "more:block_rank=4,lr=8e-3") == 1
    assert reference_index(specs, "more:block_rank=4,lr=0.002") == 0  # the same number, written otherwise
    assert reference_index(specs, "more:block_rank=4") == 0  # no override given: the first such arm
    assert reference_index(specs, None) == 2  # the default lora:rank=8, at any lr
    assert reference_index(specs, "lora:rank=8,lr=1e-3") == 2
    with pytest.raises(ConfigError, match=r"reference 'more:block_rank=4,lr=4e-3' is not one of the arms"):
        reference_index(specs, "more:block_rank=4,lr=4e-3")
    with pytest.raises(ConfigError, match=r"reference 'more:block_rank=4,batch_size=8' is not one of"):
        reference_index(specs, "more:block_rank=4,batch_size=8")
