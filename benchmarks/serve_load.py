"""Load test for `lmforge serve`: what continuous batching buys, and whether the server holds up.

Starts `lmforge serve` (SmolLM2-135M-Instruct from the packaged GGUF) as a separate process on 127.0.0.1 and
drives it with streaming chat clients (asyncio + httpx) whose prompts are real questions from the packaged
chatterbot-corpus:

  1. sequential: N requests one after another (each runs alone in the batch);
  2. concurrent: the same N requests at once (they share decode steps);
  3. soak: C clients for S seconds, each sending its next request as soon as the last one ends.

Printed: aggregate generated tokens/s and p50/p95 time to first token for 1 and 2 and their ratio (the goal is
>= 4x at N=16); for 3 the count of requests by status (goal: no 5xx) and the server's resident memory after
warm-up and at the end (goal: within 10%). Each reply generates exactly --max-tokens tokens (`ignore_eos`), so
the modes do the same work. Loopback only; bounded in count and time.

    python benchmarks/serve_load.py [--n 16] [--clients 32] [--seconds 60] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx

MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def questions() -> list[str]:
    from lmforge.data.chat import chatterbot_conversations

    qs = [turns[0] for _, turns in chatterbot_conversations() if turns]
    random.Random(0).shuffle(qs)
    return qs


async def one(client: httpx.AsyncClient, url: str, question: str, max_tokens: int, seed: int) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0.7, "seed": seed, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "ttft": None, "tokens": 0, "seconds": time.perf_counter() - t0}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 500, "ttft": None, "tokens": 0, "seconds": time.perf_counter() - t0}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - t0
    return {"status": 200, "ttft": first, "tokens": tokens, "seconds": time.perf_counter() - t0}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def sequential(url: str, qs: list[str], max_tokens: int) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(timeout=600) as c:
        t0 = time.perf_counter()
        res = [await one(c, url, q, max_tokens, i) for i, q in enumerate(qs)]
        return res, time.perf_counter() - t0


async def concurrent(url: str, qs: list[str], max_tokens: int) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(qs))) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(c, url, q, max_tokens, i) for i, q in enumerate(qs)))
        return list(res), time.perf_counter() - t0


async def soak(url: str, qs: list[str], clients: int, seconds: float, max_tokens: int) -> list[dict]:
    end = time.perf_counter() + seconds
    out: list[dict] = []

    async def client_loop(k: int, c: httpx.AsyncClient) -> None:
        i = k
        while time.perf_counter() < end:
            try:
                out.append(await one(c, url, qs[i % len(qs)], max_tokens, i))
            except httpx.HTTPError as e:
                out.append({"status": f"client error: {type(e).__name__}", "ttft": None, "tokens": 0})
            i += clients

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(client_loop(k, c) for k in range(clients)))
    return out


def summary(name: str, res: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in res)
    ttft = [r["ttft"] for r in res]
    return {"mode": name, "requests": len(res), "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="requests for the sequential and concurrent rounds")
    ap.add_argument("--clients", type=int, default=32, help="clients in the soak round")
    ap.add_argument("--seconds", type=float, default=60, help="length of the soak round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    a = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")  # (a pipe nobody reads could fill up and stall the server)
    server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", MODEL, "--port", str(port),
                               "--max-batch", str(a.max_batch), "--max-queue", "128"],
                              stdout=log, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.time() + 120
        while True:
            try:
                httpx.get(url + "/health").raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise SystemExit("the server did not start:\n" + log.read()) from None
                time.sleep(0.2)
        qs = questions()
        asyncio.run(concurrent(url, qs[: a.n], a.max_tokens))  # warm-up: allocator, packed weights, cache growth
        seq_res, seq_wall = asyncio.run(sequential(url, qs[: a.n], a.max_tokens))
        con_res, con_wall = asyncio.run(concurrent(url, qs[: a.n], a.max_tokens))
        asyncio.run(soak(url, qs, a.clients, 10, a.max_tokens))  # warm-up at the soak's batch size
        rss_warm = rss_mb(server.pid)
        t0 = time.perf_counter()
        soak_res = asyncio.run(soak(url, qs, a.clients, a.seconds, a.max_tokens))
        soak_wall = time.perf_counter() - t0
        rss_end = rss_mb(server.pid)
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)

    rows = [summary(f"sequential x{a.n}", seq_res, seq_wall), summary(f"concurrent x{a.n}", con_res, con_wall),
            summary(f"soak {a.clients} clients", soak_res, soak_wall)]
    print(f"\nlmforge serve, {MODEL}, {a.max_tokens} tokens per reply, max-batch {a.max_batch}, "
          f"torch threads {os.cpu_count()} cores\n")
    print(f"{'mode':<22}{'requests':>9}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p95':>10}")
    for r in rows:
        print(f"{r['mode']:<22}{r['requests']:>9}{r['tokens']:>8}{r['seconds']:>9.1f}{r['tok_s']:>8.1f}"
              f"{r['ttft_p50']:>9.2f}s{r['ttft_p95']:>9.2f}s")
    ratio = rows[1]["tok_s"] / rows[0]["tok_s"]
    print(f"\nconcurrent / sequential tokens/s: {ratio:.2f}x (goal >= 4x)")
    statuses: dict = {}
    for r in soak_res:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    errors = sum(n for s, n in statuses.items() if not (isinstance(s, int) and s < 500))
    print(f"soak statuses: {statuses}  -> 5xx/failed: {errors} (goal 0)")
    drift = (rss_end - rss_warm) / rss_warm * 100
    print(f"server RSS after warm-up {rss_warm:.0f} MiB, at the end {rss_end:.0f} MiB ({drift:+.1f}%, goal within "
          "10%)")
    steps = [line for line in metrics.splitlines() if line.startswith(("lmforge_decode_steps_total",
                                                                       "lmforge_decode_rows_total"))]
    if len(steps) == 2:
        s, rws = (float(x.split()[-1]) for x in steps)
        print(f"mean decode batch over the run: {rws / s:.1f} rows")


if __name__ == "__main__":
    main()
