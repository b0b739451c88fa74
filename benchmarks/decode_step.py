"""Where a batch-1 decoding step of the packaged SmolLM2 GGUF goes (int4, `--quantize auto`), against the floor
that PyTorch's own kernels set, and llama.cpp's whole step on the same file.

1. Each product of the step alone, at its shape, on the kernels lmforge calls (the int4 CPU kernel for the
   blocks' Linear layers, the int8 one for the tied head), and bf16 / fp32 products of the same shapes beside
   them; the effective bandwidth is the weight's bytes over the call's time. The sum over the step's 30 blocks
   and the head is the floor: what a step costs with no other work at all.
2. The step as it runs (`generate_ids`, 128 new tokens after a warm-up), its time per token, and the PyTorch
   profiler's count of operations per step.
3. `llama-bench -n 128` on the same GGUF when `make llama-cpp` has built it.

    python benchmarks/decode_step.py
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_cpp  # noqa: E402
from common import machine_header, table  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
SHAPES = (("q, k, v", 576, 960), ("o", 576, 576), ("gate, up", 576, 3072), ("down", 1536, 576))
HEAD = (576, 49152)
LAYERS = 30


def timed(f, n: int = 300) -> float:
    for _ in range(20):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def kernels() -> tuple[list[dict], float]:
    rows, floor = [], 0.0
    for name, k, n in (*SHAPES, ("head (int8)", *HEAD)):
        x = torch.randn(1, k).to(torch.bfloat16)
        if name.startswith("head"):
            w8 = torch.randint(-127, 127, (n, k), dtype=torch.int8)
            s8 = torch.rand(n).to(torch.bfloat16)
            t = timed(partial(torch.ops.aten._weight_int8pack_mm, x, w8, s8), 100)
            nbytes = n * k
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (n, k), dtype=torch.int32), 1
            )
            sz = torch.randn(k // 32, n, 2).to(torch.bfloat16)
            t = timed(partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed, 32, sz))
            nbytes = n * k // 2 + (k // 32) * n * 4
        wb, wf = torch.randn(n, k).to(torch.bfloat16), torch.randn(n, k)
        tb = timed(partial(torch.nn.functional.linear, x, wb), 100)
        tf = timed(partial(torch.nn.functional.linear, x.float(), wf), 100)
        calls = 1 if name.startswith("head") else LAYERS
        floor += calls * t
        rows.append(
            {
                "product": f"{name} {k}x{n}",
                "us": t * 1e6,
                "gbs": nbytes / t / 1e9,
                "bf16": tb * 1e6,
                "fp32": tf * 1e6,
                "calls": calls,
            }
        )
    return rows, floor


def step() -> tuple[float, dict[str, int]]:
    from torch.profiler import profile

    from lmforge.assets import model_file
    from lmforge.generate import SamplingParams, generate_ids
    from lmforge.interop import load_pretrained
    from lmforge.runtime import tune_allocator

    tune_allocator()
    model, tok = load_pretrained(model_file("smollm2-135m-instruct"), quantize="auto")
    rows = [tok.encode(PROMPT)]
    params = SamplingParams(max_new_tokens=128, temperature=0)
    sum(1 for _ in generate_ids(model, rows, params))
    best = min(timed(lambda: sum(1 for _ in generate_ids(model, rows, params)), 1) for _ in range(3)) / 128
    with profile() as pr:
        sum(1 for _ in generate_ids(model, rows, SamplingParams(max_new_tokens=33, temperature=0)))
    counts = {e.key: e.count for e in pr.key_averages()}
    per_step = {k: round(v / 32) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:8]}
    return best, {"all aten ops": round(sum(v for k, v in counts.items() if k.startswith("aten::")) / 32), **per_step}


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    print(machine_header(), flush=True)
    rows, floor = kernels()
    print(
        table(
            rows,
            [
                ("product", "product (in x out)", "s"),
                ("us", "lmforge's kernel, us", ".1f"),
                ("gbs", "GB/s", ".1f"),
                ("bf16", "bf16 matmul, us", ".1f"),
                ("fp32", "fp32 matmul, us", ".1f"),
                ("calls", "calls a step", "d"),
            ],
        )
    )
    t, counts = step()
    print(f"\nfloor (the products alone, {LAYERS} blocks + head): {floor * 1e3:.2f} ms a token")
    print(f"lmforge's step as it runs: {t * 1e3:.2f} ms a token ({floor / t:.0%} of it in the products)")
    print(
        "aten calls a step, nested ones included (PyTorch profiler): "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    from lmforge.assets import model_file

    for variant, bin_dir in llama_cpp.builds().items():
        r = llama_cpp.bench(bin_dir, model_file("smollm2-135m-instruct"), 128)
        if "tg" in r:
            print(f"llama.cpp {variant} (llama-bench tg128): {1e3 / r['tg']:.2f} ms a token ({r['tg']:.1f} tok/s)")


if __name__ == "__main__":
    main()
