"""Decoding speed: lmforge against transformers' `generate`, GPT-2 124M shape with random weights, greedy,
prompt 32 tokens, 128 new tokens, batch 1 and 8, with the weights in fp32 and in bf16 (both systems' models cast
with `.to(torch.bfloat16)`), plus the memory-bandwidth roofline measured in the same run.

Roofline: at batch 1 every new token must read every weight once, so the fastest possible time per token is
(bytes of weights read per token) / (read bandwidth). "% roofline" = that ideal / the measured time per token
(prefill included in the measured time, so the figure is conservative). The bandwidth is measured in the same
process right before and after the decoding runs (a sum over 1 GiB, 7 reads each time): "% roofline" takes the
best single read of the 14, the strictest ceiling; "% of median bw" takes their median, the same statistic as
the decoding time, which is the median of 3 runs after one warm-up. The machine's bandwidth drifts by 20% and
more between minutes, which is why the ceiling is read beside each measurement. Each system runs in its own
fresh process. "lmforge + compile" decodes through torch.compile (`generate_ids(compile=True)`); its warm-up
run holds the compilation.

    python benchmarks/decode.py
    DTYPES=bfloat16 python benchmarks/decode.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, median_time, read_rates, run_worker, table  # noqa: E402

PROMPT, NEW = 32, 128
DTYPES = os.environ.get("DTYPES", "float32,bfloat16").split(",")


def worker(system: str, batch: str, dtype_name: str = "float32") -> None:
    from lmforge.config import model_config

    B, dtype = int(batch), getattr(torch, dtype_name)
    cfg = model_config("gpt2-124m")
    torch.manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (B, PROMPT))
    if system.startswith("lmforge"):
        from lmforge.generate import SamplingParams, generate_ids
        from lmforge.models import DecoderLM
        from lmforge.runtime import tune_allocator

        tune_allocator()
        model = DecoderLM(cfg).eval().to(dtype)
        params = SamplingParams(max_new_tokens=NEW, temperature=0)
        rows = prompt.tolist()

        def run():
            n = sum(1 for _ in generate_ids(model, rows, params, compile=system == "lmforge-compile"))
            assert n == NEW
    else:
        import transformers

        model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().to(dtype)
        mask = torch.ones_like(prompt)

        def run():
            with torch.inference_mode():
                out = model.generate(
                    prompt, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0
                )
            assert out.shape[1] == PROMPT + NEW

    run()  # warm-up (and the compilation)
    bw = read_rates()
    t = median_time(run, warmup=0, repeats=3)
    bw += read_rates()
    # weights read per decoded token: every matmul weight (blocks + LM head) in the dtype
    weight_bytes = dtype.itemsize * (cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model)
    print(
        json.dumps({"seconds": t, "weight_bytes": weight_bytes, "bw_best": max(bw), "bw_median": statistics.median(bw)})
    )


def main() -> None:
    print(machine_header())
    rows = []
    for batch, dtype in [(b, d) for d in DTYPES for b in (1, 8)]:
        group = []
        for system in ("lmforge", "lmforge-compile", "transformers"):
            r = run_worker(__file__, system, str(batch), dtype)
            per_tok = r["seconds"] / NEW
            group.append(
                {
                    "batch": batch,
                    "dtype": {"float32": "fp32", "bfloat16": "bf16"}[dtype],
                    "system": system.replace("-compile", " + compile"),
                    "tok_s": batch * NEW / r["seconds"],
                    "ms_tok": per_tok * 1e3,
                    "bw": r["bw_best"] / 1e9,
                    "bw_med": r["bw_median"] / 1e9,
                    "roofline": r["weight_bytes"] / r["bw_best"] / per_tok if batch == 1 else None,
                    "roofline_med": r["weight_bytes"] / r["bw_median"] / per_tok if batch == 1 else None,
                }
            )
        for row in group:  # each lmforge row against transformers (the group's last row)
            row["ratio"] = row["tok_s"] / group[-1]["tok_s"]
        rows += group
    print(
        table(
            rows,
            [
                ("batch", "batch", "d"),
                ("dtype", "dtype", ""),
                ("system", "system", ""),
                ("ms_tok", "ms / step", ".1f"),
                ("tok_s", "tokens/s", ",.1f"),
                ("bw", "best GB/s", ".1f"),
                ("bw_med", "median GB/s", ".1f"),
                ("roofline", "% roofline", ".0%"),
                ("roofline_med", "% of median bw", ".0%"),
                ("ratio", "x transformers", ".2f"),
            ],
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
