"""Process-level settings for long-running CPU work.

glibc returns every allocation above 32 MiB to the kernel (mmap/munmap), so each training step pays page faults
again on its logits and activation buffers: a quarter of a CPU step can go there. `tune_allocator` keeps freed
memory in the process instead (the same effect as jemalloc/tcmalloc, which PyTorch's CPU performance guide
recommends). It changes nothing on other platforms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_done = False


def tune_allocator() -> bool:
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        _done = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        _done = False
    return _done
