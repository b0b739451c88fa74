"""lmforge.runtime.TensorMemory: live tensor bytes on the CPU, checked against sizes known by hand."""

from __future__ import annotations

import pytest
import torch

from lmforge.runtime import TensorMemory

MB = 2**20


def test_tensor_memory_counts_activations_gradients_and_optimizer_state():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
    params = sum(p.numel() for p in m.parameters()) * 4
    opt = torch.optim.AdamW(m.parameters(), foreach=False)
    x = torch.randn(128, 256)
    with TensorMemory(m, opt) as tm:
        assert tm.current == params  # the weights, held before the block
        y = m(x)
        # kept for backward: ReLU's output (128 x 1024); plus y (128 x 256). Linear 1's output is already freed
        assert tm.current - params == (128 * 1024 + 128 * 256) * 4
        view = y[:, :10]  # a view shares y's storage: nothing more
        assert tm.current - params == (128 * 1024 + 128 * 256) * 4
        y.sum().backward()
        del y, view
        assert tm.current == 2 * params  # gradients; activations freed
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert tm.current >= 3 * params  # weights + Adam's two moments (+ step counters)
    assert tm.peak >= 4 * params  # during the step: gradients and both moments at once
    assert tm.peak_mb == tm.peak / MB


def test_in_own_thread_returns_raises_and_runs_elsewhere():
    """serve loads its models through in_own_thread so that the main thread never holds an OpenMP pool."""
    import threading

    from lmforge.errors import ConfigError
    from lmforge.runtime import in_own_thread

    assert in_own_thread(lambda a, b=0: (a + b, threading.current_thread().name), 2, b=3) == (5, "lmforge-setup")
    with pytest.raises(ConfigError, match="bad"):
        in_own_thread(lambda: (_ for _ in ()).throw(ConfigError("bad")))


def test_trim_heap_gives_freed_memory_back():
    """Under tune_allocator's settings (no mmap, a 1 GB trim threshold) a freed 256 MiB buffer stays resident;
    trim_heap returns it (what serve does after loading the weights, and the engine after a long prompt)."""
    import subprocess
    import sys

    code = """
import os, torch
from lmforge.runtime import trim_heap, tune_allocator
rss = lambda: int(open(f"/proc/{os.getpid()}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
assert tune_allocator()
x = torch.ones(64 << 20)  # 256 MiB, touched
del x
kept = rss()
assert trim_heap()
print(kept - rss())
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc_trim: Linux only")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 200  # MiB given back
