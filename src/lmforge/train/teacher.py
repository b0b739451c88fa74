"""A teacher's next-token distribution over a token shard, computed once and stored: what a distilled causal LM
learns from (train.teacher), so the teacher never runs again, however many epochs the student trains.

At every position of the training shard the teacher's k likeliest next tokens and their log-probabilities (its
full-vocabulary log-softmax) are stored beside the shard as two flat files, `teacher/idx.bin` (int32 [N, k]) and
`teacher/logp.bin` (float16 [N, k]), plus `teacher/meta.json`, written last: a store without it is incomplete and
is computed again. The student reads them window by window, aligned with the shard's own windows
(TokenShard.windows), wherever the epoch's windows start.

The teacher reads the shard in chunks of `context` tokens that overlap by a quarter: every position after the
first chunk is predicted from at least a quarter-chunk of its past, and each is taken from the chunk where it has
the most. Under torchrun every process computes its share of the chunks into the same files.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmforge.data.shards import TokenShard
from lmforge.files import write_json

TEACHER_DIR = "teacher"


def chunk_plan(n: int, context: int) -> list[tuple[int, int, int]]:
    """(start, first kept, end) of each chunk over n positions: chunks of `context` tokens overlapping by a quarter,
    each keeping the positions the chunk before it did not (the first keeps all)."""
    step = max(1, context - context // 4)
    plan, start = [], 0
    while True:
        end = min(n, start + context)
        plan.append((start, 0 if start == 0 else start + context - step, end))
        if end >= n:
            return plan
        start += step


@torch.no_grad()
def store_teacher(
    teacher: torch.nn.Module,
    shard: TokenShard,
    out: str | Path,
    top_k: int,
    context: int,
    batch: int = 4,
    device: torch.device | str = "cpu",
    autocast=None,
    rank: int = 0,
    world: int = 1,
    barrier=None,
    progress: bool = False,
) -> Path:
    """Run `teacher` over `shard` once and store its top-k next-token log-probabilities at every position into
    `out` (see the module notes); returns `out`. `autocast` is the run's mixed-precision context manager (or None)."""
    out = Path(out)
    n = len(shard)
    k = min(top_k, teacher.config.vocab_size)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)
        np.memmap(out / "idx.bin", dtype=np.int32, mode="w+", shape=(n, k)).flush()
        np.memmap(out / "logp.bin", dtype=np.float16, mode="w+", shape=(n, k)).flush()
    if barrier:
        barrier()
    idx = np.memmap(out / "idx.bin", dtype=np.int32, mode="r+", shape=(n, k))
    logp = np.memmap(out / "logp.bin", dtype=np.float16, mode="r+", shape=(n, k))
    plan = chunk_plan(n, context)
    mine = plan[rank::world]
    teacher.eval()
    bar = tqdm(total=len(mine), desc="teacher", unit="chunk", disable=not progress, file=sys.stderr)
    for b in range(0, len(mine), batch):
        part = mine[b : b + batch]
        width = max(e - s for s, _, e in part)
        ids = torch.zeros(len(part), width, dtype=torch.long)
        for i, (s, _, e) in enumerate(part):
            ids[i, : e - s] = torch.from_numpy(shard.tokens[s:e].astype(np.int64))
        with autocast or nullcontext():
            logits = teacher(ids.to(device)).logits  # (a short last chunk's padding is after it: never read)
        lp = torch.log_softmax(logits.float(), dim=-1)
        top, at = lp.topk(k, dim=-1)
        for i, (s, keep, e) in enumerate(part):
            idx[keep:e] = at[i, keep - s : e - s].cpu().numpy()
            logp[keep:e] = top[i, keep - s : e - s].cpu().numpy().astype(np.float16)
        bar.update(len(part))
    bar.close()
    idx.flush()
    logp.flush()
    del idx, logp
    if barrier:
        barrier()
    if rank == 0:
        write_json(out / "meta.json", {"positions": n, "top_k": k, "context": context})
    return out


@dataclass
class TeacherShard:
    """A stored teacher (store_teacher), read window by window."""

    idx: np.ndarray  # memmap [N, k]
    logp: np.ndarray  # memmap [N, k]

    @classmethod
    def open(cls, path: str | Path) -> TeacherShard | None:
        """The store in `path`, or None when it is missing or incomplete (no meta.json)."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            return None
        meta = json.loads((path / "meta.json").read_text())
        shape = (meta["positions"], meta["top_k"])
        return cls(
            np.memmap(path / "idx.bin", dtype=np.int32, mode="r", shape=shape),
            np.memmap(path / "logp.bin", dtype=np.float16, mode="r", shape=shape),
        )

    def windows(self, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (idx, logp) [len(starts), seq_len, k] at the positions of TokenShard.windows(starts, ...)'s
        inputs: its distribution over each input position's next token."""
        at = starts.numpy()[:, None] + np.arange(seq_len)[None, :]
        return torch.from_numpy(self.idx[at].astype(np.int64)), torch.from_numpy(self.logp[at].astype(np.float32))
