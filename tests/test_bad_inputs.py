"""Hostile and malformed input: one table of bad inputs across the library and the CLI.

Each row sets up a bad input, runs it, and checks that the error is a clear one (the pinned
pattern names the value and the rule; a CLI error is one ``moreft: error:`` line, no traceback)
and that nothing was touched: the model's modules and tensors, and every file under the test's
folder (the tiny base model included), byte for byte.
"""

from __future__ import annotations

import pytest
from bad_inputs_cases import (
    FILE_TASK,
    ROWS,
    Bad,
    CliError,
    T,
    call,
    check_bad_input,
    cli,
    edited,
    inject_twice,
    int_tensors,
    pickled,
    raw_file,
)
from tiny import make_tiny_bert

import moreft
from moreft.adapter_files import CONFIG_NAME, MAX_CONFIG_BYTES, WEIGHTS_NAME
from moreft.config import LoRAConfig, MoRAConfig, MoReConfig
from moreft.errors import AdapterFileError, ConfigError, TargetError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


BAD_INPUTS = [
    # adapter directories are data: safetensors + JSON only, validated before anything is built
    Bad(
        "file-pickle",
        pickled,
        AdapterFileError,
        r"found \['adapter_model\.bin'\], which moreft refuses to read: pickle files can run code",
    ),
    Bad(
        "json-nan",
        raw_file(CONFIG_NAME, lambda p: p.read_bytes().replace(b'"dropout": 0.0', b'"dropout": NaN')),
        AdapterFileError,
        r"adapter_config\.json' is not valid JSON: NaN is not valid JSON \(only finite numbers",
    ),
    Bad(
        "json-huge",
        raw_file(CONFIG_NAME, lambda p: b" " * (MAX_CONFIG_BYTES + 1)),
        AdapterFileError,
        r"is 16,777,217 bytes; an adapter config is at most 16,777,216 bytes",
    ),
    Bad(
        "json-not-utf8",
        raw_file(CONFIG_NAME, lambda p: b"\xff\xfe{}"),
        AdapterFileError,
        r"is not valid JSON: 'utf-8' codec can't decode byte 0xff",
    ),
    Bad(
        "json-5000-digits",
        raw_file(CONFIG_NAME, lambda p: b'{"format_version": ' + b"9" * 5000 + b"}"),
        AdapterFileError,
        r"is not valid JSON: Exceeds the limit \(4300 digits\)",
    ),
    Bad(
        "json-method",
        edited(lambda m: m["config"].update(method="dora")),
        AdapterFileError,
        r"method='dora' is not one of 'more', 'mora', 'lora'",
    ),
    Bad(
        "json-str-for-int",
        edited(lambda m: m["config"].update(nblocks="4")),
        AdapterFileError,
        r"nblocks='4' must be an integer >= 1 \(got str\)",
    ),
    Bad(
        "json-bool-for-int",
        edited(lambda m: m["config"].update(block_rank=True)),
        AdapterFileError,
        r"block_rank=True must be an integer >= 1 \(got bool\)",
    ),
    Bad(
        "json-dropout-range",
        edited(lambda m: m["config"].update(dropout=1.5)),
        AdapterFileError,
        r"dropout=1\.5 must be a number in \[0, 1\)",
    ),
    Bad(
        "json-negative-shape",
        edited(lambda m: m.update(modules={"lin": [-24, 24]})),
        AdapterFileError,
        r"'modules' in .* must map module names to \[out_features, in_features\] positive integer pairs",
    ),
    Bad(
        "json-fingerprint",
        edited(lambda m: m.update(modules={"lin": [24, 20]})),
        AdapterFileError,
        r"fingerprint='[0-9a-f]{16}' in .* does not match its 'modules' \('[0-9a-f]{16}'\); the file was edited",
    ),
    Bad(
        "json-base-model-type",
        edited(lambda m: m.update(base_model=42)),
        AdapterFileError,
        r"base_model=42 must be a model name or null",
    ),
    Bad(
        "json-layer-state",
        edited(
            lambda m: m.update(layer_state={"lin": {"sharing_layout": "diagonal"}}),
            MoRAConfig(target_modules=T, rank=2),
        ),
        AdapterFileError,
        r"'layer_state' of 'lin' is \{'sharing_layout': 'diagonal'\}; it must be \{'sharing_layout': one of "
        r"\['strided', 'adjacent'\]\}",
    ),
    # crafted sizes: refused from the shapes alone; allocating any of them would take GBs to PBs
    Bad(
        "size-block-rank-1e6",
        edited(lambda m: m["config"].update(block_rank=10**6)),
        AdapterFileError,
        r"block_rank=1000000 must be <= min\(in_block, out_block\)=6 for 'lin'",
    ),
    Bad(
        "size-r-hat-1e6",
        edited(lambda m: m["config"].update(r_hat=10**6), MoRAConfig(target_modules=T, r_hat=8)),
        AdapterFileError,
        r"r_hat=1000000 must be <= max\(in_features, out_features\)=24 on 'lin'",
    ),
    Bad(
        "size-lora-rank-1e12",
        edited(lambda m: m["config"].update(rank=10**12), LoRAConfig(target_modules=T, rank=2)),
        AdapterFileError,
        r"tensor 'lin\.lora_A' has shape \[2, 24\] in .* but the model expects "
        r"\[1000000000000, 24\] \(the shape its config implies\)",
    ),
    Bad(
        "size-mora-rank-1e9",
        edited(lambda m: m["config"].update(rank=10**9), MoRAConfig(target_modules=T, rank=2)),
        AdapterFileError,
        r"tensor 'lin\.matrix' has shape \[8, 8\] in .* but the model expects \[219088, 219088\]",
    ),
    Bad(
        "size-mora-rank-1e60",
        edited(lambda m: m["config"].update(rank=10**60), MoRAConfig(target_modules=T)),
        AdapterFileError,
        r"mora config implies impossible sizes on 'lin' \(24->24\)",
    ),
    Bad(
        "tensor-int-dtype",
        int_tensors,
        AdapterFileError,
        r"tensor 'lin\.blkdiag1' in .* has dtype I64; adapter tensors must be floating point \(F64, F32, F16, BF16\)",
    ),
    Bad(
        "tensor-truncated",
        raw_file(WEIGHTS_NAME, lambda p: p.read_bytes()[:100]),
        AdapterFileError,
        r"adapter_model\.safetensors' is not a readable safetensors file",
    ),
    # configs and shapes through the library
    Bad(
        "nblocks-above-in",
        call(lambda c: moreft.inject(c.net, MoReConfig(target_modules=T, nblocks=25))),
        ConfigError,
        r"nblocks=25 must be <= in_features=24 of 'lin'",
    ),
    Bad(
        "lora-alpha-inf",
        call(lambda c: LoRAConfig(target_modules=T, alpha=float("inf"))),
        ConfigError,
        r"alpha=inf must be a number > 0 and finite",
    ),
    Bad(
        "target-regex",
        call(lambda c: MoReConfig(target_modules="lin[")),
        ConfigError,
        r"target_modules='lin\[' is not a valid regular expression",
    ),
    Bad(
        "rotation-odd-r-hat",
        call(lambda c: MoRAConfig(target_modules=T, r_hat=7)),
        ConfigError,
        r"r_hat=7 must be even for operator 'rotation'",
    ),
    Bad(
        "inject-twice",
        inject_twice,
        TargetError,
        r"model already carries a moreft adapter \(e\.g\. on \['lin'\]\)",
    ),
    # command-line flags
    Bad(
        "flag-zero", cli("--block-rank", "0", train={}), CliError, r"moreft: error: block_rank=0 must be >= 1"
    ),
    Bad("flag-nan", cli("--lr", "nan", train={}), CliError, r"moreft: error: lr=nan must be a finite number"),
    Bad(
        "flag-choice",
        cli("--method", "dora", train={}),
        CliError,
        r"argument --method: invalid choice: 'dora' \(choose from '?more'?, '?mora'?, '?lora'?, '?full'?, '?peft'?\)",
    ),
    Bad(
        "flag-type",
        cli("--max-steps", "ten", train={}),
        CliError,
        r"argument --max-steps: invalid int value: 'ten'",
    ),
    Bad(
        "flag-run-name",
        cli("--run-name", "a/b", train={}),
        CliError,
        r"run_name='a/b' must be a non-empty folder name without '/'",
    ),
    Bad(
        "flag-task-option",
        cli("--task-option", "sourcetweets", train={}),
        CliError,
        r"task option 'sourcetweets' must look like key=value",
    ),
    Bad(
        "flag-rank-too-large",
        cli("--method", "lora", "--rank", "1000000000", train={}),
        CliError,
        r"this lora config would give 384,000,000,000 adapter parameters on 6 layers of a model with [\d,]+; "
        r"an adapter larger than its base model is refused",
    ),
    Bad(
        "eval-not-a-run",
        cli("eval", "{tmp}"),
        CliError,
        r"is not a moreft run directory: it has no config\.yaml",
    ),
    # recipes
    Bad(
        "recipe-unknown-key",
        cli("train", "--config", "{tmp}/r.yaml", files={"r.yaml": "task: spam\nlearning_rate: 1\n"}),
        CliError,
        r"recipe '.*r\.yaml' has unknown key\(s\) \['learning_rate'\]; valid keys are \[.*'lr'",
    ),
    Bad(
        "recipe-not-mapping",
        cli("train", "--config", "{tmp}/r.yaml", files={"r.yaml": "- task\n- spam\n"}),
        CliError,
        r"recipe '.*r\.yaml' must be a mapping of key: value, got list",
    ),
    Bad(
        "recipe-bad-yaml",
        cli("train", "--config", "{tmp}/r.yaml", files={"r.yaml": "task: [spam\n"}),
        CliError,
        r"recipe '.*r\.yaml' is not valid YAML",
    ),
    Bad(
        "recipe-placeholder",
        cli(
            "train",
            "--config",
            "{tmp}/r.yaml",
            files={
                "r.yaml": "requires: {NOPE_MODEL: a local model folder}\ntask: spam\nmodel: ${NOPE_MODEL}\n"
            },
        ),
        CliError,
        r"needs NOPE_MODEL: a local model folder\. Set it in the environment",
    ),
    # data files
    Bad(
        "data-bad-json-line",
        cli(*FILE_TASK, files={"data.jsonl": ROWS[0] + "{oops\n" + "".join(ROWS[1:])}, train={"task": None}),
        CliError,
        r"data\.jsonl:2: not valid JSON",
    ),
    Bad(
        "data-not-utf8",
        cli(
            *FILE_TASK,
            files={"data.jsonl": b"".join(r.encode() for r in ROWS[:5]) + b"\xff\n"},
            train={"task": None},
        ),
        CliError,
        r"data\.jsonl: not UTF-8 text",
    ),
    Bad(
        "data-empty",
        cli(*FILE_TASK, files={"data.jsonl": ""}, train={"task": None}),
        CliError,
        r"data\.jsonl: field 'label' has 0 distinct value\(s\); classification needs at least 2",
    ),
    Bad(
        "data-missing-field",
        cli(
            *FILE_TASK,
            files={"data.jsonl": '{"sentence": "a", "label": "pos"}\n{"sentence": "b", "label": "neg"}\n'},
            train={"task": None},
        ),
        CliError,
        r"no field 'text'; the record has \['label', 'sentence'\]",
    ),
    Bad(
        "data-csv-columns",
        cli(
            "--task",
            "file-classification",
            "--task-option",
            "train_path={tmp}/data.csv",
            files={"data.csv": "text,label\na,pos\nb,neg,extra\n"},
            train={"task": None},
        ),
        CliError,
        r"data\.csv:3: the row has a different number of columns than the header \['text', 'label'\]",
    ),
    Bad(
        "data-missing-file",
        cli(
            "--task",
            "file-classification",
            "--task-option",
            "train_path={tmp}/none.jsonl",
            train={"task": None},
        ),
        CliError,
        r"train_path='.*none\.jsonl' does not exist; point it at your local data file",
    ),
    Bad(
        "data-suffix",
        cli(
            "--task",
            "file-classification",
            "--task-option",
            "train_path={tmp}/data.txt",
            train={"task": None},
        ),
        CliError,
        r"train_path='.*data\.txt' must be a \.jsonl/\.json/\.csv/\.tsv file",
    ),
    Bad(
        "data-too-few",
        cli(*FILE_TASK, files={"data.jsonl": "".join(ROWS[:2])}, train={"task": None}),
        CliError,
        r"cannot split 2 examples into train/validation/test; need at least 3",
    ),
]


def test_the_table_covers_at_least_25_bad_inputs():
    assert len(BAD_INPUTS) >= 25 and len({b.id for b in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.id for b in BAD_INPUTS])
def test_bad_input_gives_a_clear_error_and_touches_nothing(bad, bert, tmp_path):
    check_bad_input(bad, bert, tmp_path)
