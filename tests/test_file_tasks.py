"""The file tasks (``file-classification``, ``file-generation``): reading the user's files, splits, metrics,
sentence-pair encoding, and errors that name the file, the field or the option."""

from __future__ import annotations

import json

import pytest

from moreft.errors import ConfigError
from moreft.tasks import PairExample, ReferencedExample, TaskKind, get_task
from moreft.train.data import PadCollator, encode_classification
from moreft.train.evaluate import references

ROWS = [{"sentence1": f"first {i}", "sentence2": f"second {i}", "label": i % 3} for i in range(30)]


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        sep = "\t" if fmt == "tsv" else ","
        keys = list(rows[0])
        path.write_text(
            sep.join(keys) + "\n" + "".join(sep.join(str(r[k]) for k in keys) + "\n" for r in rows)
        )
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv"])
def test_classification_file_formats_give_the_same_examples(tmp_path, fmt):
    path = write(tmp_path / f"train.{fmt}", ROWS, fmt)
    task = get_task(
        "file-classification", train_path=path, text_field="sentence1", text_pair_field="sentence2"
    )
    assert task.kind is TaskKind.CLASSIFICATION and task.labels == ("0", "1", "2") and task.num_labels == 3
    examples = task.examples()
    assert examples[4] == PairExample(4, "first 4", 1, "second 4")
    splits = task.load(seed=1)
    assert splits.sizes == {"train": 24, "validation": 3, "test": 3} and splits == task.load(seed=1)


def test_given_eval_and_test_files_are_the_splits(tmp_path):
    train = write(tmp_path / "train.jsonl", ROWS[:20], "jsonl")
    dev = write(tmp_path / "dev.jsonl", ROWS[20:25], "jsonl")
    test = write(tmp_path / "test.jsonl", ROWS[25:], "jsonl")
    names = ["entailment", "neutral", "contradiction"]
    task = get_task(
        "file-classification",
        train_path=train,
        eval_path=dev,
        text_field="sentence1",
        label_names=names,
        metric="matthews",
    )
    splits = task.load(seed=0, max_examples=8)
    assert len(splits.train) == 8 and {ex.id for ex in splits.train} <= set(range(20))
    assert [ex.text for ex in splits.validation] == [f"first {i}" for i in range(20, 25)]
    assert splits.test == splits.validation  # the dev set, as GLUE papers report
    assert task.load(seed=1, max_examples=8).validation == splits.validation
    assert splits.train != task.load(seed=1, max_examples=8).train
    with_test = get_task(
        "file-classification",
        train_path=train,
        eval_path=dev,
        test_path=test,
        text_field="sentence1",
        label_names=names,
    )
    assert [ex.text for ex in with_test.load(0).test] == [f"first {i}" for i in range(25, 30)]
    assert task.metric_name == "matthews"
    scores = task.compute_metrics([0, 1, 2, 0], [0, 1, 2, 1])
    assert scores["accuracy"] == 0.75 and -1.0 <= scores["matthews"] < 1.0 and "macro_f1" in scores


def test_label_names_map_names_and_ids(tmp_path):
    rows = [{"text": "a", "label": "spam"}, {"text": "b", "label": 0}, {"text": "c", "label": "1"}]
    task = get_task(
        "file-classification",
        train_path=write(tmp_path / "t.jsonl", rows, "jsonl"),
        label_names=["ham", "spam"],
    )
    assert [ex.label for ex in task.examples()] == [1, 0, 1]
    bad = write(tmp_path / "bad.jsonl", [{"text": "a", "label": "eggs"}], "jsonl")
    with pytest.raises(ConfigError, match=r"bad.jsonl: label 'eggs' is not one of \['ham', 'spam'\]"):
        get_task("file-classification", train_path=bad, label_names=["ham", "spam"]).examples()


def test_pairs_are_encoded_as_two_segments():
    from transformers import AutoTokenizer

    from moreft.models import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    data = encode_classification(
        [PairExample(0, "a cat", 1, "the dog"), PairExample(1, "hi", 0, "yo")], tok, 16
    )
    first = data.items[0]
    assert tok.decode(first["input_ids"]) == "[CLS] a cat [SEP] the dog [SEP]"
    assert first["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1] and first["labels"] == 1
    batch = PadCollator(tok.pad_token_id)(data.items)
    assert batch["token_type_ids"].tolist()[1] == [0, 0, 0, 1, 1, 0, 0]  # padded with 0


def test_generation_file_templates_answers_and_matching(tmp_path):
    rows = [
        {
            "instruction": f"q{i}?",
            "output": f"the correct answer is answer{i % 2 + 1}",
            "answer": f"answer{i % 2 + 1}",
        }
        for i in range(10)
    ]
    path = write(tmp_path / "cs.json", rows, "json")
    task = get_task(
        "file-generation",
        train_path=path,
        prompt_template="Q: {instruction}\nA:",
        answer_field="output",
        reference_field="answer",
        match="last_word",
    )
    ex = task.examples()[0]
    assert ex == ReferencedExample(0, "Q: q0?\nA:", " the correct answer is answer1", "answer1")
    assert references(task, [ex]) == ["answer1"]
    got = task.compute_metrics(
        ["the correct answer is answer1.", "answer2\nmore text", "", "Answer1"],
        ["answer1", "answer1", "answer1", "answer1"],
    )
    assert got == {"accuracy": 0.5, "answered": 0.75}
    spaced = get_task(
        "file-generation", train_path=path, prompt_template="{instruction}\n", answer_field="answer"
    )
    assert spaced.examples()[1].answer == "answer2"  # no space added after a template ending in whitespace
    numbers = get_task(
        "file-generation",
        train_path=path,
        answer_field="output",
        prompt_template="{instruction}",
        match="number",
    )
    assert numbers.compute_metrics(["so 1,200.0 apples", "12"], ["#### 1200", "The answer is: 13"]) == {
        "accuracy": 0.5,
        "answered": 1.0,
    }
    exact = get_task(
        "file-generation", train_path=path, answer_field="output", prompt_template="{instruction}"
    )
    assert exact.compute_metrics(["  Paris \nis a city", "Rome"], ["paris", "Oslo"])["accuracy"] == 0.5


def test_evaluation_files_may_carry_only_the_reference(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"q": "1+1", "r": "2"}] * 3, "jsonl")
    test = write(tmp_path / "test.jsonl", [{"q": "2+2", "gold": "4"}], "jsonl")
    task = get_task(
        "file-generation",
        train_path=train,
        eval_path=test,
        prompt_template="{q} =",
        answer_field="r",
        reference_field="gold",
    )
    with pytest.raises(ConfigError, match=r"train.jsonl: no field 'gold'; the record has \['q', 'r'\]"):
        task.load(0)
    task = get_task(
        "file-generation", train_path=train, eval_path=test, prompt_template="{q} =", answer_field="r"
    )
    with pytest.raises(ConfigError, match=r"test.jsonl: no field 'r'; the record has \['gold', 'q'\]"):
        task.load(0)  # the reference (answer_field) itself is needed to score


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {},
            r"task 'file-classification' needs the option train_path \(a .jsonl/.json/.csv/.tsv file\); "
            r"pass --task-option train_path=PATH",
        ),
        ({"train_path": "x.jsonl", "test_path": "y.jsonl"}, "test_path needs eval_path too"),
        (
            {"train_path": "x.jsonl", "metric": "auc"},
            r"metric='auc' is not one of \['accuracy', 'macro_f1', 'matthews'\]",
        ),
        ({"train_path": "x.jsonl", "label_names": ["only"]}, "must list at least 2 distinct names"),
    ],
)
def test_bad_classification_options(options, message):
    with pytest.raises(ConfigError, match=message):
        get_task("file-classification", **options)


def test_bad_files_name_the_file_and_line(tmp_path):
    with pytest.raises(
        ConfigError, match=r"train_path='.*nope.jsonl' does not exist; point it at your local data"
    ):
        get_task("file-classification", train_path=str(tmp_path / "nope.jsonl")).examples()
    with pytest.raises(ConfigError, match=r"train_path='data.parquet' must be a .jsonl/.json/.csv/.tsv file"):
        get_task("file-classification", train_path="data.parquet").examples()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 0}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        get_task("file-classification", train_path=str(broken)).examples()
    one = write(tmp_path / "one.jsonl", [{"text": "a", "label": 0}] * 3, "jsonl")
    with pytest.raises(
        ConfigError, match=r"field 'label' has 1 distinct value\(s\); classification needs at least 2"
    ):
        get_task("file-classification", train_path=one).examples()
    with pytest.raises(
        ConfigError, match=r"prompt_template names field 'question', but the record has \['label', "
    ):
        get_task(
            "file-generation", train_path=one, prompt_template="{question}", answer_field="label"
        ).examples()
    with pytest.raises(ConfigError, match=r"match='regex' is not one of \['exact', 'number', 'last_word'\]"):
        get_task("file-generation", train_path=one, match="regex")
