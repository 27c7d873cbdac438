"""One writer per folder: an exclusive ``flock`` on ``<folder>/.moreft.lock`` while a process writes it.

The kernel drops the lock when the process exits or is killed (``kill -9`` included), so a
crashed run never leaves a folder locked; the lock file it leaves behind is harmless and the
next writer reuses it. Readers (``eval``, ``export-lora``, ``merge``) do not take the lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

LOCK_NAME = ".moreft.lock"


class FolderLock:
    """The write lock of one folder; the folder (and missing parents) are created to hold it.

    Args:
        folder: The folder to lock.
        what: The folder in words, for the error message (``"run directory"``).
    """

    def __init__(self, folder: str | os.PathLike, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self.file = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created_dirs: list[Path] = []

    def acquire(self) -> FolderLock:
        """Take the lock without waiting.

        Raises:
            OutputError: another process holds it, ``folder`` exists and is not a folder, or the
                lock file cannot be created there.
        """
        if os.path.lexists(self.folder) and not self.folder.is_dir():
            raise OutputError(
                f"{self.what} {str(self.folder)!r} is a file, not a folder; choose another name"
            )
        self._created_dirs = [p for p in (self.folder, *self.folder.parents) if not os.path.lexists(p)]
        try:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create {self.what} {str(self.folder)!r}: {exc.strerror}") from None
            for _ in range(5):  # another writer may remove the file between our open and flock
                try:
                    fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
                except OSError as exc:  # unwritable folder, or the lock file is a link (O_NOFOLLOW)
                    raise OutputError(
                        f"cannot lock {self.what} {str(self.folder)!r}: {exc.strerror} ({str(self.file)!r})"
                    ) from None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                    os.close(fd)
                    raise OutputError(
                        f"{self.what} {str(self.folder)!r} is being written by another moreft "
                        f"process (pid {holder}); wait for it to finish, or choose another "
                        "name"
                    ) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.file, follow_symlinks=False).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    self._fd = fd
                    return self
                os.close(fd)
            raise OutputError(
                f"could not lock {self.what} {str(self.folder)!r}: its lock file keeps changing"
            )
        except BaseException:
            self._remove_created()
            raise

    def release(self) -> None:
        """Drop the lock and remove the lock file, and the folders ``acquire`` made if they stayed empty."""
        if self._fd is None:
            return
        try:
            self.file.unlink(missing_ok=True)  # while still held, so no other writer holds this inode
        finally:
            os.close(self._fd)
            self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        """Remove the folders ``acquire`` made, deepest first, while they are empty."""
        for folder in self._created_dirs:
            try:
                folder.rmdir()
            except OSError:  # not empty (the run wrote into it) or already gone
                break


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[FolderLock]:
    """Hold the write lock of ``folder`` for the ``with`` block (see :class:`FolderLock`).

    Raises:
        OutputError: another process is writing ``folder``.
    """
    lock = FolderLock(folder, what).acquire()
    try:
        yield lock
    finally:
        lock.release()
