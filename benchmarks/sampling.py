"""Sampling cost per decoding step: the serving engine's batched sampler against the per-row loop it replaced.

Logits of SmolLM2's vocabulary (49,152) for B rows, temperature 0.8, under three filter settings (top-k 50 with
top-p 0.95, top-p 0.95 alone, none). "per-row loop" is the previous way, each row on its own: the top-k mask and
the full-vocabulary sort of top-p, then torch.multinomial; "batched" is `lmforge.generate.sampling.sample`, one
pass for the batch over the candidates only, each row's uniform draw from its own generator. Median of 20 steps
after 3 warm-ups, in one process (the per-step model time for comparison: SmolLM2 at batch 8 takes about 20-27 ms
on 2 cores, benchmarks/RESULTS.md).

    python benchmarks/sampling.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, table  # noqa: E402

V = 49_152


def per_row(logits, temps, top_k, top_p, gens):
    from lmforge.generate.sampling import filter_top_k, filter_top_p

    out = []
    for i in range(logits.size(0)):
        row = logits[i][None] / temps[i]
        if top_k is not None:
            row = filter_top_k(row, top_k)
        if top_p is not None:
            row = filter_top_p(row, top_p)
        out.append(int(torch.multinomial(torch.softmax(row, -1), 1, generator=gens[i])))
    return out


def batched(logits, temps, top_k, top_p, gens):
    from lmforge.generate.sampling import sample

    u = torch.cat([torch.rand(1, generator=g) for g in gens])
    return sample(logits / temps[:, None], top_k, top_p, u).tolist()


def ms(fn, *args) -> float:
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    print(machine_header())
    torch.manual_seed(0)
    rows = []
    for top_k, top_p in [(50, 0.95), (None, 0.95), (None, None)]:
        for B in (1, 8, 16):
            logits = torch.randn(B, V) * 4  # a peaked distribution, as a trained model's is
            temps = torch.full((B,), 0.8)
            gens = [torch.Generator().manual_seed(i) for i in range(B)]
            old, new = ms(per_row, logits, temps, top_k, top_p, gens), ms(batched, logits, temps, top_k, top_p, gens)
            rows.append(
                {"filters": f"top-k {top_k}, top-p {top_p}", "batch": B, "old": old, "new": new, "x": old / new}
            )
    print(
        table(
            rows,
            [
                ("filters", "filters", ""),
                ("batch", "batch", "d"),
                ("old", "per-row loop ms", ".2f"),
                ("new", "batched ms", ".2f"),
                ("x", "speed-up", ".1f"),
            ],
        )
    )


if __name__ == "__main__":
    main()
