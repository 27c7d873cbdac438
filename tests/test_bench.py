"""``moreft bench`` runs end to end on tiny shapes and writes a well-formed JSON report.

No timing is asserted (speed targets live in the benchmark itself); the memory measurement is
checked against a case whose peak is known exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from moreft.bench.measure import paired_ratio, peak_step_memory
from moreft.bench.report import goals
from moreft.bench.variants import LAYER_METHODS
from moreft.cli import main as cli_main
from moreft.cli.bench import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--shapes",
    "64x48x96,32x32x16",
    "--rounds",
    "2",
    "--warmup",
    "1",
    "--merge-size",
    "64",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    torch.set_num_threads(1)
    assert main([*TINY, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_report_has_every_method_on_every_shape(report):
    assert [(s["in"], s["out"], s["tokens"]) for s in report["shapes"]] == [(64, 48, 96), (32, 32, 16)]
    for shape in report["shapes"]:
        assert shape["rounds"] == 2
        assert [r["method"] for r in shape["rows"]] == list(LAYER_METHODS)
        for row in shape["rows"]:
            assert len(row["times_ms"]) == 2 and all(t > 0 for t in row["times_ms"])
            assert row["min_ms"] <= row["median_ms"]
            for key in ("x_base", "x_peft_lora", "x_floor", "flop_floor", "peak_mib", "extra_peak_mib"):
                assert math.isfinite(row[key]), (row["method"], key)
            assert row["flop_floor"] >= 1.0 and row["memory_method"] == "profiler"
        by = {r["method"]: r for r in shape["rows"]}
        assert by["base"]["x_base"] == 1.0 and by["peft-lora"]["x_peft_lora"] == 1.0
        assert by["base"]["trainable_params"] == 0 and by["base"]["extra_peak_mib"] == 0.0
        assert (
            by["lora"]["trainable_params"]
            == by["peft-lora"]["trainable_params"]
            == 8 * (shape["in"] + shape["out"])
        )


def test_report_header_merge_and_goals(report):
    assert report["versions"]["torch"] == torch.__version__
    assert report["machine"]["threads"] == 1 and len(report["machine"]["load_avg_end"]) == 3
    assert report["command"].startswith("moreft bench")
    merge = report["merge"]
    assert merge["size"] == 64
    assert [r["what"] for r in merge["rows"]] == ["W.add_(D)", "lora", "more-r8", "mora"]
    assert merge["rows"][0]["x_add"] == 1.0
    checked = {(g["shape"], g["goal"]) for g in report["goals"]}
    assert ("64x48 T=96", "MoRe r8 time / frozen base") in checked
    assert ("64x64", "merge more-r8 / W.add_") in checked
    for g in report["goals"]:
        assert g["met"] == (g["value"] <= g["limit"])
    assert "e2e" not in report


def test_goals_compare_against_the_limits():
    rows = [
        {"method": "more-r8", "x_base": 1.05, "x_peft_lora": 0.9, "extra_peak_mib": 0.5},
        {"method": "lora", "x_peft_lora": 0.8},
        {"method": "mora", "x_floor": 1.4},
    ]
    checked = {g["goal"]: g["met"] for g in goals({"in": 8, "out": 8, "tokens": 4, "rows": rows})}
    assert checked == {
        "MoRe r8 time / peft LoRA r8": False,
        "MoRe r8 time / frozen base": True,
        "MoRe r8 extra peak MiB": True,
        "our LoRA / peft LoRA": True,
        "MoRA time / its FLOP floor": False,
    }


def test_peak_memory_of_a_frozen_linear_is_output_plus_input_grad():
    lin = nn.Linear(64, 48).requires_grad_(False)
    x, g = torch.randn(96, 64, requires_grad=True), torch.randn(96, 48)
    peak, how = peak_step_memory(lin, x, g)
    assert how == "profiler"
    assert peak == 96 * 48 * 4 + 96 * 64 * 4  # y and ∂x, nothing else


def test_paired_ratio_is_the_median_of_per_round_ratios():
    assert paired_ratio([2.0, 3.0, 10.0], [1.0, 3.0, 2.0]) == 2.0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--shapes", "64x48"], "bad shape '64x48' in --shapes; use INxOUTxTOKENS"),
        (["--shapes", "64x0x8"], "bad shape '64x0x8'"),
        (["--methods", "lora,dora"], "unknown method(s) ['dora']; choose from base, lora"),
        (["--e2e-methods", "more,boft"], "unknown --e2e-methods ['boft']"),
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    ],
)
def test_bad_flags_are_refused_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_layer_steps_under_autocast(tmp_path, capsys):
    """``--autocast bf16``: every variant's step runs under CPU autocast; the report and goals say so."""
    out = tmp_path / "bench.json"
    argv = ["--shapes", "64x48x96", "--methods", "lora,more-r8,mora-sharing,peft-lora", "--rounds", "1"]
    assert (
        main(
            [*argv, "--warmup", "1", "--no-merge", "--threads", "1", "--autocast", "BF16", "--out", str(out)]
        )
        == 0
    )
    data = json.loads(out.read_text())
    shape = data["shapes"][0]
    assert data["autocast"] == shape["autocast"] == "bf16"
    assert [r["method"] for r in shape["rows"]] == ["base", "lora", "more-r8", "mora-sharing", "peft-lora"]
    assert all(r["median_ms"] > 0 and math.isfinite(r["x_base"]) for r in shape["rows"])
    assert data["goals"] and all(g["shape"] == "64x48 T=96 bf16 autocast" for g in data["goals"])
    assert "64 -> 48, T=96 tokens under bf16 autocast" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--autocast", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_registered_as_moreft_bench(capsys):
    assert cli_main(["bench", "--help"]) == 0
    assert "--e2e" in capsys.readouterr().out
    assert cli_main(["bench", "--shapes", "1x2"]) == 2  # moreft's own error path
    assert "moreft: error: bad shape '1x2'" in capsys.readouterr().err


@pytest.mark.slow
def test_e2e_minilm_runs_in_a_subprocess(tmp_path):
    out = tmp_path / "e2e.json"
    assert (
        main(
            [
                "--e2e-only",
                "--e2e-methods",
                "frozen,more",
                "--e2e-batch",
                "2",
                "--e2e-seq",
                "16",
                "--e2e-steps",
                "1",
                "--e2e-repeats",
                "1",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    e2e = json.loads(out.read_text())["e2e"]
    assert [r["method"] for r in e2e["rows"]] == ["frozen", "more"]
    frozen, more = e2e["rows"]
    assert more["trainable_params"] > frozen["trainable_params"] > 0
    assert frozen["x_frozen_time"] == 1.0 and more["steps_per_s"] > 0 and more["peak_rss_mib"] > 0


def test_peak_rss_is_this_process_and_can_restart():
    from moreft.train.peak_memory import peak_rss_mib, reset_peak_rss

    before = peak_rss_mib()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    grown = peak_rss_mib()
    assert grown >= before and grown > 0
    del block
    if reset_peak_rss():  # Linux: the peak restarts at the current RSS, below the 64 MiB block
        assert peak_rss_mib() < grown


def test_compiled_variants_and_inference(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--shapes",
                "64x48x16",
                "--methods",
                "more-r8,more-r8-compiled,mora-sharing",
                "--rounds",
                "1",
                "--warmup",
                "1",
                "--no-merge",
                "--inference",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    by = {r["method"]: r for r in report["shapes"][0]["rows"]}
    assert list(by) == ["base", "more-r8", "more-r8-compiled", "mora-sharing"]
    compiled = by["more-r8-compiled"]
    assert "fullgraph=True" in compiled["note"] and math.isfinite(compiled["x_eager"])
    assert compiled["trainable_params"] == by["more-r8"]["trainable_params"]
    # SHARING's floor: three T·r² products and four group-sum passes over T·(in + out)
    r = int(by["mora-sharing"]["note"].split("r_hat=")[1].split(",")[0])
    assert by["mora-sharing"]["flop_floor"] == pytest.approx(
        1 + (6 * 16 * r * r + 2 * 16 * 112) / (4 * 16 * 64 * 48)
    )
    inference = report["inference"][0]
    names = [r["what"] for r in inference["rows"]]
    assert names[0] == "base" and {
        "more-r8 merged",
        "more-r8 no_grad",
        "more-r8 train-fwd",
        "mora-sharing merged",
    } <= set(names)
    assert all(math.isfinite(r["x_base"]) for r in inference["rows"])
    goals_checked = {g["goal"] for g in report["goals"]}
    assert {
        "MoRe r8 compiled / eager",
        "mora-sharing time / its FLOP floor",
        "more-r8 merged / frozen layer",
        "lora no_grad / training forward",
    } <= goals_checked


def make_tiny_llama(path) -> str:
    """A 2-layer Llama (hidden 72: C3A's block size 32 does not divide it, so that peer fails)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from moreft.models import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=72,
        intermediate_size=144,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_llm_end_to_end_skips_a_failing_peer(tmp_path):
    out = tmp_path / "llm.json"
    model = make_tiny_llama(tmp_path / "llama")
    assert (
        main(
            [
                "--llm-only",
                "--llm-model",
                model,
                "--llm-methods",
                "frozen,more,peft-lora,peft-c3a",
                "--llm-precisions",
                "bf16",
                "--llm-batch",
                "2",
                "--llm-seq",
                "16",
                "--llm-steps",
                "1",
                "--llm-repeats",
                "1",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    llm = json.loads(out.read_text())["llm"]
    by = {r["method"]: r for r in llm["rows"]}
    assert list(by) == ["frozen", "more", "peft-lora", "peft-c3a"] and {
        r["precision"] for r in by.values()
    } == {"bf16"}
    assert "step_s" not in by["frozen"] and by["frozen"]["x_frozen_forward"] == 1.0
    more = by["more"]
    assert more["trainable_params"] == by["peft-lora"]["trainable_params"] > 0  # 4 x r8 == LoRA r8 here
    assert math.isfinite(more["x_peft_lora_step"]) and math.isfinite(more["x_peft_lora_rss"])
    assert math.isfinite(more["x_frozen_merged_forward"]) and "merged_forward_s" not in by["peft-lora"]
    assert "skipped" in by["peft-c3a"] and "trainable_params" not in by["peft-c3a"]


def test_llm_child_refuses_an_unknown_run():
    from moreft.bench.llm import llm_child

    with pytest.raises(ValueError, match=r"unknown LLM run 'dora:fp32'"):
        llm_child("dora:fp32", "smollm2", 1, 8, 1)
