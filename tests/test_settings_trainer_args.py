"""``trainer_args``: transformers' own options, converted and checked by their types, reach the run."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import yaml
from test_settings import SPECS, error_line
from tiny import make_tiny_bert, train_flags

from moreft.cli import build_parser, main
from moreft.errors import ConfigError
from moreft.train import loop
from moreft.train.config import TrainConfig
from moreft.train.flags import overrides
from moreft.train.recipes import resolve_config
from moreft.train.trainer_args import DEFAULTS_YOU_MAY_CHANGE, FIXED


# -- trainer_args --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given, stored",
    [
        ({"optim": "ADAFACTOR"}, {"optim": "adafactor"}),
        ({"gradient_checkpointing": "true"}, {"gradient_checkpointing": True}),
        ({"gradient_checkpointing": True}, {"gradient_checkpointing": True}),
        (
            {"adam_beta1": "0.8", "dataloader_num_workers": 2},
            {"adam_beta1": 0.8, "dataloader_num_workers": 2},
        ),
        ({"report_to": "tensorboard,wandb"}, {"report_to": ["tensorboard", "wandb"]}),
        ({"report_to": ["none"]}, {"report_to": ["none"]}),
        ({"lr_scheduler_kwargs": '{"min_lr": 1e-5}'}, {"lr_scheduler_kwargs": {"min_lr": 1e-5}}),
        ({"lr_scheduler_kwargs": {"min_lr": 1e-5}}, {"lr_scheduler_kwargs": {"min_lr": 1e-5}}),
        ({"torch_compile_mode": None}, {"torch_compile_mode": None}),
    ],
)
def test_trainer_args_are_converted_by_their_own_types(given, stored):
    config = TrainConfig(task="sentiment", trainer_args=given)
    assert config.trainer_args == stored
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


@pytest.mark.parametrize(
    "given, message",
    [
        (
            {"optimm": "sgd"},
            (
                r"trainer_args key 'optimm' is not a transformers TrainingArguments field; "
                r"did you mean 'optim' or 'optim_args'\?"
            ),
        ),
        (
            {"learning_rate": 1e-3},
            (
                r"trainer_args key 'learning_rate' is set by moreft's lr setting; give it as "
                r"--lr \(recipe key lr\)"
            ),
        ),
        (
            {"per_device_train_batch_size": 4},
            r"is set by moreft's batch_size setting; give it as --batch-size",
        ),
        ({"lr": 1e-3}, r"trainer_args key 'lr' is a moreft setting; give it as --lr"),
        ({"push_to_hub": True}, r"trainer_args key 'push_to_hub' cannot be changed: moreft never uploads"),
        ({"optim": "bogus"}, r"trainer_args optim='bogus' is not one of \["),
        ({"adam_beta1": "x"}, r"trainer_args adam_beta1='x' must be a number"),
        (
            {"gradient_checkpointing": "maybe"},
            r"trainer_args gradient_checkpointing='maybe' must be true or false",
        ),
        ({"adam_beta1": [0.8, 0.9]}, r"trainer_args adam_beta1=\[0\.8, 0\.9\] takes one value"),
        ({"adam_beta1": None}, r"trainer_args adam_beta1=None: this option cannot be null"),
        (
            {"report_to": "tensorbord"},
            (
                r"report_to='tensorbord' is not one of transformers' integrations "
                r".*did you mean 'tensorboard'\?"
            ),
        ),
        (
            {"lr_scheduler_kwargs": "{min_lr"},
            r"trainer_args lr_scheduler_kwargs='\{min_lr' is not a valid JSON object",
        ),
    ],
)
def test_bad_trainer_args(given, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(task="sentiment", trainer_args=given)


def test_trainer_args_reach_training_arguments(monkeypatch):
    import transformers

    passed = {}
    real = transformers.TrainingArguments

    def recording(**kwargs):
        passed.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(transformers, "TrainingArguments", recording)
    config = TrainConfig(
        task="sentiment",
        max_steps=4,
        trainer_args={
            "optim": "sgd",
            "gradient_checkpointing": True,
            "report_to": "none",
            "adam_beta2": 0.95,
        },
    )
    arguments = loop.training_arguments(config)
    assert (
        arguments.optim.value,
        arguments.gradient_checkpointing,
        arguments.report_to,
        arguments.adam_beta2,
    ) == ("sgd", True, [], 0.95)
    assert arguments.learning_rate == config.lr and arguments.run_name == config.run_name
    owned = {key for s in SPECS.values() for key in s.trainer_keys}
    moreft_keys = set(passed) - set(config.trainer_args)
    assert moreft_keys <= owned | set(FIXED) | set(DEFAULTS_YOU_MAY_CHANGE), moreft_keys - owned - set(FIXED)


def test_run_time_checks_of_training_arguments():
    config = TrainConfig(task="sentiment", lr_scheduler="cosine_with_min_lr")
    with pytest.raises(ConfigError, match=r"lr_scheduler='cosine_with_min_lr' cannot be built .*min_lr"):
        loop.training_arguments(config)
    loop.training_arguments(config.replace(trainer_args={"lr_scheduler_kwargs": {"min_lr": 1e-6}}))
    with pytest.raises(
        ConfigError,
        match=r"transformers refused this run's training arguments: "
        r"lr_scheduler_type reduce_lr_on_plateau requires an eval strategy",
    ):
        loop.training_arguments(config.replace(lr_scheduler="reduce_lr_on_plateau"))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(
            ConfigError, match=r"report_to='tensorboard' needs its package, which is not installed"
        ):
            loop.training_arguments(
                config.replace(lr_scheduler="cosine", trainer_args={"report_to": "tensorboard"})
            )


def test_trainer_arg_flags_add_to_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: sentiment\ntrainer_args: {optim: sgd, adam_beta1: 0.8}\n")
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(recipe),
            "--trainer-arg",
            "adam_beta1=0.7",
            "--trainer-arg",
            "gradient_checkpointing=true",
        ]
    )
    config = resolve_config(args.config, overrides(args, TrainConfig))
    assert config.trainer_args == {"optim": "sgd", "adam_beta1": 0.7, "gradient_checkpointing": True}


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-settings"))


@pytest.mark.usefixtures("one_thread")
def test_a_tiny_run_with_trainer_args(bert, tmp_path, capsys):
    """optim, gradient checkpointing and reporting reach the Trainer; trainer_args cannot change on resume."""
    flags = train_flags(bert, tmp_path, run_name="r", save_every=2, max_steps=2)
    extra = [
        "--trainer-arg",
        "optim=sgd",
        "--trainer-arg",
        "gradient_checkpointing=true",
        "--trainer-arg",
        "report_to=none",
    ]
    assert main([*flags, *extra]) == 0
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["trainer_args"] == {"optim": "sgd", "gradient_checkpointing": True, "report_to": "none"}
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["train_loss"] == metrics["train_loss"]  # finite
    capsys.readouterr()
    line = error_line(
        capsys,
        [
            *train_flags(bert, tmp_path, run_name="r", save_every=2, max_steps=4),
            "--resume",
            "--trainer-arg",
            "optim=adafactor",
        ],
    )
    assert "cannot resume" in line and "trainer_args" in line


@pytest.mark.usefixtures("one_thread")
def test_tensorboard_logs_go_into_the_run(bert, tmp_path):
    pytest.importorskip("tensorboard")
    flags = train_flags(bert, tmp_path, run_name="tb", max_steps=2)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*flags, "--trainer-arg", "report_to=tensorboard"]) == 0
        assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
        assert (
            main([*flags, "--trainer-arg", "report_to=tensorboard", "--overwrite"]) == 0
        )  # moreft's to delete
