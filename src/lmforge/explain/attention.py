"""Attention maps: the softmax probabilities of every head in every layer for one text.

The fused attention kernel never materialises these probabilities, so each `Attention` module has a `record`
switch: while it holds a list, the module takes the explicit softmax path and appends its weights
[B, H, Tq, Tk] there. Turning it on for one forward pass and off again afterwards (whatever happens) leaves the
model exactly as it was; no model code knows about explanations.

What a map shows: row q is the distribution of query token q over the keys it reads, so every row sums to 1. A
decoder's rows only reach back (causal); an encoder's reach everywhere. Grouped-query models (fewer K/V heads
than query heads) still have one map per query head: heads sharing K/V differ by their queries.

An encoder-decoder (T5) has three kinds, all from one teacher-forced pass over a source and a target: the
encoder's self-attention over the source, the decoder's causal self-attention over the target, and the
decoder's cross-attention, whose rows are target positions and columns source tokens (not square). The target
rows are the decoder's inputs, the start token and then the target's tokens, so row t is where the decoder
looked while predicting target token t. Without a target, the model's greedy output is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.explain.inputs import device_of, display_token, encode_text, model_kind
from lmforge.generate.seq2seq import Seq2SeqParams, generate_seq2seq_ids
from lmforge.tokenizer import Tokenizer

GREEDY_TOKENS = 64  # the longest greedy output drawn when an encoder-decoder is given no target


@dataclass
class AttentionMaps:
    tokens: list[str]  # display strings, one per query position (the rows)
    weights: torch.Tensor  # [n_layer, n_head, Tq, Tk] float32; [l, h, q, k] = how much query q reads key k
    special: list[bool]  # [CLS] / [SEP] / EOS / start positions
    kind: str  # "encoder", "decoder", or for an encoder-decoder "encoder self", "decoder self", "cross"
    key_tokens: list[str] | None = None  # the columns, where they are not the rows (cross-attention)
    key_special: list[bool] | None = None

    @property
    def n_layer(self) -> int:
        return self.weights.size(0)

    @property
    def n_head(self) -> int:
        return self.weights.size(1)

    @property
    def keys(self) -> list[str]:
        return self.tokens if self.key_tokens is None else self.key_tokens

    @property
    def keys_special(self) -> list[bool]:
        return self.special if self.key_special is None else self.key_special


@dataclass
class Seq2SeqAttention:
    """An encoder-decoder's three kinds of attention for one (source, target) pair."""

    encoder: AttentionMaps  # source x source
    decoder: AttentionMaps  # target x target (causal)
    cross: AttentionMaps  # target rows x source columns
    target: str  # the target text drawn
    generated: bool  # True when the target is the model's greedy output

    def parts(self) -> dict[str, AttentionMaps]:
        return {"encoder": self.encoder, "decoder": self.decoder, "cross": self.cross}


@torch.no_grad()
def attention_maps(model: nn.Module, tokenizer: Tokenizer, text: str) -> AttentionMaps:
    """Attention probabilities of every layer and head for `text` (encoders: [CLS] text [SEP]); for an
    encoder-decoder see `seq2seq_attention_maps`."""
    kind = model_kind(model)
    if kind == "seq2seq":
        raise LmforgeError("an encoder-decoder has three kinds of attention: use seq2seq_attention_maps")
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


@torch.no_grad()
def seq2seq_attention_maps(
    model: nn.Module, tokenizer: Tokenizer, source: str, target: str | None = None, max_new_tokens: int = GREEDY_TOKENS
) -> Seq2SeqAttention:
    """Encoder self-, decoder self- and cross-attention of an encoder-decoder for `source` (ending in EOS, as
    generation feeds it) and `target` (default: the model's greedy output, up to max_new_tokens tokens)."""
    if model_kind(model) != "seq2seq":
        raise LmforgeError("seq2seq_attention_maps needs an encoder-decoder; use attention_maps")
    c = model.config
    enc = encode_text(model, tokenizer, source)
    device = device_of(model)
    ids = torch.tensor([enc.ids], device=device)
    was_training = model.training
    model.eval()  # attention dropout would make the maps random
    try:
        if target is None:
            out = generate_seq2seq_ids(
                model, ids, None, Seq2SeqParams(max_new_tokens=min(max_new_tokens, c.max_seq_len - 1))
            )
            row = out[0].tolist()
            tgt = row[: row.index(c.eos_token_id)] if c.eos_token_id in row else row
            tgt = [t for t in tgt if t != c.pad_token_id]
            text = tokenizer.decode(tgt).strip()
        else:
            if not isinstance(target, str) or not target.strip():
                raise LmforgeError("the target text is empty; pass one, or leave it out to draw the model's own output")
            tgt, text = tokenizer.encode(target), target
            if len(tgt) + 1 > c.max_seq_len:
                raise LmforgeError(
                    f"the target is {len(tgt)} tokens but the model reads at most "
                    f"{c.max_seq_len - 1} after its start token; shorten the target"
                )
        dec_ids = [c.decoder_start_token_id] + tgt
        stacks = (
            [b.attn for b in model.encoder.blocks],
            [b.attn for b in model.decoder.blocks],
            [b.cross_attn for b in model.decoder.blocks],
        )
        try:
            for a in (m for group in stacks for m in group):
                a.record = []
            model(ids, decoder_input_ids=torch.tensor([dec_ids], device=device))
            enc_w, dec_w, cross_w = (torch.stack([a.record[0][0].float().cpu() for a in group]) for group in stacks)
        finally:
            for a in (m for group in stacks for m in group):
                a.record = None
    finally:
        model.train(was_training)
    dec_tokens = [display_token(tokenizer, i) for i in dec_ids]
    dec_special = [True] + [False] * len(tgt)
    return Seq2SeqAttention(
        encoder=AttentionMaps(enc.tokens, enc_w, enc.special, "encoder self"),
        decoder=AttentionMaps(dec_tokens, dec_w, dec_special, "decoder self"),
        cross=AttentionMaps(dec_tokens, cross_w, dec_special, "cross", enc.tokens, enc.special),
        target=text,
        generated=target is None,
    )
