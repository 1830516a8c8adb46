"""The resident memory of this process, as a node reports it once its job is built.

VmRSS (/proc/self/status) counts every page the process has resident, shared ones in full;
PSS (/proc/self/smaps_rollup) counts a page shared by k processes as 1/k, so the PSS of
co-located nodes adds up to what they really take together (a checkpoint mapped read-only by
four nodes counts once). Where /proc does not say (another OS, an old kernel), the values are
0 and None.
"""

from __future__ import annotations

import resource
from pathlib import Path


def _kib(path: str, field: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmRSS:   123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_memory() -> tuple[int, int | None]:
    """(resident KiB, proportional KiB or None) of this process now."""
    rss = _kib("/proc/self/status", "VmRSS")
    if rss is None:  # no /proc: the peak is the best resident figure there is
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss, _kib("/proc/self/smaps_rollup", "Pss")
