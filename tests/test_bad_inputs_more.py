"""More of the bad-input table (``test_bad_inputs.py``), by category: parser bounds, names, model folders.

Same contract per row: the pinned error, one ``moreft: error:`` line for the CLI, and nothing
touched (model, every file under the test folder and the tiny BERT, byte for byte; a run that
cannot start leaves no run folder).
"""

from __future__ import annotations

import time

import pytest
from bad_inputs_cases import (
    BOMB,
    FILE_TASK,
    GEN,
    GEN_ROWS,
    ROWS,
    Bad,
    CliError,
    _mora_export,
    call,
    check_bad_input,
    cli,
    model_folder,
    nan_adapter,
    recipe,
    run_folder,
    sparse_recipe,
    three_labels,
)
from tiny import make_tiny_bert

from moreft.errors import AdapterFileError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


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
