"""moreft's peft methods under ``transformers.Trainer`` and TRL: adapter-only checkpoints, best-adapter restore,
gradient checkpointing, ``SFTTrainer(peft_config=...)``."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft_models import MODELS, PeftCase
from safetensors.torch import load_file

import moreft

BERT, LLAMA = MODELS[1], MODELS[2]


class Examples(torch.utils.data.Dataset):
    """Eight fixed token sequences with binary labels."""

    def __init__(self, n: int = 8) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 60, (n, 7), generator=gen)
        self.labels = torch.arange(n) % 2

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(7, dtype=torch.long),
            "labels": self.labels[i],
        }


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 5e-2,
        "save_strategy": "steps",
        "save_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 1,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("config_id", ["more-N4r2", "mora-rotation"])
def test_trainer_saves_adapter_only_and_restores_the_best(config_id, tmp_path):
    from transformers import Trainer

    pm = PeftCase(BERT, config_id).peft_model(init_weights=True)
    scores = iter([0.1, 0.9, 0.3, 0.2])  # the adapter of step 2 is the best; the last one is not
    trainer = Trainer(
        model=pm,
        args=_args(
            tmp_path,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
            save_total_limit=None,
        ),
        train_dataset=Examples(),
        eval_dataset=Examples(4),
        compute_metrics=lambda _: {"score": next(scores)},
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    for step in (1, 2, 3, 4):
        files = sorted(
            p.name
            for p in (tmp_path / "out" / f"checkpoint-{step}").iterdir()
            if p.name.startswith(("adapter", "model", "pytorch_model"))
        )
        assert files == ["adapter_config.json", "adapter_model.safetensors"]
    best = load_file(tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(tmp_path / "out" / "checkpoint-4" / "adapter_model.safetensors")
    now = peft.get_peft_model_state_dict(pm)
    assert now.keys() == best.keys()
    assert all(torch.equal(now[k], best[k]) for k in best)
    prefix = moreft.tuners.TUNERS[pm.peft_config["default"].method].prefix
    assert any(not torch.equal(best[k], last[k]) for k in best if prefix in k)
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert saved["peft_type"] == pm.peft_config["default"].peft_type.value
    assert not (tmp_path / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("config_id", ["more-N3r1", "mora-truncation"])
def test_gradient_checkpointing_gives_the_same_gradients(config_id):
    grads = []
    for checkpointing in (False, True):
        model = LLAMA.make()
        if checkpointing:
            model.gradient_checkpointing_enable()
        pm = PeftCase(LLAMA, config_id).peft_model(init_weights=False) if not checkpointing else None
        if checkpointing:
            torch.manual_seed(1)
            pm = peft.get_peft_model(model, PeftCase(LLAMA, config_id).config(init_weights=False))
        pm.train()
        ids = LLAMA.inputs()["input_ids"]
        pm(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert pm.base_model.model.is_gradient_checkpointing
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


def test_trl_sft_trainer_trains_and_saves_an_adapter(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{chr(97 + i): 2 + i for i in range(26)}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
        pad_token="<pad>",
        eos_token="<eos>",
    )
    tok._tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    data = datasets.Dataset.from_dict({"text": ["abcabcabc", "defdefdef", "ghighighi", "abcdefghi"] * 2})
    model = LLAMA.make()
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    config = moreft.MoReConfig(target_modules=["q_proj", "v_proj"], nblocks=4, block_rank=2)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        max_length=16,
        disable_tqdm=True,
        dataset_text_field="text",
        bf16=False,
    )  # fp32, so that the trained model's forward is not under bf16 autocast
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok, peft_config=config
    )
    assert isinstance(trainer.model, peft.PeftModel)
    layers = moreft.adapter_layers(trainer.model)
    before = {n: layer.blkdiag2.detach().clone() for n, layer in layers.items()}
    assert all(float(b.abs().max()) == 0 for b in before.values())
    trainer.train()
    assert any(not torch.equal(layer.blkdiag2, before[n]) for n, layer in layers.items())
    assert trainer.state.log_history[-1]["train_loss"] > 0
    trainer.save_model(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "MORE"
    loaded = peft.PeftModel.from_pretrained(LLAMA.make(), tmp_path / "adapter")
    ids = LLAMA.inputs()["input_ids"]
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits, rtol=0, atol=1e-5
        )
