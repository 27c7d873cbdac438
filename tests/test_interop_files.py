"""Loading and converting the authors' files: synthetic files in their formats, built with our
transcriptions (tests/official), loaded onto a tiny Llama; outputs equal to the transcribed code's."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_close, assert_unchanged, snapshot
from official import kongds_mora, sprocketlab_more
from safetensors.torch import save_file

import moreft
from moreft.cli import main
from moreft.errors import AdapterFileError
from moreft.interop import load_official

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOL = {"rtol": 1e-11, "atol": 1e-12}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 2-layer Llama: 24 wide, 4 heads over 2 KV heads (k/v 24->12), MLP 24->37->24; saved to disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def fresh(llama_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()


def linears(model):
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS
    }


def official_logits(model, adapter_fn, ids):
    """``model`` with each target linear's output plus ``adapter_fn(name, layer, x)``: the authors' forward."""
    model = copy.deepcopy(model)
    handles = [
        layer.register_forward_hook(lambda mod, inp, out, n=n: out + adapter_fn(n, mod, inp[0]))
        for n, layer in linears(model).items()
    ]
    with torch.no_grad():
        logits = model(ids).logits
    for h in handles:
        h.remove()
    return logits, model


# -- kongds/MoRA -------------------------------------------------------------------------------
def write_kongds(path, model, kind, r=4, suffix="safetensors", **overrides):
    """An adapter directory as the fork's save_pretrained writes it, with random square matrices."""
    gen = torch.Generator().manual_seed(kind)
    tensors = {}
    for name, layer in linears(model).items():
        size = kongds_mora.r_hat(layer.in_features, layer.out_features, r)
        a = torch.randn(size, size, generator=gen, dtype=torch.float64) * 0.2
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.float()
        tensors[f"base_model.model.{name}.lora_B.weight"] = a.float().clone()
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "use_mora": True,
        "mora_type": kind,
        "target_modules": list(TARGETS),
        "bias": "none",
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": "CAUSAL_LM",
        **overrides,
    }
    path.mkdir(exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    if suffix == "bin":
        torch.save(tensors, path / "adapter_model.bin")
    else:
        save_file(tensors, str(path / "adapter_model.safetensors"))
    return {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v.double()
        for k, v in tensors.items()
        if "lora_A" in k
    }


@pytest.mark.parametrize("mora_type", [1, 2, 3, 4, 6])
def test_kongds_adapter_loads_with_the_official_outputs_and_merge(llama_dir, tmp_path, mora_type):
    base = fresh(llama_dir)
    matrices = write_kongds(tmp_path / "ad", base, mora_type)
    ids = torch.randint(0, 50, (2, 7))
    expected, _ = official_logits(
        base,
        lambda n, m, x: kongds_mora.apply_mora(
            x, matrices[n], m.in_features, m.out_features, mora_type, torch.float64
        ),
        ids,
    )
    report = load_official(base, "kongds-mora", tmp_path / "ad")
    assert report.config.r_hat_rounding.value == "round" and report.config.cap_r_hat is False
    assert report.layers == 14 and any("mora_type=" + str(mora_type) in line for line in report.options)
    base.eval()
    with torch.no_grad():
        assert_close(base(ids).logits, expected, **TOL)
        for name, layer in moreft.adapter_layers(base).items():  # the merge they would do
            if mora_type != 6 or layer.r_hat < layer.in_features:
                assert_close(
                    layer.delta_weight(),
                    kongds_mora.delta_weight(
                        matrices[name], layer.in_features, layer.out_features, mora_type, torch.float64
                    ),
                    **TOL,
                )
        moreft.merge(base, safe=True)
        assert_close(base(ids).logits, expected, **TOL)


def test_kongds_convert_writes_a_moreft_adapter_that_loads_equal(llama_dir, tmp_path, capsys):
    base = fresh(llama_dir)
    write_kongds(tmp_path / "ad", base, 3, base_model_name_or_path=str(llama_dir))
    assert main(["convert", str(tmp_path / "ad"), str(tmp_path / "out"), "--from", "kongds-mora"]) == 0
    printed = capsys.readouterr().out
    assert (
        "mora_type=3 -> operator=sharing, sharing_layout=adjacent, sharing_output_layout=strided" in printed
    )
    assert "r_hat_rounding=round" in printed and "wrote" in printed
    direct = fresh(llama_dir)
    load_official(direct, "kongds-mora", tmp_path / "ad")
    loaded = moreft.load_adapter(fresh(llama_dir), tmp_path / "out", check_base=False)
    direct.eval(), loaded.eval()  # the injected dropout (their lora_dropout) starts in training mode
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert_close(loaded(ids).logits, direct(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"use_mora": False}, "use_mora=False, so this is a plain LoRA adapter"),
        (
            {"mora_type": 5},
            r"mora_type=5 is not one the authors' forward runs \(_apply_mora handles \[1, 2, 3, 4, 6\]\)",
        ),
        (
            {"rank_pattern": {"q_proj": 8}},
            r"rank_pattern=.*per-layer ranks \(rank_pattern\) cannot be expressed",
        ),
        ({"use_dora": True}, "DoRA cannot be expressed"),
        ({"bias": "all"}, "bias='all' trains base-layer biases"),
    ],
)
def test_kongds_settings_moreft_cannot_express_are_refused(llama_dir, tmp_path, overrides, message):
    base = fresh(llama_dir)
    write_kongds(tmp_path / "ad", base, 1, **overrides)
    before = snapshot(base)
    with pytest.raises(AdapterFileError, match=message):
        load_official(base, "kongds-mora", tmp_path / "ad")
    assert_unchanged(base, before)


def test_kongds_bin_is_refused_unless_allowed_then_read_weights_only(llama_dir, tmp_path):
    base = fresh(llama_dir)
    matrices = write_kongds(tmp_path / "ad", base, 2, suffix="bin")
    with pytest.raises(
        AdapterFileError, match=r"is a pickle file; moreft reads it only when asked \(--allow-bin"
    ):
        load_official(base, "kongds-mora", tmp_path / "ad")
    load_official(base, "kongds-mora", tmp_path / "ad", allow_bin=True)
    layer = moreft.adapter_layers(base)["model.layers.0.self_attn.q_proj"]
    assert_close(layer.matrix, matrices["model.layers.0.self_attn.q_proj"], rtol=0, atol=0)


def test_kongds_bin_with_code_is_refused_by_weights_only(llama_dir, tmp_path):
    base = fresh(llama_dir)
    write_kongds(tmp_path / "ad", base, 1)
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "ad" / "adapter_model.bin")  # a pickled module: code
    with pytest.raises(
        AdapterFileError, match=r"is not a plain tensor file torch.load\(weights_only=True\) accepts"
    ):
        load_official(base, "kongds-mora", tmp_path / "ad", allow_bin=True)


def test_kongds_file_for_another_base_is_refused_with_the_rule(llama_dir, tmp_path):
    base = fresh(llama_dir)
    write_kongds(tmp_path / "ad", base, 1, r=4)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(
        AdapterFileError,
        match=r"down_proj: the file's square is 16x16 but the authors' rule "
        r"int\(sqrt\(\(37 \+ 24\) \* 8\) \+ 0.5\) gives 22",
    ):
        load_official(base, "kongds-mora", tmp_path / "ad")


def test_kongds_lora_b_must_repeat_lora_a(llama_dir, tmp_path):
    from safetensors.torch import load_file

    base = fresh(llama_dir)
    write_kongds(tmp_path / "ad", base, 1)
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match=r"lora_B\.weight differs from lora_A\.weight"):
        load_official(base, "kongds-mora", tmp_path / "ad")


def test_convert_without_a_known_base_says_to_give_one(llama_dir, tmp_path, capsys):
    write_kongds(tmp_path / "ad", fresh(llama_dir), 1)
    assert main(["convert", str(tmp_path / "ad"), str(tmp_path / "out"), "--from", "kongds-mora"]) == 2
    assert "moreft: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- SprocketLab MoRe --------------------------------------------------------------------------
def write_sprocketlab(path, model, nblocks, blk_r, float_align=True, extra=None):
    """A state-dict checkpoint as their MonarchLinear layers leave it (factors, dense, bias, other weights)."""
    gen = torch.Generator().manual_seed(nblocks * 10 + blk_r)
    tensors, factors = (
        {"model.embed_tokens.weight": model.model.embed_tokens.weight.detach().float().clone()},
        {},
    )
    for name, layer in linears(model).items():
        n, i, o = sprocketlab_more.block_shapes(layer.in_features, layer.out_features, nblocks, float_align)
        b1 = (torch.randn(n, blk_r, i, generator=gen) * 0.3).double()  # float32 values, as trained
        b2 = (torch.randn(n, o, blk_r, generator=gen) * 0.3).double()
        tensors |= {
            f"{name}.blkdiag1": b1.float(),
            f"{name}.blkdiag2": b2.float(),
            f"{name}.dense": layer.weight.detach().clone(),
        }
        factors[name] = (b1, b2)
    tensors |= extra or {}
    path.mkdir(exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    return factors


@pytest.mark.parametrize(
    ("nblocks", "blk_r", "float_align", "rule"),
    [
        (8, 2, True, "official"),
        (4, 3, True, "official"),
        (8, 1, False, "official-int"),
        (3, 2, True, "official"),
    ],
)
def test_sprocketlab_checkpoint_loads_with_the_official_outputs(
    llama_dir, tmp_path, nblocks, blk_r, float_align, rule
):
    base = fresh(llama_dir)
    factors = write_sprocketlab(tmp_path / "ck", base, nblocks, blk_r, float_align)
    ids = torch.randint(0, 50, (2, 6))
    expected, _ = official_logits(
        base, lambda n, m, x: sprocketlab_more.adapter_output(x, *factors[n], m.out_features), ids
    )
    report = load_official(base, "sprocketlab-more", tmp_path / "ck")
    assert report.config.block_rule.value == rule and report.config.block_rank == blk_r
    assert any("differ from this base model's by at most 0" in line for line in report.notes)
    with torch.no_grad():
        assert_close(base(ids).logits, expected, **TOL)
        moreft.merge(base, safe=True)
        assert_close(base(ids).logits, expected, **TOL)


def test_sprocketlab_shapes_moreft_rebuilds_get_the_default_rule(llama_dir, tmp_path):
    """24 and 12 and 37 at N=1: one block everywhere, the same shapes under every rule but the
    float out_block; the default rule is chosen where it rebuilds the file."""
    base = fresh(llama_dir)
    write_sprocketlab(tmp_path / "ck", base, 1, 2, float_align=True)
    report = load_official(base, "sprocketlab-more", tmp_path / "ck")
    assert report.config.block_rule.value == "moreft" and report.config.nblocks == 1


def test_sprocketlab_convert_and_modules_to_save(llama_dir, tmp_path, capsys):
    base = fresh(llama_dir)
    write_sprocketlab(tmp_path / "ck", base, 8, 2, extra={"lm_head.weight": torch.randn(50, 24)})
    code = main(
        [
            "convert",
            str(tmp_path / "ck"),
            str(tmp_path / "out"),
            "--from",
            "sprocketlab-more",
            "--base",
            str(llama_dir),
            "--modules-to-save",
            "lm_head",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert (
        "block_rule=official" in printed
        and "nblocks=8" in printed
        and "1 tensors of modules_to_save" in printed
    )
    direct = fresh(llama_dir)
    load_official(direct, "sprocketlab-more", tmp_path / "ck", modules_to_save=("lm_head",))
    loaded = moreft.load_adapter(fresh(llama_dir), tmp_path / "out")
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert_close(loaded(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_sprocketlab_scaler_and_explicit_block_size_are_refused(llama_dir, tmp_path):
    base = fresh(llama_dir)
    write_sprocketlab(
        tmp_path / "ck", base, 4, 2, extra={"model.layers.0.self_attn.q_proj.scaler.scaler": torch.zeros(1)}
    )
    with pytest.raises(AdapterFileError, match="trained with a scaler or a multiplicative factor"):
        load_official(base, "sprocketlab-more", tmp_path / "ck")
    gen = torch.Generator().manual_seed(0)  # blk_sz=7 on 24 inputs: 4 blocks of 7, which no nblocks gives
    save_file(
        {
            "model.layers.0.self_attn.q_proj.blkdiag1": torch.randn(4, 2, 7, generator=gen),
            "model.layers.0.self_attn.q_proj.blkdiag2": torch.randn(4, 7, 2, generator=gen),
        },
        str(tmp_path / "ck" / "model.safetensors"),
    )
    before = snapshot(base)
    with pytest.raises(
        AdapterFileError, match=r"no nblocks and block rule .* rebuild the file's block shapes"
    ):
        load_official(base, "sprocketlab-more", tmp_path / "ck")
    assert_unchanged(base, before)
