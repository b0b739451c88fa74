"""Token shards: one flat array of token ids per split, on disk as a numpy memmap (uint16 when the vocabulary
fits, else uint32), with a meta.json recording token and byte counts (bits per byte needs the bytes).

Training reads random windows from the memmap, so a corpus larger than memory costs nothing extra, and the
sampler's state is one torch.Generator: saving it in a checkpoint makes resuming exact.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.data.corpus import Document
from lmforge.data.stream import token_dtype, write_tokens
from lmforge.errors import DataError
from lmforge.files import write_json
from lmforge.tokenizer import Tokenizer


def write_shard(
    docs: list[Document],
    tokenizer: Tokenizer,
    path: str | Path,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Tokenize documents (an end-of-text token after each) into one flat file, streaming (data/stream.py).
    Returns its counts."""
    # documents are separated by the end-of-text token ([SEP] for a WordPiece vocabulary, which has none)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.token_id(tokenizer.sep_token)
    return write_tokens(
        docs,
        tokenizer.tok.to_str(),
        path,
        eos,
        token_dtype(tokenizer.vocab_size),
        workers,
        rank,
        world,
        barrier,
        progress,
    )


def build_shards(
    train: list[Document],
    val: list[Document],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = False,
) -> dict:
    """train.bin, val.bin and meta.json in `out_dir`. Under torchrun every process calls it (each encodes its
    share; `barrier` is the process group's) and process 0 writes the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(d.size for d in train + val),
            desc="tokenize",
            unit="B",
            unit_scale=True,
            dynamic_ncols=True,
            file=sys.stderr,
        )
    tick = bar.update if bar is not None else None
    try:
        meta = {
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "train": write_shard(train, tokenizer, out / "train.bin", workers, rank, world, barrier, tick),
            "val": write_shard(val, tokenizer, out / "val.bin", workers, rank, world, barrier, tick),
            "val_documents": [Path(d.name).name for d in val],
        }
    finally:
        if bar is not None:
            bar.close()
    if rank == 0:
        write_json(out / "meta.json", meta)
    return meta


@dataclass
class TokenShard:
    tokens: np.ndarray  # memmap
    n_bytes: int

    @classmethod
    def open(cls, data_dir: str | Path, split: str) -> TokenShard:
        data_dir = Path(data_dir)
        meta = json.loads((data_dir / "meta.json").read_text())[split]
        arr = np.memmap(data_dir / meta["file"], dtype=np.dtype(meta["dtype"]), mode="r")
        return cls(arr, meta["bytes"])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, len(self.tokens))

    def check_fits(self, seq_len: int, split: str) -> None:
        if len(self.tokens) < seq_len + 1:
            raise DataError(
                f"the {split} split has {len(self.tokens)} tokens, fewer than one window of "
                f"{seq_len + 1}; add text or lower train.seq_len"
            )

    def windows(self, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets [len(starts), seq_len] for windows beginning at `starts`."""
        idx = starts.numpy()[:, None] + np.arange(seq_len + 1)[None, :]
        block = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return block[:, :-1], block[:, 1:]

    def random_starts(self, n: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self.tokens) - seq_len, (n,), generator=generator)

    def epoch_starts(self, seq_len: int, seed: int) -> EpochSampler:
        return EpochSampler(len(self.tokens), seq_len, seed)

    def contiguous_starts(self, seq_len: int) -> torch.Tensor:
        """Non-overlapping windows covering the shard (the last partial window is dropped)."""
        return torch.arange(0, len(self.tokens) - seq_len, seq_len)


class EpochSampler:
    """Training windows drawn without replacement: each epoch is a shuffled set of non-overlapping windows of
    the shard, shifted by a random offset (so window edges move between epochs), visited once each before the
    next epoch begins. Sample i of the run is a function of (seed, i) alone, so resuming at a step needs no state,
    and every process computes the same global batch and trains its own slice of it."""

    def __init__(self, n_tokens: int, seq_len: int, seed: int) -> None:
        self.seq_len, self.seed = seq_len, seed
        self.per_epoch = max(1, n_tokens // seq_len - 1)  # windows per epoch, whatever the offset
        # a window reads seq_len + 1 tokens: offset + (per_epoch - 1) * seq_len + seq_len + 1 <= n_tokens
        self.max_offset = max(0, min(seq_len - 1, n_tokens - self.per_epoch * seq_len - 1))
        self._epoch, self._starts = -1, torch.empty(0, dtype=torch.long)

    def epoch(self, e: int) -> torch.Tensor:
        if e != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            offset = int(torch.randint(0, self.max_offset + 1, (1,), generator=g))
            self._epoch = e
            self._starts = offset + torch.randperm(self.per_epoch, generator=g) * self.seq_len
        return self._starts

    def take(self, first: int, n: int) -> torch.Tensor:
        """Window starts of samples first .. first + n - 1 of the run."""
        idx = torch.arange(first, first + n)
        out = torch.empty(n, dtype=torch.long)
        for e in idx.div(self.per_epoch, rounding_mode="floor").unique().tolist():
            sel = idx.div(self.per_epoch, rounding_mode="floor") == e
            out[sel] = self.epoch(e)[idx[sel] % self.per_epoch]
        return out
