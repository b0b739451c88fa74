"""What batch invariance (lmforge.nn.invariant) costs, and what it buys, in every weight mode.

The packaged SmolLM2-135M-Instruct GGUF decoded greedily, 128 new tokens, batch 1 and 8 (eight different
prompts), in fp32 (dequantized), bf16 (`--dtype bfloat16`), int8 (`--quantize int8`) and int4 (the file's own
Q4_1 blocks, what `--quantize auto` picks): tokens/s with batch invariance off ("off": each kernel as the library
picks it, `lmforge.nn.invariant.set_enabled(False)`) and on (the default), taking turns in one fresh process per
mode, best of 3 runs after a warm-up (the machine's noise between processes, about ±10% here, is larger than what
is measured). With BEFORE_SRC=path/to/an/older/checkout/src the same worker also runs on that tree in its own
process ("before": the code before this mechanism, e.g. a `git worktree` of an earlier commit).

Beside the speed, what a user sees, measured in the same process: whether a greedy reply alone equals the same
prompt's reply among seven others (batch 8), and whether greedy decoding with `--speculative ngram` equals plain
greedy decoding, on issue 35's prompt. The row plans the probe chose for each kernel are printed under the table.

    python benchmarks/batch_invariance.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, table  # noqa: E402

NEW = 128
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three primary colours are",
    "Write a haiku about the moon.",
    "def fibonacci(n):",
    "Explain photosynthesis to a child in two sentences.",
    "List five fruits that are red:",
    "The capital of France is",
    "Translate to Spanish: good morning, my friend.",
]
REPEAT = "Repeat this sentence twice: the quick brown fox jumps over the lazy dog near the river bank."
MODES = ("fp32", "bf16", "int8", "int4")
MODES = tuple(m for m in MODES if m in os.environ.get("MODES", ",".join(MODES)).split(","))


def worker(mode: str, tree: str) -> None:
    """One weight mode in one process: tree "before" (an older checkout, no switch), or "now" with invariance off
    and on taking turns (so that both see the same process, memory and machine state), best of 3 runs each."""
    from lmforge.assets import model_file
    from lmforge.generate import SamplingParams, generate_ids
    from lmforge.generate.speculative import NgramDrafter
    from lmforge.interop import load_pretrained
    from lmforge.runtime import tune_allocator

    tune_allocator()
    invariant = None
    if tree == "now":
        from lmforge.nn import invariant
    model, tok = load_pretrained(
        model_file("smollm2-135m-instruct"),
        quantize={"int8": "int8", "int4": "auto"}.get(mode, "none"),
        dtype="bfloat16" if mode == "bf16" else "float32",
    )
    chat = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=NEW, temperature=0)
    short = SamplingParams(max_new_tokens=64, temperature=0)
    rep = [tok.encode(REPEAT)]
    states = ("off", "on") if invariant else ("before",)
    out = {s: {"mode": mode, "state": s} for s in states}

    def use(state: str) -> None:
        if invariant:
            invariant.set_enabled(state == "on")

    for state in states:  # warm-up (and the probes), then what a user sees
        use(state)
        for B in (1, 8):
            list(generate_ids(model, chat[:B], params))
        alone = [int(t[0]) for t in generate_ids(model, chat[:1], short)]
        among = [int(t[0]) for t in generate_ids(model, chat, short)]
        out[state]["batch_equal"] = alone == among
        plain = [int(t[0]) for t in generate_ids(model, rep, short)]
        spec = [int(t[0]) for t in generate_ids(model, rep, short, draft=NgramDrafter())]
        out[state]["spec_equal"] = plain == spec
    for _ in range(3):
        for state in states:
            use(state)
            for B in (1, 8):
                t0 = time.perf_counter()
                list(generate_ids(model, chat[:B], params))
                tok_s = B * NEW / (time.perf_counter() - t0)
                out[state][f"tok_s_{B}"] = max(out[state].get(f"tok_s_{B}", 0.0), tok_s)
    out["plans"] = dict(invariant.report) if invariant else {}
    print(json.dumps(out))


def run(mode: str, tree: str, src: str | None = None) -> dict:
    import subprocess

    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, __file__, "--worker", mode, tree], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"worker {mode} {tree} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    print(machine_header())
    before = os.environ.get("BEFORE_SRC")
    rows, plans = [], {}
    for mode in MODES:
        results = {}
        if before:
            results.update(run(mode, "before", before))
        now = run(mode, "now")
        plans.update(now.pop("plans"))
        results.update(now)
        results.pop("plans", None)
        on = results["on"]
        for state, r in results.items():
            row = {
                "mode": mode,
                "state": state,
                "b1": r["tok_s_1"],
                "b8": r["tok_s_8"],
                "batch": "yes" if r["batch_equal"] else "NO",
                "spec": "yes" if r["spec_equal"] else "NO",
            }
            if state != "on":
                row["cost1"] = 100 * (1 - on["tok_s_1"] / r["tok_s_1"])
                row["cost8"] = 100 * (1 - on["tok_s_8"] / r["tok_s_8"])
            rows.append(row)
    print(
        f"\nSmolLM2-135M-Instruct, greedy, {NEW} new tokens; tokens/s, best of 3 (off and on taking turns in one "
        "process, before in its own); cost: the share of tokens/s that turning invariance on loses"
    )
    print(
        table(
            rows,
            [
                ("mode", "weights", ""),
                ("state", "invariance", ""),
                ("b1", "batch 1 tok/s", ",.1f"),
                ("b8", "batch 8 tok/s", ",.1f"),
                ("cost1", "cost of on, b1 %", "+.1f"),
                ("cost8", "cost of on, b8 %", "+.1f"),
                ("batch", "alone = in batch of 8", ""),
                ("spec", "greedy = speculative", ""),
            ],
        )
    )
    print("\nrow plans the probe chose (lmforge.nn.invariant):")
    for kind, plan in sorted(plans.items()):
        print(f"  {kind:44s} {plan}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
        worker(*sys.argv[2:])
    else:
        main()
