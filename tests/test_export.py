"""export_lora -> peft.PeftModel.from_pretrained gives the same model (MoRA: up to its SVD tail)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from cases import cases, expected_r_hat, expected_rank
from conftest import assert_close, make_net, randomize_adapters
from peft import PeftModel

import moreft
from moreft import Method, MoRAOperator

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(case):
    return torch.randn(4, case.in_features, generator=torch.Generator().manual_seed(11))


def trained(case, **replace):
    model = moreft.inject(make_net(case), dataclasses.replace(case.config, **replace)).eval()
    randomize_adapters(model)
    return model


def peft_load(case, path):
    return PeftModel.from_pretrained(make_net(case), str(path)).eval()


def exact_rank(case):
    """A LoRA rank at which the export is lossless: the rank of ΔW (for MoRA: not always r_hat)."""
    return expected_rank(case) if case.method is Method.MORA else None


@pytest.mark.parametrize("case", cases())
def test_export_loads_in_peft_with_equal_outputs(case, tmp_path):
    model = trained(case)
    report = moreft.export_lora(model, tmp_path / "lora", rank=exact_rank(case))
    assert report.path == tmp_path / "lora" and set(report.relative_errors) == {"lin"}
    assert report.max_relative_error < 1e-6
    peft_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == peft_config["lora_alpha"] == report.rank
    assert peft_config["target_modules"] == ["lin"] and peft_config["fan_in_fan_out"] is False
    if case.method is Method.MORE:  # the principal init's frozen product is a second term of the same rank
        doubled = case.config.init_mode is moreft.InitMode.PRINCIPAL
        assert report.rank == case.config.nblocks * case.config.block_rank * (2 if doubled else 1)
    elif case.method is Method.LORA:
        assert report.rank == case.config.rank
    x = _x(case)
    with torch.no_grad():
        assert_close(peft_load(case, tmp_path / "lora")(x), model(x), case.tol)


@pytest.mark.parametrize("case", cases())
def test_export_with_modules_to_save(case, tmp_path):
    model = trained(case, modules_to_save=("head",))
    with torch.no_grad():
        model.head.weight.mul_(-2.0)
    moreft.export_lora(model, tmp_path, rank=exact_rank(case))
    x = _x(case)
    with torch.no_grad():
        assert_close(peft_load(case, tmp_path)(x), model(x), case.tol)


@pytest.mark.parametrize("case", cases(Method.MORA))
def test_mora_low_rank_export_reports_the_svd_tail(case, tmp_path):
    model = trained(case)
    rank = 2
    report = moreft.export_lora(model, tmp_path, rank=rank)
    delta = model.lin.delta_weight().detach().double()
    s = torch.linalg.svdvals(delta)
    tail = math.sqrt(float(s[rank:].square().sum() / s.square().sum()))
    assert report.rank == rank and report.relative_errors["lin"] > 0
    assert report.relative_errors["lin"] == pytest.approx(tail, rel=1e-6)
    merged = peft_load(case, tmp_path).merge_and_unload()  # what peft actually applies
    peft_delta = merged.lin.weight.double() - model.lin.base_layer.weight.double()
    got = float(torch.linalg.matrix_norm(peft_delta - delta) / torch.linalg.matrix_norm(delta))
    assert got == pytest.approx(tail, rel=1e-4)


@pytest.mark.parametrize("case", cases(Method.MORA))
def test_mora_export_at_r_hat_is_exact_only_when_delta_has_rank_r_hat(case, tmp_path):
    model = trained(case)
    r_hat = expected_r_hat(case.config, case.in_features, case.out_features)
    report = moreft.export_lora(model, tmp_path, rank=r_hat)
    if case.config.operator in (MoRAOperator.TRUNCATION, MoRAOperator.SHARING):
        assert report.max_relative_error < 1e-6
    else:  # DECOUPLE / ROTATION reach rank min(in, out) > r_hat with only r_hat² parameters
        assert expected_rank(case) > r_hat and report.max_relative_error > 1e-3


def test_export_of_thin_layers_pads_to_one_rank(tmp_path):
    case = cases(Method.MORA, operators=(MoRAOperator.TRUNCATION,))[0].values[0]
    model = trained(case, target_modules=("lin", "head"))  # head is out_features -> 3: thinner than lin
    big = min(case.in_features, case.out_features)
    assert big > 3
    report = moreft.export_lora(model, tmp_path, rank=big)
    assert report.rank == big and report.max_relative_error < 1e-6
    with torch.no_grad():
        assert_close(peft_load(case, tmp_path)(_x(case)), model(_x(case)), case.tol)
    with pytest.raises(moreft.ConfigError, match=f"rank={big + 1} is more than any adapted layer can hold: "
                                                 rf"min\(out_features, in_features\) is at most {big}"):
        moreft.export_lora(model, tmp_path / "too-big", rank=big + 1)
    with pytest.raises(moreft.ConfigError, match="is more than any adapted layer can hold"):
        moreft.export_lora(model, tmp_path / "huge", rank=10**12)
    assert not (tmp_path / "too-big").exists() and not (tmp_path / "huge").exists()


def test_export_refuses_merged_layers_and_bad_ranks(tmp_path):
    case = cases(Method.MORE)[0].values[0]
    model = trained(case)
    natural = case.config.nblocks * case.config.block_rank
    with pytest.raises(moreft.ConfigError, match=f"its exact LoRA rank is {natural}"):
        moreft.export_lora(model, tmp_path / "a", rank=natural + 1)
    model.lin.merge()
    with pytest.raises(moreft.AdapterFileError, match="unmerge them before exporting"):
        moreft.export_lora(model, tmp_path / "b")
    mora = trained(cases(Method.MORA)[0].values[0])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(moreft.ConfigError, match="must be an integer >= 1"):
            moreft.export_lora(mora, tmp_path / "c", rank=bad)
    with pytest.raises(moreft.AdapterFileError, match="no moreft adapter to export"):
        moreft.export_lora(make_net(case), tmp_path / "d")
    assert not any(tmp_path.iterdir())
