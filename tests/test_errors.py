"""Bad input: every error names the problem, and the model is left exactly as it was."""

from __future__ import annotations

import pytest
from conftest import assert_unchanged, make_net, randomize_adapters, snapshot

import moreft
from moreft import ConfigError, LoRAConfig, MoRAConfig, MoReConfig, TargetError

pytestmark = pytest.mark.usefixtures("one_thread")

T = ("lin",)


def test_error_classes_derive_from_builtins():
    assert issubclass(ConfigError, ValueError) and issubclass(TargetError, ValueError)
    assert issubclass(moreft.AdapterFileError, ValueError) and issubclass(moreft.MergeError, RuntimeError)
    for cls in (ConfigError, TargetError, moreft.AdapterFileError, moreft.MergeError):
        assert issubclass(cls, moreft.MoreftError)


def expect_inject_error(model, make_config, error, match):
    """``make_config`` may itself raise (config errors): either way the model must not change."""
    before = snapshot(model)
    with pytest.raises(error, match=match):
        moreft.inject(model, make_config())
    assert_unchanged(model, before)


BAD_INTS = [
    pytest.param(0, r"=0 must be an integer >= 1", id="zero"),
    pytest.param(-2, r"=-2 must be an integer >= 1", id="negative"),
    pytest.param(2.0, r"=2\.0 must be an integer >= 1 \(got float\)", id="float"),
    pytest.param(True, r"=True must be an integer >= 1 \(got bool\)", id="bool"),
    pytest.param("4", r"='4' must be an integer >= 1 \(got str\)", id="str"),
]


@pytest.mark.parametrize("value,match", BAD_INTS)
@pytest.mark.parametrize(
    "cls,field",
    [
        (MoReConfig, "nblocks"),
        (MoReConfig, "block_rank"),
        (LoRAConfig, "rank"),
        (MoRAConfig, "rank"),
        (MoRAConfig, "r_hat"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_bad_integer_hyperparameters(net24, cls, field, value, match):
    expect_inject_error(
        net24, lambda: cls(target_modules=T, **{field: value}), ConfigError, f"{field}{match}"
    )


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, True, "0.1", None], ids=repr)
@pytest.mark.parametrize("cls", [MoReConfig, MoRAConfig, LoRAConfig], ids=lambda c: c.__name__)
def test_dropout_outside_unit_interval(net24, cls, value):
    match = rf"dropout={value!r} must be a number in \[0, 1\)"
    expect_inject_error(net24, lambda: cls(target_modules=T, dropout=value), ConfigError, match)


@pytest.mark.parametrize("value", [0, -1.0, True, "16"], ids=repr)
def test_bad_lora_alpha(net24, value):
    expect_inject_error(
        net24,
        lambda: LoRAConfig(target_modules=T, alpha=value),
        ConfigError,
        rf"alpha={value!r} must be a number > 0",
    )


def test_unknown_operator_and_layout(net24):
    expect_inject_error(
        net24,
        lambda: MoRAConfig(target_modules=T, operator="bogus"),
        ConfigError,
        r"operator='bogus' is not one of 'truncation', 'sharing', 'decouple', 'rotation'",
    )
    expect_inject_error(
        net24,
        lambda: MoRAConfig(target_modules=T, sharing_layout="zigzag"),
        ConfigError,
        r"sharing_layout='zigzag' is not one of 'strided', 'adjacent'",
    )


def test_odd_r_hat_for_rotation(net24):
    expect_inject_error(
        net24,
        lambda: MoRAConfig(target_modules=T, operator="rotation", r_hat=7),
        ConfigError,
        r"r_hat=7 must be even for operator 'rotation'",
    )


def test_nblocks_above_in_features(net24):
    expect_inject_error(
        net24,
        lambda: MoReConfig(target_modules=T, nblocks=25, block_rank=1),
        ConfigError,
        r"nblocks=25 must be <= in_features=24 of 'lin'",
    )


@pytest.mark.parametrize(
    "shape,block_rank,smallest", [((24, 24), 7, 6), ((36, 20), 6, 5), ((20, 36), 6, 5)], ids=str
)
def test_block_rank_above_smallest_block(shape, block_rank, smallest):
    expect_inject_error(
        make_net(shape),
        lambda: MoReConfig(target_modules=T, nblocks=4, block_rank=block_rank),
        ConfigError,
        rf"block_rank={block_rank} must be <= min\(in_block, out_block\)={smallest} "
        "for 'lin'",
    )


@pytest.mark.parametrize("operator", ["truncation", "sharing"])
def test_r_hat_above_min_for_bounded_operators(operator):
    expect_inject_error(
        make_net((36, 20)),
        lambda: MoRAConfig(target_modules=T, operator=operator, r_hat=24),
        ConfigError,
        rf"r_hat=24 must be <= min\(in_features, out_features\)=20 for "
        rf"operator '{operator}' on 'lin'",
    )


def test_r_hat_above_max_for_decouple(net24):
    expect_inject_error(
        net24,
        lambda: MoRAConfig(target_modules=T, operator="decouple", r_hat=26),
        ConfigError,
        r"r_hat=26 must be <= max\(in_features, out_features\)=24",
    )


def test_a_failing_second_target_injects_nothing(net24):  # head is 24 -> 3: one row per block
    expect_inject_error(
        net24,
        lambda: MoReConfig(target_modules=["lin", "head"], nblocks=4, block_rank=2),
        ConfigError,
        r"block_rank=2 must be <= min\(in_block, out_block\)=1 for 'head'",
    )


@pytest.mark.parametrize("spec", [["nope"], r"li"], ids=["names", "regex"])
def test_targets_matching_nothing_list_the_linear_layers(net24, spec):
    expect_inject_error(
        net24,
        lambda: LoRAConfig(target_modules=spec),
        TargetError,
        r"matches no module; linear layers are: lin, head$",
    )


def test_no_default_targets_for_unknown_model(net24):
    expect_inject_error(
        net24, lambda: LoRAConfig(), TargetError, r"no default target_modules for model type None"
    )


@pytest.mark.parametrize("spec", [["norm"], r"lin|norm"], ids=["exact-name", "regex"])
def test_targeting_a_non_linear_module(net24, spec):
    expect_inject_error(
        net24,
        lambda: LoRAConfig(target_modules=spec),
        TargetError,
        r"target module 'norm' is a LayerNorm; moreft adapts only nn\.Linear",
    )


def test_bad_regex_and_empty_targets(net24):
    expect_inject_error(
        net24,
        lambda: LoRAConfig(target_modules=r"lin("),
        ConfigError,
        r"target_modules='lin\(' is not a valid regular expression",
    )
    expect_inject_error(net24, lambda: LoRAConfig(target_modules=[]), ConfigError, r"selects nothing")


def test_modules_to_save_matching_nothing(net24):
    expect_inject_error(
        net24,
        lambda: LoRAConfig(target_modules=T, modules_to_save=["classifier"]),
        TargetError,
        r"modules_to_save \['classifier'\] match no module of the model",
    )


def test_injecting_twice(net24):
    moreft.inject(net24, MoReConfig(target_modules=T, nblocks=2, block_rank=2))
    randomize_adapters(net24)
    expect_inject_error(
        net24,
        lambda: LoRAConfig(target_modules=T),
        TargetError,
        r"model already carries a moreft adapter \(e\.g\. on \['lin'\]\)",
    )
    expect_inject_error(
        net24,
        lambda: LoRAConfig(target_modules=["head"]),
        TargetError,
        r"model already carries a moreft adapter",
    )
    with pytest.raises(TargetError, match=r"module 'lin' already has a more adapter"):
        moreft.LoRALinear(net24.lin, LoRAConfig(), name="lin")


def test_wrapping_a_non_linear_layer_directly(net24):
    with pytest.raises(TargetError, match=r"module 'norm' is a LayerNorm"):
        moreft.MoReLinear(net24.norm, MoReConfig(), name="norm")
