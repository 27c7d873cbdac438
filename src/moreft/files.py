"""Crash-safe file writes: a reader sees the old content or the new, never half of one.

Everything is written into a temp file or folder beside the target (same filesystem), flushed to
disk with ``fsync``, and renamed over the target in one step. A process killed at any point
(``kill -9``) leaves the previous version in place; what it leaves behind is a hidden
``.<name>.tmp-<pid>-*`` sibling that the next write to the same target removes.

Replacing a *folder* that already exists is one ``renameat2(RENAME_EXCHANGE)`` on Linux; where
the kernel or filesystem lacks it, the old folder is renamed aside first and the new one renamed
in, so for that instant the target is missing (the old copy sits in ``.<name>.old-<pid>`` and is
put back by the next write).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _public(path: Path, mode: int) -> None:
    """Give a temp file/dir the mode a plain ``open``/``mkdir`` would (temp files start private)."""
    os.chmod(path, mode & ~_UMASK)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to disk (folders: their entries, i.e. renames)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(path: Path) -> None:
    """Remove temp siblings of ``path`` left by killed writers; put back an old copy if ``path`` is gone."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    for old in sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue
        if not path.exists():
            old.rename(path)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


@functools.cache
def _renameat2() -> Any:
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is not None:
        rename.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return rename


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where unsupported.

    Raises:
        OSError: the kernel supports the call but it failed (e.g. a path is missing).
    """
    rename = _renameat2()
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete folder ``src`` to ``dst``, replacing any folder there, atomically where possible."""
    _fsync(src)
    if dst.exists() and exchange(src, dst):
        shutil.rmtree(src)  # now holds the old contents
    elif dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old)
    else:
        src.rename(dst)
    _fsync(dst.parent)


def atomic_dir_write(path: Path, files: dict[str, Callable[[Path], Any]]) -> None:
    """Write ``files`` (name -> callable(path)) into ``path`` via a sibling temp dir and rename.

    On any exception (or a kill) the previous contents of ``path``, if any, stay as they were.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
            _public(tmp / name, 0o666)
            _fsync(tmp / name)
        _public(tmp, 0o777)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _public(Path(tmp), 0o666)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temp file in the same folder and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))
