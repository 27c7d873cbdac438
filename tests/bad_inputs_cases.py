"""Rows and helpers of the bad-input tables (``test_bad_inputs.py``, ``test_bad_inputs_more.py``)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_net, randomize_adapters, snapshot
from safetensors.torch import load_file, save_file
from tiny import train_flags

import moreft
from moreft.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from moreft.cli import main
from moreft.config import LoRAConfig, MoRAConfig, MoReConfig
from moreft.errors import MoreftError

T = ["lin"]


@dataclass
class Ctx:
    """What a row's setup may use: a fresh 24 -> 24 net, a folder, and the tiny BERT's path."""

    tmp: Path
    net: torch.nn.Module
    bert: str


# -- setups: each returns the call that must fail ---------------------------------------------------
def _adapter(ctx: Ctx, config: Any = None) -> Path:
    model = moreft.inject(make_net((24, 24)), config or MoReConfig(target_modules=T, nblocks=4, block_rank=2))
    randomize_adapters(model)
    return moreft.save_adapter(model, ctx.tmp / "ad")


def edited(change: Callable[[dict], Any], config: Any = None) -> Callable[[Ctx], Callable[[], Any]]:
    """An adapter directory whose JSON was edited by ``change(meta)``; loading it must fail."""

    def setup(ctx: Ctx) -> Callable[[], Any]:
        path = _adapter(ctx, config)
        meta = json.loads((path / CONFIG_NAME).read_text())
        change(meta)
        (path / CONFIG_NAME).write_text(json.dumps(meta))
        return lambda: moreft.load_adapter(ctx.net, path)

    return setup


def raw_file(name: str, data: Callable[[Path], bytes]) -> Callable[[Ctx], Callable[[], Any]]:
    """An adapter directory whose file ``name`` was replaced by ``data(old path)``."""

    def setup(ctx: Ctx) -> Callable[[], Any]:
        path = _adapter(ctx)
        (path / name).write_bytes(data(path / name))
        return lambda: moreft.load_adapter(ctx.net, path)

    return setup


def pickled(ctx: Ctx) -> Callable[[], Any]:
    path = _adapter(ctx)
    (path / WEIGHTS_NAME).unlink()
    torch.save({"lin.blkdiag1": torch.zeros(1)}, path / "adapter_model.bin")
    return lambda: moreft.load_adapter(ctx.net, path)


def int_tensors(ctx: Ctx) -> Callable[[], Any]:
    path = _adapter(ctx)
    save_file(
        {
            "lin.blkdiag1": torch.zeros(4, 2, 6, dtype=torch.int64),
            "lin.blkdiag2": torch.zeros(4, 6, 2, dtype=torch.int64),
        },
        str(path / WEIGHTS_NAME),
    )
    return lambda: moreft.load_adapter(ctx.net, path)


def call(fn: Callable[[Ctx], Any]) -> Callable[[Ctx], Callable[[], Any]]:
    """A library call on the context (its setup does nothing)."""
    return lambda ctx: lambda: fn(ctx)


def inject_twice(ctx: Ctx) -> Callable[[], Any]:
    moreft.inject(ctx.net, LoRAConfig(target_modules=T, rank=2))
    return lambda: moreft.inject(ctx.net, MoReConfig(target_modules=T))


def cli(
    *argv: str, files: dict[str, bytes | str] | None = None, train: dict[str, Any] | None = None
) -> Callable[[Ctx], Callable[[], Any]]:
    """``moreft ARGV`` (``{tmp}`` / ``{bert}`` filled in), after writing ``files`` into the folder.

    With ``train``, ARGV follows ``moreft train`` flags for a short run on the tiny BERT (a flag in ARGV
    replaces the run's own: a flag may be given only once).
    """

    def setup(ctx: Ctx) -> Callable[[], Any]:
        for name, content in (files or {}).items():
            data = content.encode() if isinstance(content, str) else content
            (ctx.tmp / name).write_bytes(data)
        args = [a.format(tmp=ctx.tmp, bert=ctx.bert) for a in argv]
        if train is not None:
            given = {
                a[2:].replace("-", "_"): None for a in args if a.startswith("--") and a != "--task-option"
            }
            model = None if "model" in given else ctx.bert
            given.pop("model", None)
            args = train_flags(model, ctx.tmp / "runs", **{**given, **train}) + args
        return lambda: _cli(args)

    return setup


class CliError(Exception):
    """What the CLI printed when it exited with status 2."""


def _cli(args: list[str]) -> None:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = main(args)
        except SystemExit as exc:  # argparse's own errors
            status = exc.code
    text = err.getvalue()
    assert "Traceback" not in text, text
    if status != 0:
        assert status == 2, (status, text)
        raise CliError(text.strip())


FILE_TASK = ("--task", "file-classification", "--task-option", "train_path={tmp}/data.jsonl")
ROWS = [
    line + "\n"
    for line in (json.dumps({"text": f"text {i}", "label": ["pos", "neg"][i % 2]}) for i in range(20))
]


@dataclass(frozen=True)
class Bad:
    id: str
    setup: Callable[[Ctx], Callable[[], Any]]
    error: type[BaseException]
    match: str


def _tree(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` with the hash of its bytes (folders listed too)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def check_bad_input(bad: Bad, bert: str, tmp_path: Path) -> None:
    """Run one row: its error, one clear line, and no change to the model or any file under ``tmp_path`` / ``bert``."""
    ctx = Ctx(tmp_path, make_net((24, 24)), bert)
    attempt = bad.setup(ctx)
    model_before, files_before = snapshot(ctx.net), _tree(tmp_path, Path(bert))
    with pytest.raises(bad.error, match=bad.match) as info:
        attempt()
    assert isinstance(info.value, (MoreftError, CliError)), type(info.value)
    after = snapshot(ctx.net)
    assert after["types"] == model_before["types"] and after["grad"] == model_before["grad"]
    assert after["config"] == model_before["config"]
    for key, value in model_before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert _tree(tmp_path, Path(bert)) == files_before


def recipe(text: str | bytes) -> Callable[[Ctx], Callable[[], Any]]:
    """``moreft train --config r.yaml --dry-run`` on a recipe with this content."""
    return cli("train", "--config", "{tmp}/r.yaml", "--dry-run", files={"r.yaml": text})


def sparse_recipe(size: int) -> Callable[[Ctx], Callable[[], Any]]:
    def setup(ctx: Ctx) -> Callable[[], Any]:
        with open(ctx.tmp / "r.yaml", "wb") as f:
            f.truncate(size)  # sparse: no time or disk spent on the test's side
        return cli("train", "--config", "{tmp}/r.yaml", "--dry-run")(ctx)

    return setup


def model_folder(
    spoil: Callable[[Path], Any], *argv: str, **train: Any
) -> Callable[[Ctx], Callable[[], Any]]:
    """``moreft train`` on a copy of the tiny BERT spoiled by ``spoil(folder)``."""

    def setup(ctx: Ctx) -> Callable[[], Any]:
        shutil.copytree(ctx.bert, ctx.tmp / "m")
        spoil(ctx.tmp / "m")
        return cli("--model", "{tmp}/m", *argv, train=train)(ctx)

    return setup


def run_folder(files: dict[str, bytes | str]) -> Callable[[Ctx], Callable[[], Any]]:
    """``moreft eval`` on a folder holding ``files``."""

    def setup(ctx: Ctx) -> Callable[[], Any]:
        (ctx.tmp / "run").mkdir()
        for name, content in files.items():
            (ctx.tmp / "run" / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return cli("eval", "{tmp}/run")(ctx)

    return setup


def three_labels(folder: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(folder)
    config.num_labels = 3
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)


def nan_adapter(ctx: Ctx) -> Callable[[], Any]:
    path = _adapter(ctx)
    tensors = load_file(str(path / WEIGHTS_NAME))
    tensors["lin.blkdiag1"][0, 0, 0] = float("inf")
    save_file(tensors, str(path / WEIGHTS_NAME))
    return lambda: moreft.load_adapter(ctx.net, path)


def _mora_export(ctx: Ctx, rank: int) -> Any:
    model = moreft.inject(
        torch.nn.Sequential(torch.nn.Linear(24, 16)), MoRAConfig(target_modules=["0"], rank=2)
    )
    return moreft.export_lora(model, ctx.tmp / "lora", rank=rank)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)
GEN = ("--task", "file-generation", "--task-option", "train_path={tmp}/data.jsonl")
GEN_ROWS = "".join(json.dumps({"prompt": f"q {i}", "answer": str(i)}) + "\n" for i in range(20))
