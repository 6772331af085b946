"""Process memory, for the runs whose memory is the point (streaming a model bigger than memory).

glibc's malloc serves a large block from its own mapping (``mmap``) only above a threshold that *grows*
to the size of the largest such block freed so far (up to 32 MB). After that, every temporary below it
(a weight cast to float32 for one matmul, an activation) comes from the heap, and a heap freed in the
middle is kept, not handed back: evaluating a streamed 1B model grew the process by 1.0 GB of freed
memory this way (``docs/streaming.md``). :func:`pin_mmap_threshold` fixes the threshold low, so a large
temporary goes back to the OS the moment it is freed; :func:`release` hands back what is free now.

Both act on the whole process and only under glibc (elsewhere they do nothing and say so by their
return value). :func:`amgfx.stream.prune_streamed` pins the threshold, since it exists for runs that
would not fit otherwise; the setting stays for the rest of the process (glibc cannot restore its
dynamic threshold). The cost is a fresh mapping, zeroed page by page, for each large temporary: the
streamed 1B model's evaluation took 36 s longer, its peak was 0.9 GB lower.

Example:
    >>> pin_mmap_threshold() == release()        # both True under glibc, both False elsewhere
    True
    >>> rss_mb() > 0 < peak_mb()
    True
"""
from __future__ import annotations

import ctypes
import functools
import gc
import os
import resource

__all__ = ["MMAP_THRESHOLD", "pin_mmap_threshold", "release", "rss_mb", "peak_mb"]

MMAP_THRESHOLD = 1 << 20     # blocks from 1 MB up are mapped on their own: a 2048-wide activation row block
_M_MMAP_THRESHOLD = -3       # mallopt's parameter number (malloc.h)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:          # not glibc (macOS, musl): nothing to tune
        return None


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``nbytes`` or more from its own mapping, returned to the OS when freed (and
    stop glibc raising the threshold by itself). True where it took effect."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


def release() -> bool:
    """Collect garbage, then hand the heap's free pages back to the OS (``malloc_trim``): a run that frees one
    block's weights and reads the next would otherwise keep a block's worth each time. True under glibc."""
    gc.collect()
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def rss_mb() -> float:
    """Resident memory of this process now, in MB (Linux; 0.0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def peak_mb() -> float:
    """The most resident memory this process has held, in MB (``ru_maxrss`` is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
