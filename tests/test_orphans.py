"""A worker process ends when the command that started it is killed (``moreft.train.orphans``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from moreft.train.orphans import exit_with_parent

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process ids and signals")

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    import os
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())])
    print(child.pid, flush=True)
    time.sleep(600)
    """
)
CHILD = (
    "import sys, time\n"
    "from moreft.train.orphans import exit_with_parent\n"
    "exit_with_parent(int(sys.argv[1]), poll=0.05)\n"
    "print('watching', flush=True)\n"
    "time.sleep(600)\n"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_worker_exits_when_its_parent_is_killed(sig):
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline().strip() == "watching" and _alive(child)
        parent.send_signal(sig)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the worker went on after its parent was killed"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_worker_whose_parent_died_while_it_started_exits_at_once():
    code = (
        "from moreft.train.orphans import exit_with_parent; import time; exit_with_parent(1); time.sleep(600)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 1  # pid 1 is not its parent


def test_the_watch_is_a_daemon_and_leaves_a_living_parent_alone():
    thread = exit_with_parent(poll=0.01)
    time.sleep(0.05)
    assert thread.daemon and thread.is_alive()  # this process's parent lives: nothing happened
