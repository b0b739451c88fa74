"""Chunked prefill in `lmforge serve` (`--prefill-chunk`): does a long prompt stall the streams already running?

`lmforge serve --model smollm2-135m-instruct --max-batch 2 --cache-mb 0` as its own process, one server at a
time: without chunking (`--prefill-chunk 0`) and with it (256, the default). Each round: --streams clients
stream completions of --max-tokens tokens (greedy, `ignore_eos`); once each has streamed for --settle seconds,
one more client sends a prompt of --prompt-tokens tokens (a packaged Shakespeare play) for 8 tokens. Printed per
server and round: the streams' usual gap between two tokens (the median before the long prompt arrives), their
worst gap from its arrival until its first token (goal: <= 2x the usual), and the long prompt's time to first
token; then a last round with no long prompt gives the streams' own worst gap over a window as long (the
jitter of the machine, which no scheduling removes). In the first round the server's KV cache grows to the long
prompt's length while it runs (every row of the slot cache is reallocated at each doubling, a pause of its own);
in the later ones it is that long already.

    python benchmarks/chunked_prefill.py [--streams 1] [--prompt-tokens 4000] [--max-tokens 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, table  # noqa: E402

MODEL = "smollm2-135m-instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=1, help="streams running when the long prompt arrives")
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--max-tokens", type=int, default=1000, help="tokens each running stream asks for")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds the streams run before the long prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=256, help="--prefill-chunk of the chunked server")
    a = ap.parse_args()

    import httpx

    from lmforge.assets import corpus_files
    from lmforge.interop import load_pretrained
    from serve_load import free_port, start

    print(machine_header())
    tok = load_pretrained(MODEL)[1]
    text = corpus_files("shakespeare")[1].read_text(encoding="utf-8")
    long = tok.decode(tok.encode(text)[: a.prompt_tokens])

    def stream(url: str, prompt: str, max_tokens: int, times: list[float]) -> None:
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    times.append(time.perf_counter())

    rows = []
    for label, chunk in (("--prefill-chunk 0", 0), (f"--prefill-chunk {a.chunk}", a.chunk)):
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
                str(a.streams + 1),
                "--cache-mb",
                "0",
                "--prefill-chunk",
                str(chunk),
            ],
            url,
        )
        try:
            stream(url, "Hello", 8, [])  # warm-up
            ttfts = []
            for k in range(a.rounds + 1):
                control = k == a.rounds  # the last round sends no long prompt: the stream's own jitter
                times: list[list[float]] = [[] for _ in range(a.streams)]
                threads = [
                    threading.Thread(target=stream, args=(url, f"Story {i}: Once upon a time", a.max_tokens, times[i]))
                    for i in range(a.streams)
                ]
                for t in threads:
                    t.start()
                while min(len(t) for t in times) < 5 or time.perf_counter() - min(t[0] for t in times) < a.settle:
                    time.sleep(0.01)
                sent = time.perf_counter()
                first: list[float] = []
                if control:  # the window the long prompts took, on a stream left alone
                    first.append(sent + statistics.median(ttfts))
                else:
                    stream(url, long, 8, first)
                for t in threads:
                    t.join()
                usual, worst = [], []
                for ts in times:
                    gaps = [(y - x, x, y) for x, y in zip(ts, ts[1:])]
                    usual.append(statistics.median(g for g, _, y in gaps if y < sent))
                    # the gaps that overlap the long prompt's reading, from its arrival to its first token (after
                    # it, the two decode together, and a step over a 4,000-token row costs more however it came)
                    worst.append(max((g for g, x, y in gaps if y > sent and x < first[0]), default=float("nan")))
                    if ts[-1] < first[0]:
                        print(
                            f"note: a stream ended {first[0] - ts[-1]:.1f} s before the long prompt's first token;"
                            " raise --max-tokens to cover the whole prefill",
                            file=sys.stderr,
                        )
                ttfts.append(first[0] - sent)
                rows.append(
                    {
                        "label": label,
                        "round": "no long prompt" if control else "first" if k == 0 else f"later ({k + 1})",
                        "usual": 1000 * statistics.median(usual),
                        "worst": 1000 * max(worst),
                        "ratio": max(w / u for w, u in zip(worst, usual)),
                        "ttft": float("nan") if control else first[0] - sent,
                    }
                )
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(
        f"{MODEL}, --quantize auto, {a.streams} stream(s) of {a.max_tokens} tokens running, then a prompt of "
        f"{a.prompt_tokens} tokens; {a.rounds} rounds\n"
    )
    print(
        table(
            rows,
            [
                ("label", "server", ""),
                ("round", "round", ""),
                ("usual", "usual gap ms", ".1f"),
                ("worst", "worst gap ms", ".0f"),
                ("ratio", "worst / usual", ".1f"),
                ("ttft", "long prompt TTFT s", ".2f"),
            ],
        )
    )
    print("\n(goal: worst / usual <= 2 with chunking)")


if __name__ == "__main__":
    main()
