"""lmforge on one GPU, in one call of at most 8 minutes: training MFU, decoding tokens/s, the server under 64 clients.

    train    `lmforge.train.loop.pretrain` itself (tokenizer, shards, the loop with its pinned-memory batches,
             TF32, autocast, torch.compile): GPT-2 124M on the packaged Shakespeare, bf16 (float16 with a gradient
             scaler on a GPU without bf16), 16 x 1024 tokens a step; tok/s and MFU are the loop's own log records
             after the compile warm-up, MFU against the matmul peak of the dtype measured on this GPU
    decode   `generate_ids` on the packaged SmolLM2-135M-Instruct (bf16 weights), greedy, 128 new tokens, batch 1,
             8 and 64 (and compiled at batch 1)
    serve    `lmforge serve --device cuda` as its own process, 64 clients streaming completions at once:
             aggregate tokens/s and the mean time to first token

    python benchmarks/gpu.py             # on a machine with a CUDA GPU
    python benchmarks/gpu.py --dry-run   # every code path at toy size on this CPU (a test runs it)

The table starts with the machine: the GPU, its measured bf16 / fp32 (TF32) matmul peaks and read bandwidth, and the
CPU line every lmforge table prints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, serve_process, table  # noqa: E402

PROMPT = "The history of the city begins"


def gpu_header(device: torch.device) -> str:
    from lmforge.runtime import matmul_flops

    if device.type != "cuda":
        return "no GPU: dry run on the CPU (toy sizes; the figures say nothing about speed)"
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)
    x.sum()
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        torch.cuda.synchronize()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0))
    del x
    torch.backends.cuda.matmul.allow_tf32 = True
    return (
        f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}; measured peaks: bf16 matmul "
        f"{matmul_flops(torch.bfloat16, device) / 1e12:,.0f} TFLOP/s, fp32 (TF32) matmul "
        f"{matmul_flops(torch.float32, device) / 1e12:,.0f} TFLOP/s, read {best / 1e9:,.0f} GB/s"
    )


def bench_train(device: torch.device, dry: bool, work: Path, compile: bool) -> dict:
    from lmforge.assets import corpus_files
    from lmforge.config import load_run_config
    from lmforge.runtime import pick_dtype
    from lmforge.train.loop import pretrain

    dtype = str(pick_dtype(device)[0]).removeprefix("torch.") if device.type == "cuda" else "float16"
    model = (
        {"preset": "gpt2-124m", "dropout": 0.0}
        if not dry
        else {"preset": "gpt2-124m", "n_layer": 2, "n_head": 2, "d_model": 64, "max_seq_len": 64, "dropout": 0.0}
    )
    steps, bs, seq = (60, 16, 1024) if not dry else (6, 4, 64)
    # the dry run reads one play (its tokenizer and shards in seconds, not the minute and a half the corpus takes)
    sources = ["shakespeare"] if not dry else [str(corpus_files("shakespeare")[0])]
    cfg = load_run_config(
        base={
            "model": model,
            "data": {"sources": sources, "vocab_size": 50257 if not dry else 512, "val_fraction": 0.05},
            "train": {
                "steps": steps,
                "batch_size": bs,
                "seq_len": seq,
                "lr": 6e-4,
                "warmup_steps": 10 if not dry else 1,
                "eval_every": 0,
                "eval_batches": 2,
                "ckpt_every": steps // 2,
                "log_every": 5 if not dry else 2,
                "device": str(device),
                "dtype": dtype,
                "compile": compile,
                "seed": 0,
                # the dry run's MFU against a stated 1 GFLOP/s: measuring a CPU's float16 peak (no float16 units:
                # ~1 GFLOP/s on 2048-wide products) would take most of the run
                **({"peak_tflops": 0.001} if dry else {}),
            },
        }
    )
    t0 = time.perf_counter()
    pretrain(cfg, work / "train", progress=False)
    wall = time.perf_counter() - t0
    recs = [json.loads(ln) for ln in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "split" not in r]
    late = logged[len(logged) // 2 :] or logged  # after the compile warm-up
    return {
        "dtype": dtype,
        "tok_s": statistics.median(r["tok_per_s"] for r in late),
        "mfu": statistics.median(r["mfu"] for r in late),
        "loss": logged[-1]["loss"],
        "wall": wall,
    }


def bench_decode(device: torch.device, dry: bool) -> list[dict]:
    from lmforge.generate import SamplingParams, generate_ids
    from lmforge.interop import load_pretrained

    model, tok = load_pretrained(
        "smollm2-135m-instruct", device=device, quantize="none", dtype="bfloat16" if device.type == "cuda" else None
    )
    new = 128 if not dry else 4
    prompt = tok.encode(PROMPT)
    rows = []
    # (the dry run leaves out compiled decoding: compiling a 30-layer model takes a minute on a CPU, and the
    # compiled path has its own tests)
    for batch, compile in [(1, False), (8, False), (64, False), (1, True)] if not dry else [(1, False), (4, False)]:
        params = SamplingParams(max_new_tokens=new, temperature=0.0)
        prompts = [prompt] * batch

        def run(prompts=prompts, params=params, compile=compile):
            n = sum(1 for _ in generate_ids(model, prompts, params, compile=compile))
            if device.type == "cuda":
                torch.cuda.synchronize()
            return n

        run()  # warm-up (and the compile)
        t0 = time.perf_counter()
        steps = run()
        sec = time.perf_counter() - t0
        rows.append({"batch": batch, "compiled": compile, "tok_s": batch * steps / sec, "ms_step": 1e3 * sec / steps})
    return rows


def bench_serve(device: torch.device, dry: bool) -> dict:
    import httpx

    clients, max_tokens = (64, 128) if not dry else (4, 4)
    with serve_process(
        "--model",
        "smollm2-135m-instruct",
        "--device",
        str(device),
        "--quantize",
        "none",
        "--dtype",
        "bfloat16" if device.type == "cuda" else "float32",
        "--max-batch",
        str(clients),
    ) as (url, _proc):
        body = {
            "model": "smollm2-135m-instruct",
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        httpx.post(url + "/v1/completions", json=body, timeout=600).raise_for_status()  # warm-up
        results: list[dict] = [{} for _ in range(clients)]

        def client(i: int) -> None:
            t0 = time.perf_counter()
            first, n = None, 0
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=600) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        piece = json.loads(line[6:])["choices"][0].get("text", "")
                        if piece and first is None:
                            first = time.perf_counter() - t0
                        n += 1 if piece else 0
            results[i] = {"ttft": first or 0.0, "pieces": n}

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sec = time.perf_counter() - t0
        metrics = httpx.get(url + "/metrics", timeout=30).text
    tokens = clients * max_tokens
    return {
        "clients": clients,
        "tok_s": tokens / sec,
        "ttft": statistics.mean(r["ttft"] for r in results),
        "ok": sum(1 for r in results if r.get("pieces")),
        "metrics_lines": len(metrics.splitlines()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: runs every code path")
    ap.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    a = ap.parse_args()
    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA GPU here; run it on a GPU machine, or give --dry-run")
    device = torch.device("cuda") if not a.dry_run else torch.device("cpu")
    print(gpu_header(device))
    print(machine_header())
    with tempfile.TemporaryDirectory(prefix="lmforge-gpu-") as work:
        t0 = time.perf_counter()
        train = bench_train(device, a.dry_run, Path(work), compile=not a.no_compile)
        decode = bench_decode(device, a.dry_run)
        serve = bench_serve(device, a.dry_run)
        total = time.perf_counter() - t0
    print(
        "\ntraining: GPT-2 124M" + (" (toy: 2 x 64)" if a.dry_run else "") + f", {train['dtype']}, compiled "
        f"{not a.no_compile}"
    )
    print(
        table(
            [train],
            [
                ("tok_s", "tokens/s", ",.0f"),
                ("mfu", "MFU", ".1%"),
                ("loss", "last loss", ".3f"),
                ("wall", "wall s (all of pretrain)", ".0f"),
            ],
        )
    )
    print("\ndecoding: SmolLM2-135M-Instruct, greedy")
    print(
        table(
            decode,
            [
                ("batch", "batch", "d"),
                ("compiled", "compiled", ""),
                ("tok_s", "tokens/s", ",.0f"),
                ("ms_step", "ms / step", ".2f"),
            ],
        )
    )
    print(f"\nserver: {serve['clients']} clients streaming at once")
    print(
        table(
            [serve],
            [
                ("clients", "clients", "d"),
                ("ok", "answered", "d"),
                ("tok_s", "tokens/s", ",.0f"),
                ("ttft", "mean TTFT s", ".3f"),
            ],
        )
    )
    print(f"\ntotal {total:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"train": train, "decode": decode, "serve": serve, "seconds": total}))


if __name__ == "__main__":
    main()
