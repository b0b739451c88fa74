"""What constrained decoding costs per token in the serving engine: SmolLM2-135M-Instruct (`--quantize auto`),
greedy, --tokens new tokens per request, at batch 1 (one request at a time) and batch 8 (eight at once), with and
without a JSON schema (an array of at least 1,000 objects of a name and a number, so that no reply ends before
--tokens), alternating the two, --rounds times. Printed: tokens/s both ways and the overhead (goal < 10%), and
the grammar engine's own time per mask.

    python benchmarks/constrained.py [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, table  # noqa: E402

SCHEMA = {
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "n": {"type": "integer", "minimum": 0, "maximum": 9999},
        },
        "required": ["name", "n"],
        "additionalProperties": False,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    from lmforge.data.chat import apply_chat_template
    from lmforge.generate import SamplingParams
    from lmforge.generate.constrain import Constraint
    from lmforge.generate.engine import Engine, Request
    from lmforge.interop import load_pretrained
    from lmforge.runtime import in_own_thread

    print(in_own_thread(machine_header))

    def setup():
        model, tok = load_pretrained("smollm2-135m-instruct", quantize="auto")
        return model, tok, Engine(model, tok, max_batch=8).start()

    model, tok, engine = in_own_thread(setup)
    V, ends = model.config.vocab_size, [tok.eos_id]
    ids = tok.encode(apply_chat_template(tok, [{"role": "user", "content": "List people and numbers as JSON."}]))

    def run(batch: int, constrained: bool) -> float:
        reqs = []
        for _ in range(batch):
            c = Constraint.make(tok, V, ends, json_schema=SCHEMA) if constrained else None
            reqs.append(Request(ids, SamplingParams(a.tokens, temperature=0), end_ids=ends, constraint=c))
        t0 = time.perf_counter()
        done = []
        for r in reqs:
            r.on_event = lambda ev, done=done: done.append(1) if ev.finish_reason else None
        engine.submit(reqs)
        while len(done) < batch:
            time.sleep(0.002)
        sec = time.perf_counter() - t0
        assert all(len(r.completion_ids) == a.tokens for r in reqs), [len(r.completion_ids) for r in reqs]
        return batch * a.tokens / sec

    try:
        run(1, True), run(8, False)  # warm-up
        rows = []
        for batch in (1, 8):
            plain, cons = [], []
            for _ in range(a.rounds):
                plain.append(run(batch, False))
                cons.append(run(batch, True))
            p, c = max(plain), max(cons)
            rows.append({"batch": batch, "plain": p, "constrained": c, "overhead": p / c - 1})
        c = Constraint.make(tok, V, ends, json_schema=SCHEMA)
        t0 = time.perf_counter()
        for _ in range(200):
            c.allowed()
        per_mask = (time.perf_counter() - t0) / 200
    finally:
        engine.close()
    print(f"SmolLM2-135M-Instruct, --quantize auto, greedy, {a.tokens} tokens per request, best of {a.rounds}\n")
    print(
        table(
            rows,
            [
                ("batch", "batch", "d"),
                ("plain", "plain tok/s", ".1f"),
                ("constrained", "json_schema tok/s", ".1f"),
                ("overhead", "overhead", ".1%"),
            ],
        )
    )
    print(f"\none mask (llguidance + unpacking to a bool tensor): {per_mask * 1000:.3f} ms; goal: overhead < 10%")


if __name__ == "__main__":
    main()
