"""Train a tiny BERT with moreft's peft methods, in one process or in several; save each adapter.

``python peft_accelerate_worker.py MODE OUT`` trains MoRe and MoRA adapters (one after the other, so that the
processes pay the imports once) on 16 fixed examples with a global batch of 8 for 3 steps, and saves each with
``save_pretrained`` to ``OUT/more`` and ``OUT/mora``. The per-process batch is 8 / WORLD_SIZE, so one process and
N processes see the same global batches. MODE:

- ``trainer``: ``transformers.Trainer`` (``use_cpu``); run it plainly, or under ``accelerate launch`` / torchrun.
  The main process also writes ``OUT/run.json`` (accelerate's distributed type, the world size, the losses).
- ``fully_shard``: a plain loop; with WORLD_SIZE > 1 (torchrun) the encoder layers and the model are sharded with
  torch's FSDP2 ``fully_shard`` (gloo) and the full state dict is gathered before rank 0 saves.

Used by ``test_peft_distributed.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import peft
import torch
from transformers import BertConfig, BertForSequenceClassification

import moreft

GLOBAL_BATCH, STEPS = 8, 3
CONFIGS = {
    "more": lambda: moreft.MoReConfig(
        target_modules=["query", "value"], nblocks=2, block_rank=2, modules_to_save=["classifier"]
    ),
    "mora": lambda: moreft.MoRAConfig(
        target_modules=["query", "value"], rank=4, modules_to_save=["classifier"]
    ),
}


class Examples(torch.utils.data.Dataset):
    """16 fixed token sequences with binary labels."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 60, (16, 10), generator=gen)  # (16, T)
        self.labels = torch.randint(0, 2, (16,), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(10, dtype=torch.long),
            "labels": self.labels[i],
        }


def peft_model(method: str) -> peft.PeftModel:
    """The same tiny BERT (no dropout) with a fresh adapter in every process: fixed seeds."""
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    model = BertForSequenceClassification(cfg)
    torch.manual_seed(1)
    return peft.get_peft_model(model, CONFIGS[method]())


def train_with_trainer(method: str, out: Path, world: int) -> None:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        learning_rate=1e-2,
        use_cpu=True,
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        # BERT's forward takes **kwargs, so Trainer would scale the loss by the number of
        # processes for a token count the classifier's mean loss never uses (gradients x2).
        average_tokens_across_devices=False,
    )
    trainer = Trainer(model=peft_model(method), args=args, train_dataset=Examples())
    trainer.train()
    trainer.save_model(str(out / method))  # the main process writes
    if trainer.is_world_process_zero():
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        run = {
            "distributed_type": str(trainer.accelerator.distributed_type),
            "world": world,
            "losses": losses,
        }
        (out / f"{method}.run.json").write_text(json.dumps(run))


def train_fully_shard(method: str, out: Path, world: int) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank() if world > 1 else 0
    model = peft_model(method)
    if world > 1:  # frozen base weights and trainable adapters sharded together, layer by layer
        for layer in model.base_model.model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    data = Examples()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        start = (step * GLOBAL_BATCH) % len(data) + rank * per_rank
        mine = slice(start, start + per_rank)
        model(input_ids=data.ids[mine], labels=data.labels[mine]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # every rank gathered; rank 0 holds the full tensors
        model.save_pretrained(out / method, state_dict=full)


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out.mkdir(parents=True, exist_ok=True)
    if mode == "fully_shard" and world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    for method in CONFIGS:
        (train_with_trainer if mode == "trainer" else train_fully_shard)(method, out, world)
    if mode == "fully_shard" and world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
