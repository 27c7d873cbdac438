"""Crash-safe file writes: a reader sees the old content or the new, never half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


_UMASK = os.umask(0)
os.umask(_UMASK)


def _public(path: Path, mode: int) -> None:
    """Give a temp file/dir the mode a plain ``open``/``mkdir`` would (temp files start private)."""
    os.chmod(path, mode & ~_UMASK)


def atomic_dir_write(path: Path, files: dict[str, Callable[[Path], Any]]) -> None:
    """Write ``files`` (name -> callable(path)) into ``path`` via a sibling temp dir and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
            _public(tmp / name, 0o666)
        _public(tmp, 0o777)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _public(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
