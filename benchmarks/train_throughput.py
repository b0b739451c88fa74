"""Training throughput: lmforge against transformers' GPT2LMHeadModel and LlamaForCausalLM on the same shape.

Shape (issue #2): 6 layers, width 384, 6 heads, context 256, vocab 8192, batch 8, fp32, one process.
A step is forward + backward + AdamW step. Each system runs in its own fresh process: 2 warm-up steps, then
7 timed steps, with the fp32 matmul peak measured in the same process right before and after (the best of the
two is the MFU denominator, so a machine whose speed drifts is not read as a faster or slower model). Systems
alternate over ROUNDS rounds and the table shows each one's median. FLOPs per token are counted the same way for
all (lmforge.config.DecoderConfig.flops_per_token: 6 x matmul weights + attention scores and values).

    python benchmarks/train_throughput.py            # prints the table
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import matmul_peak_flops, median_time, run_worker, table  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "3"))

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
        hf = transformers.GPT2Config(vocab_size=8192, n_positions=SEQ, n_embd=384, n_layer=6, n_head=6,
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        model = transformers.GPT2LMHeadModel(hf)
    else:
        hf = transformers.LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                      num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=SEQ,
                                      tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(hf)
    return model, cfg, False


def worker(system: str, family: str, tuned: str) -> None:
    if tuned == "1":
        from lmforge.runtime import tune_allocator

        tune_allocator()
    model, cfg, ours = build(system, family)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 8192, (BATCH, SEQ + 1))
    inp, tgt = x[:, :-1], x[:, 1:]

    def step():
        loss = model(inp, labels=tgt, loss_only=True).loss if ours else model(input_ids=inp, labels=inp).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    peak = matmul_peak_flops(seconds=0.5)
    t = median_time(step, warmup=1, repeats=7)
    peak = max(peak, matmul_peak_flops(seconds=0.5))
    print(json.dumps({"seconds": t, "flops_per_token": cfg.flops_per_token(SEQ), "peak": peak}))


def main() -> None:
    import statistics

    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, {ROUNDS} rounds, batch {BATCH} x {SEQ}")
    systems = [("lmforge", "1"), ("transformers", "0"), ("transformers", "1")]
    rows = []
    for family in ("gpt2", "llama"):
        results: dict[tuple[str, str], list[dict]] = {s: [] for s in systems}
        for _ in range(ROUNDS):
            for system in systems:
                results[system].append(run_worker(__file__, system[0], family, system[1]))
        group = []
        for (system, tuned), rs in results.items():
            tps = statistics.median(BATCH * SEQ / r["seconds"] for r in rs)
            mfu = statistics.median(BATCH * SEQ / r["seconds"] * r["flops_per_token"] / r["peak"] for r in rs)
            name = system if system == "lmforge" or tuned == "0" else "transformers + lmforge allocator"
            group.append({"model": family, "system": name, "tok_s": tps, "step_ms": BATCH * SEQ / tps * 1e3,
                          "gflops": tps * rs[0]["flops_per_token"] / 1e9, "mfu": mfu,
                          "peak": statistics.median(r["peak"] for r in rs) / 1e9})
        for row in group:
            row["ratio"] = group[0]["tok_s"] / row["tok_s"]
        rows += group
    print(table(rows, [("model", "model", ""), ("system", "system", ""), ("step_ms", "step ms", ".0f"),
                       ("tok_s", "tokens/s", ",.0f"), ("gflops", "GFLOP/s", ".1f"), ("peak", "peak GFLOP/s", ".0f"),
                       ("mfu", "MFU", ".1%"), ("ratio", "lmforge speed-up", ".2f")]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
