"""Bad input: every error names the problem, and the model is left exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_unchanged, make_net, randomize_adapters, snapshot
from safetensors.torch import save_file

import moreft
from moreft import ConfigError, LoRAConfig, MoRAConfig, MoReConfig, TargetError
from moreft.adapter_files import CONFIG_NAME, WEIGHTS_NAME

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


# -- adapter files ---------------------------------------------------------------------------------
def saved(path, shape=(24, 24), config=None, **net_kw):
    model = moreft.inject(
        make_net(shape, **net_kw), config or MoReConfig(target_modules=T, nblocks=4, block_rank=2)
    )
    randomize_adapters(model)
    moreft.save_adapter(model, path)
    return path


def expect_load_error(model, path, match, error=moreft.AdapterFileError):
    model.norm.requires_grad_(False)  # a mixed pattern of flags, which must survive
    before = snapshot(model)
    with pytest.raises(error, match=match):
        moreft.load_adapter(model, path)
    assert_unchanged(model, before)


def test_load_a_file_of_another_method(tmp_path, net24):
    moreft.inject(net24, LoRAConfig(target_modules=T, rank=2))
    randomize_adapters(net24)
    expect_load_error(
        net24,
        saved(tmp_path),
        r"model already carries a different adapter \(lora on 1 "
        r"modules\); the file holds more on 1 modules",
    )


@pytest.mark.parametrize(
    "mine,theirs,match",
    [
        (
            LoRAConfig(target_modules=T, rank=2, alpha=4),
            LoRAConfig(target_modules=T, rank=2, alpha=16),
            r"lora adapter with alpha=4\.0; the file was saved with alpha=16\.0",
        ),
        (
            MoRAConfig(target_modules=T, r_hat=8, operator="decouple"),
            MoRAConfig(target_modules=T, r_hat=8),
            r"mora adapter with operator='decouple'; the file was saved with operator='rotation'",
        ),
    ],
    ids=["lora-alpha", "mora-operator"],
)
def test_load_a_file_with_other_hyperparameters(tmp_path, net24, mine, theirs, match):
    moreft.inject(net24, mine)
    expect_load_error(net24, saved(tmp_path, config=theirs), match)


def test_load_a_file_of_another_shape(tmp_path):
    expect_load_error(
        make_net((24, 20)),
        saved(tmp_path),
        r"adapter module 'lin' was made for shape \[24, 24\] \(out, in\) "
        r"but this model's is \[20, 24\]",
    )


def test_load_a_file_for_a_module_the_model_lacks(tmp_path, net24):
    net24.lin = torch.nn.Identity()
    expect_load_error(net24, saved(tmp_path), r"adapter module 'lin' is not a linear layer of this model")


def test_load_a_file_of_another_base(tmp_path):
    path = saved(tmp_path, name_or_path="org/base-a")
    expect_load_error(
        make_net((24, 24), name_or_path="org/base-b"),
        path,
        r"adapter was trained on base model 'org/base-a' but this model is 'org/base-b'",
    )


def test_load_a_path_that_is_not_an_adapter_dir(tmp_path, net24):
    expect_load_error(net24, tmp_path / "missing", r"is not a directory")
    (tmp_path / "file.txt").write_text("hi")
    expect_load_error(net24, tmp_path / "file.txt", r"is not a directory")
    expect_load_error(
        net24,
        tmp_path,
        r"is not a moreft adapter directory: it needs adapter_config\.json "
        r"and adapter_model\.safetensors$",
    )


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "adapter_model.bin"])
@pytest.mark.parametrize("with_config", [False, True], ids=["alone", "with-config"])
def test_pickle_files_are_refused(tmp_path, net24, pickle_name, with_config):
    path = saved(tmp_path / "ad")
    (path / WEIGHTS_NAME).unlink()
    if not with_config:
        (path / CONFIG_NAME).unlink()
    torch.save({"lin.blkdiag1": torch.zeros(1)}, path / pickle_name)
    expect_load_error(
        net24,
        path,
        rf"found \['{pickle_name}'\], which moreft refuses to read: pickle files "
        r"can run code",
    )


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", r"is not valid JSON"),
        ('{"format": "something-else"}', r"is not a 'moreft-adapter' file"),
        ("[1, 2]", r"is not a 'moreft-adapter' file"),
    ],
    ids=["corrupt", "other-format", "not-an-object"],
)
def test_bad_json(tmp_path, net24, text, match):
    path = saved(tmp_path / "ad")
    (path / CONFIG_NAME).write_text(text)
    expect_load_error(net24, path, match)


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda m: m["config"].update(bogus=1),
            r"bad config in .*unknown keys \['bogus'\] for method 'more'",
        ),
        (lambda m: m["config"].update(nblocks=0), r"bad config in .*nblocks=0 must be an integer >= 1"),
        (lambda m: m["config"].update(method="qlora"), r"bad config in .*method='qlora' is not one of"),
        (lambda m: m.update(format_version=2), r"format_version=2 is not supported"),
        (lambda m: m.update(modules={"lin": [24]}), r"'modules' in .* must map module names"),
        (lambda m: m.update(method="lora"), r"method='lora' disagrees with config method 'more'"),
    ],
    ids=["unknown-key", "bad-value", "unknown-method", "format-version", "modules", "method-mismatch"],
)
def test_bad_config_contents(tmp_path, net24, edit, match):
    path = saved(tmp_path / "ad")
    meta = json.loads((path / CONFIG_NAME).read_text())
    edit(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    expect_load_error(net24, path, match)


def _tensors(**shapes):
    return {k: torch.zeros(*v) for k, v in shapes.items()}


@pytest.mark.parametrize(
    "tensors,match",
    [
        (_tensors(**{"lin.blkdiag1": (4, 2, 6)}), r"missing keys \['lin\.blkdiag2'\], unexpected keys \[\]"),
        (
            _tensors(**{"lin.blkdiag1": (4, 2, 6), "lin.blkdiag2": (4, 6, 2), "lin.extra": (1,)}),
            r"missing keys \[\], unexpected keys \['lin\.extra'\]",
        ),
        (
            _tensors(**{"lin.blkdiag1": (4, 2, 5), "lin.blkdiag2": (4, 6, 2)}),
            r"tensor 'lin\.blkdiag1' has shape \[4, 2, 5\] .* but the model expects \[4, 2, 6\]",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
@pytest.mark.parametrize("preinjected", [False, True], ids=["fresh", "injected"])
def test_bad_tensor_file(tmp_path, net24, tensors, match, preinjected):
    path = saved(tmp_path / "ad")
    save_file(tensors, str(path / WEIGHTS_NAME))
    if preinjected:
        moreft.inject(net24, MoReConfig(target_modules=T, nblocks=4, block_rank=2))
    expect_load_error(net24, path, match)
    assert bool(moreft.adapter_layers(net24)) is preinjected


def test_corrupt_safetensors_file(tmp_path, net24):
    path = saved(tmp_path / "ad")
    (path / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10)
    expect_load_error(net24, path, r"is not a readable safetensors file")


def test_nan_adapter_file_is_refused_on_load_and_nan_weights_by_safe_merge(tmp_path, net24):
    path = saved(tmp_path / "ad")
    good = _tensors(**{"lin.blkdiag1": (4, 2, 6), "lin.blkdiag2": (4, 6, 2)})
    save_file(good | {"lin.blkdiag2": torch.full((4, 6, 2), float("nan"))}, str(path / WEIGHTS_NAME))
    before = snapshot(net24)
    with pytest.raises(
        moreft.AdapterFileError,
        match=r"holds NaN/Inf values in 1 tensor\(s\) \(e\.g\. "
        r"\['lin\.blkdiag2'\]\); an adapter must be finite",
    ):
        moreft.load_adapter(net24, path)
    assert_unchanged(net24, before)
    save_file(good, str(path / WEIGHTS_NAME))
    moreft.load_adapter(net24, path)
    with torch.no_grad():
        net24.lin.blkdiag2.fill_(float("nan"))  # diverged in memory, after loading
    before = snapshot(net24)
    # 288 of 576: the in-place merge adds per column block, so MoRe's structural zeros stay finite
    with pytest.raises(moreft.MergeError, match=r"merging adapter layer 'lin' would write 288 NaN/Inf"):
        moreft.merge(net24, safe=True)
    assert_unchanged(net24, before)
    assert isinstance(net24.lin, moreft.MoReLinear)


def test_save_without_adapter(tmp_path, net24):
    with pytest.raises(moreft.AdapterFileError, match=r"model carries no moreft adapter to save"):
        moreft.save_adapter(net24, tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize(
    "data,match",
    [
        ({"method": "bogus"}, r"method='bogus' is not one of 'more', 'mora', 'lora'"),
        ([("method", "more")], r"an adapter config must be a mapping, got list"),
        ({"method": "lora", "rank": 2, "nblocks": 4}, r"unknown keys \['nblocks'\] for method 'lora'"),
    ],
    ids=["method", "not-mapping", "unknown-key"],
)
def test_config_from_dict_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        moreft.config_from_dict(data)
