"""Data-parallel training on CPU (gloo): torchrun / accelerate launch / fully_shard equal one process.

Each distributed run uses 2 processes with half the per-process batch, so the global batch is the
same as the single-process run's; the tiny BERT has no dropout, so the runs see the same data and
compute the same gradients, and the final adapters agree to float rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import SUBPROCESS_ENV, free_port, make_tiny_bert, moreft_command, train_flags

from moreft.adapter_files import WEIGHTS_NAME
from moreft.train import resolve_config, train

#: Observed max |difference| is ~3e-8 (float32 sums in another order); anything real is far larger.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.0)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / WEIGHTS_NAME)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _launch(commands: dict[str, list[str]]) -> None:
    """Run the commands side by side; fail with a command's stderr if it fails."""
    procs = {
        name: subprocess.Popen(
            cmd, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in commands.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} failed:\n{err[-3000:]}"


@pytest.mark.slow
def test_torchrun_and_accelerate_launch_match_one_process(bert, tmp_path):
    single = train_flags(bert, tmp_path, batch_size=8, run_name="single")
    half = train_flags(bert, tmp_path, batch_size=4)
    _launch(
        {
            "single": moreft_command(*single),
            "torchrun": [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--master_port",
                str(free_port()),
                "--nproc_per_node",
                "2",
                "-m",
                "moreft",
                *half,
                "--run-name",
                "torchrun",
            ],
            "accelerate": [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--main_process_port",
                str(free_port()),
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "-m",
                "moreft",
                *half,
                "--run-name",
                "accelerate",
            ],
        }
    )
    reference = _adapter(tmp_path / "single")
    for name in ("torchrun", "accelerate"):
        assert max_abs_diff(_adapter(tmp_path / name), reference) < TOLERANCE, name
        losses = [
            r["loss"]
            for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]
        expected = [
            r["loss"]
            for r in map(json.loads, (tmp_path / "single" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]
        assert losses == pytest.approx(expected, abs=1e-6), name  # the mean over both processes' halves


def test_gradient_accumulation_matches_the_full_batch(bert, tmp_path):
    # The same global batch as 2 micro-batches: the classification loss is averaged, not summed.
    base = {
        "task": "sentiment",
        "model": bert,
        "method": "lora",
        "rank": 2,
        "max_steps": 3,
        "max_examples": 120,
        "eval_examples": 4,
        "max_length": 32,
        "lr": 1e-2,
        "output_dir": str(tmp_path),
        "progress": False,
    }
    full = train(resolve_config(None, {**base, "batch_size": 8, "run_name": "full"}), quiet=True)
    accum = train(
        resolve_config(None, {**base, "batch_size": 4, "grad_accum": 2, "run_name": "accum"}), quiet=True
    )
    assert max_abs_diff(_adapter(accum.run_dir), _adapter(full.run_dir)) < TOLERANCE


FSDP_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForSequenceClassification
    import moreft

    model_dir, out, sharded = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if sharded:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    config = moreft.MoReConfig(target_modules=["query", "value"], block_rank=2, modules_to_save=["classifier"])
    moreft.inject(model, config)
    if sharded:  # frozen base weights and trainable adapters sharded together, layer by layer
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    x = torch.randint(1000, 2000, (8, 12), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(2))
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=x[mine], labels=y[mine]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moreft.save_adapter(model, out)  # every rank: the shards are gathered, rank 0 writes
    if sharded:
        dist.destroy_process_group()
""")


@pytest.mark.slow
def test_fully_shard_on_cpu_matches_one_process(bert, tmp_path):
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER)
    _launch(
        {
            "single": [sys.executable, str(worker), bert, str(tmp_path / "single"), "0"],
            "fully_shard": [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--master_port",
                str(free_port()),
                "--nproc_per_node",
                "2",
                str(worker),
                bert,
                str(tmp_path / "sharded"),
                "1",
            ],
        }
    )
    single, sharded = (load_file(tmp_path / d / WEIGHTS_NAME) for d in ("single", "sharded"))
    assert any(k.endswith("blkdiag2") for k in single) and any(k.startswith("classifier") for k in single)
    assert max_abs_diff(sharded, single) < TOLERANCE
    assert max(float(t.abs().max()) for k, t in single.items() if k.endswith("blkdiag2")) > 1e-3  # it trained
