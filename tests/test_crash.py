"""Crash-safe runs: kill -9 then --resume is bit-identical, saves are atomic, NaN/Inf losses stop or skip."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import make_net, randomize_adapters
from safetensors.torch import load_file
from tiny import SUBPROCESS_ENV, make_tiny_bert, moreft_command, train_flags
from transformers import TrainerCallback

import moreft
from moreft.adapter_files import WEIGHTS_NAME
from moreft.errors import TrainingError
from moreft.safe_write import atomic_dir_write, atomic_write_text
from moreft.train import resolve_config, train
from moreft.train.rundir import RunDir, checkpoint_complete

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.1)


def _tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / WEIGHTS_NAME)


# -- kill -9 and --resume ----------------------------------------------------------------------
@pytest.mark.slow
def test_kill9_then_resume_equals_an_uninterrupted_run_bit_for_bit(bert, tmp_path):
    # Dropout and gradient accumulation on: RNG, data order, optimizer and scheduler all matter.
    flags = train_flags(
        bert,
        tmp_path,
        max_steps=24,
        save_every=3,
        batch_size=4,
        grad_accum=2,
        dropout=0.1,
        max_examples=200,
        keep_checkpoints=2,
    )
    full = subprocess.Popen(
        moreft_command(*flags, "--run-name", "full"),
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    part = subprocess.Popen(
        moreft_command(*flags, "--run-name", "part"),
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = RunDir(tmp_path / "part")
    while part.poll() is None and not list(run.checkpoints.glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.002)
    os.kill(part.pid, signal.SIGSTOP)  # freeze it at once (possibly mid-save of the next checkpoint) ...
    os.kill(part.pid, signal.SIGKILL)  # ... and kill it there
    part.wait()
    assert part.returncode == -signal.SIGKILL
    assert not run.adapter.exists(), "the run finished before it could be killed"
    last = run.last_checkpoint()
    assert last is not None and checkpoint_complete(last)

    resumed = subprocess.run(
        moreft_command(*flags, "--run-name", "part", "--resume"),
        env=SUBPROCESS_ENV,
        check=False,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert full.wait() == 0, full.stderr.read().decode()[-2000:]
    metrics = json.loads(run.metrics.read_text())
    assert metrics["resumed_from"] == last.name and metrics["global_step"] == 24
    a, b = _tensors(tmp_path / "full"), _tensors(run.path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (key, float((a[key] - b[key]).abs().max()))


def test_a_torn_checkpoint_is_skipped_on_resume(tmp_path):
    run = RunDir(tmp_path)
    model = moreft.inject(make_net((24, 24)), moreft.MoReConfig(target_modules=["lin"], block_rank=2))
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_step": 4, "log_hist')):
        ckpt = run.checkpoints / f"checkpoint-{step}"
        moreft.save_adapter(model, ckpt / "adapter")
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.save({}, ckpt / name)
        (ckpt / "trainer_state.json").write_text(state)
    (run.checkpoints / "checkpoint-6" / "adapter").mkdir(parents=True)  # killed right after mkdir
    assert run.last_checkpoint() == run.checkpoints / "checkpoint-2"


def test_a_checkpoint_counts_as_complete_by_content_not_by_file_names(tmp_path):
    run = RunDir(tmp_path)
    good = run.checkpoints / "checkpoint-2"
    moreft.save_adapter(
        moreft.inject(make_net((24, 24)), moreft.MoReConfig(target_modules=["lin"])), good / "adapter"
    )
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({}, good / name)
    (good / "trainer_state.json").write_text('{"global_step": 2}')
    assert run.last_checkpoint() == good
    fakes = {  # each newer "checkpoint" is marked complete by some JSON file, but is not
        4: lambda c: (c / "optimizer.pt").write_bytes(b"x"),  # not a torch.save archive
        6: lambda c: (c / "trainer_state.json").write_text('{"global_step": 2}'),  # another step's state
        8: lambda c: (c / "trainer_state.json").write_text(
            '{"global_step": 8, "nope": 1}'
        ),  # not a TrainerState
        10: lambda c: (c / "trainer_state.json").write_text("[8]"),
        12: lambda c: (c / "adapter" / "adapter_config.json").write_text("{}"),  # not an adapter
    }
    for step, spoil in fakes.items():
        ckpt = run.checkpoints / f"checkpoint-{step}"
        shutil.copytree(good, ckpt)
        (ckpt / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        assert run.last_checkpoint() == ckpt
        spoil(ckpt)
        assert run.last_checkpoint() == good, step


# -- atomic writes -----------------------------------------------------------------------------
def _saved(tmp_path: Path, seed: int) -> tuple[torch.nn.Module, Path]:
    model = moreft.inject(make_net((24, 24)), moreft.MoReConfig(target_modules=["lin"], block_rank=2))
    randomize_adapters(model, seed=seed)
    return model, moreft.save_adapter(model, tmp_path / "ad")


def _assert_holds(path: Path, model: torch.nn.Module) -> None:
    fresh = moreft.load_adapter(make_net((24, 24)), path)
    for name, p in moreft.adapter_layers(model)["lin"].adapter_params().items():
        assert torch.equal(fresh.lin.adapter_params()[name], p)


def test_an_exception_while_saving_keeps_the_previous_adapter(tmp_path, monkeypatch):
    old, path = _saved(tmp_path, seed=1)
    new = moreft.inject(make_net((24, 24)), moreft.MoReConfig(target_modules=["lin"], block_rank=2))

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("moreft.adapter_files.save_file", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        moreft.save_adapter(new, path)
    _assert_holds(path, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temp folder left behind


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path[:0] = [{src!r}, {tests!r}]
    import moreft, moreft.safe_write, moreft.adapter_files
    from conftest import make_net
    where = {where!r}
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "weights":
        real = moreft.adapter_files.save_file
        def save_file(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[:50])
            die()
        moreft.adapter_files.save_file = save_file
    elif where == "rename":
        moreft.safe_write.exchange = die
    elif where == "text":
        os.fsync = die
    model = moreft.inject(make_net((24, 24)), moreft.MoReConfig(target_modules=["lin"], block_rank=2))
    if where == "text":
        moreft.safe_write.atomic_write_text(Path({path!r}), "new contents")
    else:
        moreft.save_adapter(model, {path!r})
    print("not killed")
""")


def _run_killer(where: str, path: Path) -> None:
    code = KILLER.format(src=str(SRC), tests=str(Path(__file__).parent), where=where, path=str(path))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=SUBPROCESS_ENV, capture_output=True, text=True, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("where", ["weights", "rename"])
def test_a_kill_while_saving_keeps_the_previous_adapter(tmp_path, where):
    old, path = _saved(tmp_path, seed=1)
    _run_killer(where, path)
    _assert_holds(path, old)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "ad")
    assert leftovers and all(n.startswith(".ad.tmp-") for n in leftovers)
    new, _ = _saved(tmp_path, seed=2)  # the next save sweeps what the killed one left
    _assert_holds(path, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_a_kill_while_writing_text_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old contents")
    _run_killer("text", path)
    assert path.read_text() == "old contents"
    atomic_write_text(path, "newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"] and path.read_text() == "newer"


def test_without_rename_exchange_an_old_copy_is_put_back(tmp_path, monkeypatch):
    atomic_dir_write(tmp_path / "d", {"f": lambda p: p.write_text("v1")})
    (tmp_path / "d").rename(tmp_path / ".d.old-999999999")  # a writer killed between its two renames
    monkeypatch.setattr("moreft.safe_write.exchange", lambda a, b: False)
    atomic_dir_write(tmp_path / "e", {"f": lambda p: p.write_text("other")})
    assert not (tmp_path / "d").exists()
    atomic_dir_write(tmp_path / "d", {"f": lambda p: p.write_text("v2")})
    assert (tmp_path / "d" / "f").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "e"]


# -- NaN / Inf losses ----------------------------------------------------------------------------
class PoisonAt(TrainerCallback):
    """Make the frozen embeddings NaN for optimizer step ``step`` (1-based); ``heal`` restores them after it."""

    def __init__(self, step: int, heal: bool) -> None:
        self.step, self.heal, self.saved = step, heal, None
        self.adam_steps: list[float] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            weight = model.get_input_embeddings().weight
            self.saved = weight.detach().clone()
            with torch.no_grad():
                weight.fill_(float("nan"))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.saved is not None and self.heal:
            with torch.no_grad():
                model.get_input_embeddings().weight.copy_(self.saved)
            self.saved = None

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.adam_steps = sorted({float(s["step"]) for s in optimizer.state.values()})


def _config(bert: str, out: Path, **changes):
    flags = {
        "task": "sentiment",
        "model": bert,
        "method": "lora",
        "rank": 2,
        "max_steps": 6,
        "batch_size": 8,
        "max_examples": 120,
        "eval_examples": 4,
        "max_length": 32,
        "lr": 1e-2,
        "log_every": 1,
        "save_every": 2,
        "output_dir": str(out),
        "progress": False,
    }
    return resolve_config(None, {**flags, **changes})


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(bert, tmp_path):
    config = _config(bert, tmp_path, run_name="nan")
    with pytest.raises(
        TrainingError,
        match=r"training loss nan at step 5: stopped before the optimizer applied "
        r"it; the last good checkpoint is '.*checkpoint-4' \(continue with "
        r"--resume\)\..*nonfinite: skip",
    ):
        train(config, callbacks=[PoisonAt(5, heal=False)], quiet=True)
    run = RunDir(config.run_dir)
    assert not run.adapter.exists()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    kept = load_file(run.checkpoints / "checkpoint-4" / "adapter" / WEIGHTS_NAME)
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_nonfinite_skip_drops_only_that_step(bert, tmp_path):
    poison = PoisonAt(5, heal=True)
    result = train(_config(bert, tmp_path, run_name="skip", nonfinite="skip"), callbacks=[poison], quiet=True)
    assert result.metrics["nonfinite_skipped"] == [5] and result.metrics["global_step"] == 6
    assert poison.adam_steps == [5.0]  # AdamW took 5 steps of 6: step 5 was skipped
    assert all(torch.isfinite(t).all() for t in _tensors(result.run_dir).values())
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite_skipped") for r in logged if "loss" in r] == [None] * 4 + [1, 1]
