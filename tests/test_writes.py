"""Where moreft writes: never over what it did not create, never into the run it reads, one writer per run.

Library writers (``save_adapter``, ``export_lora``) and CLI writers (``export-lora``, ``merge``,
``train --overwrite``) either succeed changing only their own output, or refuse with a
``MoreftError`` / ``moreft: error:`` (exit 2, no traceback) leaving every file byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_net, randomize_adapters
from tiny import SUBPROCESS_ENV, make_tiny_bert, train_flags

import moreft
from moreft.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from moreft.cli import main
from moreft.errors import OutputError
from moreft.lock import LOCK_NAME, FolderLock
from moreft.safe_write import atomic_write_text

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"


# -- fixtures and helpers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def trained_run(bert, tmp_path_factory) -> Path:
    """A finished two-step run (never changed by the tests: each copies it first)."""
    out = tmp_path_factory.mktemp("runs")
    assert main(train_flags(bert, out, max_steps=2, run_name="r")) == 0
    return out / "r"


def copy_run(trained_run: Path, root: Path, name: str = "r") -> Path:
    shutil.copytree(trained_run, root / name, symlinks=True)
    return root / name


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: links by target, folders, files by the hash of their bytes."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def cli(*argv: str) -> tuple[int, str]:
    """``moreft ARGV`` in this process: ``(exit status, stderr)``."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def assert_refused(code: int, err: str, match: str) -> None:
    assert code == 2, err
    assert err.startswith("moreft: error: ") and "Traceback" not in err, err
    assert match in err, err


def adapted(seed: int = 0) -> torch.nn.Module:
    model = moreft.inject(make_net((24, 24)), moreft.MoReConfig(target_modules=["lin"], block_rank=2))
    randomize_adapters(model, seed=seed)
    return model


# -- library: save_adapter / export_lora -------------------------------------------------------------
def test_save_adapter_keeps_other_files_in_the_folder(tmp_path):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "tokenizer.json").write_text('{"a tokenizer": true}')
    before = tree(tmp_path)
    with pytest.raises(
        OutputError,
        match=r"holds files moreft did not write there as a moreft adapter "
        r"\(tokenizer.json\)",
    ):
        moreft.save_adapter(adapted(), tmp_path / "ad")
    assert tree(tmp_path) == before


def test_saving_onto_a_file_is_refused_and_the_file_keeps_its_name_and_bytes(tmp_path):
    (tmp_path / "ad").write_bytes(b"my notes")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        moreft.save_adapter(adapted(), tmp_path / "ad")
    assert tree(tmp_path) == {"ad": ("file", hashlib.sha256(b"my notes").hexdigest())}
    moreft.save_adapter(adapted(), tmp_path / "other")  # a later save sweeps nothing of the user's
    assert (tmp_path / "ad").read_bytes() == b"my notes"


def test_saving_through_a_symlinked_folder_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    model = adapted()
    moreft.save_adapter(model, tmp_path / "link")
    moreft.save_adapter(adapted(seed=3), tmp_path / "link")  # again, replacing our own adapter
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == "real"
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
    assert sorted(os.listdir(tmp_path / "real")) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = moreft.load_adapter(make_net((24, 24)), tmp_path / "link")
    assert torch.equal(fresh.lin.blkdiag1, adapted(seed=3).lin.blkdiag1)


def test_a_link_to_a_file_or_nowhere_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "to-file").symlink_to("f")
    (tmp_path / "dangling").symlink_to("missing")
    before = tree(tmp_path)
    for name in ("to-file", "dangling"):
        with pytest.raises(OutputError, match=r"is a symbolic link to .* which is not a folder"):
            moreft.save_adapter(adapted(), tmp_path / name)
    assert tree(tmp_path) == before


def test_export_lora_replaces_its_own_export_but_not_an_adapter(tmp_path):
    model = adapted()
    moreft.save_adapter(model, tmp_path / "ad")
    before = tree(tmp_path)
    with pytest.raises(OutputError, match=r"as a peft LoRA export \(adapter_config.json, adapter_model"):
        moreft.export_lora(model, tmp_path / "ad")
    assert tree(tmp_path) == before
    moreft.export_lora(model, tmp_path / "lora")
    moreft.export_lora(adapted(seed=5), tmp_path / "lora")
    assert sorted(os.listdir(tmp_path / "lora")) == [CONFIG_NAME, WEIGHTS_NAME]
    with pytest.raises(OutputError, match="as a moreft adapter"):  # and save_adapter does not take an export
        moreft.save_adapter(model, tmp_path / "lora")


def test_text_writes_follow_a_link_and_refuse_a_folder(tmp_path):
    (tmp_path / "real.txt").write_text("old")
    (tmp_path / "link.txt").symlink_to("real.txt")
    atomic_write_text(tmp_path / "link.txt", "new")
    assert (tmp_path / "link.txt").is_symlink() and (tmp_path / "real.txt").read_text() == "new"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("k")
    with pytest.raises(OutputError, match="is a folder; moreft does not replace a folder with a file"):
        atomic_write_text(tmp_path / "d", "x")
    assert (tmp_path / "d" / "keep").read_text() == "k"


def test_the_sweep_removes_only_temp_files_moreft_made(tmp_path):
    user = {
        ".ad.tmp-notes": b"1",
        ".ad.tmp-999999999-x": b"2",
        ".ad.tmp-999999999-abcdefgh.bak": b"3",
        ".ad.old-backup": b"4",
    }
    for name, data in user.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / ".ad.tmp-999999999-abcd_f12").mkdir()  # what a killed writer (pid gone) leaves
    moreft.save_adapter(adapted(), tmp_path / "ad")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == user
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ad"]


# -- CLI: export-lora and merge ----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["run", "inside", "adapter", "parent"])
def test_export_and_merge_never_write_into_or_over_the_run(trained_run, tmp_path, where):
    run = copy_run(trained_run, tmp_path)
    out = {"run": run, "inside": run / "lora", "adapter": run / "adapter", "parent": tmp_path}[where]
    before = tree(tmp_path)
    for argv in (["export-lora", run, out], ["merge", run, out, "--overwrite"]):
        code, err = cli(*argv)
        assert_refused(code, err, "the run being read")
        assert tree(tmp_path) == before


def test_export_lora_keeps_other_files_in_its_output_folder(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    (tmp_path / "somedir").mkdir()
    (tmp_path / "somedir" / "notes.md").write_text("mine")
    before = tree(tmp_path)
    assert_refused(*cli("export-lora", run, tmp_path / "somedir"), "(notes.md)")
    assert tree(tmp_path) == before


def test_merge_overwrite_replaces_only_its_own_output(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    out = tmp_path / "merged"
    assert cli("merge", run, out)[0] == 0
    assert_refused(*cli("merge", run, out), "already exists; pass --overwrite")
    assert cli("merge", run, out, "--overwrite")[0] == 0
    listed = json.loads((out / "moreft_merged.json").read_text())["files"]
    assert set(os.listdir(out)) == {*listed, "moreft_merged.json"} and "config.json" in listed
    (out / "README.md").write_text("my model card")
    before = tree(tmp_path)
    assert_refused(*cli("merge", run, out, "--overwrite"), "(README.md)")
    assert tree(tmp_path) == before


# -- CLI: train --overwrite ---------------------------------------------------------------------------
def test_a_failed_overwrite_keeps_the_old_run(trained_run, bert, tmp_path):
    copy_run(trained_run, tmp_path)
    before = tree(tmp_path)
    flags = train_flags(bert, tmp_path, max_steps=2, run_name="r", target_modules="nope")
    code, err = cli(*flags, "--overwrite")
    assert_refused(code, err, "nope")
    assert tree(tmp_path) == before


def test_overwrite_refuses_a_run_folder_with_foreign_files(trained_run, bert, tmp_path):
    run = copy_run(trained_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / "adapter" / "tokenizer.json").write_text("{}")
    before = tree(tmp_path)
    code, err = cli(*train_flags(bert, tmp_path, max_steps=2, run_name="r"), "--overwrite")
    assert_refused(code, err, "holds files moreft did not write there (adapter/tokenizer.json, notes.txt)")
    assert tree(tmp_path) == before


def test_overwrite_replaces_moreft_run_files(trained_run, bert, tmp_path):
    run = copy_run(trained_run, tmp_path)
    (run / "delta_lin.png").write_bytes(b"an old heat map")  # what `moreft inspect` writes
    old_split = (run / "split.json").read_bytes()
    assert cli(*train_flags(bert, tmp_path, max_steps=2, run_name="r", seed=1), "--overwrite")[0] == 0
    assert not (run / "delta_lin.png").exists() and not (run / LOCK_NAME).exists()
    assert (run / "split.json").read_bytes() != old_split  # the new seed's split
    assert json.loads((run / "metrics.json").read_text())["seed"] == 1


def test_a_run_that_cannot_start_leaves_no_folder(bert, tmp_path):
    out = tmp_path / "runs" / "deeper"
    code, err = cli(*train_flags(bert, out, max_steps=2, run_name="new", target_modules="nope"))
    assert_refused(code, err, "nope")
    assert os.listdir(tmp_path) == []


# -- the run lock ---------------------------------------------------------------------------------------
HOLDER = """
import sys, time
sys.path.insert(0, {src!r})
from moreft.lock import FolderLock
FolderLock({path!r}, "run directory").acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_killed_writer_frees_the_run(trained_run, bert, tmp_path):
    run = copy_run(trained_run, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(src=str(SRC), path=str(run))],
        env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(tmp_path)
        for extra in (["--overwrite"], ["--resume"], []):
            code, err = cli(*train_flags(bert, tmp_path, max_steps=2, run_name="r"), *extra)
            assert_refused(code, err, f"is being written by another moreft process (pid {holder.pid})")
            assert tree(tmp_path) == before
        with pytest.raises(OutputError, match="being written"):
            FolderLock(run).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lock = FolderLock(run).acquire()  # the kernel dropped the killed holder's lock
    lock.release()
    assert not (run / LOCK_NAME).exists()


def test_two_locks_on_one_folder_in_one_process(tmp_path):
    first = FolderLock(tmp_path / "r", "run directory").acquire()
    with pytest.raises(
        OutputError,
        match=r"run directory .* is being written by another moreft process "
        rf"\(pid {os.getpid()}\)",
    ):
        FolderLock(tmp_path / "r", "run directory").acquire()
    first.release()
    assert os.listdir(tmp_path) == []  # the folder the lock made, empty again, is removed


def test_a_run_name_that_is_a_file_is_refused(bert, tmp_path):
    (tmp_path / "r").write_text("not a run")
    assert_refused(*cli(*train_flags(bert, tmp_path, max_steps=2, run_name="r")), "is a file, not a folder")
    assert (tmp_path / "r").read_text() == "not a run"


def test_a_gguf_conversion_never_replaces_a_folder_it_did_not_write(tmp_path):
    from moreft.models import convert_gguf

    (tmp_path / "model.gguf").write_bytes(b"GGUF not really")
    (tmp_path / "cache" / "smollm2").mkdir(parents=True)
    (tmp_path / "cache" / "smollm2" / "my-weights.safetensors").write_bytes(b"mine")
    before = tree(tmp_path)
    refusals = {
        tmp_path / "cache" / "smollm2": r"holds files moreft did not write there as a GGUF conversion "
        r"\(my-weights\.safetensors\)",
        tmp_path / "model.gguf": "is a file, not a folder; moreft does not replace a file with the GGUF",
    }
    for target, message in refusals.items():
        with pytest.raises(OutputError, match=message):
            convert_gguf(tmp_path / "model.gguf", target)
    assert tree(tmp_path) == before


def test_a_gguf_conversion_is_written_by_files_write_folder(tmp_path, monkeypatch):
    """convert_gguf shares files.py's one mechanism: a killed writer's temp sibling is swept, a link written through."""
    from moreft.models import gguf as models

    monkeypatch.setattr(models, "_dequantize_gguf", lambda p: _tiny_llama_and_tokenizer())
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    cache = tmp_path / "cache"
    (cache / ".tiny.tmp-999999999-abcd_f12").mkdir(parents=True)  # what a killed writer (pid gone) leaves
    models.convert_gguf(gguf, cache / "tiny")
    assert sorted(p.name for p in cache.iterdir()) == ["tiny"] and (cache / "tiny" / models.MARKER).is_file()
    (tmp_path / "real").mkdir()
    (cache / "link").symlink_to(tmp_path / "real")
    models.convert_gguf(gguf, cache / "link")
    assert (cache / "link").is_symlink() and (tmp_path / "real" / models.MARKER).is_file()


def _tiny_llama_and_tokenizer():
    """Stand-in for the slow dequantisation: a 1-layer random Llama with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from moreft.models import minilm_dir

    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config), AutoTokenizer.from_pretrained(minilm_dir())


def test_inspect_replaces_only_its_own_heat_map_and_not_in_a_run_being_written(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    (tmp_path / "photo.png").write_bytes(b"\x89PNG my holiday")
    before = tree(tmp_path)
    assert_refused(*cli("inspect", run, "--heatmap", tmp_path / "photo.png"), "is not a PNG moreft wrote")
    lock = FolderLock(run, "run directory").acquire()
    try:
        assert_refused(*cli("inspect", run), "is being written by another moreft process")
    finally:
        lock.release()
    assert tree(tmp_path) == before
    assert cli("inspect", run)[0] == 0 and cli("inspect", run)[0] == 0  # the second replaces our own PNG
    assert cli("inspect", run, "--heatmap", tmp_path / "h.png")[0] == 0
    assert cli("inspect", run, "--heatmap", tmp_path / "h.png")[0] == 0
    assert (tmp_path / "photo.png").read_bytes() == b"\x89PNG my holiday"
    heat_map = "r/delta_bert.encoder.layer.0.attention.self.query.png"
    assert sorted(set(tree(tmp_path)) - set(before)) == ["h.png", heat_map]


def test_a_lock_file_that_is_a_link_is_refused_not_followed(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "victim").write_text("keep")
    (tmp_path / "r" / LOCK_NAME).symlink_to(tmp_path / "victim")
    with pytest.raises(OutputError, match=r"cannot lock run directory .*\.moreft\.lock"):
        FolderLock(tmp_path / "r", "run directory").acquire()
    assert (tmp_path / "victim").read_text() == "keep" and (tmp_path / "r" / LOCK_NAME).is_symlink()


def test_reading_a_run_being_written_works_and_writes_only_outside_it(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    lock = FolderLock(run, "run directory").acquire()
    try:
        before = tree(run)
        assert cli("export-lora", run, tmp_path / "lora")[0] == 0
        assert cli("merge", run, tmp_path / "merged")[0] == 0
        assert_refused(*cli("export-lora", run, run / "lora"), "is inside the run being read")
        assert tree(run) == before
    finally:
        lock.release()
