"""The encoder-decoder Transformer (T5).

    embeddings   one table, shared by the encoder input, the decoder input and (when tied) the output head
    encoder      pre-norm blocks: x = x + attn(norm(x)); x = x + mlp(norm(x)); every token sees every real token
    decoder      pre-norm blocks: causal self-attention, then cross-attention to the encoder's output, then MLP
    positions    none absolute: each stack adds a learned relative-position bias to its attention scores
    head         tied: logits = (h * d_model^-0.5) E^T (the rescale keeps logits at unit size when E is shared
                 with the inputs); untied: a Linear of its own

Attention, MLP and RMSNorm are the same modules the decoder-only and encoder-only families use (`lmforge.nn`).
Generation encodes the source once; the decoder then reuses the encoder's projected keys and values at every
step (`Seq2SeqCache.cross`) and keeps its own self-attention history in a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.config import Seq2SeqConfig
from lmforge.models.base import PretrainedModel, call_block
from lmforge.nn.attention import Attention, KVCache, RelativePositionBias, causal_mask
from lmforge.nn.loss import cross_entropy
from lmforge.nn.mlp import MLP
from lmforge.nn.norm import RMSNorm


@dataclass
class Seq2SeqOutput:
    logits: torch.Tensor | None  # [B, T_target, V]
    loss: torch.Tensor | None = None
    encoder_hidden: torch.Tensor | None = None  # [B, T_source, d]


@dataclass
class Seq2SeqCache:
    """What decoding keeps between steps: the decoder's self-attention KV cache, the encoder output projected to
    every block's cross-attention keys and values (computed once), and the source padding as an additive mask."""

    self_attn: KVCache
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    source_bias: torch.Tensor | None  # [B, 1, 1, S] additive, or None when no source token is padding

    def reorder(self, rows: torch.Tensor, same_source: bool = False) -> None:
        """Keep rows `rows` (beam search). same_source: every row keeps a row of the same source (the beams of
        one input), so the cross-attention keys and values, equal across those rows, need no copy."""
        self.self_attn.reorder(rows)
        if same_source:
            return
        self.cross = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross]
        if self.source_bias is not None:
            self.source_bias = self.source_bias.index_select(0, rows)


def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[B, S] 1/0 key mask -> additive [B, 1, 1, S] (0 for real keys, the dtype's lowest value for padding).
    The lowest finite value rather than -inf: a row that is all padding then averages evenly instead of
    giving NaN."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class Seq2SeqBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, cross: bool) -> None:
        super().__init__()
        d, h, hd = cfg.d_model, cfg.n_head, cfg.head_dim

        def attention() -> Attention:  # unscaled scores: T5 puts 1/sqrt(head_dim) into the query's init
            return Attention(d, h, h, hd, bias=False, dropout=cfg.dropout, causal=False, scale=1.0)

        self.attn_norm, self.attn = RMSNorm(d, cfg.norm_eps), attention()
        if cross:
            self.cross_norm, self.cross_attn = RMSNorm(d, cfg.norm_eps), attention()
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.mlp = MLP(d, cfg.d_ff, cfg.mlp, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, bias, cross_kv=None, cross_bias=None, cache=None, layer=0):
        """cross_kv: the cross-attention's (keys, values), or the encoder's output [B, S, d] to project here (in
        the block's own forward, where FSDP has gathered its weights and activation checkpointing recomputes)."""
        x = x + self.drop(self.attn(self.attn_norm(x), bias, cache=cache, layer=layer))
        if torch.is_tensor(cross_kv):
            cross_kv = self.cross_attn.project_kv(cross_kv)
        if cross_kv is not None:
            x = x + self.drop(self.cross_attn(self.cross_norm(x), cross_bias, kv=cross_kv))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Stack(nn.Module):
    """The blocks of one side, with that side's relative-position table and final norm."""

    def __init__(self, cfg: Seq2SeqConfig, decoder: bool) -> None:
        super().__init__()
        n = cfg.n_decoder_layer if decoder else cfg.n_layer
        self.rel_bias = RelativePositionBias(
            cfg.n_head, cfg.rel_buckets, cfg.rel_max_distance, bidirectional=not decoder
        )
        self.blocks = nn.ModuleList(Seq2SeqBlock(cfg, cross=decoder) for _ in range(n))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Seq2SeqLM(PretrainedModel):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """T5's initialisation: each matrix's std is 1/sqrt(fan-in), and the query also takes the attention
        scale 1/sqrt(head_dim) (scores are not scaled at run time). Embeddings start at unit size (the tied
        head rescales by d_model^-0.5); an untied head starts at 1/sqrt(d_model) so logits start near unit size."""
        c, f = self.config, self.config.init_factor
        inner = c.n_head * c.head_dim
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
                continue
            std = {
                "tok_emb.weight": 1.0,
                "lm_head.weight": c.d_model**-0.5,
                "q_proj.weight": (c.d_model * c.head_dim) ** -0.5,
                "o_proj.weight": inner**-0.5,
                "down.weight": c.d_ff**-0.5,
            }.get(".".join(name.split(".")[-2:]), c.d_model**-0.5)  # k, v, gate, up, relative bias
            nn.init.normal_(p, 0.0, f * std)

    # ------------------------------------------------------------------------------------------------------------

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, grad_checkpoint: bool = False
    ) -> torch.Tensor:
        """The encoder's output [B, S, d] for input_ids [B, S] (attention_mask: 1 = real token, 0 = padding)."""
        S = input_ids.size(1)
        x = self.drop(self.tok_emb(input_ids))
        bias = self.encoder.rel_bias(S, S)
        pad = padding_bias(attention_mask, x.dtype)
        if pad is not None:
            bias = bias + pad
        for block in self.encoder.blocks:
            x = call_block(block, x, bias, grad_checkpoint=grad_checkpoint)
        return self.drop(self.encoder.norm(x))

    def new_cache(
        self,
        encoder_hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_len: int,
        dtype: torch.dtype | None = None,
    ) -> Seq2SeqCache:
        """A decoding cache for up to max_len target tokens, with the cross-attention keys and values of
        encoder_hidden projected once for all steps."""
        c = self.config
        dtype = dtype or encoder_hidden.dtype
        self_attn = KVCache(
            c.n_decoder_layer, encoder_hidden.size(0), c.n_head, c.head_dim, max_len, encoder_hidden.device, dtype
        )
        cross = [b.cross_attn.project_kv(encoder_hidden) for b in self.decoder.blocks]
        return Seq2SeqCache(self_attn, cross, padding_bias(attention_mask, dtype))

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Seq2SeqCache | None = None,
        grad_checkpoint: bool = False,
    ) -> torch.Tensor:
        """The decoder's final hidden states [B, T, d]. Without a cache, every target position attends to the
        ones before it and to encoder_hidden (masked by the source attention_mask); with one, the new tokens
        continue the cached history and the cached cross keys/values stand in for encoder_hidden."""
        T = decoder_input_ids.size(1)
        past = cache.self_attn.length if cache is not None else 0
        x = self.drop(self.tok_emb(decoder_input_ids))
        bias = self.decoder.rel_bias(T, past + T, offset=past)
        if T > 1:
            bias = bias.masked_fill(~causal_mask(T, past + T, x.device), torch.finfo(bias.dtype).min)
        if cache is not None:
            cross, cross_bias = cache.cross, cache.source_bias
        else:  # (each block projects encoder_hidden itself)
            cross = [encoder_hidden] * len(self.decoder.blocks)
            cross_bias = padding_bias(attention_mask, x.dtype)
        for i, block in enumerate(self.decoder.blocks):
            x = call_block(
                block,
                x,
                bias,
                cross[i],
                cross_bias,
                cache.self_attn if cache is not None else None,
                i,
                grad_checkpoint=grad_checkpoint and cache is None,
            )
        if cache is not None:
            cache.self_attn.advance(T)
        return self.drop(self.decoder.norm(x))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.config.tie_embeddings:
            h = h * self.config.d_model**-0.5
        return self.lm_head(h)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: the start token, then the targets up to the last one (-100
        positions become padding; they are never predicted and causal attention hides them from real ones)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_hidden: torch.Tensor | None = None,
        loss_only: bool = False,
        grad_checkpoint: bool = False,
    ) -> Seq2SeqOutput:
        """input_ids [B, S] with attention_mask [B, S]; labels [B, T] target ids (-100 = not predicted) give the
        mean cross-entropy and, when decoder_input_ids is None, the decoder's inputs (shifted right).
        encoder_hidden: a precomputed `encode(...)`, to score several targets against one source. loss_only=True
        (what the training loops ask for) returns no logits; grad_checkpoint=True recomputes each block of both
        stacks in backward (models.base.call_block)."""
        if encoder_hidden is None:
            encoder_hidden = self.encode(input_ids, attention_mask, grad_checkpoint=grad_checkpoint)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("Seq2SeqLM.forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        logits = self.head(
            self.decode(decoder_input_ids, encoder_hidden, attention_mask, grad_checkpoint=grad_checkpoint)
        )
        loss = None
        if labels is not None:
            loss = cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
        return Seq2SeqOutput(logits=None if loss_only else logits, loss=loss, encoder_hidden=encoder_hidden)

    # ------------------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, tokenizer=None, generation_config: dict | None = None) -> Path:
        from lmforge.interop.hf_t5 import save_seq2seq_dir

        return save_seq2seq_dir(self, path, tokenizer=tokenizer, generation_config=generation_config)
