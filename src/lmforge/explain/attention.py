"""Attention maps: the softmax probabilities of every head in every layer for one text.

The fused attention kernel never materialises these probabilities, so each `Attention` module has a `record`
switch: while it holds a list, the module takes the explicit softmax path and appends its weights
[B, H, Tq, Tk] there. Turning it on for one forward pass and off again afterwards (whatever happens) leaves the
model exactly as it was; no model code knows about explanations.

What a map shows: row q is the distribution of query token q over the keys it reads, so every row sums to 1. A
decoder's rows only reach back (causal); an encoder's reach everywhere. Grouped-query models (fewer K/V heads
than query heads) still have one map per query head: heads sharing K/V differ by their queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.explain.inputs import device_of, encode_text, model_kind
from lmforge.tokenizer import Tokenizer


@dataclass
class AttentionMaps:
    tokens: list[str]  # display strings, one per position
    weights: torch.Tensor  # [n_layer, n_head, T, T] float32; [l, h, q, k] = how much query q reads key k
    special: list[bool]  # [CLS] / [SEP] positions (encoders)
    kind: str  # "encoder" or "decoder"

    @property
    def n_layer(self) -> int:
        return self.weights.size(0)

    @property
    def n_head(self) -> int:
        return self.weights.size(1)


@torch.no_grad()
def attention_maps(model: nn.Module, tokenizer: Tokenizer, text: str) -> AttentionMaps:
    """Attention probabilities of every layer and head for `text` (encoders: [CLS] text [SEP])."""
    kind = model_kind(model)
    enc = encode_text(model, tokenizer, text)
    ids = torch.tensor([enc.ids], device=device_of(model))
    attns = [block.attn for block in model.blocks]
    was_training = model.training
    model.eval()  # attention dropout would make the maps random
    try:
        for a in attns:
            a.record = []
        if kind == "encoder":
            model(ids, heads=False)
        else:
            model(ids, last_only=True)
        weights = torch.stack([a.record[0][0].float().cpu() for a in attns])
    finally:
        for a in attns:
            a.record = None
        model.train(was_training)
    return AttentionMaps(enc.tokens, weights, enc.special, kind)
