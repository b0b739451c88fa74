"""GPU readiness, checked on a CPU: benchmarks/gpu.py's dry run drives every path the GPU benchmark takes (pretrain
with float16 and its gradient scaler, compiled; decoding; the server under concurrent clients) at toy size; every
verb that runs a model takes --device; a float16 run resumes bitwise (the scaler's state is in the checkpoint)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import load_run_config
from lmforge.train.loop import pretrain
from test_train import losses, tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # (29 s: every GPU benchmark at toy size on the CPU)
def test_gpu_benchmark_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no GPU: dry run" in r.stdout and "MFU" in r.stdout and "clients" in r.stdout
    res = json.loads(out.read_text())
    # (MFU is against the measured peak of the dtype in use: a CPU without float16 units multiplies large float16
    # matrices at ~1 GFLOP/s, below what the toy's small products reach, so it can pass 100% in a dry run)
    assert res["train"]["dtype"] == "float16" and 0 < res["train"]["mfu"] < 1e3 and res["train"]["loss"] < 7
    assert [row["batch"] for row in res["decode"]] == [1, 4] and all(row["tok_s"] > 0 for row in res["decode"])
    assert res["serve"]["ok"] == res["serve"]["clients"] == 4


def test_every_verb_that_runs_a_model_takes_device():
    from lmforge.cli import build_parser

    def leaves(parser, name):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield name, {o for a in parser._actions for o in a.option_strings}
            return
        for n, sp in subs[0].choices.items():
            yield from leaves(sp, f"{name} {n}".strip())

    no_model = {
        "tokenizer train",
        "convert",
        "export",
        "data shakespeare-qa",
        "data chatterbot",
        "data bible-genres",
        "data clean",
        "info",
    }  # (no compute)
    verbs = dict(leaves(build_parser(), ""))
    assert len(verbs) > 20
    for verb, opts in verbs.items():
        assert ("--device" in opts) == (verb not in no_model), verb


def test_a_gpu_asked_for_where_there_is_none_is_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge.cli",
            "pretrain",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "no CUDA GPU is available" in r.stderr and "Traceback" not in r.stderr


def test_float16_training_resumes_bitwise(tmp_path, small_corpus):
    base = tiny_run(small_corpus, steps=8, ckpt_every=4, dtype="float16")
    pretrain(load_run_config(base=base), tmp_path / "straight", progress=False)
    pretrain(load_run_config(base=base), tmp_path / "split", progress=False, stop_after=6)
    pretrain(load_run_config(base=base), tmp_path / "split", resume=True, progress=False)
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    state = json.loads((tmp_path / "split/checkpoints/step_000008/trainer_state.json").read_text())
    assert state["scaler"]["scale"] > 1
