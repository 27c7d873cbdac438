"""Bad adapter files: every load error names the problem, and the model is left exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_unchanged, make_net, randomize_adapters, snapshot
from safetensors.torch import save_file
from test_errors import T

import moreft
from moreft import ConfigError, LoRAConfig, MoRAConfig, MoReConfig
from moreft.adapter_files import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


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
