"""More of the bad-input table (``test_bad_inputs.py``), by category: parser bounds, names, model folders.

Same contract per row: the pinned error, one ``moreft: error:`` line for the CLI, and nothing
touched (model, every file under the test folder and the tiny BERT, byte for byte; a run that
cannot start leaves no run folder).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_inputs import FILE_TASK, ROWS, Bad, CliError, Ctx, _adapter, call, check_bad_input, cli
from tiny import SUBPROCESS_ENV, make_tiny_bert

import moreft
from moreft.adapter_files import WEIGHTS_NAME
from moreft.config import MoRAConfig
from moreft.errors import AdapterFileError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
T = ["lin"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def recipe(text: str | bytes) -> Callable[[Ctx], Callable[[], Any]]:
    """``moreft train --config r.yaml --dry-run`` on a recipe with this content."""
    return cli("train", "--config", "{tmp}/r.yaml", "--dry-run", files={"r.yaml": text})


def sparse_recipe(size: int) -> Callable[[Ctx], Callable[[], Any]]:
    def setup(ctx: Ctx) -> Callable[[], Any]:
        with open(ctx.tmp / "r.yaml", "wb") as f:
            f.truncate(size)  # sparse: no time or disk spent on the test's side
        return cli("train", "--config", "{tmp}/r.yaml", "--dry-run")(ctx)

    return setup


def model_folder(
    spoil: Callable[[Path], Any], *argv: str, **train: Any
) -> Callable[[Ctx], Callable[[], Any]]:
    """``moreft train`` on a copy of the tiny BERT spoiled by ``spoil(folder)``."""

    def setup(ctx: Ctx) -> Callable[[], Any]:
        shutil.copytree(ctx.bert, ctx.tmp / "m")
        spoil(ctx.tmp / "m")
        return cli("--model", "{tmp}/m", *argv, train=train)(ctx)

    return setup


def run_folder(files: dict[str, bytes | str]) -> Callable[[Ctx], Callable[[], Any]]:
    """``moreft eval`` on a folder holding ``files``."""

    def setup(ctx: Ctx) -> Callable[[], Any]:
        (ctx.tmp / "run").mkdir()
        for name, content in files.items():
            (ctx.tmp / "run" / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return cli("eval", "{tmp}/run")(ctx)

    return setup


def three_labels(folder: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(folder)
    config.num_labels = 3
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)


def nan_adapter(ctx: Ctx) -> Callable[[], Any]:
    path = _adapter(ctx)
    tensors = load_file(str(path / WEIGHTS_NAME))
    tensors["lin.blkdiag1"][0, 0, 0] = float("inf")
    save_file(tensors, str(path / WEIGHTS_NAME))
    return lambda: moreft.load_adapter(ctx.net, path)


def _mora_export(ctx: Ctx, rank: int) -> Any:
    model = moreft.inject(
        torch.nn.Sequential(torch.nn.Linear(24, 16)), MoRAConfig(target_modules=["0"], rank=2)
    )
    return moreft.export_lora(model, ctx.tmp / "lora", rank=rank)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)
GEN = ("--task", "file-generation", "--task-option", "train_path={tmp}/data.jsonl")
GEN_ROWS = "".join(json.dumps({"prompt": f"q {i}", "answer": str(i)}) + "\n" for i in range(20))

BAD_MORE = [
    # recipes: bounded YAML (aliases counted after expansion), size, encoding, shape
    Bad(
        "recipe-alias-bomb",
        recipe(BOMB),
        CliError,
        r"recipe '.*r\.yaml' expands to more than 100,000 YAML nodes \(through aliases, \*name\)",
    ),
    Bad("recipe-recursive-alias", recipe("task: &a [spam, *a]\n"), CliError, r"has a recursive YAML alias"),
    Bad(
        "recipe-not-utf8",
        recipe(b"task: spam\nmodel: \xff\xfe\n"),
        CliError,
        r"recipe '.*r\.yaml' is not UTF-8 text \(byte 18: invalid start byte\)",
    ),
    Bad(
        "recipe-too-large",
        sparse_recipe(64 * 2**20 + 1),
        CliError,
        r"recipe '.*r\.yaml' is 67,108,865 bytes; at most 67,108,864 are read",
    ),
    Bad("recipe-scalar", recipe("42\n"), CliError, r"must be a mapping of key: value, got int"),
    Bad(
        "recipe-deep",
        recipe("[" * 5000),
        CliError,
        r"recipe '.*r\.yaml' is (nested too deeply|not valid YAML)",
    ),
    Bad(
        "recipe-5000-digits",
        recipe("task: spam\nseed: " + "9" * 5000 + "\n"),
        CliError,
        r"holds a value YAML cannot represent: Exceeds the limit \(4300 digits\)",
    ),
    Bad(
        "recipe-two-documents",
        recipe("task: spam\n---\ntask: news\n"),
        CliError,
        r"is not valid YAML: expected a single",
    ),
    Bad(
        "method-spec-yaml",
        cli(
            "compare",
            "--task",
            "sentiment",
            "--model",
            "{bert}",
            "--methods",
            "lora:rank=[",
            "--seeds",
            "1",
            "--output-dir",
            "{tmp}/runs",
        ),
        CliError,
        r"method spec 'lora:rank=\[' is not valid YAML",
    ),
    # run folders: run files that are not UTF-8 / not the expected shape
    Bad(
        "run-config-not-utf8",
        run_folder({"config.yaml": b"task: \xff\n"}),
        CliError,
        r"run config '.*config\.yaml' is not UTF-8 text",
    ),
    Bad(
        "run-config-list",
        run_folder({"config.yaml": "- task\n"}),
        CliError,
        r"run config '.*config\.yaml' must be a mapping of field: value, got list",
    ),
    # flags: ranges and names
    Bad(
        "seed-too-large",
        cli("--seed", str(2**32), train={}),
        CliError,
        r"seed=4294967296 must be <= 4294967295",
    ),
    Bad(
        "int-beyond-int64",
        cli("--max-steps", str(2**70), train={}),
        CliError,
        r"max_steps=\d+ must be <= 4611686018427387904",
    ),
    Bad("run-name-long", cli("--run-name", "r" * 201, train={}), CliError, r"at most 200 bytes"),
    Bad(
        "run-name-hidden",
        cli("--run-name", ".r", train={}),
        CliError,
        r"run_name='\.r' must be a non-empty folder name",
    ),
    Bad("run-name-backslash", cli("--run-name", "a\\b", train={}), CliError, r"without '/' \(nor '\\'"),
    Bad("run-name-control", cli("--run-name", "a\nb", train={}), CliError, r"control characters"),
    Bad(
        "compare-seeds-huge",
        cli(
            "compare",
            "--task",
            "sentiment",
            "--model",
            "{bert}",
            "--methods",
            "lora:rank=2",
            "--seeds",
            "10000000000",
            "--output-dir",
            "{tmp}/runs",
        ),
        CliError,
        r"seeds=10000000000 must be a count in \[1, 1000\]",
    ),
    Bad(
        "compare-name-path",
        cli(
            "compare",
            "--task",
            "sentiment",
            "--model",
            "{bert}",
            "--methods",
            "lora:rank=2",
            "--seeds",
            "1",
            "--name",
            "../x",
            "--output-dir",
            "{tmp}/runs",
        ),
        CliError,
        r"name='\.\./x' must be a non-empty folder name",
    ),
    Bad(
        "target-regex-long",
        cli("--target-modules", "q|" * 600 + "q", train={}),
        CliError,
        r"target_modules is a regex of 1,201 characters; at most 1,000 are accepted",
    ),
    Bad(
        "target-regex-backtracks",
        cli("--target-modules", "(.|..)+b", train={}),
        CliError,
        r"target_modules='\(\.\|\.\.\)\+b' took more than 2 s to match \d+ module names",
    ),
    Bad(
        "export-rank-huge",
        call(lambda c: _mora_export(c, 10**12)),
        ConfigError,
        r"rank=1000000000000 is more than any adapted layer can hold: min\(out_features, in_features\) is at most 16",
    ),
    # data files: sizes, value types, templates
    Bad(
        "data-huge-line",
        cli(
            *FILE_TASK,
            files={"data.jsonl": ROWS[0] + '{"text": "' + "x" * (8 * 2**20) + '"}\n'},
            train={"task": None},
        ),
        CliError,
        r"data\.jsonl:2: the line has 8,388,620 characters; a record may have at most 8,388,608",
    ),
    Bad(
        "data-csv-huge-field",
        cli(
            "--task",
            "file-classification",
            "--task-option",
            "train_path={tmp}/d.csv",
            files={"d.csv": "text,label\n" + "x" * (8 * 2**20 + 1) + ",pos\n"},
            train={"task": None},
        ),
        CliError,
        r"d\.csv:\d+: not a valid row \(field larger than field limit",
    ),
    Bad(
        "data-text-object",
        cli(
            *FILE_TASK,
            files={"data.jsonl": ROWS[0] + '{"text": {"a": 1}, "label": "pos"}\n' + "".join(ROWS[1:])},
            train={"task": None},
        ),
        CliError,
        r"data\.jsonl: field 'text' is \{'a': 1\} \(dict\); it must be text, a number or a boolean",
    ),
    Bad(
        "data-label-null",
        cli(
            *FILE_TASK, files={"data.jsonl": ROWS[0] + '{"text": "a", "label": null}\n'}, train={"task": None}
        ),
        CliError,
        r"field 'label' is None \(NoneType\)",
    ),
    Bad(
        "data-json-deep",
        cli(
            "--task",
            "file-classification",
            "--task-option",
            "train_path={tmp}/d.json",
            files={"d.json": "[" * 100_000},
            train={"task": None},
        ),
        CliError,
        r"d\.json: not valid JSON",
    ),
    Bad(
        "template-format-spec",
        cli(
            *GEN,
            "--task-option",
            "prompt_template=Q {{prompt:>999999999}}",
            files={"data.jsonl": GEN_ROWS},
            train={"task": None},
        ),
        CliError,
        r"prompt_template field '\{prompt:>999999999\}' must be a plain record field name",
    ),
    Bad(
        "template-attribute",
        cli(
            *GEN,
            "--task-option",
            "prompt_template=Q {{prompt.__class__}}",
            files={"data.jsonl": GEN_ROWS},
            train={"task": None},
        ),
        CliError,
        r"field '\{prompt\.__class__\}' must be a plain record field name",
    ),
    Bad(
        "template-unmatched",
        cli(
            *GEN,
            "--task-option",
            "prompt_template=Q {{prompt",
            files={"data.jsonl": GEN_ROWS},
            train={"task": None},
        ),
        CliError,
        r"prompt_template='Q \{prompt' is not a valid format string",
    ),
    # model folders: named, with what is wrong; and limits checked before any run folder exists
    Bad(
        "model-config-not-json",
        model_folder(lambda m: (m / "config.json").write_text("{bad")),
        CliError,
        r"model folder '.*m': config\.json is not valid JSON",
    ),
    Bad(
        "model-config-list",
        model_folder(lambda m: (m / "config.json").write_text("[1]")),
        CliError,
        r"config\.json must be a JSON object with a 'model_type'",
    ),
    Bad(
        "model-no-weights",
        model_folder(lambda m: (m / "model.safetensors").unlink()),
        CliError,
        r"model folder '.*m' has no weights: none of \['model\.safetensors'",
    ),
    Bad(
        "model-truncated",
        model_folder(
            lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:5000])
        ),
        CliError,
        r"model folder '.*m' cannot be loaded \(SafetensorError: .*\); its weights or tokenizer files are missing",
    ),
    Bad(
        "model-three-labels",
        model_folder(three_labels),
        CliError,
        r"model folder '.*m' holds a classifier for 3 labels; this task has 2",
    ),
    Bad(
        "max-length-over-positions",
        cli(train={"max_length": 65}),
        CliError,
        r"max_length=65 is more than model '.*' takes \(64 positions\); lower --max-length",
    ),
    # adapter files: values are checked too
    Bad(
        "adapter-inf",
        nan_adapter,
        AdapterFileError,
        r"holds NaN/Inf values in 1 tensor\(s\) \(e\.g\. \['lin\.blkdiag1'\]\)",
    ),
]


def test_the_second_table_adds_at_least_30_bad_inputs():
    assert len(BAD_MORE) >= 30 and len({b.id for b in BAD_MORE}) == len(BAD_MORE)


@pytest.mark.parametrize("bad", BAD_MORE, ids=[b.id for b in BAD_MORE])
def test_bad_input_gives_a_clear_error_and_touches_nothing(bad, bert, tmp_path):
    began = time.perf_counter()
    check_bad_input(bad, bert, tmp_path)
    assert time.perf_counter() - began < 60


def test_a_bad_moreft_triton_breaks_only_the_commands_that_run_layers():
    env = {**SUBPROCESS_ENV, "MOREFT_TRITON": "sometimes"}
    ok = subprocess.run(
        [sys.executable, "-m", "moreft", "--version"], env=env, capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0 and ok.stdout.startswith("moreft "), ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "moreft", "train", "--task", "sentiment", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip()
        == "moreft: error: MOREFT_TRITON='sometimes' must be one of ('auto', 'off', 'on') (or 0/1)"
    )


def test_a_5_mb_line_is_clipped_before_tokenising(tmp_path):
    """Peak memory of tokenising one 5 MB text, in a fresh process (before: ~700 MB for the whole line)."""
    code = (
        "import resource, sys\n"
        "from transformers import AutoTokenizer\n"
        "from moreft.models import minilm_dir\n"
        "from moreft.tasks import PromptExample, TextExample\n"
        "from moreft.train.data import encode_classification, encode_generation\n"
        "tok = AutoTokenizer.from_pretrained(minilm_dir())\n"
        "encode_classification([TextExample(0, 'warm up', 0)], tok, 128)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "text = 'a gripping, funny film ' * 230_000\n"
        "items = encode_classification([TextExample(0, text, 1)], tok, 128).items\n"
        "gen = encode_generation([PromptExample(1, text, ' ' + text)], tok, 128).items\n"
        "grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024\n"
        "print(len(text), len(items[0]['input_ids']), len(gen[0]['input_ids']), grew)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    chars, n_cls, n_gen, grew_mib = out.stdout.split()
    assert int(chars) > 5 * 10**6 and int(n_cls) == 128 and int(n_gen) == 128
    assert float(grew_mib) < 64, f"tokenising one 5 MB line grew the peak RSS by {grew_mib} MiB"


def test_a_backtracking_regex_is_stopped_in_the_library(monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["moreft.targets"], "MATCH_SECONDS", 0.2)
    net = torch.nn.Sequential()
    net.add_module("a" * 40, torch.nn.Linear(4, 4))
    began = time.perf_counter()
    with pytest.raises(moreft.TargetError, match=r"took more than 0\.2 s to match 1 module names"):
        moreft.inject(net, moreft.LoRAConfig(target_modules="(a|aa)+c"))
    assert time.perf_counter() - began < 5 and not moreft.adapter_layers(net)
