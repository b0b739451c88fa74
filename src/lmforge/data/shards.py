"""Token shards: one flat array of token ids per split, on disk as a numpy memmap (uint16 when the vocabulary
fits, else uint32), with a meta.json recording token and byte counts (bits per byte needs the bytes).

Training reads random windows from the memmap, so a corpus larger than memory costs nothing extra, and the
sampler's state is one torch.Generator: saving it in a checkpoint makes resuming exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.data.corpus import Document
from lmforge.errors import DataError
from lmforge.files import atomic_path, write_json
from lmforge.tokenizer import Tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(docs: list[Document], tokenizer: Tokenizer, path: str | Path, chunk: int = 64) -> dict:
    """Tokenize documents (an end-of-text token after each) into one flat file. Returns its counts."""
    dtype = token_dtype(tokenizer.vocab_size)
    # documents are separated by the end-of-text token ([SEP] for a WordPiece vocabulary, which has none)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.token_id(tokenizer.sep_token)
    n_tokens = n_bytes = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for i in range(0, len(docs), chunk):
            part = docs[i:i + chunk]
            for d, ids in zip(part, tokenizer.encode_batch([d.text for d in part])):
                if eos is not None:
                    ids.append(eos)
                arr = np.asarray(ids, dtype=dtype)
                f.write(arr.tobytes())
                n_tokens += len(arr)
                n_bytes += len(d.text.encode("utf-8"))
    return {"file": Path(path).name, "tokens": n_tokens, "bytes": n_bytes, "documents": len(docs),
            "dtype": dtype.name}


def build_shards(train: list[Document], val: list[Document], tokenizer: Tokenizer, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    meta = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "train": write_shard(train, tokenizer, out / "train.bin"),
            "val": write_shard(val, tokenizer, out / "val.bin"),
            "val_documents": [Path(d.name).name for d in val]}
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
            raise DataError(f"the {split} split has {len(self.tokens)} tokens, fewer than one window of "
                            f"{seq_len + 1}; add text or lower train.seq_len")

    def windows(self, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets [len(starts), seq_len] for windows beginning at `starts`."""
        idx = starts.numpy()[:, None] + np.arange(seq_len + 1)[None, :]
        block = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return block[:, :-1], block[:, 1:]

    def random_starts(self, n: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self.tokens) - seq_len, (n,), generator=generator)

    def contiguous_starts(self, seq_len: int) -> torch.Tensor:
        """Non-overlapping windows covering the shard (the last partial window is dropped)."""
        return torch.arange(0, len(self.tokens) - seq_len, seq_len)
