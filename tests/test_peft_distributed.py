"""moreft's peft methods trained data-parallel on CPU (gloo) equal one process.

``transformers.Trainer`` under ``accelerate launch --multi_gpu`` (DDP) and torch's FSDP2 ``fully_shard`` under
torchrun, 2 processes each with half the per-process batch, against the same worker in one process
(``peft_accelerate_worker.py``): the saved MoRe and MoRA adapters (with the saved classifier) agree to float
rounding and load with ``PeftModel.from_pretrained``. ``accelerate launch --use_fsdp --fsdp_version 2`` cannot
shard on CPU: accelerate keeps ``DistributedType.MULTI_CPU`` (its FSDP branch in ``AcceleratorState`` is for
accelerators only) and runs DDP; the last test pins that, so that a release that shards on CPU is noticed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import peft
import pytest
import torch
from peft_accelerate_worker import CONFIGS, peft_model
from safetensors.torch import load_file
from test_distributed import _launch, max_abs_diff
from tiny import free_port

WORKER = str(Path(__file__).with_name("peft_accelerate_worker.py"))
#: Observed max |difference|: DDP 6e-8 (MoRe) / 1.1e-7 (MoRA), fully_shard 1.7e-6 (MoRe) / 1.2e-7 (MoRA):
#: float32 sums in another order, grown by AdamW's division by each gradient's own size. Measured faults: a loss
#: doubled by the process count moves the DDP adapters by 3e-3; unreduced gradients (no sharding) by 4.5e-2.
TOLERANCE = 1e-5


def _adapter(run: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(run / method / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("peft-distributed")
    _launch(
        {
            "trainer": [sys.executable, WORKER, "trainer", str(out / "trainer")],
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
                WORKER,
                "trainer",
                str(out / "accelerate"),
            ],
            "accelerate_fsdp": [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--main_process_port",
                str(free_port()),
                "--use_fsdp",
                "--fsdp_version",
                "2",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                WORKER,
                "trainer",
                str(out / "accelerate_fsdp"),
            ],
            "loop": [sys.executable, WORKER, "fully_shard", str(out / "loop")],
            "fully_shard": [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--master_port",
                str(free_port()),
                "--nproc_per_node",
                "2",
                WORKER,
                "fully_shard",
                str(out / "fully_shard"),
            ],
        }
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize(
    ("distributed", "single"),
    [("accelerate", "trainer"), ("accelerate_fsdp", "trainer"), ("fully_shard", "loop")],
)
def test_two_processes_save_the_adapter_of_one(runs, method, distributed, single):
    reference, sharded = _adapter(runs / single, method), _adapter(runs / distributed, method)
    assert {k for k in reference if "classifier" in k} == {
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }
    assert max_abs_diff(sharded, reference) < TOLERANCE
    # it trained: the adapters start at ΔW = 0 (MoRe's second factor, MoRA's square matrix are zero)
    assert (
        max(float(t.abs().max()) for k, t in reference.items() if k.endswith(("blkdiag2", "mora_matrix")))
        > 1e-3
    )
    for run in (single, distributed):
        loaded = peft.PeftModel.from_pretrained(peft_model(method).unload(), runs / run / method)
        assert loaded.peft_config["default"].peft_type == CONFIGS[method]().peft_type
        now = peft.get_peft_model_state_dict(loaded)
        saved = _adapter(runs / run, method)
        assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["accelerate", "accelerate_fsdp"])
def test_trainer_under_accelerate_is_data_parallel_with_the_same_losses(runs, launch):
    for method in CONFIGS:
        single, ddp = (json.loads((runs / r / f"{method}.run.json").read_text()) for r in ("trainer", launch))
        assert (single["distributed_type"], single["world"]) == ("DistributedType.NO", 1)
        # --use_fsdp on CPU: still MULTI_CPU (DDP), not DistributedType.FSDP
        assert (ddp["distributed_type"], ddp["world"]) == ("DistributedType.MULTI_CPU", 2)
        # the mean over both processes' halves; a loss scaled by the process count would be twice as large
        assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-6)
