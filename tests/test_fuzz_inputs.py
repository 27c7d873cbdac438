"""Property tests of every input moreft reads: mutate a valid one, and the answer is success or a clear error.

For each category (flags, environment, recipes, data files, model folders, run folders,
checkpoints, adapter files) hypothesis takes a valid input and spoils it: truncates or flips
bytes, swaps a JSON/YAML value for another type, a huge number, NaN, text that is not UTF-8, a
structure of the wrong shape. Whatever it draws, the command or call must either succeed or fail
with a :class:`moreft.MoreftError` (CLI: one ``moreft: error:`` line, exit status 2, no
traceback), leave every file it does not own as it was, and stay within a time and memory bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import make_tiny_bert, train_flags

import moreft
from moreft.cli import main
from moreft.errors import MoreftError

pytestmark = pytest.mark.usefixtures("one_thread")
#: Growth of the process's peak RSS one example may cause (the tiny model and its runs need ~50 MiB).
MAX_GROWTH_MIB = 512


def fuzz(examples: int, deadline_s: float) -> Callable:
    """Hypothesis settings of one category: few examples, derandomised (CI stable), a per-example deadline."""
    return settings(
        max_examples=examples,
        deadline=deadline_s * 1000,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# -- mutations ---------------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["", "../x", "\x00", "é" * 3, "9" * 40, "NaN", "-1", "1e309"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def mutated_bytes(draw: Any, data: bytes) -> bytes:
    """``data`` truncated, with bytes flipped, inserted (non-UTF-8 too), deleted or a slice repeated."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "repeat", "empty"]))
    i = draw(st.integers(0, len(data)))
    if kind == "truncate":
        return data[:i]
    if kind == "flip" and data:
        i = min(i, len(data) - 1)
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    if kind == "insert":
        return (
            data[:i]
            + draw(st.binary(min_size=1, max_size=16) | st.sampled_from([b"\xff\xfe", b"\x00", b"*a"]))
            + data[i:]
        )
    if kind == "delete":
        return data[:i] + data[i + draw(st.integers(1, 64)) :]
    if kind == "repeat":
        return data[:i] + data[i : i + 64] * draw(st.integers(2, 50)) + data[i:]
    return b""


@st.composite
def mutated_value(draw: Any, value: Any) -> Any:
    """``value`` (a JSON/YAML document) with one node replaced by another value, or the whole of it."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value, key=str)))
        return {**value, key: draw(mutated_value(value[key]))}
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(mutated_value(value[i])), *value[i + 1 :]]
    return draw(JSON_VALUES)


def mutated_json(text: str) -> st.SearchStrategy[bytes]:
    """A JSON file's text mutated as bytes or as a document (then written back as JSON)."""
    doc = json.loads(text)
    as_doc = mutated_value(doc).map(lambda d: json.dumps(d, allow_nan=True).encode())
    return mutated_bytes(text.encode()) | as_doc


# -- the contract -------------------------------------------------------------------------------------
def tree(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` with the hash of its bytes."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def bounded(seconds: float, *untouched: Path) -> Iterator[None]:
    """The body may not take longer than ``seconds``, grow the peak RSS past :data:`MAX_GROWTH_MIB`, or change
    a file under ``untouched``."""
    before, peak, began = (
        tree(*untouched),
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        time.perf_counter(),
    )
    yield
    assert time.perf_counter() - began < seconds
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024 < MAX_GROWTH_MIB
    assert tree(*untouched) == before


def cli(*args: str) -> tuple[int, str]:
    """``moreft ARGS`` in this process; a failure must be exit status 2 with one clear line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own errors and --version
            status = exc.code
    text = err.getvalue()
    assert "Traceback" not in text, text
    assert status in (0, 2), (status, text)
    if status == 2:
        lines = [line for line in text.splitlines() if line.startswith("moreft: error: ")]
        assert len(lines) == 1, text
    return status, text


def library(call: Callable[[], Any]) -> BaseException | None:
    """Run a library call: it returns, or raises a MoreftError (returned for further checks)."""
    try:
        call()
    except MoreftError as exc:
        return exc
    return None


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="moreft-fuzz-") as tmp:
        yield Path(tmp)


# -- fixtures: valid inputs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The tiny BERT, a data file, a recipe, and a finished run with checkpoints (kept pristine in ``kept``)."""
    root = tmp_path_factory.mktemp("fuzz")
    bert = Path(make_tiny_bert(root / "bert"))
    rows = "".join(
        json.dumps({"text": f"text {i}", "label": ["pos", "neg"][i % 2]}) + "\n" for i in range(24)
    )
    (root / "data.jsonl").write_text(rows)
    (root / "recipe.yaml").write_text(
        yaml.safe_dump(
            {
                "description": "fuzzed",
                "task": "sentiment",
                "model": str(bert),
                "method": "lora",
                "rank": 2,
                "target_modules": ["query", "value"],
                "lr": "1e-3",
                "max_steps": 2,
                "seed": 1,
                "task_options": {},
            }
        )
    )
    flags = train_flags(str(bert), root / "runs", run_name="r", save_every=2, max_examples=40)
    assert cli(*flags)[0] == 0
    shutil.copytree(root / "runs", root / "kept")
    return {
        "root": root,
        "bert": bert,
        "data": root / "data.jsonl",
        "recipe": root / "recipe.yaml",
        "run": root / "runs" / "r",
        "kept": root / "kept" / "r",
        "flags": flags,
    }


def restore(world: dict[str, Path]) -> Path:
    """Put the run back as trained; returns it."""
    shutil.rmtree(world["run"])
    shutil.copytree(world["kept"], world["run"])
    return world["run"]


# -- recipes ------------------------------------------------------------------------------------------
def _recipe_mutations(text: str) -> st.SearchStrategy[bytes]:
    doc = yaml.safe_load(text)
    as_doc = mutated_value(doc).map(lambda d: yaml.safe_dump(d).encode())
    bombs = st.integers(2, 12).map(
        lambda n: (
            "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n"
            + "".join(
                f"b{i}: &b{i} [{', '.join(['*a' if i == 0 else f'*b{i - 1}'] * 9)}]\n" for i in range(n)
            )
        ).encode()
    )
    return mutated_bytes(text.encode()) | as_doc | bombs


@fuzz(examples=40, deadline_s=15)
@given(data=st.data())
def test_fuzzed_recipes_give_a_config_or_a_clear_error(world, data):
    content = data.draw(_recipe_mutations(world["recipe"].read_text()))
    with scratch() as tmp, bounded(15, world["bert"]):
        (tmp / "r.yaml").write_bytes(content)
        cli("train", "--config", tmp / "r.yaml", "--dry-run")


# -- data files ---------------------------------------------------------------------------------------
@fuzz(examples=40, deadline_s=10)
@given(data=st.data(), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_fuzzed_data_files_load_or_give_a_clear_error(world, data, suffix):
    rows = [json.loads(line) for line in world["data"].read_text().splitlines()]
    valid = {
        ".jsonl": world["data"].read_text(),
        ".json": json.dumps(rows),
        ".csv": "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows),
    }[suffix]
    mutations = mutated_bytes(valid.encode())
    if suffix != ".csv":
        mutations = mutations | mutated_value(rows).map(
            lambda d: (
                json.dumps(d)
                if suffix == ".json"
                else "".join(json.dumps(r) + "\n" for r in d)
                if isinstance(d, list)
                else json.dumps(d)
            ).encode()
        )
    content = data.draw(mutations)
    template = data.draw(st.sampled_from(["{text}", "Q {text}\n"]) | st.text(max_size=16))
    with scratch() as tmp, bounded(10):
        (tmp / f"d{suffix}").write_bytes(content)
        for name, options in (
            ("file-classification", {}),
            ("file-generation", {"prompt_template": template, "answer_field": "label"}),
        ):
            library(
                lambda name=name, options=options: moreft.tasks.get_task(
                    name, train_path=str(tmp / f"d{suffix}"), **options
                ).load(0, None)
            )


# -- model folders ------------------------------------------------------------------------------------
@fuzz(examples=14, deadline_s=30)
@given(
    data=st.data(),
    target=st.sampled_from(["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]),
)
def test_fuzzed_model_folders_load_or_give_a_clear_error(world, data, target):
    from moreft.models import load_model

    original = (world["bert"] / target).read_bytes()
    if target.endswith(".json") and data.draw(st.booleans()):
        content = data.draw(mutated_json(original.decode()))
    elif target == "model.safetensors":  # the header (where structure lives) or anywhere
        header = int.from_bytes(original[:8], "little") + 8
        i = data.draw(st.integers(0, header + 64))
        content = data.draw(st.sampled_from([original[:i], original[:i] + b"\xff" + original[i + 1 :]]))
    else:
        content = data.draw(mutated_bytes(original) | st.just(None))
    with scratch() as tmp, bounded(30, world["bert"]):
        folder = shutil.copytree(world["bert"], tmp / "m")
        (folder / target).unlink() if content is None else (folder / target).write_bytes(content)
        error = library(lambda: load_model(folder, "classification", num_labels=2))
        assert error is None or str(folder) in str(error), error


# -- run folders and checkpoints ----------------------------------------------------------------------
RUN_FILES = [
    "config.yaml",
    "split.json",
    "metrics.jsonl",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
]


@fuzz(examples=10, deadline_s=40)
@given(data=st.data(), target=st.sampled_from(RUN_FILES))
def test_fuzzed_run_folders_evaluate_or_give_a_clear_error(world, data, target):
    run = restore(world)
    original = (run / target).read_bytes()
    if target == "config.yaml" and data.draw(st.booleans()):
        doc = yaml.safe_load(original)
        key = data.draw(st.sampled_from(sorted(set(doc) - {"model", "task", "max_examples"})))
        content = yaml.safe_dump({**doc, key: data.draw(JSON_VALUES)}).encode()
    elif target.endswith(".json") and data.draw(st.booleans()):
        content = data.draw(mutated_json(original.decode()))
    else:
        content = data.draw(mutated_bytes(original))
    (run / target).write_bytes(content)
    with bounded(40, world["bert"], world["kept"]):
        cli("eval", run, "--eval-examples", "2")


@fuzz(examples=10, deadline_s=40)
@given(
    data=st.data(),
    target=st.sampled_from(["optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"]),
)
def test_fuzzed_checkpoints_resume_or_give_a_clear_error(world, data, target):
    run = restore(world)
    path = run / "checkpoints" / "checkpoint-4" / target
    if target.endswith(".pt") and data.draw(st.booleans()):  # a well-formed file with mutated content
        state = torch.load(path, weights_only=True)
        leaf = data.draw(
            st.sampled_from(
                [
                    torch.full((3,), float("nan")),
                    torch.zeros(2, 2, dtype=torch.int64),
                    torch.zeros(0),
                    5,
                    "x",
                    None,
                    [0.1],
                    {},
                    torch.zeros(4, 2, 8),
                ]
            )
        )
        if target == "optimizer.pt":
            key = data.draw(st.sampled_from(sorted(state["state"])))
            field = data.draw(st.sampled_from(["exp_avg", "exp_avg_sq", "step", "other"]))
            state["state"][key] = {**state["state"][key], field: leaf}
        else:
            state[data.draw(st.sampled_from([*sorted(state), "other"]))] = leaf
        torch.save(state, path)
    elif target.endswith(".json"):
        path.write_bytes(data.draw(mutated_json(path.read_text())))
    else:
        path.write_bytes(data.draw(mutated_bytes(path.read_bytes())))
    with bounded(40, world["bert"], world["kept"]):
        status, _ = cli(*world["flags"], "--max-steps", "6", "--resume")
    if status == 0:
        metrics = json.loads((run / "metrics.json").read_text())
        assert all(
            math.isfinite(v) for k, v in metrics.items() if isinstance(v, float) and k.endswith("loss")
        ), metrics
