"""Run settings are declared once (moreft.train.settings); flags, checks, docs and roles follow from the declaration.

Every TrainConfig field has a declaration and a flag with plain help; every choice is matched in any
case; a repeated flag is an error; ``--target-modules`` takes several names; ``trainer_args`` passes
transformers' own options through, checked by their types; docs/settings.md is what the declarations say.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import typing
from pathlib import Path

import pytest
import torch
import yaml

import moreft
from moreft.cli import build_parser, main
from moreft.cli.search import SEARCHED_FIELDS
from moreft.config import CONFIG_CLASSES, PEFT_CONFIG_FIELDS, Method, MoReConfig
from moreft.errors import ConfigError
from moreft.train import comparison
from moreft.train.config import RESUMABLE_CHANGES, TrainConfig
from moreft.train.flags import overrides
from moreft.train.recipes import resolve_config
from moreft.train.settings import SETTING, Group, Kind, specs
from moreft.train.settings_doc import settings_doc

DOCS = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
SPECS = specs(TrainConfig)
CHOICES = [s for s in SPECS.values() if s.kind is Kind.CHOICE]


def parse(*argv: str) -> TrainConfig:
    """``moreft train --task sentiment ARGV`` parsed and resolved (no run)."""
    args = build_parser().parse_args(["train", "--task", "sentiment", *argv])
    return resolve_config(None, overrides(args, TrainConfig))


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moreft: error: "), lines
    return lines[0]


# -- one declaration per setting ------------------------------------------------------------------------
def test_every_field_is_declared_and_has_a_flag_with_plain_help():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {option: action for action in train._actions for option in action.option_strings}
    for f in dataclasses.fields(TrainConfig):
        spec = f.metadata.get(SETTING)
        assert spec is not None, f.name
        assert spec.help and not any(mark in spec.help for mark in ("``", ":class:", ":mod:", ":func:")), (
            f.name
        )
        action = flags[SPECS[f.name].option]
        assert action.dest == f.name and SPECS[f.name].help.replace("%", "%%") in action.help
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["train", "--help"]) == 0
    assert "``" not in text.getvalue()


def test_adapter_settings_are_the_adapter_configs_fields():
    """Each hyperparameter of each adapter config is a TrainConfig setting with its default and choices,
    and the rule declared for it is the one the adapter config enforces."""
    for method, cls in CONFIG_CLASSES.items():
        for f in dataclasses.fields(cls):
            if f.name in PEFT_CONFIG_FIELDS or f.name in ("modules_to_save", "init_weights"):
                continue
            spec = SPECS[f.name]
            assert spec.group is Group.ADAPTER and (not spec.methods or method in spec.methods), f.name
            default = f.default.value if isinstance(f.default, enum.Enum) else f.default
            # None: each method's own default (alpha: LoRA 16, MoRe 1), which the adapter config then takes
            assert spec.default in (default, None), f.name
            run = TrainConfig(task="sentiment", method=method.value, target_modules=("x",))
            if f.name != "target_modules":
                assert getattr(run.adapter_config(), f.name) == f.default, f.name
            if spec.kind is Kind.INT and spec.minimum is not None:
                others = (
                    {"operator": "decouple"} if method is Method.MORA else {}
                )  # rotation needs an even r_hat
                cls(target_modules=["x"], **others, **{f.name: int(spec.minimum)})
                with pytest.raises(ConfigError, match=f"{f.name}={int(spec.minimum) - 1} must be"):
                    cls(target_modules=["x"], **others, **{f.name: int(spec.minimum) - 1})
    config = TrainConfig(
        task="sentiment",
        method="mora",
        operator="sharing",
        sharing_output_layout="adjacent",
        cap_r_hat=False,
        rank=4,
        dropout=0.1,
    )
    adapter = config.adapter_config(("query",))
    assert (
        adapter.operator.value,
        adapter.sharing_output_layout.value,
        adapter.cap_r_hat,
        adapter.rank,
        adapter.dropout,
        adapter.target_modules,
    ) == ("sharing", "adjacent", False, 4, 0.1, ("query",))


def test_roles_are_derived_from_the_declarations():
    assert {
        "resume",
        "nonfinite",
        "overwrite",
        "max_steps",
        "epochs",
        "eval_every",
        "save_every",
        "log_every",
        "keep_checkpoints",
        "eval_batch_size",
        "progress",
    } == RESUMABLE_CHANGES
    assert set(SEARCHED_FIELDS) == {
        "method",
        "block_rank",
        "nblocks",
        "rank",
        "r_hat",
        "operator",
        "lr",
        "batch_size",
        "run_name",
        "resume",
        "overwrite",
        "peft_type",
        "peft_options",
    }
    assert {s.name for s in SPECS.values() if s.group is Group.ADAPTER} == comparison._ADAPTER_KEYS
    assert {
        "method",
        "rank",
        "alpha",
        "block_rank",
        "nblocks",
        "r_hat",
        "operator",
        "sharing_layout",
    } <= comparison._ADAPTER_KEYS


@pytest.mark.parametrize(
    "changes, label",
    [
        ({}, "more:block_rank=4"),
        ({"nblocks": 2, "block_rule": "official"}, "more:block_rank=4,nblocks=2,block_rule=official"),
        ({"method": "lora"}, "lora:rank=8"),
        ({"method": "lora", "alpha": 32}, "lora:rank=8,alpha=32.0"),
        ({"method": "mora", "r_hat": 16, "operator": "sharing"}, "mora:rank=8,r_hat=16,operator=sharing"),
        ({"dropout": 0.1, "target_modules": "query"}, "more:block_rank=4"),  # settings every method shares
    ],
)
def test_method_label(changes, label):
    assert TrainConfig(task="sentiment", **changes).method_label() == label


def test_docs_table_is_up_to_date():
    """docs/settings.md is generated: `python -m moreft.train.settings_doc docs/settings.md` after a change."""
    assert DOCS.read_text(encoding="utf-8") == settings_doc()
    text = DOCS.read_text(encoding="utf-8")
    assert all(f"| `{name}` |" in text for name in SPECS)


# -- choices: any case, stored as the value -----------------------------------------------------------------
@pytest.mark.parametrize("spec", CHOICES, ids=[s.name for s in CHOICES])
def test_choices_in_any_case(spec):
    for member in spec.choices:
        value = str(member.value)
        extra = (
            {"peft_type": "vera"} if (spec.name, value) == ("method", "peft") else {}
        )  # a peft arm names its type
        for written in (value, value.upper(), value.title()):
            assert getattr(TrainConfig(task="sentiment", **{spec.name: written}, **extra), spec.name) == value
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
        assert getattr(parse(spec.option, value.upper(), *flags), spec.name) == value
    with pytest.raises(ConfigError, match=rf"^{spec.name}='bogus' is not one of '"):
        TrainConfig(task="sentiment", **{spec.name: "bogus"})
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parse(spec.option, "bogus")


def test_the_drifted_cases_now_agree():
    """operator='ROTATION' was saved raw while sharing_layout='STRIDED' and method='MORE' were refused."""
    config = TrainConfig(task="sentiment", method="MORE", operator="ROTATION", sharing_layout="STRIDED")
    assert (config.method, config.operator, config.sharing_layout) == ("more", "rotation", "strided")
    assert yaml.safe_load(yaml.safe_dump(config.to_dict()))["operator"] == "rotation"
    assert comparison.parse_method_spec("MORA:rank=4") == {"method": "mora", "rank": 4}


def test_none_clears_an_optional_setting(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: sentiment\nmax_steps: 10\nsharing_output_layout: adjacent\n")
    args = build_parser().parse_args(
        ["train", "--config", str(recipe), "--max-steps", "none", "--sharing-output-layout", "NONE"]
    )
    config = resolve_config(args.config, overrides(args, TrainConfig))
    assert config.max_steps is None and config.sharing_output_layout is None


# -- a flag is given once ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "1", "--lr", "2"], "argument --lr: given twice (--lr 1, then --lr 2); give it once"),
        (
            ["--resume", "--no-resume"],
            "argument --resume/--no-resume: given twice (--resume, then --no-resume)",
        ),
        (
            ["--method", "lora", "--method=mora"],
            "argument --method: given twice (--method lora, then --method mora)",
        ),
        (
            ["--target-modules", "query", "--target-modules", "value"],
            "argument --target-modules: given twice",
        ),
        (["--config", "a.yaml", "--config", "b.yaml"], "argument --config: given twice"),
        (
            ["--task-option", "source=movie", "--task-option", "source=nyt"],
            "task option 'source' is given twice ('source=movie', then 'source=nyt'); give it once",
        ),
        (
            ["--trainer-arg", "optim=sgd", "--trainer-arg", "optim=adafactor"],
            "trainer arg 'optim' is given twice",
        ),
    ],
)
def test_a_repeated_flag_is_an_error(argv, message, capsys):
    assert message in error_line(capsys, ["train", "--task", "sentiment", "--dry-run", *argv])


def test_other_commands_refuse_repeats_too(capsys):
    line = error_line(capsys, ["eval", "runs/x", "--split", "test", "--split", "validation"])
    assert "argument --split: given twice (--split test, then --split validation)" in line


# -- target_modules ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, expected",
    [
        ("query value", ("query", "value")),
        ("query,value", ("query", "value")),
        (" query , value ", ("query", "value")),
        ("attention.self.query", ("attention.self.query",)),
        (["query", "value"], ("query", "value")),
        (["query value", "key"], ("query", "value", "key")),
        (".*\\.(query|value)", ".*\\.(query|value)"),
        (["q.*"], "q.*"),
        ("all-linear", "all-linear"),
        (None, None),
    ],
)
def test_target_modules(value, expected):
    assert TrainConfig(task="sentiment", target_modules=value).target_modules == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (["query", "q.*"], r"'q\.\*' is a regex or 'all-linear', which must be given alone"),
        (["all-linear", "query"], r"'all-linear' is a regex or 'all-linear', which must be given alone"),
        ("", "names no module"),
        (" , ", "names no module"),
        ([], "must be module names"),
        (3, "must be module names"),
        ("lin[", r"target_modules='lin\[' is not a valid regular expression"),
    ],
)
def test_bad_target_modules(value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(task="sentiment", target_modules=value)


@pytest.mark.parametrize("argv", [["query", "value"], ["query value"], ["query,value"]])
def test_target_modules_flag_takes_several_names(argv):
    config = parse("--target-modules", *argv)
    assert config.target_modules == ("query", "value")

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value = (torch.nn.Linear(8, 8) for _ in range(3))

    found = moreft.resolve_targets(Attention(), config.adapter_config())
    assert sorted(found) == ["query", "value"]


def test_a_new_adapter_option_needs_one_field():
    """What a new MoRe option takes: a field in MoReConfig and one adapter_setting line; the rest follows."""
    from moreft.train.settings import adapter_setting

    @dataclasses.dataclass(kw_only=True)
    class MoReWithScale(MoReConfig):
        learn_scale: bool = dataclasses.field(default=False, metadata={"help": "Learn an output scalar."})

    original = dict(CONFIG_CLASSES)
    try:
        CONFIG_CLASSES[Method.MORE] = MoReWithScale
        declared = adapter_setting("learn_scale")
    finally:
        CONFIG_CLASSES.update(original)
    spec = declared.metadata[SETTING]
    assert (declared.default, spec.group, spec.methods, spec.help) == (
        False,
        Group.ADAPTER,
        (Method.MORE,),
        "MoRe: Learn an output scalar.",
    )


class _Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@pytest.mark.parametrize(
    ("hint", "words"),
    [
        (int, "an integer"),
        (float | None, "a number or null"),
        (list[str] | str, "a list or text"),
        (tuple[int, ...], "a list"),
        (typing.Literal["a", "b"], "one of 'a', 'b'"),
        (_Colour | None, "one of ['red', 'blue'] or null"),
        (dict[str, int], "a mapping"),
    ],
)
def test_a_fields_type_reads_as_words_in_error_messages(hint, words):
    from moreft.train.type_words import type_in_words

    assert type_in_words(hint) == words
