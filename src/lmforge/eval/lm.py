"""Language-model evaluation: mean next-token loss over windows of a token shard, perplexity, bits per byte.

Bits per byte divides the total loss in bits by the UTF-8 bytes of the text the tokens encode, so models with
different tokenizers can be compared (perplexity per token cannot).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from lmforge.data.corpus import read_documents
from lmforge.data.shards import TokenShard
from lmforge.errors import ConfigError, DataError


def lm_metrics(loss: float, bytes_per_token: float) -> dict[str, float]:
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": loss / math.log(2) / bytes_per_token}


@torch.no_grad()
def window_loss(
    model: torch.nn.Module,
    shard: TokenShard,
    starts: torch.Tensor,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    autocast=None,
) -> tuple[float, int]:
    """Sum of token losses and number of tokens over the windows beginning at `starts`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = shard.windows(starts[i : i + batch_size], seq_len)
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            loss = model(x, labels=y).loss
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total, count


def evaluate_shard(
    model: torch.nn.Module,
    shard: TokenShard,
    seq_len: int,
    batch_size: int = 8,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte over the whole shard in non-overlapping windows."""
    device = device or next(model.parameters()).device
    total, count = window_loss(model, shard, shard.contiguous_starts(seq_len), seq_len, batch_size, device)
    return {**lm_metrics(total / max(1, count), shard.bytes_per_token), "tokens": count}


@torch.no_grad()
def strided_nll(
    model: torch.nn.Module,
    ids: list[int],
    window: int,
    stride: int,
    windows: list[tuple[int, float, int]] | None = None,
) -> tuple[float, int]:
    """Total negative log-likelihood and token count of `ids` with a sliding window.

    Windows of `window` tokens start every `stride` tokens; each scores only the tokens the previous window
    did not, so every token after the first is scored once, with up to window - stride tokens of context
    (the method of HF's perplexity guide, so the figures compare). `windows`, when given, collects
    (first token, summed nll, tokens scored) for every window that scored any.
    """
    device = next(model.parameters()).device
    total, count, scored_to = 0.0, 0, 1  # token 0 has no context
    for begin in range(0, max(1, len(ids) - 1), stride):
        end = min(begin + window, len(ids))
        x = torch.tensor(ids[begin : end - 1], device=device)[None]
        y = torch.tensor(ids[begin + 1 : end], device=device)[None]
        first = max(scored_to, begin + 1) - (begin + 1)  # index of the first target not yet scored
        y[:, :first] = -100
        n = int((y != -100).sum())
        if n:
            nll = model(x, labels=y).loss.item() * n
            total += nll
            count += n
            if windows is not None:
                windows.append((begin, nll, n))
        scored_to = end
        if end == len(ids):
            break
    return total, count


def evaluate_perplexity(
    model: torch.nn.Module, tokenizer, sources: list[str], window: int | None = None, stride: int | None = None
) -> dict:
    """Perplexity and bits per byte of a model on text files / corpora, document by document.

    Returns loss (mean nats per scored token), ppl, bpb (total nats / ln 2 / UTF-8 bytes of the text), tokens
    (scored), bytes, windows (how many scored tokens), window, stride, and per_window: one (document name, first token,
    mean loss, tokens scored) per window, in order."""
    window = min(model.config.max_seq_len, 1024) if window is None else window  # (0 is refused, not a default)
    stride = max(1, window // 2) if stride is None else stride
    if window > model.config.max_seq_len or window < 2 or not 0 < stride <= window:
        raise ConfigError(
            f"need 2 <= window <= {model.config.max_seq_len} (the context) and 0 < stride <= window; "
            f"got window {window}, stride {stride}"
        )
    was_training = model.training
    model.eval()
    total, count, n_bytes = 0.0, 0, 0
    per_window: list[tuple[str, int, float, int]] = []
    try:
        for doc in read_documents(sources):
            spans: list[tuple[int, float, int]] = []
            t, c = strided_nll(model, tokenizer.encode(doc.text), window, stride, spans)
            total, count, n_bytes = total + t, count + c, n_bytes + len(doc.text.encode("utf-8"))
            per_window += [(doc.name, begin, nll / n, n) for begin, nll, n in spans]
    finally:
        model.train(was_training)
    if count == 0:  # a loss of 0 (perplexity 1) would look like a perfect model
        raise DataError(
            f"{', '.join(map(str, sources))}: too little text to score (each document needs at least two tokens)"
        )
    loss = total / count
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": total / math.log(2) / n_bytes,
        "tokens": count,
        "bytes": n_bytes,
        "windows": len(per_window),
        "window": window,
        "stride": stride,
        "per_window": per_window,
    }
