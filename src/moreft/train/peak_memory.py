"""Peak memory of this process, for run metrics and benchmarks."""

from __future__ import annotations

import resource
import sys

_MIB_PER_KIB = 1 / 1024.0


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB.

    On Linux, ``VmHWM`` of the process's own address space: unlike ``ru_maxrss`` it does not carry
    a parent's peak over fork + exec, and :func:`reset_peak_rss` can restart it. Elsewhere
    ``ru_maxrss`` (bytes on macOS, KiB otherwise).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * _MIB_PER_KIB  # "VmHWM:  123456 kB"
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss * _MIB_PER_KIB


def reset_peak_rss() -> bool:
    """Restart the peak at the current RSS (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True
