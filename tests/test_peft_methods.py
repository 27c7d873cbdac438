"""MoRe and MoRA as peft methods, tested the way peft tests its own: one table of models x configs.

Every check runs on every pair of :data:`peft_models.MODELS` (a tiny MLP with non-divisible
shapes, a tiny BERT classifier, a tiny Llama with ``"all-linear"``) and :data:`peft_models.CONFIGS`
(MoRe at several ``nblocks``/``block_rank``, MoRA with each operator).
"""

from __future__ import annotations

import contextlib
import io
import json

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft_models import PeftCase, peft_cases
from safetensors.torch import load_file, save_file
from torch import nn

import moreft
from moreft.layers import AdapterLayer
from moreft.ops.fused import reference_mode

CASES = peft_cases()
ATOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


def _layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.base_layer.weight.detach().clone() for n, m in _layers(model).items()}


@pytest.mark.parametrize("case", CASES)
def test_get_peft_model_equals_moreft_inject(case: PeftCase):
    pm = case.peft_model()
    assert isinstance(pm, PeftModel) and pm.peft_type == case.config().peft_type
    model = case.model.make()
    moreft.inject(model, case.config())
    peft_layers = _layers(pm.base_model.model)
    assert list(peft_layers) == list(moreft.adapter_layers(model))
    with torch.no_grad():
        for name, layer in moreft.adapter_layers(model).items():
            for p, t in layer.adapter_params().items():
                t.copy_(peft_layers[name].adapter_params("default")[p])
        if case.model.modules_to_save:
            head = case.model.modules_to_save[0]
            pm.base_model.model.get_submodule(head).modules_to_save["default"].load_state_dict(
                model.get_submodule(head).state_dict()
            )
    fused = case.model.out(pm)
    _close(fused, case.model.out(model))
    with reference_mode():
        _close(case.model.out(pm), fused)
        _close(case.model.out(model), fused)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=["plain", "low-cpu-mem"])
def test_save_pretrained_round_trip(case: PeftCase, low_cpu_mem_usage, tmp_path):
    pm = case.peft_model()
    expected = case.model.out(pm)
    pm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == case.config().peft_type
    if "operator" in saved:
        assert saved["operator"] in [o.value for o in moreft.MoRAOperator]
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys and all(".default" not in k for k in keys)
    loaded = PeftModel.from_pretrained(case.model.make(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert type(loaded.peft_config["default"]) is type(case.config())
    _close(case.model.out(loaded), expected, atol=0)
    assert all(p.device.type == "cpu" for p in loaded.parameters())


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_and_idempotent_merge(case: PeftCase):
    pm = case.peft_model()
    w0, expected = _base_weights(pm), case.model.out(pm)
    pm.merge_adapter()
    assert all(layer.merged for layer in _layers(pm).values())
    _close(case.model.out(pm), expected)
    merged = _base_weights(pm)
    assert any(not torch.equal(merged[n], w0[n]) for n in w0)
    pm.merge_adapter()  # again: nothing changes
    assert all(torch.equal(_base_weights(pm)[n], merged[n]) for n in merged)
    pm.unmerge_adapter()
    assert not any(layer.merged for layer in _layers(pm).values())
    for n, w in _base_weights(pm).items():
        _close(w, w0[n])
    _close(case.model.out(pm), expected)


@pytest.mark.parametrize("case", CASES)
def test_merge_and_unload_gives_the_plain_model(case: PeftCase):
    pm = case.peft_model()
    expected = case.model.out(pm)
    merged = pm.merge_and_unload(safe_merge=True)
    assert not _layers(merged) and not isinstance(merged, PeftModel)
    assert not any(type(m).__module__.startswith("moreft") for m in merged.modules())
    _close(case.model.out(merged), expected)


@pytest.mark.parametrize("case", CASES)
def test_safe_merge_refuses_nan_and_changes_nothing(case: PeftCase):
    pm = case.peft_model()
    layers = list(_layers(pm).values())
    with torch.no_grad():
        next(iter(layers[-1].adapter_params().values())).view(-1)[0] = float("nan")
    w0 = _base_weights(pm)
    with pytest.raises(moreft.MergeError, match=r"would write \d+ NaN/Inf values .* nothing was merged"):
        pm.merge_and_unload(safe_merge=True)
    with pytest.raises(moreft.MergeError, match="nothing was merged"):
        pm.merge_adapter(safe_merge=True)
    assert isinstance(pm, PeftModel) and len(_layers(pm)) == len(layers)
    assert not any(layer.merged for layer in layers)
    assert all(torch.equal(w, w0[n]) for n, w in _base_weights(pm).items())


@pytest.mark.parametrize("case", peft_cases(("mlp", "llama")))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_merge_rounds_once(case: PeftCase, dtype):
    base = case.model.make().to(dtype)  # a low-precision base, as loaded with torch_dtype=...
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, case.config())
    layers = _layers(pm)
    exact = {
        n: (layer.base_layer.weight.float() + layer.delta_weight().detach().float()).to(dtype)
        for n, layer in layers.items()
    }
    assert all(p.dtype == torch.float32 for layer in layers.values() for p in layer.adapter_params().values())
    pm.merge_adapter()
    for n, layer in layers.items():
        assert layer.base_layer.weight.dtype == dtype
        torch.testing.assert_close(layer.base_layer.weight, exact[n], rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_disable_adapter_gives_the_base_model(case: PeftCase):
    base_out = case.model.out(case.model.make())
    pm = case.peft_model()
    adapted = case.model.out(pm)
    assert not torch.allclose(adapted, base_out, atol=1e-4)
    with pm.disable_adapter():
        _close(case.model.out(pm), base_out)
    _close(case.model.out(pm), adapted)
    pm.merge_adapter()
    with pm.disable_adapter():  # a merged adapter is unmerged first, as in peft
        _close(case.model.out(pm), base_out)


@pytest.mark.parametrize("case", CASES)
def test_several_adapters_add_set_and_delete(case: PeftCase):
    pm = case.peft_model()
    base_out = case.model.out(case.model.make())
    first = case.model.out(pm)
    torch.manual_seed(7)
    pm.add_adapter("other", case.config(modules_to_save=()))  # peft activates one saved-module copy at a time
    _close(case.model.out(pm), first)  # adding does not activate
    pm.set_adapter("other")
    second = case.model.out(pm)
    assert not torch.allclose(second, first, atol=1e-4)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    # both at once: the layers add both ΔW; equal to merging both into the base weights
    pm.base_model.set_adapter(["default", "other"])
    both = case.model.out(pm)
    assert not torch.allclose(both, second, atol=1e-4)
    pm.merge_adapter()
    assert all(layer.merged_adapters == ["default", "other"] for layer in _layers(pm).values())
    _close(case.model.out(pm), both, atol=1e-4)
    pm.unmerge_adapter()
    with pm.disable_adapter():
        _close(case.model.out(pm), base_out)
    pm.set_adapter("default")
    _close(case.model.out(pm), first)
    pm.delete_adapter("other")
    assert set(pm.peft_config) == {"default"}
    assert not any(".other" in n for n, _ in pm.named_parameters())
    _close(case.model.out(pm), first)


@pytest.mark.parametrize("case", CASES)
def test_training_step_changes_only_the_adapter(case: PeftCase):
    pm = case.peft_model(init_weights=True)
    pm.train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        y = pm(**case.model.inputs())
        (y if isinstance(y, torch.Tensor) else y.logits).square().mean().backward()
        opt.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    allowed = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert changed and changed <= allowed
    assert all(".default" in n for n in allowed)
    prefix = moreft.tuners.TUNERS[case.config().method].prefix
    assert any(prefix in n for n in changed)


@pytest.mark.parametrize("case", CASES)
def test_unload_returns_the_untouched_base(case: PeftCase):
    base_out = case.model.out(case.model.make())
    pm = case.peft_model()
    model = pm.unload()
    assert not _layers(model)
    _close(case.model.out(model), base_out)


@pytest.mark.parametrize("case", CASES)
def test_print_trainable_parameters_counts_adapter_and_saved_modules(case: PeftCase):
    pm = case.peft_model()
    adapter = sum(p.numel() for layer in _layers(pm).values() for p in layer.adapter_params().values())
    saved = sum(
        p.numel() for n in case.model.modules_to_save for p in case.model.make().get_submodule(n).parameters()
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pm.print_trainable_parameters()
    assert f"trainable params: {adapter + saved:,}" in out.getvalue()
    counts = moreft.count_parameters(pm)
    assert counts.adapter == adapter and counts.other_trainable == saved


@pytest.mark.parametrize("case", CASES)
def test_peft_model_state_dict_get_and_set(case: PeftCase):
    pm = case.peft_model()
    state = get_peft_model_state_dict(pm)
    assert state and all(".default" not in k for k in state)
    saved_heads = [
        k for k in state if "modules_to_save" in k or any(f"{m}." in k for m in case.model.modules_to_save)
    ]
    assert bool(saved_heads) == bool(case.model.modules_to_save)
    other = case.peft_model(adapter_seed=5)
    assert not torch.allclose(case.model.out(other), case.model.out(pm))
    result = set_peft_model_state_dict(other, state)
    assert not [k for k in result.unexpected_keys]
    _close(case.model.out(other), case.model.out(pm), atol=0)


@pytest.mark.parametrize("case", CASES)
def test_inference_mode_loading_freezes_everything(case: PeftCase, tmp_path):
    case.peft_model().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.model.make(), tmp_path)
    assert loaded.peft_config["default"].inference_mode
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(case.model.make(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("case", peft_cases(("mlp", "bert")))
def test_a_file_that_does_not_fit_is_refused_and_the_model_kept(case: PeftCase, tmp_path):
    case.peft_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = moreft.tuners.TUNERS[case.config().method].prefix
    key = next(k for k in sorted(tensors) if prefix in k)
    tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = case.model.make()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(
        moreft.AdapterFileError, match=r"does not fit the model \(nothing was loaded\).*has shape"
    ):
        PeftModel.from_pretrained(base, tmp_path)
    assert not _layers(base) and not hasattr(base, "peft_config")
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    head = f"base_model.model.{case.model.modules_to_save[0]}.bias"  # a saved module that does not fit
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] - 1)
    save_file({**tensors, head: torch.zeros(99)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(moreft.AdapterFileError, match=r"bias' has shape \[99\] in the file"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not _layers(base) and all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_peft_types_are_registered_on_import():
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    assert moreft.tuners.registered()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MORE"] is moreft.MoReConfig
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MORA"] is moreft.MoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["MOREFT_LORA"] is moreft.LoRAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["MORE"] == "more_"
    assert (
        peft.PeftConfig.from_peft_type(peft_type="MORA", operator="sharing").operator
        is moreft.MoRAOperator.SHARING
    )


def test_config_validation_and_json():
    with pytest.raises(moreft.ConfigError, match=r"nblocks=0 must be an integer >= 1"):
        moreft.MoReConfig(nblocks=0)
    with pytest.raises(moreft.ConfigError, match=r"init_weights='yes' must be True or False"):
        moreft.MoRAConfig(init_weights="yes")
    with pytest.raises(
        ValueError, match="operator='spin' is not one of"
    ):  # ConfigError is a ValueError for peft
        moreft.MoRAConfig(operator="spin")
    data = moreft.MoRAConfig(operator="decouple", target_modules=["q"]).to_dict()
    assert data["operator"] == "decouple" and data["peft_type"] == "MORA" and data["target_modules"] == ["q"]
    assert moreft.config_from_dict(json.loads(json.dumps(data))) == moreft.MoRAConfig(
        operator="decouple", target_modules=["q"]
    )
    with pytest.raises(moreft.ConfigError, match=r"peft_type='MORA' disagrees with method 'more'"):
        moreft.config_from_dict({**data, "method": "more"})


def test_one_layer_holds_one_method():
    case = PeftCase(CASES[0].values[0].model, "more-N4r2")
    pm = case.peft_model()
    w0 = _base_weights(pm)
    with pytest.raises(
        ValueError, match="Cannot combine adapters with different peft types"
    ):  # peft's own rule
        pm.add_adapter("second", moreft.MoRAConfig(target_modules=["lin1"], rank=2))
    with pytest.raises(
        moreft.TargetError, match=r"already carries a more adapter; one layer holds adapters of one"
    ):
        moreft.MoRAModel(pm.base_model.model, moreft.MoRAConfig(target_modules=["lin1"], rank=2), "second")
    assert set(pm.peft_config) == {"default"}
    assert all(layer.adapter_configs.keys() == {"default"} for layer in _layers(pm).values())
    assert all(torch.equal(w, w0[n]) for n, w in _base_weights(pm).items())


@pytest.mark.parametrize(
    "config, match",
    [
        (
            moreft.MoReConfig(target_modules=["lin1", "lin2"], nblocks=30),
            r"nblocks=30 must be <= in_features=20 of 'lin1'",
        ),
        (
            moreft.MoRAConfig(target_modules=["lin1", "lin2"], r_hat=30, operator="truncation"),
            r"r_hat=30 must be <= min\(in_features, out_features\)=20",
        ),
        (
            moreft.MoReConfig(target_modules="lin9.*"),
            r"target_modules='lin9\.\*' matches no module; linear layers are: lin1",
        ),
        (moreft.MoReConfig(target_modules=["lin2", "lin1", "nonexistent"], block_rank=2), None),
    ],
    ids=["nblocks", "r_hat", "no-match", "partial"],
)
def test_a_config_that_does_not_fit_leaves_the_model_untouched(config, match):
    spec = CASES[0].values[0].model
    model = spec.make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if match is None:  # peft's rule: some names may match nothing, as long as one does
        assert len(_layers(peft.get_peft_model(model, config))) == 2
        return
    with pytest.raises((moreft.ConfigError, moreft.TargetError), match=match):
        peft.get_peft_model(model, config)
    assert not _layers(model) and "peft_config" not in model.__dict__
    assert model.state_dict().keys() == before.keys()
