"""moreft.train: run configs, recipes, training runs on tiny models, resume, eval/merge/export/inspect, compare."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from moreft.cli import main
from moreft.errors import ConfigError
from moreft.tasks import PromptExample
from moreft.train import load_trained, parse_method_spec, resolve_config, train
from moreft.train.config import TrainConfig, field_names
from moreft.train.data import IGNORE_INDEX, encode_generation

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# -- tiny models --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer, 32-wide Llama causal LM with a character-level tokenizer that prepends BOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def tiny_config(model: str, out: Path, **changes) -> TrainConfig:
    base = {
        "task": "sentiment",
        "model": model,
        "method": "more",
        "block_rank": 2,
        "max_steps": 6,
        "batch_size": 8,
        "max_examples": 120,
        "eval_examples": 12,
        "max_length": 32,
        "lr": 1e-2,
        "log_every": 2,
        "output_dir": str(out),
        "progress": False,
    }
    return resolve_config(None, {**base, **changes})


# -- config and recipes -------------------------------------------------------------------------
def test_recipe_then_flags_override_defaults(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: sentiment\nlr: 3e-4\nbatch_size: 8\ntask_options: {source: tweets}\n")
    config = resolve_config(recipe, {"lr": "1e-3", "task_options": {"source": "movie,nyt"}})
    assert config.lr == 1e-3 and config.batch_size == 8  # flag beats recipe, recipe beats default
    assert config.epochs == TrainConfig.__dataclass_fields__["epochs"].default
    assert config.model == "minilm"  # the packaged default for a classification task
    assert config.task_options == {"source": "movie,nyt"}
    assert main(["train", "--config", str(recipe), "--batch-size", "4", "--seed", "3", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["batch_size"] == 4 and printed["lr"] == 3e-4 and printed["seed"] == 3
    assert printed["run_name"] == "sentiment-minilm-more-seed3"
    assert set(printed) == set(field_names())  # every value visible


def test_unknown_recipe_key_is_named_with_valid_keys(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("task: sentiment\nlearning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\].*'lr'"):
        resolve_config(recipe)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"block_rank": 0}, "block_rank=0 must be >= 1"),
        ({"dropout": 1.5}, "dropout=1.5 must be < 1.0"),
        ({"warmup_ratio": 0.1, "warmup_steps": 5}, "give only one"),
        ({"lr": "fast"}, "lr='fast' must be a number"),
        ({"method": "dora"}, "method='dora' is not one of"),
        ({"task": "glue"}, "unknown task 'glue'"),
        ({"method": "mora", "operator": "rotation", "r_hat": 7}, "r_hat=7 must be even"),
    ],
)
def test_bad_values_name_the_field_and_rule(changes, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, {"task": "sentiment", **changes})


def test_placeholders_need_their_variables(tmp_path):
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text(
        "requires: {MODEL_PATH: local directory of roberta-large}\ntask: sentiment\nmodel: ${MODEL_PATH}\n"
    )
    with pytest.raises(ConfigError, match=r"needs MODEL_PATH: local directory of roberta-large.*--model"):
        resolve_config(recipe, env={})
    assert resolve_config(recipe, env={"MODEL_PATH": "/models/rl"}).model == "/models/rl"
    assert resolve_config(recipe, {"model": "minilm"}, env={}).model == "minilm"


def test_every_recipe_is_valid_and_gpu_recipes_say_what_to_supply():
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert (RECIPES / "demo.yaml") in recipes
    gpu = 0
    for path in recipes:
        data = yaml.safe_load(path.read_text())
        if data.get("requires"):
            gpu += 1
            with pytest.raises(ConfigError, match=f"needs ({'|'.join(data['requires'])}):"):
                resolve_config(path, env={})
        else:
            assert resolve_config(path, env={}).task == data["task"]
    assert gpu >= 4


def test_method_specs():
    assert parse_method_spec("more:block_rank=4,nblocks=2") == {
        "method": "more",
        "block_rank": 4,
        "nblocks": 2,
    }
    assert parse_method_spec("lora") == {"method": "lora"}
    with pytest.raises(ConfigError, match="unknown method 'dora'"):
        parse_method_spec("dora:rank=8")
    with pytest.raises(ConfigError, match="'seed' is not a setting"):
        parse_method_spec("lora:seed=1")


def test_generation_labels_mask_the_prompt(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    (item,) = encode_generation([PromptExample(0, "Key: ab\nValue:", " cd")], tok, max_length=64).items
    n_prompt = len("Key: ab\nValue:") + 1  # characters + BOS
    assert item["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(item["labels"][n_prompt:]) == " cd</s>"
    assert item["input_ids"][n_prompt:] == item["labels"][n_prompt:]


# -- training runs ------------------------------------------------------------------------------
def test_tiny_run_writes_every_run_file(tiny_bert, tmp_path):
    result = train(tiny_config(tiny_bert, tmp_path, run_name="r", eval_every=3, save_every=3), quiet=True)
    run = result.run_dir
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "metrics.json",
        "split.json",
        "loss.png",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    # MoRe on query/key/value of 2 layers (32x32), block_rank 2: 2 * (32 + 32) per layer; head excluded
    assert metrics["trainable_params"] == 6 * 2 * 64
    assert metrics["other_trainable_params"] == 32 * 2 + 2
    for key in ("eval_accuracy", "test_accuracy", "eval_macro_f1", "train_seconds", "peak_rss_mb"):
        assert isinstance(metrics[key], float), key
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert all("lr" in r for r in records if "loss" in r)
    assert [r["step"] for r in records if "eval_accuracy" in r] == [3, 6]
    split = json.loads((run / "split.json").read_text())["ids"]
    assert sum(map(len, split.values())) == 120 and not set(split["train"]) & set(split["test"])
    assert yaml.safe_load((run / "config.yaml").read_text()) == result.config.to_dict()
    ckpt = run / "checkpoints" / "checkpoint-6"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(ckpt.glob("model*.safetensors"))  # checkpoints hold the adapter, not the model
    with pytest.raises(ConfigError, match="already exists; pass --resume"):
        train(result.config, quiet=True)


class StopAt(TrainerCallback):
    """Simulates an interruption: training stops after ``step`` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny_bert, tmp_path, group_by_length):
    common = {
        "max_steps": 8,
        "save_every": 4,
        "grad_accum": 2,
        "dropout": 0.1,
        "eval_examples": 4,
        "group_by_length": group_by_length,
    }
    full = train(tiny_config(tiny_bert, tmp_path, run_name="full", **common), quiet=True)
    part = tiny_config(tiny_bert, tmp_path, run_name="part", **common)
    assert train(part, callbacks=[StopAt(4)], quiet=True).metrics["global_step"] == 4
    with pytest.raises(ConfigError, match=r"cannot resume .*lr: 0.01 -> 0.02"):
        train(part.replace(resume=True, lr=2e-2), quiet=True)
    resumed = train(part.replace(resume=True), quiet=True)
    assert resumed.metrics["resumed_from"] == "checkpoint-4" and resumed.metrics["global_step"] == 8
    a = load_file(full.run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # bit-exact on CPU
    steps = [json.loads(x)["step"] for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # records after the checkpoint were dropped before re-logging


def test_generation_run_on_tiny_llama(tiny_llama, tmp_path):
    config = tiny_config(
        tiny_llama,
        tmp_path,
        task="uuid",
        task_options={"num_pairs": 4},
        method="mora",
        rank=2,
        max_examples=None,
        max_steps=3,
        batch_size=4,
        max_length=96,
        max_new_tokens=8,
    )
    metrics = train(config, quiet=True).metrics
    assert metrics["metric"] == "char_accuracy" and 0.0 <= metrics["test_char_accuracy"] <= 1.0
    assert metrics["other_trainable_params"] == 0


def test_eval_merge_export_inspect(tiny_bert, tmp_path, capsys):
    run = train(tiny_config(tiny_bert, tmp_path, run_name="r"), quiet=True)
    saved = run.metrics
    capsys.readouterr()
    assert main(["eval", str(run.run_dir)]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["test"]["accuracy"] == saved["test_accuracy"]
    assert scored["validation"]["accuracy"] == saved["eval_accuracy"]

    assert main(["merge", str(run.run_dir), str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    _, _, model, _ = load_trained(run.run_dir)
    batch = AutoTokenizer.from_pretrained(tmp_path / "merged")(
        ["a fine film", "dull"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-5)
    assert main(["merge", str(run.run_dir), str(tmp_path / "merged")]) == 2  # refuses to overwrite

    assert main(["export-lora", str(run.run_dir), str(tmp_path / "lora")]) == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 4 * 2

    capsys.readouterr()
    assert main(["inspect", str(run.run_dir), "--layer", "layer.0.attention.self.query"]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.1.attention.self.value" in out and "/ 32 |" in out
    assert (run.run_dir / "delta_bert.encoder.layer.0.attention.self.query.png").is_file()
    ranks = [int(line.split("|")[4].split("/")[0]) for line in out.splitlines() if line.startswith("| bert.")]
    assert len(ranks) == 6 and all(0 < r <= 4 * 2 for r in ranks)  # MoRe: rank(ΔW) <= nblocks * block_rank

    flags = ["--json", "--plots", "--sv-threshold", "1e-3", "--subspace-rank", "4"]
    assert main(["inspect", str(run.run_dir), *flags]) == 0
    report = json.loads(capsys.readouterr().out)
    _, _, model, _ = load_trained(run.run_dir)
    for entry in report[
        "layers"
    ]:  # the JSON's numbers are the definitions' (tests/test_analysis.py has more)
        delta = model.get_submodule(entry["name"]).delta_weight().detach().double()
        assert entry["sv_above"] == int((torch.linalg.svdvals(delta) > 1e-3).sum()) > 0
        assert 1 <= entry["subspace"]["rank"] <= 4 and 0 <= entry["subspace"]["output"] <= 1
    assert set(report["weights"]) == {"blkdiag1", "blkdiag2"} and report["sv_threshold"] == 1e-3
    from moreft.train.plots import is_moreft_png

    assert report["weights_plot"] == str(run.run_dir / "weights.png") and is_moreft_png(
        run.run_dir / "weights.png"
    )


def test_gpu_recipes_run_on_tiny_stand_ins(tiny_bert, tiny_llama, tmp_path):
    """The GPU recipes' tasks, paths and settings work end to end (tiny models, 2 steps)."""

    def jsonl(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    small = {
        "epochs": 1.0,
        "max_steps": 2,
        "batch_size": 4,
        "grad_accum": 1,
        "eval_batch_size": 8,
        "max_length": 32,
        "max_new_tokens": 4,
        "precision": "fp32",
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
    }
    pairs = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i % 2, "idx": i} for i in range(16)]
    for split in ("train", "validation"):
        jsonl(tmp_path / "glue" / "rte" / f"{split}.jsonl", pairs)
    env = {"GLUE_DIR": str(tmp_path / "glue"), "ROBERTA_LARGE": tiny_bert}
    glue = train(resolve_config(RECIPES / "gpu-glue-rte.yaml", small, env=env), quiet=True)
    assert glue.run_dir.name == "glue-rte-roberta-large-more4-seed0"
    assert glue.metrics["train_examples"] == glue.metrics["test_examples"] == 16  # test = the dev file
    assert glue.metrics["eval_accuracy"] == glue.metrics["test_accuracy"]

    answers = ["true" if i % 2 == 0 else "false" for i in range(12)]
    rows = [
        {"instruction": f"Is {i} even?", "input": "", "output": f"the correct answer is {a}", "answer": a}
        for i, a in enumerate(answers)
    ]
    for name in ("commonsense_170k.json", "tuning_10k.json", "boolq/test.json"):
        (tmp_path / "cs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cs" / name).write_text(json.dumps(rows))
    env = {"COMMONSENSE_DIR": str(tmp_path / "cs"), "LLAMA_7B": tiny_llama}
    config = resolve_config(
        RECIPES / "gpu-commonsense-llama-more.yaml", {**small, "max_length": 160}, env=env
    )
    metrics = train(config, quiet=True).metrics
    assert metrics["metric"] == "accuracy" and metrics["test_examples"] == 12
    assert 0 <= metrics["test_accuracy"] <= 1 and 0 <= metrics["test_answered"] <= 1
