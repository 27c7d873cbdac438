"""Reading the user's own data files as records (one ``dict`` per example), for the file tasks.

Formats, chosen by the file suffix:

=========  ==================================================================================
``.jsonl`` one JSON object per line (blank lines skipped), e.g. a ``datasets`` ``to_json`` export
``.json``  one JSON list of objects, e.g. LLM-Adapters' ``commonsense_170k.json``
``.csv``   comma separated with a header line
``.tsv``   tab separated with a header line (the GLUE distribution's ``train.tsv`` / ``dev.tsv``)
=========  ==================================================================================

Nothing is downloaded: a missing file is an error that names the path and the option it came from.
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path
from typing import Any

from moreft.errors import ConfigError, DataFileError

FORMATS = (".jsonl", ".json", ".csv", ".tsv")


def data_path(path: str, option: str, task: str) -> Path:
    """The existing file named by a task option.

    Args:
        path: The option's value.
        option: The option's name (for the message), e.g. ``"train_path"``.
        task: The task's name (for the message).

    Raises:
        ConfigError: The file does not exist or its suffix is not one of :data:`FORMATS`.
    """
    p = Path(path).expanduser()
    if p.suffix.lower() not in FORMATS:
        raise ConfigError(f"task {task!r} option {option}={path!r} must be a {'/'.join(FORMATS)} file")
    if not p.is_file():
        raise ConfigError(f"task {task!r} option {option}={path!r} does not exist; point it at your local "
                          "data file (moreft never downloads data)")
    return p.resolve()


def read_records(path: Path) -> tuple[dict[str, Any], ...]:
    """Every record of a data file, in file order (cached until the file changes).

    Raises:
        DataFileError: (a ``ValueError``) The file is not UTF-8 text, a line or the file is not
            valid JSON / CSV, or holds something other than objects; the message names the file and line.
    """
    stat = path.stat()
    return _read(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read(path: Path, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",",
                                quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
        if not reader.fieldnames:
            raise DataFileError(f"{path}: no header line (the first line must name the columns)")
        rows = []
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataFileError(f"{path}:{reader.line_num}: the row has a different number of columns "
                                 f"than the header {reader.fieldnames}")
            rows.append(dict(row))
        return tuple(rows)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataFileError(f"{path}: a .json data file must hold one list of objects")
        return tuple(data)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return tuple(rows)


def field(record: dict[str, Any], name: str, where: str) -> Any:
    """``record[name]``, or a clear error naming the fields the record has.

    Raises:
        ConfigError: The record has no field ``name``.
    """
    if name not in record:
        raise ConfigError(f"{where}: no field {name!r}; the record has {sorted(record)} (set the task option "
                          "that names this field)")
    return record[name]
