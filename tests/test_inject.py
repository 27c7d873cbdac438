"""Model-level API: inject, targeting, freezing, counts, merge / safe merge / eject."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
from cases import cases, expected_params
from conftest import (
    TinyNet,
    assert_close,
    assert_unchanged,
    make_net,
    module_types,
    randomize_adapters,
    snapshot,
)
from torch import nn

import moreft
from moreft.layers import LAYER_CLASSES

pytestmark = pytest.mark.usefixtures("one_thread")


def two_layer_net(case, seed=0):
    """lin: in -> out, lin2: out -> in (the swapped shape is in the table too)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            lin=nn.Linear(case.in_features, case.out_features),
            act=nn.Tanh(),
            lin2=nn.Linear(case.out_features, case.in_features),
        )
    )


BOTH = ("lin", "lin2")


def _x(n, seed=3):
    return torch.randn(4, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", cases())
def test_inject_wraps_targets_freezes_base_and_counts(case):
    model = make_net(case)
    base_total = sum(p.numel() for p in model.parameters())
    assert moreft.inject(model, case.config) is model
    assert type(model.lin) is LAYER_CLASSES[case.method]
    assert type(model.head) is nn.Linear and type(model.norm) is nn.LayerNorm
    assert list(moreft.adapter_layers(model)) == ["lin"]
    assert moreft.adapter_config(model) == case.config
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # the adapter's parameters live in per-adapter dicts: lin.more_blkdiag1.default, ...
    assert trainable == {f"lin.{model.lin.prefix}{n}.default" for n in model.lin.adapter_params()}
    counts = moreft.count_parameters(model)
    assert counts == moreft.ParameterCounts(
        adapter=expected_params(case),
        other_trainable=0,
        trainable=expected_params(case),
        total=base_total + expected_params(case),
    )
    assert f"{expected_params(case):,}" in str(counts)


@pytest.mark.parametrize("case", cases())
def test_modules_to_save_stay_trainable(case):
    model = make_net(case)
    moreft.inject(model, dataclasses.replace(case.config, modules_to_save=("head",)))
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any(p.requires_grad for p in model.norm.parameters())
    assert not any(p.requires_grad for p in model.lin.base_layer.parameters())
    counts = moreft.count_parameters(model)
    assert counts.other_trainable == sum(p.numel() for p in model.head.parameters())
    assert counts.adapter == expected_params(case)


@pytest.mark.parametrize("case", cases())
def test_model_merge_puts_plain_linear_back_with_same_outputs(case):
    model = moreft.inject(two_layer_net(case), dataclasses.replace(case.config, target_modules=BOTH))
    randomize_adapters(model)
    x = _x(case.in_features)
    with torch.no_grad():
        before = model(x)
    assert moreft.merge(model) is model
    assert type(model.lin) is nn.Linear and type(model.lin2) is nn.Linear
    assert moreft.adapter_layers(model) == {} and moreft.adapter_config(model) is None
    with torch.no_grad():
        assert_close(model(x), before, case.tol)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("case", cases())
def test_model_safe_merge_refuses_non_finite_and_leaves_model_unchanged(case, bad):
    model = moreft.inject(two_layer_net(case), dataclasses.replace(case.config, target_modules=BOTH))
    randomize_adapters(model)
    with torch.no_grad():  # only the second layer is bad: the first must not be merged either
        next(iter(model.lin2.adapter_params().values())).view(-1)[0] = bad
    before = snapshot(model)
    with pytest.raises(moreft.MergeError, match=r"merging adapter layer 'lin2' would write \d+ NaN/Inf"):
        moreft.merge(model, safe=True)
    assert_unchanged(model, before)
    assert set(moreft.adapter_layers(model)) == {"lin", "lin2"}


@pytest.mark.parametrize("case", cases())
def test_eject_restores_the_untouched_base(case):
    model = make_net(case)
    types, state = module_types(model), {k: v.clone() for k, v in model.state_dict().items()}
    moreft.inject(model, case.config)
    randomize_adapters(model)
    assert moreft.eject(model) is model
    assert module_types(model) == types and moreft.adapter_config(model) is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_eject_after_layer_merge_unmerges(net24):
    w0 = net24.lin.weight.detach().clone()
    moreft.inject(net24, moreft.LoRAConfig(target_modules=["lin"], rank=2))
    randomize_adapters(net24)
    net24.lin.merge()
    assert not torch.allclose(net24.lin.base_layer.weight, w0)
    moreft.eject(net24)
    assert type(net24.lin) is nn.Linear
    torch.testing.assert_close(net24.lin.weight, w0)


def test_inject_after_merge_starts_a_new_adapter(net24):
    moreft.inject(net24, moreft.MoReConfig(target_modules=["lin"], nblocks=2, block_rank=2))
    randomize_adapters(net24)
    moreft.merge(net24)
    moreft.inject(net24, moreft.LoRAConfig(target_modules=["lin"], rank=2))
    assert isinstance(net24.lin, moreft.LoRALinear)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"lin": nn.Linear(8, 8), "proj": nn.Linear(8, 8), "ln": nn.LayerNorm(8)})
        self.other_lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize(
    "spec,expected",
    [
        (["lin"], ["block.lin"]),  # dotted suffix, not a substring: other_lin is not matched
        (["block.proj"], ["block.proj"]),
        (["lin", "proj"], ["block.lin", "block.proj"]),
        (r"block\.(lin|proj)", ["block.lin", "block.proj"]),
        (r".*lin", ["block.lin", "other_lin"]),  # regex must match the whole name
        (r"lin", []),
        ("all-linear", ["block.lin", "block.proj", "other_lin"]),  # the output head is excluded
    ],
    ids=["suffix", "qualified", "list", "regex", "regex-suffix", "regex-fullmatch", "all-linear"],
)
def test_resolve_targets(spec, expected):
    config = moreft.LoRAConfig(target_modules=spec, rank=2)
    if not expected:
        with pytest.raises(moreft.TargetError, match="matches no module"):
            moreft.resolve_targets(Nested(), config)
        return
    assert moreft.resolve_targets(Nested(), config) == expected


def test_all_linear_skips_modules_to_save():
    model = TinyNet(8, 8)  # no get_output_embeddings: the head is excluded through modules_to_save
    assert moreft.resolve_targets(model, moreft.LoRAConfig(target_modules="all-linear")) == ["lin", "head"]
    config = moreft.LoRAConfig(target_modules="all-linear", modules_to_save=["head"], rank=2)
    assert moreft.resolve_targets(model, config) == ["lin"]
    moreft.inject(model, config)
    assert type(model.head) is nn.Linear and all(p.requires_grad for p in model.head.parameters())


def test_trainable_parameters_count_tied_weights_once():
    model = nn.Sequential(
        OrderedDict(emb=nn.Linear(8, 8, bias=False), lin=nn.Linear(8, 8), out=nn.Linear(8, 8, bias=False))
    )
    model.out.weight = model.emb.weight
    moreft.inject(model, moreft.LoRAConfig(target_modules=["lin"], rank=2, modules_to_save=["out"]))
    counts = moreft.count_parameters(model)
    assert counts.total == 64 + 72 + 2 * 16
    assert counts.adapter == 32 and counts.other_trainable == 64 and counts.trainable == 96


def test_injected_model_trains_only_adapter(net24):
    moreft.inject(net24, moreft.MoRAConfig(target_modules=["lin"], rank=2, operator="rotation"))
    before = {k: v.clone() for k, v in net24.state_dict().items()}
    opt = torch.optim.SGD([p for p in net24.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net24(_x(24)).square().mean().backward()
        opt.step()
    changed = {k for k, v in net24.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"lin.mora_matrix.default"}


def test_trainable_parameters_is_a_deprecated_name_of_count_parameters():
    model = TinyNet(8, 8)
    moreft.inject(model, moreft.LoRAConfig(target_modules=["lin"], rank=2))
    with pytest.warns(DeprecationWarning, match="count_parameters"):
        assert moreft.trainable_parameters(model) == moreft.count_parameters(model)
