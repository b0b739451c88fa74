"""Pre-training quality at equal time: lmforge's quickstart recipe against nanoGPT's published CPU recipe.

Both train on the same 37 plays and poems of the packaged Shakespeare (modern spelling) and are scored in bits per
byte over all of five whole held-out plays (King John, Measure for Measure, Richard II: the quickstart's own
held-out plays, and Othello, Twelfth Night), split by play, never by position in a file.

    lmforge   `lmforge pretrain --config configs/quickstart.yaml` on the training plays (the recipe as embedded:
              its byte-level BPE, model, optimizer, schedule and dtype; it holds out data.val_fraction of the
              training plays, 2% here, for its own validation), then `lmforge eval perplexity` on the five plays
    peer      nanoGPT's CPU recipe for shakespeare_char (its README: 4 layers x 128, 4 heads, context 64, batch
              12, dropout 0, AdamW lr 1e-3 with 100 warm-up steps and cosine decay to 1e-4, beta2 0.99, weight
              decay 0.1, clip 1.0; 5,000 iterations) through transformers' GPT2LMHeadModel on a character
              vocabulary, trained for the wall time lmforge's training took (its schedule sized to the iterations
              that fit, measured over its first 50), scored with windows of 64 characters, each character
              predicted once with at least 32 before it

Both run in this process's threads (2 on the CI machines), one after the other.

    python benchmarks/pretrain_quality.py
    SETS="train.optimizer=muon train.steps=500" python benchmarks/pretrain_quality.py   # try a recipe change
    SYSTEMS=lmforge python benchmarks/pretrain_quality.py                                # lmforge alone
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = (
    "john_gut.txt",
    "measure_for_measure_gut.txt",
    "richard_ii_gut.txt",
    "othello_gut.txt",
    "twelfth_night_gut.txt",
)
SETS = os.environ.get("SETS", "").split()
SYSTEMS = os.environ.get("SYSTEMS", "lmforge,nanogpt").split(",")
PEER = dict(
    n_layer=4,
    n_head=4,
    n_embd=128,
    block=64,
    batch=12,
    lr=1e-3,
    min_lr=1e-4,
    warmup=100,
    iters=5000,
    beta2=0.99,
    weight_decay=0.1,
    clip=1.0,
)


def split_plays(work: Path) -> tuple[Path, Path]:
    from lmforge.assets import corpus_files

    train, held = work / "train", work / "heldout"
    train.mkdir()
    held.mkdir()
    for f in corpus_files("shakespeare"):
        shutil.copy(f, (held if f.name in HELD_OUT else train) / f.name)
    assert len(list(held.iterdir())) == len(HELD_OUT)
    return train, held


def run_lmforge(train: Path, held: Path, work: Path) -> dict:
    out = work / "lmforge"
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
        f"data.sources=[{train}]",
        "--set",
        "data.val_fraction=0.02",
    ]
    for s in SETS:
        cmd += ["--set", s]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    wall = time.time() - t0
    logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = [x for x in logged if "split" not in x][-1]["time"]
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
    m = json.loads(ev.stdout)
    s = json.loads((out / "summary.json").read_text())
    return {
        "system": "lmforge quickstart recipe" + (f" ({' '.join(SETS)})" if SETS else ""),
        "bpb": m["bpb"],
        "train_s": train_s,
        "wall": wall,
        "steps": s["steps"],
        "params": s["params"] / 1e6,
        "tokens": s["tokens"] / 1e6,
    }


def run_nanogpt(train: Path, held: Path, budget: float) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    texts = [f.read_text(encoding="utf-8") for f in sorted(train.iterdir())]
    held_texts = [f.read_text(encoding="utf-8") for f in sorted(held.iterdir())]
    chars = sorted(set("".join(texts + held_texts)))  # (nanoGPT's vocabulary: every character of its input)
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in "\n".join(texts)], dtype=torch.long)
    p = PEER
    torch.manual_seed(1337)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(chars),
            n_positions=p["block"],
            n_embd=p["n_embd"],
            n_layer=p["n_layer"],
            n_head=p["n_head"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    decay = [q for q in model.parameters() if q.dim() >= 2]
    rest = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": p["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=p["lr"],
        betas=(0.9, p["beta2"]),
    )
    g = torch.Generator().manual_seed(1337)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - p["block"] - 1, (p["batch"],), generator=g)
        x = torch.stack([data[i : i + p["block"]] for i in ix])
        return x, torch.stack([data[i + 1 : i + 1 + p["block"]] for i in ix])

    def lr_at(it: int, total: int) -> float:  # nanoGPT's get_lr: linear warm-up, cosine to min_lr
        if it < p["warmup"]:
            return p["lr"] * (it + 1) / (p["warmup"] + 1)
        ratio = min(1.0, (it - p["warmup"]) / max(1, total - p["warmup"]))
        return p["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (p["lr"] - p["min_lr"])

    model.train()
    total, it, t0 = p["iters"], 0, time.time()
    while time.time() - t0 < budget and it < total:
        if it == 50:  # size the schedule to the iterations that fit the budget
            total = min(p["iters"], int(budget / ((time.time() - t0) / 50)))
        for group in opt.param_groups:
            group["lr"] = lr_at(it, total)
        x, y = batch()
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.view(-1, len(chars)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p["clip"])
        opt.step()
        it += 1
    train_s = time.time() - t0

    model.eval()
    nats, n_bytes, block, half = 0.0, 0, p["block"], p["block"] // 2
    with torch.no_grad():
        for text in held_texts:
            ids = torch.tensor([stoi[c] for c in text])
            n_bytes += len(text.encode("utf-8"))
            last = max(0, len(ids) - block)
            starts = torch.tensor(sorted(set(range(0, last, half)) | {last}))
            # window k scores the characters its predecessor did not: from position (previous start + block - 1
            # - its start) on (the first character of each play is given, as lmforge's evaluation gives it)
            first = torch.cat([torch.zeros(1, dtype=torch.long), starts[:-1] + block - 1 - starts[1:]])
            for s in range(0, len(starts), 512):
                rows = starts[s : s + 512]
                x = torch.stack([ids[r : r + block] for r in rows.tolist()])
                lp = (
                    torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
                    .gather(-1, x[:, 1:, None])
                    .squeeze(-1)
                )  # [rows, block - 1]: position j scores character r + j + 1
                keep = torch.arange(lp.size(1))[None, :] >= first[s : s + 512, None]
                nats -= float((lp * keep).sum())
    return {
        "system": "nanoGPT CPU recipe (transformers GPT-2, chars)",
        "bpb": nats / math.log(2) / n_bytes,
        "train_s": train_s,
        "wall": time.time() - t0,
        "steps": it,
        "params": model.num_parameters() / 1e6,
        "tokens": it * p["batch"] * p["block"] / 1e6,
    }


def main() -> None:
    torch.set_num_threads(min(torch.get_num_threads(), int(os.environ.get("THREADS", "2"))))
    print(machine_header())
    with tempfile.TemporaryDirectory(prefix="lmforge-quality-") as w:
        work = Path(w)
        train, held = split_plays(work)
        n = sum(f.stat().st_size for f in held.iterdir())
        print(f"train: {len(list(train.iterdir()))} texts; held out: {', '.join(HELD_OUT)} ({n / 1e6:.2f} MB)")
        rows = []
        if "lmforge" in SYSTEMS:
            rows.append(run_lmforge(train, held, work))
        if "nanogpt" in SYSTEMS:
            budget = rows[0]["train_s"] if rows else float(os.environ.get("BUDGET", "180"))
            rows.append(run_nanogpt(train, held, budget))
    best = min(r["bpb"] for r in rows)
    for r in rows:
        r["gap"] = r["bpb"] - best
    print(
        table(
            rows,
            [
                ("system", "system", "s"),
                ("bpb", "held-out bits/byte", ".4f"),
                ("gap", "vs best", "+.4f"),
                ("train_s", "training s", ".0f"),
                ("wall", "wall s", ".0f"),
                ("steps", "steps", ",d"),
                ("tokens", "M tokens seen", ".2f"),
                ("params", "M params", ".2f"),
            ],
        )
    )
    if len(rows) == 2:
        lead = rows[1]["bpb"] - rows[0]["bpb"]
        ok = rows[0]["bpb"] <= 2.0 and lead >= 0.2 and rows[0]["train_s"] <= 180
        print(
            f"goal: <= 2.0 bits/byte in <= 180 s of training, >= 0.2 ahead of the peer at equal time: "
            f"{'met' if ok else 'NOT met'} (lmforge {rows[0]['bpb']:.3f} in {rows[0]['train_s']:.0f} s, "
            f"{lead:+.3f} ahead)"
        )


if __name__ == "__main__":
    main()
