"""Language-model evaluation: mean next-token loss over windows of a token shard, perplexity, bits per byte.

Bits per byte divides the total loss in bits by the UTF-8 bytes of the text the tokens encode, so models with
different tokenizers can be compared (perplexity per token cannot).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from lmforge.data.shards import TokenShard


def lm_metrics(loss: float, bytes_per_token: float) -> dict[str, float]:
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": loss / math.log(2) / bytes_per_token}


@torch.no_grad()
def window_loss(
    model: torch.nn.Module, shard: TokenShard, starts: torch.Tensor, seq_len: int, batch_size: int,
    device: torch.device, autocast=None,
) -> tuple[float, int]:
    """Sum of token losses and number of tokens over the windows beginning at `starts`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = shard.windows(starts[i:i + batch_size], seq_len)
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            loss = model(x, labels=y).loss
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total, count


def evaluate_shard(
    model: torch.nn.Module, shard: TokenShard, seq_len: int, batch_size: int = 8, device: torch.device | None = None,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte over the whole shard in non-overlapping windows."""
    device = device or next(model.parameters()).device
    total, count = window_loss(model, shard, shard.contiguous_starts(seq_len), seq_len, batch_size, device)
    return {**lm_metrics(total / max(1, count), shard.bytes_per_token), "tokens": count}
