"""Property tests (see ``test_fuzz_inputs.py``) of flags, the environment and adapter files."""

from __future__ import annotations

import pytest
import torch
from conftest import make_net, randomize_adapters, snapshot
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_fuzz_inputs import (
    bounded,
    cli,
    fuzz,
    library,
    mutated_bytes,
    mutated_json,
    scratch,
)

import moreft
from moreft.errors import MoreftError

pytestmark = pytest.mark.usefixtures("one_thread")


# -- flags and environment ----------------------------------------------------------------------------
FLAGS = [
    "--seed",
    "--lr",
    "--rank",
    "--block-rank",
    "--nblocks",
    "--max-steps",
    "--max-length",
    "--batch-size",
    "--run-name",
    "--target-modules",
    "--dropout",
    "--warmup-ratio",
    "--epochs",
    "--task-option",
    "--model",
    "--output-dir",
    "--merge-every",
    "--eval-every",
    "--method",
    "--operator",
    "--task",
]
VALUES = (
    st.integers(-(2**80), 2**80).map(str)
    | st.floats().map(repr)
    | st.text(max_size=24)
    | st.sampled_from(
        [
            "",
            "0",
            "-1",
            "nan",
            "inf",
            "1e400",
            "a/b",
            "..",
            "(a|aa)+c",
            "x=1",
            "=",
            "{seed}",
            "\\",
            "q" * 300,
            "all-linear",
        ]
    )
)


@fuzz(examples=60, deadline_s=10)
@given(flags=st.lists(st.tuples(st.sampled_from(FLAGS), VALUES), min_size=1, max_size=3))
def test_fuzzed_flags_give_a_config_or_a_clear_error(flags):
    args = [f"{flag}={value}" for flag, value in flags]
    with bounded(10):
        cli("train", "--task", "sentiment", "--dry-run", *args)


@fuzz(examples=25, deadline_s=10)
@given(value=st.text(max_size=12) | st.sampled_from(["0", "1", "on", "OFF", " auto ", "yes", "2", "\x7f"]))
def test_a_fuzzed_moreft_triton_breaks_no_unrelated_command(value, monkeypatch):
    from moreft.ops import triton_more

    monkeypatch.setenv("MOREFT_TRITON", value.replace("\x00", ""))
    try:
        mode, error = triton_more._mode_from_env(), None
    except MoreftError as exc:
        mode, error = None, exc
    monkeypatch.setattr(triton_more, "_mode", mode)  # as importing moreft with this environment leaves it
    assert cli("--version")[0] == 0
    status, err = cli("train", "--task", "sentiment", "--dry-run")
    assert (status == 2 and "MOREFT_TRITON=" in err) if error else status == 0


# -- adapter files ------------------------------------------------------------------------------------
@fuzz(examples=60, deadline_s=10)
@given(data=st.data(), target=st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]))
def test_fuzzed_adapter_files_load_or_leave_the_model_as_it_was(data, target):
    with scratch() as tmp:
        model = moreft.inject(make_net((24, 24)), moreft.MoRAConfig(target_modules=["lin"], rank=2))
        randomize_adapters(model)
        path = moreft.save_adapter(model, tmp / "ad")
        if target.endswith(".json"):
            content = data.draw(mutated_json((path / target).read_text()))
        elif data.draw(st.booleans()):
            tensors = load_file(str(path / target))
            key = data.draw(st.sampled_from(sorted(tensors)))
            tensors[key] = data.draw(
                st.sampled_from(
                    [
                        torch.full_like(tensors[key], float("nan")),
                        tensors[key].double(),
                        tensors[key].flatten(),
                        torch.zeros(1, dtype=torch.int32),
                        tensors[key][:1].clone(),
                        torch.zeros(0),
                    ]
                )
            )
            save_file(tensors, str(path / target))
            content = (path / target).read_bytes()
        else:
            content = data.draw(mutated_bytes((path / target).read_bytes()))
        (path / target).write_bytes(content)
        net = make_net((24, 24))
        before = snapshot(net)
        with bounded(10):
            error = library(lambda: moreft.load_adapter(net, path))
        if error is not None:
            after = snapshot(net)
            assert after["types"] == before["types"] and after["grad"] == before["grad"]
            assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
        else:
            assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
