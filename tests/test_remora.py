"""Merge-and-reinit (ReMoRA): outputs are preserved at each merge and the update rank grows."""

import pytest
import torch
from torch import nn

import moreft
from moreft.remora import merge_and_reinit, reset_optimizer_state


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48))


@pytest.mark.parametrize(
    "config",
    [
        moreft.MoRAConfig(target_modules=["0", "2"], operator="sharing", r_hat=8),
        moreft.MoReConfig(target_modules=["0", "2"], block_rank=2),
        moreft.LoRAConfig(target_modules=["0", "2"], rank=4),
    ],
    ids=["mora-sharing", "more", "lora"],
)
def test_merge_and_reinit_keeps_outputs_and_zeroes_delta(config):
    model = moreft.inject(_model(), config)
    for layer in moreft.adapter_layers(model).values():
        for p in layer.adapter_params().values():
            nn.init.normal_(p, std=0.1)
    x = torch.randn(5, 64)
    before = model(x)
    params = merge_and_reinit(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for layer in moreft.adapter_layers(model).values():
        assert not layer.merged
        assert torch.count_nonzero(layer.delta_weight()) == 0
    assert {id(p) for p in params} == {
        id(p) for layer in moreft.adapter_layers(model).values() for p in layer.adapter_params().values()
    }


def test_remora_sharing_rank_grows_with_merges():
    model = nn.Sequential(nn.Linear(64, 64))
    w0 = model[0].weight.detach().clone()
    moreft.inject(model, moreft.MoRAConfig(target_modules=["0"], operator="sharing", r_hat=8))
    layer = moreft.adapter_layers(model)["0"]
    ranks, layouts = [], []
    for _ in range(3):
        nn.init.normal_(layer.matrix)
        merge_and_reinit(model)
        layouts.append(layer.sharing_layout)
        ranks.append(int(torch.linalg.matrix_rank(layer.base_layer.weight - w0)))
    assert ranks[0] == 8 and ranks[1] > ranks[0]  # one layout alone is capped at r_hat
    assert layouts[0] != layouts[1]


def test_merge_and_reinit_refuses_nan_and_changes_nothing():
    model = moreft.inject(_model(), moreft.MoReConfig(target_modules=["0", "2"], block_rank=2))
    layers = list(moreft.adapter_layers(model).values())
    weights = [layer.base_layer.weight.detach().clone() for layer in layers]
    with torch.no_grad():
        layers[1].blkdiag2.fill_(float("nan"))
    with pytest.raises(moreft.MergeError, match="'2'"):
        merge_and_reinit(model)
    for layer, w in zip(layers, weights, strict=True):
        assert torch.equal(layer.base_layer.weight, w) and not layer.merged


def test_reset_optimizer_state_drops_moments():
    model = moreft.inject(_model(), moreft.LoRAConfig(target_modules=["0"], rank=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    nn.init.normal_(moreft.adapter_layers(model)["0"].lora_B)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    params = merge_and_reinit(model)
    reset_optimizer_state(opt, params)
    assert all(p not in opt.state for p in params)
