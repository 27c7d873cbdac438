"""The authors' ReMoRA as options of ``--merge-every``: the mora_type cycle 1->2->3->4 and the schedule
restart, against our transcription of their callback (tests/official/kongds_remora.py)."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import TinyNet, assert_close
from official import kongds_mora, kongds_remora
from tiny import make_tiny_bert

import moreft
from moreft.config import SharingLayout
from moreft.errors import ConfigError
from moreft.remora import RemoraCycle, merge_and_reinit
from moreft.train import resolve_config, train
from moreft.train.reinit import MergeReinitCallback, merge_callbacks, official_restarts

S, A = SharingLayout.STRIDED, SharingLayout.ADJACENT
TYPE_OF = {(S, S): 1, (A, A): 2, (A, S): 3, (S, A): 4}


def ours(scheduler_type, lr, max_steps, warmup_steps, merge_every, restart_warmup):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = transformers.get_scheduler(
        scheduler_type, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps
    )
    scheduler.lr_lambdas = [
        official_restarts(scheduler.lr_lambdas[0], merge_every, restart_warmup, max_steps)
    ]
    scheduler.last_epoch = -1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler.step()  # recompute the lr of update 1 with the new lambda
    used = []
    for _ in range(max_steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


@pytest.mark.parametrize(
    ("kind", "max_steps", "warmup", "merge_every", "restart_warmup"),
    [
        ("linear", 200, 10, 50, 50),
        ("linear", 230, 0, 60, 20),
        ("linear", 120, 5, 25, 10),
        ("cosine", 300, 30, 100, 50),
        ("cosine", 101, 3, 20, 7),
        ("linear", 40, 2, 10, 50),
    ],
)
def test_official_schedule_restart_matches_their_callback(
    kind, max_steps, warmup, merge_every, restart_warmup
):
    expected = kongds_remora.learning_rates(kind, 1e-3, max_steps, warmup, merge_every, restart_warmup)
    got = ours(kind, 1e-3, max_steps, warmup, merge_every, restart_warmup)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-18)
    # the update right after a merge keeps the lr; the next starts the ramp at 1/restart_warmup of it
    assert got[merge_every + 1] == pytest.approx(got[merge_every] / restart_warmup, rel=1e-12)


def test_official_schedule_needs_a_warmup_decay_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    constant = transformers.get_scheduler("constant", optimizer=optimizer)
    with pytest.raises(ConfigError, match="merge_schedule='official' restarts a warmup-and-decay schedule"):
        official_restarts(constant.lr_lambdas[0], 10, 5, 100)


@pytest.mark.parametrize(
    ("cycle", "types"), [(RemoraCycle.FOUR, [1, 2, 3, 4, 1, 2]), (RemoraCycle.ALTERNATE, [1, 2, 1, 2, 1, 2])]
)
def test_cycle_steps_through_their_mora_types_and_merges_their_delta(cycle, types):
    torch.manual_seed(0)
    net = TinyNet(23, 37, dtype=torch.float64)
    config = moreft.MoRAConfig(
        target_modules=("lin",), rank=2, operator="sharing", r_hat_rounding="round", cap_r_hat=False
    )
    moreft.inject(net, config)
    layer = moreft.adapter_layers(net)["lin"]
    seen = []
    for _ in range(len(types)):
        kind = TYPE_OF[layer.sharing_layout, layer.sharing_output_layout]
        seen.append(kind)
        with torch.no_grad():
            layer.matrix.normal_(0, 0.2)
            before = layer.base_layer.weight.clone()
            delta = kongds_mora.delta_weight(layer.matrix.clone(), 23, 37, kind)
        merge_and_reinit(net, cycle=cycle)
        assert_close(layer.base_layer.weight - before, delta, rtol=1e-12, atol=1e-13)
        assert float(layer.matrix.detach().abs().max()) == 0.0
    assert seen == types
    if cycle is RemoraCycle.FOUR:  # four groupings: the merged update exceeds one grouping's rank
        torch.manual_seed(0)
        w0 = TinyNet(23, 37, dtype=torch.float64).lin.weight
        assert int(torch.linalg.matrix_rank(layer.base_layer.weight.detach() - w0)) > layer.r_hat


def test_official_callback_drops_all_optimizer_state_and_jagged_only_the_adapters(tmp_path):
    torch.manual_seed(0)
    net = moreft.inject(
        TinyNet(8, 8), moreft.LoRAConfig(target_modules=("lin",), rank=2, modules_to_save=("head",))
    )
    for official, kept in ((True, 0), (False, 2)):  # the head's weight and bias keep their moments
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        net(torch.randn(4, 8)).sum().backward()
        opt.step()
        callback = MergeReinitCallback(2, 1, tmp_path, official_schedule=official)
        callback.on_step_end(
            None, SimpleNamespace(global_step=2, max_steps=10), None, model=net, optimizer=opt
        )
        assert len(opt.state) == kept


def test_train_config_options_and_defaults(tmp_path):
    base = {"task": "sentiment", "model": "minilm", "merge_every": 20, "output_dir": str(tmp_path)}
    # every choice setting's message has the adapter configs' form (moreft.config.coerce_enum)
    with pytest.raises(ConfigError, match=r"merge_schedule='restart' is not one of 'jagged', 'official'"):
        resolve_config(None, {**base, "merge_schedule": "restart"})
    with pytest.raises(ConfigError, match=r"merge_cycle='1234' is not one of 'alternate', 'four'"):
        resolve_config(None, {**base, "merge_cycle": "1234"})
    with pytest.raises(ConfigError, match="merge_warmup=50 needs merge_every > merge_warmup"):
        resolve_config(None, {**base, "merge_warmup": 50})
    official = resolve_config(None, {**base, "merge_schedule": "official", "merge_cycle": "four"})
    (callback,) = merge_callbacks(official, tmp_path)
    assert (callback.warmup, callback.official_schedule, callback.cycle) == (50, True, RemoraCycle.FOUR)
    (default,) = merge_callbacks(resolve_config(None, base), tmp_path)
    assert (default.warmup, default.official_schedule, default.cycle) == (2, False, RemoraCycle.ALTERNATE)


def test_official_remora_run_logs_their_learning_rates(tmp_path):
    """A real ``moreft train`` run (tiny BERT, MoRA sharing, linear schedule): logged lrs are the oracle's."""
    model = make_tiny_bert(tmp_path / "bert")
    config = resolve_config(
        None,
        {
            "task": "sentiment",
            "model": model,
            "method": "mora",
            "operator": "sharing",
            "rank": 2,
            "r_hat_rounding": "round",
            "cap_r_hat": False,
            "max_steps": 9,
            "batch_size": 8,
            "max_examples": 120,
            "eval_examples": 8,
            "max_length": 32,
            "lr": 1e-2,
            "log_every": 1,
            "lr_scheduler": "linear",
            "warmup_steps": 1,
            "merge_every": 3,
            "merge_warmup": 2,
            "merge_schedule": "official",
            "merge_cycle": "four",
            "output_dir": str(tmp_path / "runs"),
            "progress": False,
        },
    )
    run = train(config, quiet=True).run_dir
    logged = {
        r["step"]: r["lr"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "lr" in r
    }
    expected = kongds_remora.learning_rates("linear", 1e-2, 9, 1, 3, 2)
    assert [logged[s] for s in range(1, 10)] == pytest.approx(expected, rel=1e-9)  # update s ran at logged[s]
    state = json.loads((run / "adapter" / "adapter_config.json").read_text())["layer_state"]
    assert {tuple(v.values()) for v in state.values()} == {
        ("adjacent", "strided")
    }  # type 3 after merges at 3, 6
