"""Training throughput: lmforge against transformers' GPT2LMHeadModel and LlamaForCausalLM on the same shape,
in fp32 and in bf16 (torch.autocast for both systems: bf16 products, fp32 weights and optimizer).

Shape (issue #2): 6 layers, width 384, 6 heads, context 256, vocab 8192, batch 8, one process.
A step is forward + backward + AdamW step. Each system runs in its own fresh process: 2 warm-up steps, then
7 timed steps, with the matmul peak of the dtype in use measured in the same process right before and after (the
best of the two is the MFU denominator, so a machine whose speed drifts is not read as a faster or slower model;
a bf16 row's MFU is against the bf16 peak). Systems alternate over ROUNDS rounds and the table shows each one's
median. FLOPs per token are counted the same way for all (lmforge.config.DecoderConfig.flops_per_token: 6 x
matmul weights + attention scores and values).

    python benchmarks/train_throughput.py                 # prints the table
    DTYPES=bfloat16 ROUNDS=1 python benchmarks/train_throughput.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, matmul_peak, median_time, run_worker, table  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "3"))
DTYPES = os.environ.get("DTYPES", "float32,bfloat16").split(",")

BATCH, SEQ = 8, 256


def build(system: str, family: str):
    from lmforge.config import model_config

    cfg = model_config(f"bench-{family}")
    torch.manual_seed(0)
    if system == "lmforge":
        from lmforge.models import DecoderLM

        return DecoderLM(cfg), cfg, True
    import transformers

    if family == "gpt2":
        hf = transformers.GPT2Config(
            vocab_size=8192, n_positions=SEQ, n_embd=384, n_layer=6, n_head=6, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
        )
        model = transformers.GPT2LMHeadModel(hf)
    else:
        hf = transformers.LlamaConfig(
            vocab_size=8192,
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=6,
            max_position_embeddings=SEQ,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(hf)
    return model, cfg, False


def worker(system: str, family: str, tuned: str, dtype_name: str = "float32") -> None:
    from contextlib import nullcontext

    if tuned == "1":
        from lmforge.runtime import tune_allocator

        tune_allocator()
    dtype = getattr(torch, dtype_name)
    model, cfg, ours = build(system, family)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 8192, (BATCH, SEQ + 1))
    inp, tgt = x[:, :-1], x[:, 1:]
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step():
        with autocast:
            loss = model(inp, labels=tgt, loss_only=True).loss if ours else model(input_ids=inp, labels=inp).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def peak():
        return max(matmul_peak(dtype, n, seconds=0.25) for n in (1024, 2048))

    step()
    p = peak()
    t = median_time(step, warmup=1, repeats=7)
    p = max(p, peak())
    print(json.dumps({"seconds": t, "flops_per_token": cfg.flops_per_token(SEQ), "peak": p}))


def main() -> None:
    import statistics

    print(machine_header())
    print(f"{ROUNDS} rounds, batch {BATCH} x {SEQ}, dtypes {', '.join(DTYPES)}")
    rows = []
    for family in ("gpt2", "llama"):
        fp32_tps = None
        for dtype in DTYPES:
            # (the allocator variant of transformers only in fp32: it answers whether the allocator is the gap)
            systems = [("lmforge", "1"), ("transformers", "0")] + (
                [("transformers", "1")] if dtype == "float32" else []
            )
            results: dict[tuple[str, str], list[dict]] = {s: [] for s in systems}
            for _ in range(ROUNDS):
                for system in systems:
                    results[system].append(run_worker(__file__, system[0], family, system[1], dtype))
            group = []
            for (system, tuned), rs in results.items():
                tps = statistics.median(BATCH * SEQ / r["seconds"] for r in rs)
                mfu = statistics.median(BATCH * SEQ / r["seconds"] * r["flops_per_token"] / r["peak"] for r in rs)
                name = system if system == "lmforge" or tuned == "0" else "transformers + lmforge allocator"
                group.append(
                    {
                        "model": family,
                        "dtype": {"float32": "fp32", "bfloat16": "bf16"}[dtype],
                        "system": name,
                        "tok_s": tps,
                        "step_ms": BATCH * SEQ / tps * 1e3,
                        "gflops": tps * rs[0]["flops_per_token"] / 1e9,
                        "mfu": mfu,
                        "peak": statistics.median(r["peak"] for r in rs) / 1e9,
                    }
                )
            for row in group:
                row["ratio"] = group[0]["tok_s"] / row["tok_s"]
            if dtype == "float32":
                fp32_tps = group[0]["tok_s"]
            elif fp32_tps is not None:
                group[0]["vs_fp32"] = group[0]["tok_s"] / fp32_tps
            rows += group
    print(
        table(
            rows,
            [
                ("model", "model", ""),
                ("dtype", "dtype", ""),
                ("system", "system", ""),
                ("step_ms", "step ms", ".0f"),
                ("tok_s", "tokens/s", ",.0f"),
                ("gflops", "GFLOP/s", ".1f"),
                ("peak", "peak GFLOP/s (dtype)", ".0f"),
                ("mfu", "MFU", ".1%"),
                ("ratio", "lmforge speed-up", ".2f"),
                ("vs_fp32", "lmforge bf16 / fp32", ".2f"),
            ],
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
