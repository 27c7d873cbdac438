"""Worker processes that end with the process that started them.

``moreft compare --jobs N`` and ``moreft study`` / ``search --jobs N`` train in worker processes. A
worker whose parent is killed (SIGTERM, SIGKILL, a closed session) must not go on training: it
would hold the CPU, and write into a run or a search that a restarted command is resuming. Every
worker therefore watches its parent and exits when the parent is gone (its parent id changes).
"""

from __future__ import annotations

import os
import threading
import time

#: Seconds between two looks at the parent.
POLL_SECONDS = 1.0


def exit_with_parent(parent: int | None = None, poll: float = POLL_SECONDS) -> threading.Thread:
    """Start a daemon thread that ends this process (exit status 1) once ``parent`` has died.

    Args:
        parent: The parent's process id, as the parent passed it (a worker that was still importing
            when its parent died already has a new parent); the current parent by default.
        poll: Seconds between two looks.

    Returns:
        The watching thread (a daemon: it never keeps the process alive).
    """
    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(1)  # no cleanup: the run resumes from its last checkpoint, the trial is requeued

    thread = threading.Thread(target=watch, name="moreft-exit-with-parent", daemon=True)
    thread.start()
    return thread
