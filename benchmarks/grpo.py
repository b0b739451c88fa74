"""GRPO on the packaged SmolLM2-135M-Instruct: held-out accuracy on the built-in arithmetic word problems of the
base model, of SFT on the answers of the same training problems GRPO samples, and of GRPO (LoRA), with wall time.

    .venv/bin/python benchmarks/grpo.py

Every row is scored the same way: greedy completions of the same held-out problems (never trained on: the split
is a hash of the text), verified by `number` (the last number in the completion is the answer). SFT trains on
exactly the problems GRPO's steps draw (steps x prompts per step), each as one user turn and the bare answer;
GRPO sees only their rewards. The goal: GRPO at least 10 points over the base model within 60 minutes on 2 cores.

Scale it with environment variables (defaults: the full run, about 60 minutes on 2 cores):
    LMFORGE_GRPO_STEPS  GRPO steps (4 prompts x 8 completions each)          default 100
    LMFORGE_GRPO_TEST   held-out problems scored                             default 200
    LMFORGE_GRPO_VAL    validation problems (GRPO keeps its best evaluation) default 50
    LMFORGE_GRPO_EVALS  validation evaluations during GRPO (0: one, at the end) default 4
    LMFORGE_GRPO_TOKENS completion tokens, sampled and greedy                default 32
    LMFORGE_GRPO_DTYPE  products in float32, bfloat16 or auto (every row alike) default auto
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_header, table  # noqa: E402
from lmforge.data.arith import arith_splits  # noqa: E402
from lmforge.eval.verify import get_verifier  # noqa: E402
from lmforge.interop import load_pretrained  # noqa: E402
from lmforge.runtime import autocast, resolve_dtype  # noqa: E402
from lmforge.tune.grpo import heldout_scores  # noqa: E402
from lmforge.tune.recipe import finetune  # noqa: E402

MODEL = "smollm2-135m-instruct"
STEPS = int(os.environ.get("LMFORGE_GRPO_STEPS", "100"))
TEST = int(os.environ.get("LMFORGE_GRPO_TEST", "200"))
VAL = int(os.environ.get("LMFORGE_GRPO_VAL", "50"))
EVALS = int(os.environ.get("LMFORGE_GRPO_EVALS", "4"))
TOKENS = int(os.environ.get("LMFORGE_GRPO_TOKENS", "32"))
DTYPE = os.environ.get("LMFORGE_GRPO_DTYPE", "auto")
PROMPTS, GROUP = 4, 8
SEED = 0


def write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def score(model_dir: str) -> tuple[dict[str, float], float]:
    t = time.time()
    model, tok = load_pretrained(model_dir)
    model.eval()
    with autocast(resolve_dtype(DTYPE, say=False)):  # (as the training runs score their held-out problems)
        m, _ = heldout_scores(model, tok, splits["test"], get_verifier("number"), TOKENS)
    return m, time.time() - t


if __name__ == "__main__":
    torch.set_num_threads(min(torch.get_num_threads(), int(os.environ.get("LMFORGE_THREADS", "2"))))
    print(machine_header())
    t_all = time.time()
    seen = STEPS * PROMPTS  # training problems GRPO's steps draw (one epoch's worth, in its shuffled order)
    splits = arith_splits(SEED, train=seen, val=VAL, test=TEST)
    work = Path(tempfile.mkdtemp(prefix="lmforge-grpo-bench-"))
    files = {k: write([p.row() for p in v], work / f"{k}.jsonl") for k, v in splits.items()}
    rows = []

    base, base_s = score(MODEL)
    print(f"base: held-out accuracy {base['accuracy']:.3f} ({TEST} problems, {base_s:.0f} s)", file=sys.stderr)
    rows.append(
        {
            "system": "base model",
            "acc": 100 * base["accuracy"],
            "gain": 0.0,
            "len": base["length"],
            "train": None,
            "wall": base_s,
        }
    )

    # SFT: the same training problems, each answered with its bare number (the reply the prompt asks for)
    sft_data = write(
        [{"messages": p.prompt + [{"role": "assistant", "content": p.answer}]} for p in splits["train"]],
        work / "sft.jsonl",
    )
    sft_val = write(
        [{"messages": p.prompt + [{"role": "assistant", "content": p.answer}]} for p in splits["val"]],
        work / "sft_val.jsonl",
    )
    t = time.time()
    finetune(
        "chat",
        flags={
            "model": MODEL,
            "data": str(sft_data),
            "val_data": str(sft_val),
            "test_data": str(sft_val),
            "out": str(work / "sft"),
            "method": "lora",
            "lora_targets": "all",
            "epochs": 2.0,
            "batch_size": 8,
            "max_len": 128,
            "eval_before": False,
            "eval_limit": 1,
            "max_new_tokens": 4,
            "ckpt_every": 0,
            "dtype": DTYPE,
        },
        progress=False,
    )
    sft_train = time.time() - t
    sft, sft_s = score(str(work / "sft" / "model"))
    rows.append(
        {
            "system": f"SFT (LoRA, 2 epochs on {seen} answers)",
            "acc": 100 * sft["accuracy"],
            "gain": 100 * (sft["accuracy"] - base["accuracy"]),
            "len": sft["length"],
            "train": sft_train,
            "wall": sft_train + sft_s,
        }
    )

    t = time.time()
    res = finetune(
        "grpo",
        flags={
            "model": MODEL,
            "data": str(files["train"]),
            "val_data": str(files["val"]),
            "test_data": str(files["test"]),
            "out": str(work / "grpo"),
            "method": "lora",
            "lora_targets": "all",
            "batch_size": PROMPTS,
            "group_size": GROUP,
            "max_new_tokens": TOKENS,
            "epochs": 1.0,
            "lr": 3e-4,
            "eval_every": max(1, STEPS // EVALS) if EVALS else 0,
            "ckpt_every": 20,
            "dtype": DTYPE,
        },
        progress=False,
    )
    grpo_wall = time.time() - t
    rows.append(
        {
            "system": f"GRPO (LoRA, {STEPS} steps x {PROMPTS} prompts x {GROUP})",
            "acc": 100 * res.after["accuracy"],
            "gain": 100 * (res.after["accuracy"] - base["accuracy"]),
            "len": res.after["length"],
            "train": res.seconds,
            "wall": grpo_wall,
        }
    )
    k = max(1, len(res.rollouts) // 4)
    first = sum(r["reward"] for r in res.rollouts[:k]) / k
    last = sum(r["reward"] for r in res.rollouts[-k:]) / k

    print(
        f"SmolLM2-135M-Instruct, arithmetic word problems (seed {SEED}): {TEST} held-out, greedy, {TOKENS} tokens, "
        f"`number` verifier, dtype {DTYPE}"
    )
    print(
        table(
            rows,
            [
                ("system", "system", "s"),
                ("acc", "held-out acc %", ".1f"),
                ("gain", "vs base (points)", "+.1f"),
                ("len", "completion tokens", ".1f"),
                ("train", "training s", ".0f"),
                ("wall", "wall s", ".0f"),
            ],
        )
    )
    print(
        f"GRPO training reward: {first:.3f} over the first {k} steps -> {last:.3f} over the last {k}; GRPO's own "
        f"before / after on the same problems {res.before['accuracy']:.3f} / {res.after['accuracy']:.3f}; "
        f"total {time.time() - t_all:.0f} s; runs in {work}"
    )
