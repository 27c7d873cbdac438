"""moreft's peft methods through the rest of the ecosystem: fresh-process loading, transformers' adapter API, pins."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
import transformers
from packaging.version import Version
from peft_models import MODELS, PeftCase
from safetensors.torch import load_file
from tiny import SUBPROCESS_ENV

import moreft

BERT, LLAMA = MODELS[1], MODELS[2]

FRESH = textwrap.dedent("""
    import sys, torch, moreft
    from peft import {auto}
    from safetensors.torch import save_file
    model = {auto}.from_pretrained(sys.argv[1]).eval()
    ids = torch.arange(14).reshape(2, 7) % 61 + 2
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    save_file({{"logits": logits.contiguous()}}, sys.argv[2])
    print(type(model).__name__, type(model.peft_config["default"]).__name__)
""")


@pytest.mark.parametrize(
    "spec, config_id, auto",
    [
        (BERT, "more-N4r2", "AutoPeftModelForSequenceClassification"),
        (LLAMA, "mora-rotation", "AutoPeftModelForCausalLM"),
    ],
    ids=["bert-more", "llama-mora"],
)
def test_auto_peft_model_loads_in_a_fresh_process(spec, config_id, auto, tmp_path):
    spec.make().save_pretrained(tmp_path / "base")
    base = type(spec.make()).from_pretrained(tmp_path / "base").eval()
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, PeftCase(spec, config_id).config())
    expected = spec.out(pm)
    pm.save_pretrained(tmp_path / "adapter")
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "adapter").iterdir())
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH.format(auto=auto),
            str(tmp_path / "adapter"),
            str(tmp_path / "out.safetensors"),
        ],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config_cls = type(PeftCase(spec, config_id).config()).__name__
    assert proc.stdout.split()[-2:] == [auto.removeprefix("Auto"), config_cls]
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["logits"], expected, rtol=0, atol=1e-6)


def test_transformers_adapter_api(tmp_path):
    """``model.load_adapter`` / ``set_adapter`` / ``disable_adapters`` of transformers' own peft integration."""
    outs = {}
    for seed, name in ((1, "a"), (2, "b")):
        pm = PeftCase(BERT, "mora-sharing").peft_model(adapter_seed=seed)
        outs[name] = BERT.out(pm)
        pm.save_pretrained(tmp_path / name)
    model = BERT.make()
    base_out = BERT.out(model)
    model.load_adapter(str(tmp_path / "a"), adapter_name="a")
    model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    assert len(moreft.adapter_layers(model)) == 13
    model.set_adapter("a")
    assert model.active_adapters() == ["a"]
    torch.testing.assert_close(BERT.out(model), outs["a"], rtol=0, atol=1e-6)
    model.set_adapter("b")
    torch.testing.assert_close(BERT.out(model), outs["b"], rtol=0, atol=1e-6)
    model.disable_adapters()
    torch.testing.assert_close(BERT.out(model), base_out, rtol=0, atol=1e-6)
    model.enable_adapters()
    torch.testing.assert_close(BERT.out(model), outs["b"], rtol=0, atol=1e-6)
    model.delete_adapter("a")
    assert model.active_adapters() == ["b"]


def test_pinned_versions_work_together():
    """transformers' adapter API demands a peft version; the pins keep it one moreft registers with."""
    from transformers.integrations.peft import MIN_PEFT_VERSION

    assert Version(transformers.__version__) < Version("5.24")
    assert Version("0.21") <= Version(peft.__version__) < Version("0.22")
    assert Version(MIN_PEFT_VERSION) <= Version(peft.__version__)


@pytest.mark.parametrize(
    "config",
    [
        moreft.MoReConfig(target_modules=["lin"], nblocks=3, block_rank=2, modules_to_save=["head"]),
        moreft.MoRAConfig(target_modules=["lin"], rank=2, operator="sharing", sharing_layout="adjacent"),
        moreft.LoRAConfig(target_modules=["lin"], rank=4, alpha=8),
    ],
    ids=["more", "mora", "lora"],
)
def test_an_old_moreft_adapter_converts_to_peft(config, tmp_path):
    from conftest import make_net, randomize_adapters

    model = moreft.inject(make_net((23, 37), name_or_path="tiny-net"), config)
    randomize_adapters(model)
    x = torch.randn(4, 23)
    expected = model(x).detach()
    moreft.save_adapter(model, tmp_path / "old")
    moreft.convert_to_peft(tmp_path / "old", tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert saved["peft_type"] == config.peft_type.value and saved["base_model_name_or_path"] == "tiny-net"
    loaded = peft.PeftModel.from_pretrained(make_net((23, 37)), tmp_path / "new")
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)
    again = moreft.load_adapter(make_net((23, 37), name_or_path="tiny-net"), tmp_path / "old")  # still loads
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)


def test_converting_refuses_mixed_sharing_layouts(tmp_path):
    from conftest import make_net

    model = moreft.inject(
        make_net((24, 24)), moreft.MoRAConfig(target_modules=["lin", "head"], rank=2, operator="sharing")
    )
    model.head.sharing_layout = moreft.SharingLayout.ADJACENT
    moreft.save_adapter(model, tmp_path / "old")
    with pytest.raises(moreft.AdapterFileError, match=r"different sharing layouts \['adjacent', 'strided'\]"):
        moreft.convert_to_peft(tmp_path / "old", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_moreft_load_adapter_ignores_init_weights_and_peft_bookkeeping(tmp_path):
    """``init_weights`` and peft's fields (version, inference_mode, ...) do not change what the tensors mean."""
    from conftest import make_net

    saved = moreft.inject(
        make_net((24, 24)),
        moreft.MoReConfig(target_modules=["lin"], nblocks=4, block_rank=2, init_weights=False),
    )
    moreft.save_adapter(saved, tmp_path / "ad")
    target = moreft.inject(
        make_net((24, 24)),
        moreft.MoReConfig(target_modules=["lin"], nblocks=4, block_rank=2, inference_mode=True),
    )
    moreft.load_adapter(target, tmp_path / "ad")
    x = torch.randn(3, 24)
    torch.testing.assert_close(target(x), saved(x), rtol=0, atol=0)
    other = moreft.inject(
        make_net((24, 24)), moreft.MoReConfig(target_modules=["lin"], nblocks=4, block_rank=1)
    )
    with pytest.raises(
        moreft.AdapterFileError, match=r"with block_rank=1; the file was saved with block_rank=2"
    ):
        moreft.load_adapter(other, tmp_path / "ad")


@pytest.mark.parametrize(
    "key,value",
    [
        ("peft_type", []),
        ("task_type", 5),
        ("peft_version", ["0.21"]),
        ("inference_mode", "yes"),
        ("auto_mapping", [1]),
        ("revision", 3),
    ],
)
def test_a_saved_config_with_malformed_peft_fields_is_a_config_error(key, value):
    """peft's bookkeeping fields in an adapter_config.json are checked like ours (found by hypothesis)."""
    data = moreft.MoRAConfig(target_modules=["lin"], rank=2).to_dict()
    data[key] = value
    with pytest.raises(moreft.ConfigError, match=rf"^{key}=.* must be "):
        moreft.config_from_dict(data)
