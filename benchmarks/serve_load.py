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

When a llama.cpp build is present (`make llama-cpp`, see llama_cpp.py), the same rounds then run against
llama.cpp's `llama-server` on the same GGUF file (-np = --max-batch slots, the same threads), and the ratios are
printed row by row.

    python benchmarks/serve_load.py [--n 16] [--clients 32] [--seconds 60] [--max-tokens 64] [--max-batch 32]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header  # noqa: E402

MODEL = "smollm2-135m-instruct"
RETRIED: dict[str, int] = {}  # server url -> requests sent again after a closed kept-alive connection


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
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    for attempt in (1, 2):
        try:
            return await _one(client, url, body, t0)
        except httpx.RemoteProtocolError as e:
            # a kept-alive connection the server had closed (llama-server closes some after a streamed reply
            # without saying so): nothing was answered, so send it again once on a fresh connection, as
            # clients with retries do; counted in the result
            if attempt == 2 or "without sending a response" not in str(e):
                return {
                    "status": f"client error: {type(e).__name__}: {e}",
                    "ttft": None,
                    "tokens": 0,
                    "seconds": time.perf_counter() - t0,
                }
            RETRIED[url] = RETRIED.get(url, 0) + 1
        except httpx.HTTPError as e:  # counted, not raised: a round reports what failed
            return {
                "status": f"client error: {type(e).__name__}: {e}",
                "ttft": None,
                "tokens": 0,
                "seconds": time.perf_counter() - t0,
            }


async def _one(client: httpx.AsyncClient, url: str, body: dict, t0: float) -> dict:
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
    return {
        "mode": name,
        "requests": len(res),
        "tokens": tokens,
        "seconds": wall,
        "tok_s": tokens / wall,
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p95": pct(ttft, 0.95),
    }


def start(cmd: list[str], url: str, env: dict | None = None) -> tuple[subprocess.Popen, object]:
    """A server process (its output to a temporary file: a pipe nobody reads could fill up and stall it), once
    its /health answers 200."""
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 180
    while True:
        try:
            httpx.get(url + "/health").raise_for_status()
            return server, log
        except httpx.HTTPError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                log.seek(0)
                raise SystemExit(f"{cmd[0]} did not start:\n" + log.read()[-3000:]) from None
            time.sleep(0.2)


def rounds(url: str, pid: int, a: argparse.Namespace) -> dict:
    """The three rounds (after warm-ups) against the server at url: their summaries, the soak's results and the
    server's RSS after the soak's warm-up and at its end."""
    qs = questions()
    asyncio.run(concurrent(url, qs[: a.n], a.max_tokens))  # warm-up: allocator, packed weights, cache growth
    seq_res, seq_wall = asyncio.run(sequential(url, qs[: a.n], a.max_tokens))
    con_res, con_wall = asyncio.run(concurrent(url, qs[: a.n], a.max_tokens))
    asyncio.run(soak(url, qs, a.clients, 10, a.max_tokens))  # warm-up at the soak's batch size
    rss_warm = rss_mb(pid)
    t0 = time.perf_counter()
    soak_res = asyncio.run(soak(url, qs, a.clients, a.seconds, a.max_tokens))
    soak_wall = time.perf_counter() - t0
    rows = [
        summary(f"sequential x{a.n}", seq_res, seq_wall),
        summary(f"concurrent x{a.n}", con_res, con_wall),
        summary(f"soak {a.clients} clients", soak_res, soak_wall),
    ]
    return {"rows": rows, "seq": seq_res, "con": con_res, "soak": soak_res, "rss": (rss_warm, rss_mb(pid))}


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n")
    print(f"{'mode':<22}{'requests':>9}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p95':>10}")
    for r in rows:
        print(
            f"{r['mode']:<22}{r['requests']:>9}{r['tokens']:>8}{r['seconds']:>9.1f}{r['tok_s']:>8.1f}"
            f"{r['ttft_p50']:>9.2f}s{r['ttft_p95']:>9.2f}s"
        )


def llama_server(a: argparse.Namespace) -> tuple[str, dict] | None:
    """The same rounds against llama.cpp's llama-server on the same GGUF (-np max-batch slots, as many threads
    as torch uses), with the fastest build present that runs here; None without a build."""
    import llama_cpp
    from lmforge.assets import model_file

    path = model_file(MODEL)
    best = llama_cpp.fastest(path)
    if best is None:
        return None
    variant = best[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(llama_cpp.builds()[variant] / "llama-server"),
        "-m",
        str(path),
        "--port",
        str(port),
        "-np",
        str(a.max_batch),
        "-c",
        str(512 * a.max_batch),
        "-t",
        str(os.cpu_count()),
    ]
    server, log = start(cmd, url)
    try:
        result = rounds(url, server.pid, a)
    finally:
        alive = server.poll() is None
        server.terminate()
        server.wait(timeout=30)
    failed = [r for row in ("seq", "con") for r in result[row] if r["status"] != 200] + [
        r for r in result["soak"] if r["status"] != 200
    ]
    print(f"llama-server: {RETRIED.get(url, 0)} requests sent again after a closed kept-alive connection")
    if failed or not alive:
        log.seek(0)
        print(
            f"llama-server: {len(failed)} failed requests (first: {failed[0]['status'] if failed else '-'}), "
            f"{'still running' if alive else 'exited'}; its log ends:\n" + log.read()[-2000:]
        )
    return variant, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="requests for the sequential and concurrent rounds")
    ap.add_argument("--clients", type=int, default=32, help="clients in the soak round")
    ap.add_argument("--seconds", type=float, default=60, help="length of the soak round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument(
        "--quantize",
        default="auto",
        help="lmforge serve --quantize (auto: the file's own 4-bit weights on the int4 kernel)",
    )
    ap.add_argument("--no-peer", action="store_true", help="skip llama-server even when a build is present")
    a = ap.parse_args()
    print(machine_header(), flush=True)  # (the CPU and its peaks, measured now: every table starts with them)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server, _ = start(
        [
            sys.executable,
            "-m",
            "lmforge.cli",
            "serve",
            "--model",
            MODEL,
            "--port",
            str(port),
            "--max-batch",
            str(a.max_batch),
            "--max-queue",
            "128",
            "--quantize",
            a.quantize,
        ],
        url,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        ours = rounds(url, server.pid, a)
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)

    rows = ours["rows"]
    print_rows(
        f"lmforge serve --quantize {a.quantize}, {MODEL}, {a.max_tokens} tokens per reply, max-batch "
        f"{a.max_batch}, torch threads {os.cpu_count()} cores",
        rows,
    )
    ratio = rows[1]["tok_s"] / rows[0]["tok_s"]
    print(f"\nconcurrent / sequential tokens/s: {ratio:.2f}x (goal >= 4x)")
    statuses: dict = {}
    for r in ours["soak"]:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    errors = sum(n for s, n in statuses.items() if not (isinstance(s, int) and s < 500))
    print(
        f"soak statuses: {statuses}  -> 5xx/failed: {errors} (goal 0); requests sent again after a closed "
        f"kept-alive connection: {RETRIED.get(url, 0)}"
    )
    rss_warm, rss_end = ours["rss"]
    drift = (rss_end - rss_warm) / rss_warm * 100
    print(f"server RSS after warm-up {rss_warm:.0f} MiB, at the end {rss_end:.0f} MiB ({drift:+.1f}%, goal within 10%)")
    steps = [
        line
        for line in metrics.splitlines()
        if line.startswith(("lmforge_decode_steps_total", "lmforge_decode_rows_total"))
    ]
    if len(steps) == 2:
        s, rws = (float(x.split()[-1]) for x in steps)
        print(f"mean decode batch over the run: {rws / s:.1f} rows", flush=True)
    peer = None if a.no_peer else llama_server(a)
    if peer is not None:
        variant, theirs = peer
        print_rows(
            f"llama.cpp llama-server ({variant} build), the same GGUF, -np {a.max_batch}, -t {os.cpu_count()}",
            theirs["rows"],
        )
        print()
        for mine, other in zip(rows, theirs["rows"]):
            print(f"{mine['mode']:<22} lmforge / llama-server tokens/s: {mine['tok_s'] / other['tok_s']:.2f}x")
        print(f"llama-server RSS after warm-up {theirs['rss'][0]:.0f} MiB, at the end {theirs['rss'][1]:.0f} MiB")
    elif not a.no_peer:
        print("\n(no llama.cpp build: `make llama-cpp` adds the llama-server peer)")


if __name__ == "__main__":
    main()
