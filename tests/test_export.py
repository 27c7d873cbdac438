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
from tiny import make_tiny_bert, train_flags

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
    r_hat = expected_r_hat(case)
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
    with pytest.raises(
        moreft.ConfigError,
        match=f"rank={big + 1} is more than any adapted layer can hold: "
        rf"min\(out_features, in_features\) is at most {big}",
    ):
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


# -- a lossy export needs the caller's consent: a rank or a tolerance --------------------------------
def _lossy_mora():
    """``Linear(24, 16)`` with MoRA rank 2 and a random ΔW: at rank 2 the SVD drops most of it."""
    model = moreft.inject(
        torch.nn.Sequential(torch.nn.Linear(24, 16)), moreft.MoRAConfig(target_modules=["0"], rank=2)
    )
    randomize_adapters(model)
    return model


def test_lossy_mora_export_is_refused_without_a_rank_or_tolerance(tmp_path):
    model = _lossy_mora()
    with pytest.raises(
        moreft.ExportError,
        match=r"^LoRA export of 1 layers at rank 2: lossy, relative Frobenius "
        r"error \|\|ΔW - B·A\|\| / \|\|ΔW\|\| per layer: max 0\.\d+ \(0\), "
        r".*pass rank=R .*\(rank=16 is exact\) .*nothing was written$",
    ):
        moreft.export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_lossy_mora_export_is_written_when_a_rank_or_tolerance_accepts_it(tmp_path):
    model = _lossy_mora()
    asked = moreft.export_lora(model, tmp_path / "ranked", rank=2)  # a rank accepts its loss
    assert not asked.exact and asked.max_relative_error > 0.1
    assert asked.summary().startswith(
        f"LoRA export of 1 layers at rank 2: lossy, relative Frobenius error "
        f"||ΔW - B·A|| / ||ΔW|| per layer: max {asked.max_relative_error:.3g} (0)"
    )
    loose = moreft.export_lora(model, tmp_path / "loose", tolerance=asked.max_relative_error + 1e-9)
    assert loose.relative_errors == asked.relative_errors
    with pytest.raises(
        moreft.ExportError,
        match=r"more than tolerance=0\.1\. Export at a higher rank \(rank=16 "
        r"is exact; CLI --rank\) .*nothing was written$",
    ):
        moreft.export_lora(model, tmp_path / "tight", tolerance=0.1)
    with pytest.raises(moreft.ExportError, match=r"more than tolerance=0\.1"):  # checked with a rank too
        moreft.export_lora(model, tmp_path / "tight", rank=2, tolerance=0.1)
    exact = moreft.export_lora(model, tmp_path / "full", rank=16, tolerance=0)
    assert exact.exact and exact.summary() == (
        "LoRA export of 1 layers at rank 16: exact (relative Frobenius error <= 1e-06 on every layer)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "loose", "ranked"]


def test_export_tolerance_must_be_a_finite_number_at_least_zero(tmp_path):
    for bad in (-0.1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(moreft.ConfigError, match=r"tolerance=.* must be a finite number >= 0"):
            moreft.export_lora(_lossy_mora(), tmp_path / "x", tolerance=bad)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("case", cases(Method.MORE) + cases(Method.LORA))
def test_exact_methods_export_without_a_rank_or_tolerance(case, tmp_path):
    report = moreft.export_lora(trained(case), tmp_path / "lora", tolerance=None)
    assert report.exact and report.summary().endswith(
        ": exact (relative Frobenius error <= 1e-06 on every layer)"
    )


def test_cli_refuses_a_lossy_mora_export_and_says_the_error_in_words(tmp_path, capsys):
    from moreft.cli import main

    bert = make_tiny_bert(tmp_path / "bert")
    assert (
        main(train_flags(bert, tmp_path, method="mora", rank=2, block_rank=None, max_steps=2, run_name="r"))
        == 0
    )
    run = str(tmp_path / "r")
    capsys.readouterr()
    assert main(["export-lora", run, str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moreft: error: LoRA export of 6 layers at rank 2: lossy, relative Frobenius error")
    assert "(CLI: --rank / --tolerance); nothing was written" in err and not (tmp_path / "refused").exists()
    assert main(["export-lora", run, str(tmp_path / "ranked"), "--rank", "2"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["exact"] is False and result["lora_rank"] == 2 and result["max_relative_error"] > 0.1
    assert err.startswith(
        "moreft: LoRA export of 6 layers at rank 2: lossy, relative Frobenius error ||ΔW - B·A|| "
        f"/ ||ΔW|| per layer: max {result['max_relative_error']:.3g} (bert.encoder.layer."
    )
    assert main(["export-lora", run, str(tmp_path / "tight"), "--tolerance", "0.01"]) == 2
    assert "more than tolerance=0.01" in capsys.readouterr().err and not (tmp_path / "tight").exists()
    assert main(["export-lora", run, str(tmp_path / "loose"), "--tolerance", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["max_relative_error"] == result["max_relative_error"]
