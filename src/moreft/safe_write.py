"""Crash-safe file writes: a reader sees the old content or the new, never half of one.

Everything is written into a temp file or folder beside the target (same filesystem), flushed to
disk with ``fsync``, and renamed over the target in one step. A process killed at any point
(``kill -9``) leaves the previous version in place; what it leaves behind is a hidden
``.<name>.tmp-<pid>-*`` sibling that the next write to the same target removes.

Replacing a *folder* that already exists is one ``renameat2(RENAME_EXCHANGE)`` on Linux; where
the kernel or filesystem lacks it, the old folder is renamed aside first and the new one renamed
in, so for that instant the target is missing (the old copy sits in ``.<name>.old-<pid>`` and is
put back by the next write).

A write never replaces what moreft did not create. A folder target is written only when it is
missing, empty, or holds nothing but moreft's own earlier output of the same :class:`FolderKind`;
a file, or a folder with anything else in it, is refused with :class:`~moreft.errors.OutputError`
before anything is written. A symbolic link to a folder is written through (the link stays a link;
the folder it points to gets the new contents). The temp-sibling sweep removes only names of the
exact shape this module creates, owned by this user, whose writer process is gone.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OutputError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def current_umask() -> int:
    """The process's umask, read without changing it (Linux ``/proc``); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public(path: Path, mode: int) -> None:
    """Give a temp file/dir the mode a plain ``open``/``mkdir`` would (temp files start private)."""
    os.chmod(path, mode & ~current_umask())


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


def _ours(entry: Path) -> bool:
    """True for an entry this user owns that is not a symbolic link (a temp name we could have made)."""
    try:
        info = entry.lstat()
    except OSError:
        return False
    return not stat.S_ISLNK(info.st_mode) and info.st_uid == os.getuid()


def _sweep(path: Path) -> None:
    """Remove temp siblings of ``path`` left by killed writers; put back an old copy if ``path`` is gone.

    Only names of the exact shapes :func:`_temp_prefix` / :func:`replace_dir` make are touched
    (``.<name>.tmp-<pid>-<8 tempfile chars>``, ``.<name>.old-<pid>``), only when this user owns
    them and process ``pid`` is gone; anything else beside ``path`` is left alone.
    """
    temp = re.compile(re.escape(f".{path.name}.tmp-") + r"(\d+)-[a-z0-9_]{8}")
    old_copy = re.compile(re.escape(f".{path.name}.old-") + r"(\d+)")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for stale in siblings:
        match = temp.fullmatch(stale.name)
        if match and _ours(stale) and not _alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    olds = [p for p in siblings if old_copy.fullmatch(p.name) and _ours(p) and p.is_dir()]
    for old in sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True):
        pid = int(old.name.rsplit("-", 1)[-1])
        if _alive(pid) and pid != os.getpid():
            continue
        if not os.path.lexists(path):
            old.rename(path)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _make_parent(path: Path) -> None:
    """Create the folders above ``path``.

    Raises:
        OutputError: one of them is a file, or cannot be created.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create folder {str(path.parent)!r} for {str(path)!r}: {exc.strerror}"
        ) from None


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
    """Move the complete folder ``src`` to ``dst``, replacing any folder there, atomically where possible.

    Raises:
        OutputError: ``dst`` exists and is not a real folder (a file or a symbolic link); nothing moved.
    """
    if os.path.lexists(dst) and (dst.is_symlink() or not dst.is_dir()):
        raise OutputError(f"{str(dst)!r} is not a folder; moreft does not replace it with one")
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


@dataclass(frozen=True)
class FolderKind:
    """One kind of folder moreft writes whole, and the rule that recognises one it wrote before.

    A non-empty folder is moreft's earlier output of this kind when ``owned(folder)`` returns the
    set of names that kind writes (its identifying file says moreft wrote it) and every entry of
    the folder is a regular file with one of those names. Anything else makes it foreign.

    Attributes:
        what: The kind in words, for messages (``"moreft adapter"``).
        owned: ``folder -> names it may hold``, or None when the folder is not this kind's output.
    """

    what: str
    owned: Callable[[Path], set[str] | None]


def plain_files(what: str, names: Iterable[str]) -> FolderKind:
    """A :class:`FolderKind` recognised by its file names alone (a folder holding only ``names``)."""
    allowed = set(names)
    return FolderKind(what, lambda folder: allowed)


def foreign_entries(folder: Path, kind: FolderKind) -> list[str]:
    """Entries of ``folder`` that are not moreft's output of ``kind`` (all of them if it is not that kind)."""
    entries = sorted(os.listdir(folder))
    if not entries:
        return []
    try:
        allowed = kind.owned(folder)
    except (OSError, ValueError):
        allowed = None
    if allowed is None:
        return entries
    return [n for n in entries if n not in allowed or not stat.S_ISREG(os.lstat(folder / n).st_mode)]


def writable_folder(path: str | os.PathLike, kind: FolderKind) -> Path:
    """The folder a write of ``kind`` to ``path`` goes to, after checking it may be replaced.

    A symbolic link to a folder is followed (the returned path is the real folder, so the link
    stays a link). Nothing is changed on disk.

    Raises:
        OutputError: ``path`` is a file, a link to something other than a folder, or a non-empty
            folder that is not moreft's earlier output of ``kind``.
    """
    path = Path(os.path.abspath(path))
    if path.is_symlink():
        real = Path(os.path.realpath(path))
        if not real.is_dir():
            raise OutputError(
                f"{str(path)!r} is a symbolic link to {str(real)!r}, which is not a folder; "
                f"moreft writes the {kind.what} through a link only to an existing folder"
            )
        path = real
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(
            f"{str(path)!r} is a file, not a folder; moreft does not replace a file with the "
            f"{kind.what} (choose another path, or move the file away yourself)"
        )
    if path.is_dir():
        foreign = foreign_entries(path, kind)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputError(
                f"{str(path)!r} holds files moreft did not write there as a {kind.what} "
                f"({shown}); moreft replaces a folder only when it is empty or holds nothing "
                f"but its own earlier {kind.what}. Choose a new or empty folder"
            )
    return path


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync(Path(folder) / name)


def write_folder(path: str | os.PathLike, fill: Callable[[Path], Any], kind: FolderKind) -> Path:
    """Fill a sibling temp folder with ``fill(temp)`` and swap it in as ``path``, atomically.

    Returns:
        The folder written (the real folder when ``path`` is a link to one).

    Raises:
        OutputError: see :func:`writable_folder`; checked before anything is written.
    """
    path = Path(os.path.abspath(path))  # "." and "x/.." name their folder, not a child of it
    if not path.is_symlink():
        _sweep(path)  # an earlier writer's old copy goes back first, so the check sees it
    path = writable_folder(path, kind)
    _make_parent(path)
    _sweep(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        _public(tmp, 0o777)
        writable_folder(path, kind)  # nothing foreign arrived while we wrote
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_dir_write(
    path: str | os.PathLike, files: dict[str, Callable[[Path], Any]], kind: FolderKind | None = None
) -> Path:
    """Write ``files`` (name -> callable(path)) into ``path`` via a sibling temp dir and rename.

    On any exception (or a kill) the previous contents of ``path``, if any, stay as they were.

    Args:
        path: The folder to write.
        files: File name -> ``write(file_path)``.
        kind: What the folder is; default: a folder holding only ``files``' names.

    Returns:
        The folder written (the real folder when ``path`` is a link to one).

    Raises:
        OutputError: see :func:`writable_folder`; nothing is written then.
    """

    def fill(tmp: Path) -> None:
        for name, write in files.items():
            write(tmp / name)
            _public(tmp / name, 0o666)

    return write_folder(path, fill, kind or plain_files("folder", files))


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write a file with ``write(temp_path)`` beside ``path`` and rename it over ``path`` in one step.

    A symbolic link is written through: the file it points to is replaced, the link stays.

    Returns:
        The file written (the real file when ``path`` is a link).

    Raises:
        OutputError: ``path`` is a folder.
    """
    path = Path(os.path.abspath(path))
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise OutputError(f"{str(path)!r} is a folder; moreft does not replace a folder with a file")
    _make_parent(path)
    _sweep(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _public(Path(tmp), 0o666)
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename.

    Raises:
        OutputError: ``path`` is a folder.
    """
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temp file in the same folder and an atomic rename.

    Raises:
        OutputError: ``path`` is a folder.
    """
    atomic_write_bytes(path, text.encode("utf-8"))
