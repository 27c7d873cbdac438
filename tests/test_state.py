"""Adapter files: save / load round trips, what is written, and config (de)serialisation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from cases import CASES, cases
from conftest import make_net, randomize_adapters
from safetensors import safe_open

import moreft
from moreft import Method, SharingLayout
from moreft.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from moreft.layers import LAYER_CLASSES

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(case):
    return torch.randn(3, case.in_features, generator=torch.Generator().manual_seed(5))


def trained(case, **replace):
    """A TinyNet with the case's adapter and random adapter values (and a changed head if saved)."""
    model = moreft.inject(make_net(case), dataclasses.replace(case.config, **replace))
    randomize_adapters(model)
    if model.head.weight.requires_grad:
        with torch.no_grad():
            model.head.weight.add_(0.5)
    return model


@pytest.mark.parametrize("case", cases())
def test_save_load_round_trip_into_fresh_model(case, tmp_path):
    model = trained(case).eval()
    assert moreft.save_adapter(model, tmp_path / "ad") == tmp_path / "ad"
    fresh = make_net(case)
    assert moreft.load_adapter(fresh, tmp_path / "ad") is fresh
    fresh.eval()
    assert type(fresh.lin) is LAYER_CLASSES[case.method]
    x = _x(case)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    for name, p in fresh.lin.adapter_params().items():
        assert torch.equal(p, model.lin.adapter_params()[name]) and p.requires_grad
    loaded = moreft.adapter_config(fresh)
    assert dataclasses.replace(loaded, target_modules=case.config.target_modules) == case.config
    assert loaded.target_modules == ("lin",)


@pytest.mark.parametrize("case", cases())
def test_save_load_with_modules_to_save_gives_equal_outputs(case, tmp_path):
    model = trained(case, modules_to_save=("head",)).eval()
    moreft.save_adapter(model, tmp_path)
    fresh = make_net(case)
    moreft.load_adapter(fresh, tmp_path)
    fresh.eval()
    x = _x(case)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert all(p.requires_grad for p in fresh.head.parameters())
    assert moreft.count_parameters(fresh) == moreft.count_parameters(model)


@pytest.mark.parametrize("case", cases())
def test_load_into_model_already_carrying_the_same_adapter(case, tmp_path):
    model = trained(case).eval()
    moreft.save_adapter(model, tmp_path)
    other = moreft.inject(make_net(case), case.config).eval()
    moreft.load_adapter(other, tmp_path)
    x = _x(case)
    with torch.no_grad():
        assert torch.equal(other.lin(x), model.lin(x))


@pytest.mark.parametrize("case", cases())
def test_saved_files_hold_only_safetensors_and_json(case, tmp_path):
    model = trained(case)
    moreft.save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    with safe_open(str(tmp_path / "ad" / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
        for k in keys:
            assert f.get_tensor(k).dtype == torch.float32
    assert keys == {
        f"lin.{n}" for n in model.lin.adapter_state()
    }  # no base weight (frozen adapter buffers kept)
    meta = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert meta["format"] == "moreft-adapter" and meta["method"] == case.method.value
    assert meta["modules"] == {"lin": [case.out_features, case.in_features]}
    assert moreft.config_from_dict(meta["config"]) == case.config
    read_meta, config = moreft.read_adapter_config(tmp_path / "ad")
    assert read_meta == meta and config == case.config


@pytest.mark.parametrize("case", cases())
def test_config_dict_round_trip(case):
    data = case.config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert moreft.config_from_dict(data) == case.config


def test_saving_again_replaces_the_directory(tmp_path):
    case = CASES[0]
    model = trained(case)
    moreft.save_adapter(model, tmp_path / "ad")
    randomize_adapters(model, seed=99)
    moreft.save_adapter(model, tmp_path / "ad")  # our own earlier adapter: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temp dirs left behind
    (tmp_path / "ad" / "stale.txt").write_text("not moreft's")  # now the folder holds a user's file
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}
    with pytest.raises(moreft.OutputError, match=r"holds files moreft did not write there .*\(stale.txt\)"):
        moreft.save_adapter(trained(case), tmp_path / "ad")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == before
    (tmp_path / "ad" / "stale.txt").unlink()
    fresh = make_net(case)
    moreft.load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh.lin.blkdiag1, model.lin.blkdiag1)


@pytest.mark.parametrize("case", cases(Method.MORA, operators=(moreft.MoRAOperator.SHARING,)))
def test_mora_sharing_layout_is_restored(case, tmp_path):
    model = trained(case).eval()
    flipped = next(lay for lay in SharingLayout if lay is not case.config.sharing_layout)
    model.lin.sharing_layout = flipped  # as ReMoRA does between merges
    moreft.save_adapter(model, tmp_path)
    fresh = make_net(case)
    moreft.load_adapter(fresh, tmp_path)
    assert fresh.lin.sharing_layout is flipped
    x = _x(case)
    with torch.no_grad():
        assert torch.equal(fresh.lin(x), model.lin(x))


def test_load_with_check_base_false_accepts_another_base(tmp_path):
    case = CASES[0]
    model = moreft.inject(make_net(case, name_or_path="org/base-a"), case.config)
    randomize_adapters(model)
    moreft.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["base_model"] == "org/base-a"
    other = make_net(case, name_or_path="org/base-b")
    moreft.load_adapter(other, tmp_path, check_base=False)
    assert torch.equal(other.lin.blkdiag2, model.lin.blkdiag2)


def test_loaded_adapter_is_trainable(tmp_path):
    case = CASES[0]
    moreft.save_adapter(trained(case), tmp_path)
    fresh = make_net(case)
    moreft.load_adapter(fresh, tmp_path)
    counts = moreft.count_parameters(fresh)
    assert counts.trainable == counts.adapter > 0
