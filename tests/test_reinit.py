"""``merge_every`` (ReLoRA / ReMoRA during training): rank growth, no loss jump, schedule, saving, resume."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_bert
from torch import nn
from transformers import TrainerCallback

import moreft
from moreft.cli import main
from moreft.errors import ConfigError
from moreft.train import load_trained, resolve_config, train
from moreft.train.reinit import MERGED_BASE_FILE, MergeReinitCallback, default_merge_warmup, restart_factor

IN = 32
CYCLE = 15


def test_restart_factor_is_a_jagged_warmup():
    factors = [restart_factor(s, merge_every=10, warmup=3) for s in range(25)]
    assert factors[:10] == [1.0] * 10  # no restart before the first merge
    assert factors[10:15] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert factors[20:22] == [0.25, 0.5]
    assert restart_factor(12, merge_every=10, warmup=0) == 1.0
    assert default_merge_warmup(2000) == 50 and default_merge_warmup(100) == 10


@pytest.mark.parametrize(
    "merge_every, warmup, message",
    [
        (0, 0, "merge_every=0 must be an integer >= 1"),
        (5, 5, "merge_warmup=5 must be >= 0 and < merge_every=5"),
    ],
)
def test_callback_rejects_bad_settings(tmp_path, merge_every, warmup, message):
    with pytest.raises(ConfigError, match=message):
        MergeReinitCallback(merge_every, warmup, tmp_path)


def test_config_checks_merge_warmup():
    with pytest.raises(
        ConfigError, match=r"merge_warmup=10 needs merge_every > merge_warmup \(merge_every=None\)"
    ):
        resolve_config(None, {"task": "sentiment", "merge_warmup": 10})
    with pytest.raises(ConfigError, match="merge_every=0 must be >= 1"):
        resolve_config(None, {"task": "sentiment", "merge_every": 0})


def _train_with_merges(config: moreft.AdapterConfig, merges: int, tmp_path) -> tuple[list[int], list[float]]:
    """Fit a full-rank linear map with merges every CYCLE steps; ranks of W - W0 and loss after each cycle.

    At each merge the loss on the fixed batch must not change (the merge keeps the function), and
    the restarted optimizer (fresh moments, lr warming up again) must not push it up afterwards.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, IN))
    w0 = model[0].weight.detach().clone()
    target = torch.randn(IN, IN)
    x = torch.randn(128, IN)
    moreft.inject(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    callback = MergeReinitCallback(CYCLE, warmup=3, run_dir=tmp_path)
    state = SimpleNamespace(global_step=0, max_steps=CYCLE * (merges + 1), is_world_process_zero=True)

    def loss_fn() -> torch.Tensor:
        return ((model(x) - x @ target.T) ** 2).mean()  # (128, IN)

    ranks, losses = [], []
    for _ in range(state.max_steps):
        loss_fn().backward()
        opt.step()
        opt.zero_grad()
        state.global_step += 1
        before = loss_fn().item()
        if losses and state.global_step % CYCLE <= 3:  # the restart warmup steps after a merge
            assert before <= losses[-1] * 1.01, (state.global_step, before, losses[-1])
        callback.on_step_end(None, state, None, model=model, optimizer=opt)
        if state.global_step % CYCLE == 0 and state.global_step < state.max_steps:
            assert loss_fn().item() == pytest.approx(before, rel=1e-5)  # the merge keeps the function
            ranks.append(int(torch.linalg.matrix_rank(model[0].base_layer.weight.detach() - w0)))
            losses.append(before)
    assert callback.merges == merges
    losses.append(loss_fn().item())
    return ranks, losses


def test_remora_sharing_rank_grows_with_merges_and_loss_keeps_falling(tmp_path):
    config = moreft.MoRAConfig(target_modules=["0"], operator="sharing", r_hat=4)
    ranks, losses = _train_with_merges(config, merges=3, tmp_path=tmp_path)
    # One layout caps the update at rank r_hat = 4; strided + adjacent reach 2 r_hat - 1 = 7 (the all-ones
    # vector lies in both layouts' row and column spaces); a third cycle (strided again) adds no new space.
    assert ranks == [4, 7, 7]
    assert all(b < a for a, b in itertools.pairwise(losses))  # every cycle still improves the fit


@pytest.mark.parametrize(
    "config, per_cycle",
    [
        (moreft.LoRAConfig(target_modules=["0"], rank=2), 2),
        (moreft.MoReConfig(target_modules=["0"], nblocks=2, block_rank=1), 2),
    ],
    ids=["relora", "more"],
)
def test_rank_grows_by_each_cycle(tmp_path, config, per_cycle):
    ranks, losses = _train_with_merges(config, merges=3, tmp_path=tmp_path)
    assert ranks == [per_cycle, 2 * per_cycle, 3 * per_cycle]
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_without_layout_switch_sharing_rank_stays_capped(tmp_path):
    config = moreft.MoRAConfig(target_modules=["0"], operator="sharing", r_hat=4)
    torch.manual_seed(0)
    model = moreft.inject(nn.Sequential(nn.Linear(IN, IN)), config)
    w0 = model[0].base_layer.weight.detach().clone()
    callback = MergeReinitCallback(1, 0, tmp_path, switch_sharing_layout=False)
    state = SimpleNamespace(global_step=0, max_steps=10)
    opt = torch.optim.AdamW(list(model.parameters()), lr=1e-2)
    for _ in range(3):
        nn.init.normal_(model[0].matrix)
        state.global_step += 1
        callback.on_step_end(None, state, None, model=model, optimizer=opt)
    assert int(torch.linalg.matrix_rank(model[0].base_layer.weight.detach() - w0)) == 4


# -- through moreft.train.train ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-reinit"))


class Keep(TrainerCallback):
    """Keeps the trained model; optionally stops training after ``stop`` steps (an interruption)."""

    def __init__(self, stop: int | None = None) -> None:
        self.stop, self.model = stop, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.stop:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def _config(model: str, out, **changes):
    base = {
        "task": "sentiment",
        "model": model,
        "method": "lora",
        "rank": 2,
        "max_steps": 6,
        "batch_size": 8,
        "max_examples": 120,
        "eval_examples": 8,
        "max_length": 32,
        "lr": 1e-2,
        "log_every": 1,
        "lr_scheduler": "constant",
        "merge_every": 2,
        "merge_warmup": 1,
        "save_every": 2,
        "keep_checkpoints": 3,
        "output_dir": str(out),
        "progress": False,
    }
    return resolve_config(None, {**base, **changes})


def test_merge_every_run_saves_merged_base_and_reloads_it(tiny_bert, tmp_path, capsys):
    keep = Keep()
    result = train(_config(tiny_bert, tmp_path, run_name="full"), callbacks=[keep], quiet=True)
    run = result.run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    # constant schedule with a 1-step restart warmup after the merges at steps 2 and 4
    assert [lrs[s] / 1e-2 for s in range(1, 7)] == pytest.approx([1, 1, 0.5, 1, 0.5, 1])
    for path in (run, *(run / "checkpoints" / f"checkpoint-{s}" for s in (2, 4, 6))):
        assert (path / MERGED_BASE_FILE).is_file(), path
    x = torch.randint(5, 1000, (3, 12))
    with torch.no_grad():
        keep.model.eval()
        trained = keep.model(input_ids=x).logits
        _, _, reloaded, _ = load_trained(run)
        torch.testing.assert_close(reloaded(input_ids=x).logits, trained, rtol=1e-5, atol=1e-5)
        moreft.eject(reloaded)
        fresh, _ = moreft.models.load_model(tiny_bert, "classification", num_labels=2)
        base = dict(fresh.named_parameters())
        changed = [
            n for n, p in reloaded.named_parameters() if "query.weight" in n and not torch.equal(p, base[n])
        ]
        assert len(changed) == 2  # both layers' query weights hold the merged cycles
    assert main(["export-lora", str(run), str(tmp_path / "lora")]) == 2
    assert "was trained with merge_every" in capsys.readouterr().err


def test_resume_after_merges_matches_an_uninterrupted_run(tiny_bert, tmp_path):
    full = train(_config(tiny_bert, tmp_path, run_name="full"), quiet=True)
    part = _config(tiny_bert, tmp_path, run_name="part")
    assert train(part, callbacks=[Keep(stop=4)], quiet=True).metrics["global_step"] == 4
    resumed = train(part.replace(resume=True), quiet=True)
    assert resumed.metrics["resumed_from"] == "checkpoint-4"
    for name in ("adapter/adapter_model.safetensors", MERGED_BASE_FILE):
        a, b = load_file(full.run_dir / name), load_file(resumed.run_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resume_refuses_a_checkpoint_without_merged_base(tiny_bert, tmp_path):
    part = _config(tiny_bert, tmp_path, run_name="part")
    train(part, callbacks=[Keep(stop=4)], quiet=True)
    (part.run_dir / "checkpoints" / "checkpoint-4" / MERGED_BASE_FILE).unlink()
    with pytest.raises(
        ConfigError,
        match=r"cannot resume a merge_every=2 run from .*checkpoint-4.*: it has no "
        r"merged_base.safetensors, so the 2 merged cycles are lost",
    ):
        train(part.replace(resume=True), quiet=True)
