"""What ``--resume``, ``eval`` and ``export-lora`` load is validated before use (issue 13, "silent wrong results").

Each test starts from real runs of the tiny BERT (trained once per module, copied per test) and
spoils one thing a user or another run could leave behind: an optimizer state of other shapes,
NaN moments, a scheduler of another run, a data file edited since, an adapter full of NaN.
Every case must end in one ``moreft: error:`` line with exit status 2, never a crash or NaN training.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_net
from safetensors.torch import load_file, save_file
from tiny import make_tiny_bert, train_flags

import moreft
from moreft.cli import main
from moreft.errors import CheckpointError, TargetError
from moreft.train.checkpoints import check_optimizer_state

ROWS = "".join(json.dumps({"text": f"text {i}", "label": ["pos", "neg"][i % 2]}) + "\n" for i in range(40))


def run_cli(args: list[str]) -> tuple[int, str]:
    """``moreft ARGS`` in this process: ``(status, stderr)``; a traceback fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(args)
        except SystemExit as exc:
            status = exc.code
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return status, err.getvalue()


def _flags(bert: str, out: Path, name: str, **kw) -> list[str]:
    return train_flags(bert, out, run_name=name, save_every=2, **kw)


def _file_flags(bert: str, out: Path, data: Path, **kw) -> list[str]:
    return [*_flags(bert, out, "f", task="file-classification", **kw), "--task-option", f"train_path={data}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[str, Path]:
    """The tiny BERT and a folder with runs ``a`` (MoRe 2x... block_rank 2), ``b`` (block_rank 1) and
    ``f`` (on ``data.jsonl``), each trained 4 steps with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("resume")
    bert = make_tiny_bert(root / "bert")
    (root / "data.jsonl").write_text(ROWS)
    for name, kw in (("a", {}), ("b", {"block_rank": 1})):
        assert run_cli(_flags(bert, root / "runs", name, **kw))[0] == 0
    assert run_cli(_file_flags(bert, root / "runs", root / "data.jsonl"))[0] == 0
    return bert, root


@pytest.fixture
def work(runs) -> Iterator[tuple[str, Path]]:
    """The module's runs, put back as trained after the test (a run cannot move: its config names its folder)."""
    bert, root = runs
    keep = root.parent / f"{root.name}-kept"
    if not keep.exists():
        shutil.copytree(root, keep, ignore=shutil.ignore_patterns("bert"))
    yield bert, root
    for name in ("runs", "data.jsonl"):
        shutil.rmtree(root / name) if (root / name).is_dir() else (root / name).unlink(missing_ok=True)
        (shutil.copytree if (keep / name).is_dir() else shutil.copy)(keep / name, root / name)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder`` but the lock file."""
    return {
        str(p.relative_to(folder)): _digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".moreft.lock"
    }


def _resume_fails(bert: str, tmp: Path, match: str, name: str = "a") -> None:
    before = _files(tmp / "runs" / name)
    status, err = run_cli(_flags(bert, tmp / "runs", name, max_steps=6, resume=True))
    assert status == 2, err
    assert err.startswith("moreft: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert _files(tmp / "runs" / name) == before  # a refused resume rewrites no run file (config, metrics)


def test_resume_with_another_runs_optimizer_state_is_a_clear_error(work):
    bert, tmp = work
    ckpt = tmp / "runs" / "a" / "checkpoints" / "checkpoint-4"
    shutil.copy(tmp / "runs" / "b" / "checkpoints" / "checkpoint-4" / "optimizer.pt", ckpt / "optimizer.pt")
    _resume_fails(
        bert,
        tmp,
        r"optimizer\.pt': 'exp_avg' of parameter 0 has shape \[4, 1, 8\] \(torch\.float32\); the "
        r"parameter is \[4, 2, 8\] \(torch\.float32\): the checkpoint belongs to another run",
    )


@pytest.mark.parametrize(
    "spoil,match",
    [
        (
            lambda s: s["state"][3]["exp_avg_sq"].fill_(float("nan")),
            r"'exp_avg_sq' of parameter 3 holds NaN/Inf values",
        ),
        (
            lambda s: s["param_groups"].pop(),
            r"has 1 parameter groups \(or malformed ones\); this run's optimizer has 2",
        ),
        (
            lambda s: s["param_groups"][0]["params"].pop(),
            r"parameter group 0 holds 12 parameters; this run trains 13",
        ),
        (
            lambda s: s["param_groups"][0].update(lr=float("inf")),
            r"parameter group 0 has non-finite or malformed hyperparameters \['lr'\]",
        ),
        (lambda s: s["state"].update({99: {}}), r"state entry 99 names no parameter"),
        (lambda s: s.clear(), r"is not an optimizer state"),
        (
            lambda s: s["state"][0].update(exp_avg=torch.tensor(0.0)),
            r"'exp_avg' of parameter 0 has shape \[\]",
        ),
        (lambda s: s["state"][0].update(step=torch.zeros(2)), r"'step' of parameter 0 has shape \[2\]"),
        (lambda s: s["param_groups"][1].update(params=[[13]]), r"parameter groups \(or malformed ones\)"),
    ],
    ids=[
        "nan-moment",
        "groups",
        "params",
        "inf-lr",
        "stray-entry",
        "empty",
        "scalar-moment",
        "step-vector",
        "unhashable-id",
    ],
)
def test_resume_with_a_spoiled_optimizer_state_is_a_clear_error(work, spoil, match):
    bert, tmp = work
    path = tmp / "runs" / "a" / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    state = torch.load(path, weights_only=True)
    spoil(state)
    torch.save(state, path)
    _resume_fails(bert, tmp, match)


@pytest.mark.parametrize(
    "content,match",
    [
        (
            {"base_lrs": [0.01]},
            r"base_lrs=\[0\.01\] does not fit this run's scheduler, whose base_lrs is \[0\.01, 0\.01\] "
            r"\(2 parameter groups\)",
        ),
        ({"base_lrs": [float("nan"), 0.01]}, r"base_lrs=\[nan, 0\.01\] does not fit this run's scheduler"),
        ({"last_epoch": "4"}, r"last_epoch='4' does not fit this run's scheduler, whose last_epoch is a int"),
        ({"lr_lambdas": [{}, {}, {}]}, r"lr_lambdas=\[\{\}, \{\}, \{\}\] does not fit"),
        ({"optimizer": None}, r"has keys \[.*'optimizer'.*\]; this run's scheduler has \["),
        ([1, 2], r"is not a learning-rate scheduler state"),
        ("zip", r"scheduler\.pt' is not a readable scheduler state \(torch\.load with weights_only=True"),
    ],
)
def test_resume_with_a_spoiled_scheduler_state_is_a_clear_error(work, content, match):
    bert, tmp = work
    path = tmp / "runs" / "a" / "checkpoints" / "checkpoint-4" / "scheduler.pt"
    if content == "zip":  # a zip archive, but not one torch.save wrote
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("data.pkl", b"\x80\x02cos\nsystem\nq\x00.")
    else:
        state = torch.load(path, weights_only=True)
        torch.save({**state, **content} if isinstance(content, dict) else content, path)
    _resume_fails(bert, tmp, match)


def test_a_checkpoint_with_a_torn_state_file_is_skipped(work):
    bert, tmp = work
    (tmp / "runs" / "a" / "checkpoints" / "checkpoint-4" / "scheduler.pt").write_bytes(b"torn")
    status, err = run_cli(_flags(bert, tmp / "runs", "a", max_steps=6, resume=True))
    assert status == 0, err
    assert json.loads((tmp / "runs" / "a" / "metrics.json").read_text())["resumed_from"] == "checkpoint-2"


def test_check_optimizer_state_accepts_a_matching_state():
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}])
    sum(p.sum() for p in params).backward()
    opt.step()
    check_optimizer_state(opt.state_dict(), [params[:1], params[1:]], Path("x"))
    with pytest.raises(
        CheckpointError,
        match=r"'exp_avg' of parameter 0 has shape \[3, 2\] \(torch.float32\); the parameter is \[4\]",
    ):
        check_optimizer_state(opt.state_dict(), [params[1:], params[:1]], Path("x"))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t.replace('"text 3"', '"text three"'), "holds other examples"),
        (lambda t: t + json.dumps({"text": "new", "label": "pos"}) + "\n", "splits differently"),
    ],
)
def test_resume_after_the_data_changed_stops_and_keeps_split_json(work, edit, match):
    bert, tmp = work
    data, split = tmp / "data.jsonl", tmp / "runs" / "f" / "split.json"
    before = _digest(split)
    assert "data_sha256" in json.loads(split.read_text())
    data.write_text(edit(data.read_text()))
    status, err = run_cli(_file_flags(bert, tmp / "runs", data, max_steps=6, resume=True))
    assert status == 2 and f"data now {match} than when" in err, err
    assert "restore that data, or start a new run" in err
    assert _digest(split) == before
    status, err = run_cli(["eval", str(tmp / "runs" / "f")])
    assert status == 2 and f"data now {match} than when" in err, err


def test_resume_on_unchanged_data_continues(work):
    bert, tmp = work
    split = tmp / "runs" / "f" / "split.json"
    before = _digest(split)
    status, err = run_cli(_file_flags(bert, tmp / "runs", tmp / "data.jsonl", max_steps=6, resume=True))
    assert status == 0, err
    assert _digest(split) == before
    assert json.loads((tmp / "runs" / "f" / "metrics.json").read_text())["resumed_from"] == "checkpoint-4"


def test_eval_and_export_refuse_an_adapter_full_of_nan(work):
    _, tmp = work
    run = tmp / "runs" / "a"
    file = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = min(tensors)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(file))
    for args in (["eval", str(run)], ["export-lora", str(run), str(tmp / "lora")]):
        status, err = run_cli(args)
        assert status == 2 and f"holds NaN/Inf values in 1 tensor(s) (e.g. ['{key}'])" in err, err
    assert not (tmp / "lora").exists()


@pytest.mark.parametrize("targets,saved", [(["lin"], ["lin"]), (["head"], ["head"]), ("lin|head", ["head"])])
def test_modules_to_save_overlapping_target_modules_is_refused(targets, saved):
    net = make_net((24, 24))
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    with pytest.raises(
        TargetError, match=r"overlaps modules_to_save module '(lin|head)'; a module is either adapted"
    ):
        moreft.inject(net, moreft.LoRAConfig(target_modules=targets, modules_to_save=saved))
    assert not moreft.adapter_layers(net) and {n: p.requires_grad for n, p in net.named_parameters()} == grads


def test_modules_to_save_around_a_target_is_refused():
    outer = torch.nn.Sequential()
    outer.add_module("block", make_net((8, 8)))
    with pytest.raises(
        TargetError, match=r"target module 'block\.lin' overlaps modules_to_save module 'block'"
    ):
        moreft.inject(outer, moreft.LoRAConfig(target_modules=["lin"], modules_to_save=["block"]))
