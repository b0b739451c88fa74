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


def lean_allocator() -> bool:
    """The opposite trade to tune_allocator, for memory-bound runs: glibc's mmap threshold fixed at 256 KiB
    (by default it ratchets up to 32 MiB after the first large free, after which freed activation buffers stay
    in the heap), and free heap tops returned above 1 MiB. Peak resident memory then tracks live tensors."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 18)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        _done = False
    return _done


def reset_peak_memory() -> None:
    """Start a new peak-memory window: Linux's resident high-water mark (VmHWM) and CUDA's peak counter.
    Freed heap memory is handed back to the kernel first, so the window starts from what is live."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float:
    """Peak resident memory (MiB) since the last reset_peak_memory() (since start where the reset is not
    supported); on a GPU run, the peak CUDA allocation instead."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / (1024 if sys.platform == "darwin" else 1)


def current_memory_mb() -> float:
    """Resident memory now (MiB); on a GPU run, CUDA memory allocated now. 0 where unknown."""
    import torch

    if torch.cuda.is_available() and torch.cuda.memory_allocated() > 0:
        return torch.cuda.memory_allocated() / 2**20
    return _status_mb("VmRSS") or 0.0


def _status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (Linux), in MiB; None elsewhere."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
