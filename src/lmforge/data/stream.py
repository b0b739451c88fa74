"""Tokenizing a corpus of any size into a token file, with bounded memory and every core busy.

    plan     the split's documents, in order, grouped into parts of whole documents (~32 MB of text each)
    encode   each part by a worker process (a pool as large as this process's share of the cores), a few MB of
             text at a time: read, encode (the `tokenizers` library), append the ids to the part's file
    share    under torchrun, process r encodes parts r, r + N, r + 2N, ... (every process works at once)
    join     process 0 concatenates the parts, in order, into the split's one file

The file is the same whatever the number of workers and processes. Memory: each worker holds one batch of text and
its ids, the joining process one copy buffer. A split under 16 MB is encoded here, in this process (starting
workers would take longer than the work). This module imports no torch, so a worker starts in a fraction of a
second.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from lmforge.data.corpus import Document
from lmforge.files import atomic_path, write_json

PART_BYTES = 32 << 20
BATCH_BYTES = 1 << 20
IN_PROCESS_BYTES = 16 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def plan_parts(docs: list[Document], part_bytes: int = PART_BYTES) -> list[list[Document]]:
    parts: list[list[Document]] = [[]]
    size = 0
    for d in docs:
        if parts[-1] and size + d.size > part_bytes:
            parts.append([])
            size = 0
        parts[-1].append(d)
        size += d.size
    return [p for p in parts if p]


def default_workers() -> int:
    """This process's share of the cores it may run on (torchrun's processes on one machine split them)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


_TOKENIZERS: dict[int, object] = {}


def _encoder(tokenizer_json: str):
    from tokenizers import Tokenizer as HFTokenizer

    key = hash(tokenizer_json)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = HFTokenizer.from_str(tokenizer_json)
    return _TOKENIZERS[key]


def encode_part(tokenizer_json: str, docs: list[Document], out: str, eos: int | None, dtype: str) -> dict:
    """Encode `docs` (an end-of-text id after each) into the file `out`; returns its counts. A document of
    blanks only is left out, as read_documents leaves it out."""
    tok, dt = _encoder(tokenizer_json), np.dtype(dtype)
    n_tokens = n_bytes = n_docs = 0
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        batch: list[str] = []

        def flush() -> None:
            nonlocal n_tokens
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                ids = enc.ids
                if eos is not None:
                    ids.append(eos)
                f.write(np.asarray(ids, dtype=dt).tobytes())
                n_tokens += len(ids)
            batch.clear()

        held = 0
        for d in docs:
            text = d.read()
            if not text.strip():
                continue
            batch.append(text)
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
            held += len(text)
            if held >= BATCH_BYTES:
                flush()
                held = 0
        if batch:
            flush()
    return {"tokens": n_tokens, "bytes": n_bytes, "documents": n_docs}


def _worker_setup() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread each: the pool is the parallelism
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker ends when the process that started it is gone (killed with -9, it cannot tell its pool): left
    alone, the workers went on encoding, and then waited, for as long as the machine was up."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def write_tokens(
    docs: list[Document],
    tokenizer_json: str,
    path: str | Path,
    eos: int | None,
    dtype: np.dtype,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Encode a split's documents into `path` (see the module notes). Every process of a torchrun world calls it
    with the same documents and `barrier`; process 0 writes `path` and returns its counts (the others too, read
    from the parts' records). progress(bytes) is called as this process's parts finish."""
    path = Path(path)
    total = sum(d.size for d in docs)
    if world == 1 and total <= IN_PROCESS_BYTES:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        counts = encode_part(tokenizer_json, docs, str(path), eos, dtype.name)
        if progress:
            progress(total)
        return {"file": path.name, **counts, "dtype": dtype.name}
    parts = plan_parts(docs, PART_BYTES)
    work = path.parent / f".{path.name}.parts.tmp"  # (a stale temp to clean_run_dir, if a run dies here)
    work.mkdir(parents=True, exist_ok=True)
    mine = [k for k in range(len(parts)) if k % world == rank]
    done = {k for k in mine if (work / f"{k:05d}.json").is_file()}  # (left by an earlier try: kept)
    todo = [k for k in mine if k not in done]
    n = min(workers or default_workers(), max(1, len(todo)))
    if todo:
        with ProcessPoolExecutor(n, mp_context=get_context("spawn"), initializer=_worker_setup) as pool:
            jobs = {
                pool.submit(encode_part, tokenizer_json, parts[k], str(work / f"{k:05d}.bin"), eos, dtype.name): k
                for k in todo
            }
            for job in as_completed(jobs):
                k = jobs[job]
                write_json(work / f"{k:05d}.json", job.result())
                if progress:
                    progress(sum(d.size for d in parts[k]))
    if barrier:
        barrier()
    records = [json.loads((work / f"{k:05d}.json").read_text()) for k in range(len(parts))]
    if rank == 0:
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            for k in range(len(parts)):
                with open(work / f"{k:05d}.bin", "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
    if barrier:
        barrier()  # (every process has read the records)
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
    counts = {key: sum(r[key] for r in records) for key in ("tokens", "bytes", "documents")}
    return {"file": path.name, **counts, "dtype": dtype.name}
