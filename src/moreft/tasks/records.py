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
#: A data file is read whole; past this it is refused (LLM-Adapters' Commonsense170K is ~80 MB).
MAX_FILE_BYTES = 2 * 2**30
#: One JSONL line or CSV field; a longer one is refused (text is clipped to what fits in max_length anyway).
MAX_RECORD_CHARS = 8 * 2**20
#: Field values a record may hold where moreft reads text or a label.
SCALARS = (str, int, float, bool)


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
        raise ConfigError(
            f"task {task!r} option {option}={path!r} does not exist; point it at your local "
            "data file (moreft never downloads data)"
        )
    return p.resolve()


def read_records(path: Path) -> tuple[dict[str, Any], ...]:
    """Every record of a data file, in file order (cached until the file changes).

    Raises:
        DataFileError: (a ``ValueError``) The file is not UTF-8 text, a line or the file is not
            valid JSON / CSV, or holds something other than objects; the message names the file and line.
    """
    stat = path.stat()
    if stat.st_size > MAX_FILE_BYTES:
        raise DataFileError(
            f"{path}: {stat.st_size:,} bytes; a data file is read whole and may be at most "
            f"{MAX_FILE_BYTES:,} bytes (split it, or sample it with fewer records)"
        )
    return _read(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read(path: Path, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFileError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None
    if suffix in (".csv", ".tsv"):
        return _read_table(path, text, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, 5000-digit numbers, deep nesting
            raise DataFileError(f"{path}: not valid JSON ({str(exc)[:200]})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataFileError(f"{path}: a .json data file must hold one list of objects")
        return tuple(data)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_RECORD_CHARS:
            raise DataFileError(
                f"{path}:{number}: the line has {len(line):,} characters; a record may have at "
                f"most {MAX_RECORD_CHARS:,}"
            )
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # 5000-digit numbers, deep nesting
            raise DataFileError(f"{path}:{number}: not valid JSON ({str(exc)[:200]})") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return tuple(rows)


def _read_table(path: Path, text: str, delimiter: str) -> tuple[dict[str, Any], ...]:
    """Rows of a CSV (``,``, quoting) or TSV (tab, no quoting) text with a header line."""
    reader = csv.DictReader(
        text.splitlines(),
        delimiter=delimiter,
        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
    )
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_RECORD_CHARS)
    rows = []
    try:
        if not reader.fieldnames:
            raise DataFileError(f"{path}: no header line (the first line must name the columns)")
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataFileError(
                    f"{path}:{reader.line_num}: the row has a different number of columns "
                    f"than the header {reader.fieldnames}"
                )
            rows.append(dict(row))
    except csv.Error as exc:  # a field over the limit, a NUL byte, a stray quote
        raise DataFileError(
            f"{path}:{reader.line_num}: not a valid row ({exc}; a field may have at most "
            f"{MAX_RECORD_CHARS:,} characters)"
        ) from None
    finally:
        csv.field_size_limit(limit)
    return tuple(rows)


def field(record: dict[str, Any], name: str, where: str) -> Any:
    """``record[name]`` (text, a number or a boolean), or a clear error naming the fields the record has.

    Raises:
        ConfigError: The record has no field ``name``, or it holds null, a list or an object.
    """
    if name not in record:
        raise ConfigError(
            f"{where}: no field {name!r}; the record has {sorted(record)} (set the task option "
            "that names this field)"
        )
    value = record[name]
    if not isinstance(value, SCALARS):
        shown = repr(value)
        raise ConfigError(
            f"{where}: field {name!r} is {shown[:60] + ('...' if len(shown) > 60 else '')} "
            f"({type(value).__name__}); it must be text, a number or a boolean"
        )
    return value
