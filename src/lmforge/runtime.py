"""Process-level settings for long-running CPU work.

glibc returns every allocation above 32 MiB to the kernel (mmap/munmap), so each training step pays page faults
again on its logits and activation buffers: a quarter of a CPU step can go there (and 15-20% of a MiniLM forward
on a 64 x 128 batch). `tune_allocator`, which training, generation, serving and `predict.encode` call, keeps freed
memory in the process instead (the same effect as jemalloc/tcmalloc, which PyTorch's CPU performance guide
recommends). It changes nothing on other platforms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
import time

import torch

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


def trim_heap() -> bool:
    """Give the memory freed so far back to the kernel (glibc's malloc_trim: the heap's free pages, not only its
    top). With tune_allocator's settings freed buffers stay in the process; that is what a step wants, but after
    a one-off burst (loading and converting a model's weights: about 1 GB for the packaged SmolLM2 GGUF, whose
    weights then hold 105 MiB; or reading a long prompt) it leaves a server holding memory it will not use
    again. Returns whether it ran (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


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


class TensorMemory:
    """Live and peak bytes of tensor storage while a block of PyTorch code runs, on any device: the CPU
    counterpart of torch.cuda.max_memory_allocated (which CPU tensors lack), without the interpreter, imported
    libraries and the allocator's kept heap that resident-memory figures include.

        with TensorMemory(model, optimizer) as tm:   # storages already held by these count from the start
            train_step()
        tm.peak_mb, tm.current_mb

    Every tensor an operator returns inside the block is counted once per storage until its last tensor is
    freed (a `TorchDispatchMode`, so the backward pass and optimizer steps are seen too). Views share their
    base's storage and add nothing. It slows each operator down a little: measure with it, don't train with it.
    """

    def __init__(self, *holders) -> None:
        self._holders = holders
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors]
        self._seen: set[int] = set()  # ids of counted tensor objects
        self.current = self.peak = 0
        self._mode = None

    def _held(self):
        import torch

        for h in self._holders:
            if isinstance(h, torch.nn.Module):
                yield from h.parameters()
                yield from h.buffers()
            elif isinstance(h, torch.optim.Optimizer):
                for state in h.state.values():
                    yield from (v for v in state.values() if isinstance(v, torch.Tensor))
            elif isinstance(h, torch.Tensor):
                yield h

    def _add(self, t) -> None:
        import weakref

        if id(t) in self._seen or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return
        key, n = st.data_ptr(), st.nbytes()
        if not key or not n:
            return
        e = self._live.get(key)
        if e is None:
            e = self._live[key] = [n, 0]
            self.current += n
            self.peak = max(self.peak, self.current)
        e[1] += 1
        self._seen.add(id(t))
        weakref.finalize(t, self._drop, id(t), key)

    def _drop(self, tid: int, key: int) -> None:
        self._seen.discard(tid)
        e = self._live.get(key)
        if e is not None:
            e[1] -= 1
            if e[1] <= 0:
                self.current -= e[0]
                del self._live[key]

    def __enter__(self) -> TensorMemory:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if hasattr(t, "untyped_storage"):
                        tracker._add(t)
                return out

        for t in self._held():
            self._add(t)
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def current_mb(self) -> float:
        return self.current / 2**20


def in_own_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) on a new thread that ends with it; its result returned, its exception raised here.

    For work before a long-lived compute thread starts (the serving engine's): libgomp, PyTorch's OpenMP on
    Linux, keeps a pool of workers for every thread that has run a parallel region, and once those pools hold
    more threads than there are cores its workers stop spin-waiting between regions (they sleep and are woken
    for each of the hundreds of small products in a decoding step). On 2 cores a step then took twice as long:
    SmolLM2 int4 at batch 1, 57 tok/s in the engine thread after the main thread had loaded the model, 106 when
    the loading ran on a thread that had ended (its pool goes with it)."""
    import threading

    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="lmforge-setup")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (`model name` in /proc/cpuinfo), for every benchmark table
    and run record: the figures differ by CPU kind, so each one names the machine it came from."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------------------------
# the compute dtype

DTYPES = ("float32", "bfloat16", "float16", "auto")
_picked: dict[str, tuple[torch.dtype, str]] = {}


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (`flags` in /proc/cpuinfo); empty where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def matmul_flops(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    sizes: tuple[int, ...] | None = None,
    seconds: float = 0.5,
) -> float:
    """Achieved FLOP/s of square matmuls in `dtype` on `device`: the best of short bursts at each size (default
    1024 and 2048 on a CPU, 4096 and 8192 on a GPU). MFU's denominator, the benchmarks' peaks and auto's test.
    The operands come from a generator of its own: the global RNG (dropout) must not move, or a resumed run
    would differ from one never stopped."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    best = 0.0
    for n in sizes or ((4096, 8192) if device.type == "cuda" else (1024, 2048)):
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        a @ b  # warm-up
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best if math.isfinite(best) and best > 0 else 1e12


def pick_dtype(device: str | torch.device = "cpu") -> tuple[torch.dtype, str]:
    """What `dtype: auto` means on this device, and why: (dtype, reason). On a CPU, bfloat16 when it has bf16
    matrix instructions (AMX-BF16 or AVX-512 BF16; without them PyTorch emulates bf16 products, slower than
    fp32) and a bf16 product measures at least 1.5x an fp32 one here (about 50 ms, once per process); on CUDA,
    bfloat16 when the GPU supports it; float32 elsewhere."""
    device = torch.device(device)
    key = device.type
    if key in _picked:
        return _picked[key]
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        got = (
            (torch.bfloat16, "the GPU supports bf16")
            if ok
            else (torch.float16, "this GPU has no bf16: float16 products, with a gradient scaler in training")
        )
    elif device.type == "cpu":
        units = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16")) if flag in cpu_flags()]
        if not units:
            got = (torch.float32, "this CPU has no bf16 matrix instructions")
        else:
            speed = matmul_flops(torch.bfloat16, sizes=(768,), seconds=0.02) / matmul_flops(
                torch.float32, sizes=(768,), seconds=0.02
            )
            got = (
                (torch.bfloat16, f"{units[0]}: a bf16 product runs {speed:.1f}x fp32 here")
                if speed >= 1.5
                else (torch.float32, f"{units[0]}, but a bf16 product runs only {speed:.1f}x fp32 here")
            )
    else:
        got = (torch.float32, f"bf16 is not used on {device.type}")
    _picked[key] = got
    return got


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu", say: bool = True) -> torch.dtype:
    """'float32' / 'bfloat16' / 'auto' (or a torch dtype, or None = float32) -> the torch dtype. auto is
    `pick_dtype`'s choice, told once per process on stderr (say=False keeps it quiet)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "float32"):
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float16":
        return torch.float16
    if name != "auto":
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    first = torch.device(device).type not in _picked
    dtype, why = pick_dtype(device)
    if say and first:
        print(f"dtype auto: {str(dtype).removeprefix('torch.')} ({why})", file=sys.stderr)
    return dtype


def use_device(device: str | torch.device) -> torch.device:
    """Settings a device wants before work starts on it: on CUDA, TF32 for fp32 products and convolutions (10-bit
    mantissa products, fp32 sums: what every training recipe runs fp32 with on Ampere and later)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def to_device(t, device: torch.device):
    """A batch tensor onto `device`: through pinned host memory and an asynchronous copy for a GPU. Anything else
    with a `to` (nn.loss.TeacherTargets) moves itself."""
    if not isinstance(t, torch.Tensor):
        return t.to(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def grad_scaler(dtype: torch.dtype, device: str | torch.device = "cpu"):
    """A gradient scaler for float16 training (its range would underflow small gradients), else None."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def autocast(dtype: torch.dtype, device: str | torch.device = "cpu"):
    """Mixed precision for training: products in `dtype` under torch.autocast, weights (and the optimizer)
    in fp32; a no-op context for float32."""
    from contextlib import nullcontext

    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
