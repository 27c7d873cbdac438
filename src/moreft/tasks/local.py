"""Tasks on the user's own data files: ``file-classification`` and ``file-generation``.

These are what the GPU recipes train on (GLUE, LLM-Adapters' Commonsense170K / Math10K,
MetaMath, ...): moreft ships none of those data sets and never downloads them, so the user points
``train_path`` (and usually ``eval_path``) at local files; see :mod:`moreft.tasks.records` for the
formats.

Splits: with ``train_path`` alone the file is split 80/10/10 with the seed, like the packaged
tasks. With ``eval_path`` the given files are the splits: training examples come from
``train_path`` (shuffled with the seed; ``max_examples`` draws a sample of them), validation from
``eval_path`` and test from ``test_path``, or from ``eval_path`` again when there is none (GLUE
papers report the dev set). Example ids count through train, eval and test records in that order.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from moreft.errors import ConfigError
from moreft.tasks.base import (
    EVAL_FRACTION,
    MIN_SPLIT_EXAMPLES,
    PromptExample,
    Splits,
    Task,
    TaskKind,
    TextExample,
    check_int,
    check_pairs,
)
from moreft.tasks.classification import ClassificationTask
from moreft.tasks.gsm import extract_answer
from moreft.tasks.records import FORMATS, data_path, field, read_records

MATCHES = ("exact", "number", "last_word")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "matthews")
_WORD = re.compile(r"[\w.\-]+")
_FIELD_NAME = re.compile(r"[^.\[\]{}!:]+")


@dataclass(frozen=True)
class PairExample(TextExample):
    """A classification example with a second text (sentence pairs: MNLI, MRPC, QNLI, QQP, RTE).

    Attributes:
        text_pair: The second text, encoded as the tokenizer's second segment.
    """

    text_pair: str = ""


@dataclass(frozen=True)
class ReferencedExample(PromptExample):
    """A generation example scored against ``reference`` rather than the training ``answer``.

    Attributes:
        reference: What the prediction is compared with, e.g. ``"answer1"`` for a target
            ``"the correct answer is answer1"``.
    """

    reference: str = ""


@dataclass(frozen=True)
class _FileSplits:
    """Options shared by the file tasks: where the data is, and how it is split."""

    train_path: str | None = None
    eval_path: str | None = None
    test_path: str | None = None

    def _check_paths(self) -> None:
        if not isinstance(self.train_path, str) or not self.train_path:
            raise ConfigError(
                f"task {self.name!r} needs the option train_path (a {'/'.join(FORMATS)} file); "
                "pass --task-option train_path=PATH"
            )
        for option in ("eval_path", "test_path"):
            if getattr(self, option) is not None and not isinstance(getattr(self, option), str):
                raise ConfigError(f"task {self.name!r} option {option} must be a path string or null")
        if self.test_path is not None and self.eval_path is None:
            raise ConfigError(
                f"task {self.name!r}: test_path needs eval_path too (or neither, for a seeded split)"
            )

    def _files(self) -> list[tuple[str, tuple[dict[str, Any], ...]]]:
        """``[(option, records)]`` for train_path, then eval_path and test_path when set."""
        options = [o for o in ("train_path", "eval_path", "test_path") if getattr(self, o) is not None]
        return [(o, read_records(data_path(getattr(self, o), o, self.name))) for o in options]

    def load(
        self, seed: int, max_examples: int | None = None, eval_fraction: float = EVAL_FRACTION
    ) -> Splits:
        """The seeded split of ``train_path`` (``eval_fraction`` each to validation and test, 80/10/10
        by default), or the given files as splits (module docstring; ``eval_fraction`` unused).

        Raises:
            ConfigError: Bad ``seed`` / ``max_examples``, a missing file or field.
            ValueError: A malformed data file.
        """
        if self.eval_path is None:
            return super().load(seed, max_examples, eval_fraction)  # type: ignore[misc]
        check_int("seed", seed)
        if max_examples is not None:
            check_int("max_examples", max_examples, MIN_SPLIT_EXAMPLES)
        examples = self.examples()  # type: ignore[attr-defined]
        sizes = [len(records) for _, records in self._files()]
        if min(sizes) == 0:
            raise ConfigError(f"task {self.name!r}: a data file is empty (records per file: {sizes})")
        rng = random.Random(seed)
        train = list(range(sizes[0]))
        if max_examples is not None and max_examples < len(train):
            train = rng.sample(train, max_examples)
        rng.shuffle(train)
        validation = examples[sizes[0] : sizes[0] + sizes[1]]
        test = examples[sizes[0] + sizes[1] :] or validation
        return Splits(self.name, seed, tuple(examples[i] for i in train), validation, test)


def _label_order(values: set[str]) -> tuple[str, ...]:
    """Label names in numeric order when they are all integers (``2`` before ``10``), else sorted."""
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        return tuple(sorted(values, key=int))
    return tuple(sorted(values))


@dataclass(frozen=True)
class FileClassificationTask(_FileSplits, ClassificationTask):
    """Text (or text-pair) classification from local files.

    Attributes:
        train_path: Training file (required); see the module docstring for splits.
        eval_path: Validation file (optional).
        test_path: Test file (optional; needs ``eval_path``).
        text_field: Field holding the text.
        text_pair_field: Field holding the second text of a pair, or None.
        label_field: Field holding the label: a label name, or an integer id into ``label_names``.
        label_names: Label names in id order; None takes the distinct values of the training file.
        metric: The metric runs report and compare: ``accuracy``, ``macro_f1`` or ``matthews``
            (Matthews correlation, GLUE's CoLA metric, in [-1, 1]); all three are computed.
    """

    name: ClassVar[str] = "file-classification"

    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    label_names: tuple[str, ...] | None = None
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        self._check_paths()
        if self.metric not in CLASSIFICATION_METRICS:
            raise ConfigError(
                f"task {self.name!r} metric={self.metric!r} is not one of {list(CLASSIFICATION_METRICS)}"
            )
        if self.label_names is not None:
            names = self.label_names
            if (
                not isinstance(names, (list, tuple))
                or len(names) < 2
                or len(set(map(str, names))) != len(names)
            ):
                raise ConfigError(
                    f"task {self.name!r} label_names={names!r} must list at least 2 distinct names"
                )
            object.__setattr__(self, "label_names", tuple(str(n) for n in names))

    @property
    def metric_name(self) -> str:  # type: ignore[override]
        """The ``metric`` option."""
        return self.metric

    def compute_metrics(self, predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
        """Accuracy, macro-F1 and the Matthews correlation (scikit-learn) of predicted label ids.

        Raises:
            ValueError: If the lengths differ, are 0, or an id is not an int in ``[0, num_labels)``.
        """
        from sklearn.metrics import matthews_corrcoef

        scores = super().compute_metrics(predictions, references)
        return {**scores, "matthews": float(matthews_corrcoef(list(references), list(predictions)))}

    @property
    def labels(self) -> tuple[str, ...]:  # type: ignore[override]
        """``label_names``, or the distinct label values of the training file."""
        if self.label_names is not None:
            return self.label_names
        _, records = self._files()[0]
        names = _label_order({str(field(r, self.label_field, self.train_path)) for r in records})
        if len(names) < 2:
            raise ConfigError(
                f"{self.train_path}: field {self.label_field!r} has {len(names)} distinct value(s); "
                "classification needs at least 2"
            )
        return names

    def _label_id(self, value: Any, names: tuple[str, ...], where: str) -> int:
        key = str(value).strip()
        if key in names:
            return names.index(key)
        if self.label_names is not None and re.fullmatch(r"\d+", key) and int(key) < len(names):
            return int(key)
        raise ConfigError(
            f"{where}: label {value!r} is not one of {list(names)} (nor an id below {len(names)})"
        )

    def examples(self) -> tuple[TextExample, ...]:
        """Records of train, eval and test files in order, as (pair) examples.

        Raises:
            ConfigError: A missing file, field, or unknown label.
        """
        names, out = self.labels, []
        for option, records in self._files():
            where = getattr(self, option)
            for r in records:
                text = str(field(r, self.text_field, where))
                label = self._label_id(field(r, self.label_field, where), names, where)
                if self.text_pair_field is None:
                    out.append(TextExample(len(out), text, label))
                else:
                    out.append(PairExample(len(out), text, label, str(field(r, self.text_pair_field, where))))
        return tuple(out)


def _check_template(template: str, task: str) -> None:
    """A prompt template may only name record fields: ``{field}``; no index, attribute or format spec.

    A spec such as ``{text:>1000000000}`` would build a gigabyte string per record, and
    ``{text.__class__}`` reads attributes; neither is needed to build a prompt.

    Raises:
        ConfigError: A malformed template (unmatched brace), or a replacement field that is not a plain name.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f"task {task!r} prompt_template={template[:80]!r} is not a valid format string: {exc} "
            "(write a literal brace as {{ or }})"
        ) from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name or not _FIELD_NAME.fullmatch(name) or name.isdigit() or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(
                f"task {task!r} prompt_template field {shown[:80]!r} must be a plain record field "
                "name like {question}: no position, index, attribute, conversion or format spec"
            )


@dataclass(frozen=True)
class FileGenerationTask(_FileSplits, Task):
    """Prompt -> answer generation from local files, scored by matching the generated answer.

    Attributes:
        train_path: Training file (required); see the module docstring for splits.
        eval_path: Validation file (optional).
        test_path: Test file (optional; needs ``eval_path``).
        prompt_template: Python format string over a record's fields, e.g. LLM-Adapters'
            ``"...### Instruction:\\n{instruction}\\n\\n### Response:\\n"``.
        answer_field: Field holding the training target (evaluation files may lack it).
        reference_field: Field scored against (None: ``answer_field``).
        match: ``exact`` (first line, case and spacing ignored), ``number`` (last number, as
            for ``math``) or ``last_word`` (last word of the first line, e.g. ``answer1``).
    """

    name: ClassVar[str] = "file-generation"
    kind: ClassVar[TaskKind] = TaskKind.GENERATION
    metric_name: ClassVar[str] = "accuracy"

    prompt_template: str = "{prompt}"
    answer_field: str = "answer"
    reference_field: str | None = None
    match: str = "exact"

    def __post_init__(self) -> None:
        self._check_paths()
        if self.match not in MATCHES:
            raise ConfigError(f"task {self.name!r} match={self.match!r} is not one of {list(MATCHES)}")
        if not isinstance(self.prompt_template, str) or not self.prompt_template:
            raise ConfigError(f"task {self.name!r} prompt_template must be a non-empty format string")
        _check_template(self.prompt_template, self.name)

    def examples(self) -> tuple[PromptExample, ...]:
        """Records of train, eval and test files in order, as prompt/answer/reference examples.

        Raises:
            ConfigError: A missing file, or a field the template or options name is missing.
        """
        out = []
        spaced = self.prompt_template[-1].isspace()
        for option, records in self._files():
            where = getattr(self, option)
            for r in records:
                try:
                    prompt = self.prompt_template.format_map(r)
                except KeyError as exc:
                    raise ConfigError(
                        f"{where}: prompt_template names field {exc.args[0]!r}, but the record has "
                        f"{sorted(r)}"
                    ) from None
                reference = str(field(r, self.reference_field or self.answer_field, where)).strip()
                if option == "train_path" or self.answer_field in r:
                    answer = str(field(r, self.answer_field, where)).strip()
                else:  # evaluation files may carry only the reference
                    answer = reference
                out.append(ReferencedExample(len(out), prompt, answer if spaced else f" {answer}", reference))
        return tuple(out)

    def normalize(self, text: str) -> str | None:
        """The part of a text that ``match`` compares (None: nothing to compare)."""
        line = text.strip().split("\n", 1)[0] if text.strip() else ""
        if self.match == "number":
            return extract_answer(text)
        if self.match == "last_word":
            words = _WORD.findall(line.lower())
            return words[-1].strip(".-") if words else None
        return " ".join(line.lower().split()) or None

    def compute_metrics(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Fraction of predictions whose normalised answer equals the reference's.

        Returns:
            ``{"accuracy": float, "answered": float}`` (answered: a comparable answer was found).

        Raises:
            ValueError: The lengths differ or are 0, or a reference has nothing to compare.
            TypeError: A prediction or reference is not a string.
        """
        preds, refs = check_pairs(predictions, references)
        hits = answered = 0
        for i, (pred, ref) in enumerate(zip(preds, refs, strict=True)):
            if not isinstance(pred, str) or not isinstance(ref, str):
                raise TypeError(f"predictions[{i}] and references[{i}] must be str, got {pred!r}, {ref!r}")
            gold = self.normalize(ref)
            if gold is None:
                raise ValueError(f"references[{i}] = {ref!r} has no {self.match} answer to compare")
            got = self.normalize(pred)
            answered += got is not None
            hits += got == gold
        return {"accuracy": hits / len(refs), "answered": answered / len(refs)}
