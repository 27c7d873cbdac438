"""End to end on tiny randomly initialised transformers models (no download: HF_HUB_OFFLINE=1).

One test per family (BERT classifier, Llama causal LM, GPT-2 with its ``Conv1D`` layers), each run
for MoRe, MoRA and LoRA: default targets, freezing, a few optimizer steps, save -> load into a
fresh model, export -> peft, merge. Plus ``"all-linear"`` and regex targeting per family.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters
from peft import PeftModel
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

import moreft
from moreft.layers import AdapterLayer

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

METHODS = [
    pytest.param(lambda **kw: moreft.MoReConfig(nblocks=4, block_rank=2, **kw), id="more"),
    pytest.param(lambda **kw: moreft.MoRAConfig(rank=2, **kw), id="mora"),
    pytest.param(lambda **kw: moreft.LoRAConfig(rank=4, **kw), id="lora"),
]


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=32,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=32,
        )
    )


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            vocab_size=100,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def ids_batch(classify: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4, 8), generator=gen)
    labels = torch.randint(0, 3, (4,), generator=gen) if classify else ids
    return {"input_ids": ids, "labels": labels}


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, Conv1D)]


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def full_cycle(make, config, batch, suffixes, base_type, tmp_path, saved_modules=()):
    """inject -> freeze check -> train -> save/load -> export/peft -> merge, on one family."""
    model = moreft.inject(make(), config)
    targets = sorted(moreft.adapter_layers(model))
    assert targets and all(n.rsplit(".", 1)[-1] in suffixes for n in targets)
    assert {n.rsplit(".", 1)[-1] for n in targets} == set(suffixes)
    assert len(targets) == len(suffixes) * 2  # two layers
    layers = moreft.adapter_layers(model)
    adapter_names = {
        f"{n}.{layer.prefix}{p}.default" for n, layer in layers.items() for p in layer.adapter_params()
    }
    saved_names = {f"{m}.{p}" for m in saved_modules for p, _ in model.get_submodule(m).named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_names | saved_names

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    randomize_adapters(model, std=0.05)  # make sure ΔW is far from 0 for the comparisons below
    model.eval()
    reference = logits(model, batch)
    assert not torch.allclose(reference, logits(make().eval(), batch))

    moreft.save_adapter(model, tmp_path / "adapter")
    fresh = moreft.load_adapter(make(), tmp_path / "adapter").eval()
    assert sorted(moreft.adapter_layers(fresh)) == targets
    assert torch.equal(logits(fresh, batch), reference)

    width = max(min(layer.in_features, layer.out_features) for layer in layers.values())
    report = moreft.export_lora(
        model, tmp_path / "lora", rank=width if config.method is moreft.Method.MORA else None
    )
    assert report.max_relative_error < 1e-6
    peft_model = PeftModel.from_pretrained(make(), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(logits(peft_model, batch), reference, rtol=1e-4, atol=1e-5)

    moreft.merge(model)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(type(model.get_submodule(n)) is base_type for n in targets)
    torch.testing.assert_close(logits(model, batch), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_bert(method, tmp_path):
    batch = ids_batch(classify=True)
    config = method(modules_to_save=["classifier"])  # default targets: query, key, value
    full_cycle(
        bert, config, batch, ("query", "key", "value"), nn.Linear, tmp_path, saved_modules=["classifier"]
    )

    model = bert()
    all_linear = moreft.resolve_targets(
        model, method(target_modules="all-linear", modules_to_save=["classifier"])
    )
    assert all_linear == [n for n in linear_names(model) if n != "classifier"]
    regex = method(target_modules=r"bert\.encoder\.layer\.1\.attention\.self\.(query|value)")
    moreft.inject(model, regex)
    assert sorted(moreft.adapter_layers(model)) == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]


@pytest.mark.parametrize("method", METHODS)
def test_llama(method, tmp_path):
    batch = ids_batch(classify=False)
    full_cycle(llama, method(), batch, ("q_proj", "k_proj", "v_proj"), nn.Linear, tmp_path)

    model = llama()
    all_linear = moreft.resolve_targets(model, method(target_modules="all-linear"))
    assert "lm_head" in linear_names(model) and "lm_head" not in all_linear
    assert all_linear == [n for n in linear_names(model) if n != "lm_head"]
    moreft.inject(model, method(target_modules=r".*\.0\.(self_attn\.o_proj|mlp\.down_proj)"))
    assert sorted(moreft.adapter_layers(model)) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.o_proj",
    ]


@pytest.mark.parametrize("method", METHODS)
def test_gpt2_conv1d(method, tmp_path):
    batch = ids_batch(classify=False)
    full_cycle(gpt2, method(), batch, ("c_attn",), Conv1D, tmp_path)

    model = gpt2()
    all_linear = moreft.resolve_targets(model, method(target_modules="all-linear"))
    assert "lm_head" in linear_names(model) and "lm_head" not in all_linear
    assert all_linear == [n for n in linear_names(model) if n != "lm_head"]
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in all_linear)
    moreft.inject(model, method(target_modules=r"transformer\.h\.1\.mlp\.c_fc"))
    layer = model.transformer.h[1].mlp.c_fc
    assert isinstance(layer, AdapterLayer) and (layer.out_features, layer.in_features) == (128, 32)


def test_all_linear_leaves_the_classifier_head_alone():
    model = bert()
    names = moreft.resolve_targets(model, moreft.MoReConfig(target_modules="all-linear"))
    assert names and not any(n.startswith("classifier") for n in names)
    assert "bert.encoder.layer.0.attention.self.query" in names
