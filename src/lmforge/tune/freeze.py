"""Freezing: train only the top k Transformer blocks (and what sits above them), the classic recipe for small
labelled sets: the lower layers keep their general features, and each step costs less (no weight gradients
below the first trainable block)."""

from __future__ import annotations

from torch import nn

from lmforge.errors import ConfigError


def freeze_all_but_top(model: nn.Module, k: int) -> int:
    """Freeze embeddings and every block but the last k; heads, pooler and final norms stay trainable.
    Returns the number of trainable parameters."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"top-k freezing needs a model with Transformer blocks, got {type(model).__name__}")
    n = len(blocks)
    if not 0 <= k <= n:
        raise ConfigError(f"--top-k must be between 0 and the model's {n} layers, got {k}")
    frozen_blocks = {f"blocks.{i}." for i in range(n - k)}
    for name, p in model.named_parameters():
        in_block = name.startswith("blocks.")
        is_emb = name.split(".")[0] in ("tok_emb", "pos_emb", "type_emb", "emb_norm")
        frozen = is_emb or (in_block and any(name.startswith(b) for b in frozen_blocks))
        # a decoder's tied lm_head is the embedding: it stays frozen with it
        p.requires_grad_(not frozen)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
