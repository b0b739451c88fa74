"""The encoder-only Transformer (BERT), with the task heads of the BERT papers on one shared body.

    embeddings   word + position + token type, then LayerNorm
    blocks       post-norm: x = norm(x + attn(x)); x = norm(x + mlp(x)); attention sees every real token
    pooler       tanh(Linear(h[CLS])): the sentence vector BERT's classification and NSP heads read
    heads        mlm (transform + tied output), pretrain (mlm + next-sentence), classify (pooled -> labels),
                 qa (per-token start/end logits)

Attention, MLP and norms are the decoder's modules (`lmforge.nn`); only the wiring differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import EncoderConfig
from lmforge.models.base import PretrainedModel, call_block
from lmforge.nn.attention import Attention
from lmforge.nn.mlp import ACTIVATIONS, MLP


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # [B, T, d] last hidden states
    pooled: torch.Tensor | None = None  # [B, d]
    logits: torch.Tensor | None = None  # mlm/pretrain [B, T, V]; classify [B, labels]; qa [B, T, 2]
    nsp_logits: torch.Tensor | None = None  # [B, 2]
    loss: torch.Tensor | None = None


class EncoderBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attn = Attention(
            cfg.d_model, cfg.n_head, cfg.n_head, cfg.head_dim, bias=True, dropout=cfg.attn_dropout, causal=False
        )
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, bias=True)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, mask)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class MLMHead(nn.Module):
    """transform (Linear, activation, LayerNorm), then scores against the word embeddings (tied) plus a bias."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = ACTIVATIONS[cfg.mlp]
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, emb_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(h))), emb_weight, self.bias)


class Encoder(PretrainedModel):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.emb_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        self.pooler = (
            nn.Linear(cfg.d_model, cfg.d_model) if cfg.pooler or cfg.head in ("pretrain", "classify") else None
        )
        if cfg.head in ("mlm", "pretrain"):
            self.mlm_head = MLMHead(cfg)
        if cfg.head == "pretrain":
            self.nsp_head = nn.Linear(cfg.d_model, 2)
        if cfg.head == "classify":
            self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)
        if cfg.head == "qa":
            self.qa_head = nn.Linear(cfg.d_model, 2)
        self.reset_parameters()

    def reset_parameters(self, only: list[str] | None = None) -> None:
        """BERT's init: normal(0, init_std) for matrices, zero biases, unit norm scales. `only` limits it to the
        parameters whose names start with one of the given prefixes (a fresh head on a pretrained body)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if only is not None and not name.startswith(tuple(only)):
                continue
            if p.dim() > 1:
                nn.init.normal_(p, 0.0, std)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    # ------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        class_weights: torch.Tensor | None = None,
        heads: bool = True,
        loss_only: bool = False,
        grad_checkpoint: bool = False,
        mixup: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """input_ids [B, T]; attention_mask [B, T] marks real tokens (1) and padding (0).

        labels: mlm/pretrain [B, T] token ids with -100 where nothing is predicted; classify [B] class ids.
        start_positions / end_positions [B] train the qa head. The loss is the mean over what is predicted
        (mlm + nsp summed for pretrain). heads=False stops after the body and pooler (embeddings need no
        vocabulary-wide MLM scores). loss_only=True (what the training loops ask for) returns no logits;
        grad_checkpoint=True recomputes each block in backward (models.base.call_block).
        mixup [B] (classify, training): each pooled vector becomes `mixup_i x_i + (1 - mixup_i) x_(i-1)`, its batch
        neighbour's mixed in before the head (sentence-level mixup); the caller mixes the labels alike."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the model's {self.config.max_seq_len} positions")
        pos = torch.arange(T, device=input_ids.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)[None] + self.type_emb(types)
        x = self.drop(self.emb_norm(x))
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # keys only: every query row keeps its real keys
        for block in self.blocks:
            x = call_block(block, x, mask, grad_checkpoint=grad_checkpoint)
        out = EncoderOutput(hidden=x)
        if self.pooler is not None:
            out.pooled = torch.tanh(self.pooler(x[:, 0]))
            if mixup is not None:
                lam = mixup.to(out.pooled.dtype)[:, None]
                out.pooled = lam * out.pooled + (1 - lam) * out.pooled.roll(1, 0)

        head = self.config.head if heads else "none"
        if head in ("mlm", "pretrain"):
            if labels is not None:
                # score only the masked positions: the V-wide projection is most of an MLM step's cost
                sel = labels.view(-1) != -100
                out.logits = self.mlm_head(x.reshape(-1, x.size(-1))[sel], self.tok_emb.weight)
                loss = F.cross_entropy(out.logits, labels.view(-1)[sel]) if bool(sel.any()) else x.sum() * 0
                out.loss = loss
            else:
                out.logits = self.mlm_head(x, self.tok_emb.weight)
            if head == "pretrain":
                out.nsp_logits = self.nsp_head(out.pooled)
                if next_sentence_label is not None:
                    nsp = F.cross_entropy(out.nsp_logits, next_sentence_label)
                    out.loss = nsp if out.loss is None else out.loss + nsp
        elif head == "classify":
            out.logits = self.classifier(self.drop(out.pooled))
            if labels is not None:
                out.loss = F.cross_entropy(out.logits, labels, weight=class_weights)
        elif head == "qa":
            out.logits = self.qa_head(x)
            if start_positions is not None and end_positions is not None:
                start, end = out.logits.unbind(-1)
                out.loss = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
        if loss_only:
            out.logits = out.nsp_logits = None
        return out

    # ------------------------------------------------------------------------------------------------------------

    def with_head(self, head: str, labels: list[str] | None = None) -> Encoder:
        """This body under a different head: shared weights are kept, a new head is freshly initialised."""
        from dataclasses import replace

        cfg = replace(
            self.config,
            head=head,
            labels=list(labels or []),
            pooler=self.pooler is not None or head in ("pretrain", "classify"),
        )
        new = Encoder(cfg).to(self.tok_emb.weight.device)
        # the body carries over; a task head never does (other labels, other order, other task)
        heads = ("mlm_head.", "nsp_head.", "classifier.", "qa_head.")
        body = {k: v for k, v in self.state_dict().items() if not k.startswith(heads)}
        if head in ("mlm", "pretrain") and self.config.head in ("mlm", "pretrain"):
            body.update({k: v for k, v in self.state_dict().items() if k.startswith("mlm_head.")})
        missing, _ = new.load_state_dict(body, strict=False)
        new.reset_parameters(only=sorted({m.rsplit(".", 1)[0] for m in missing}))
        return new

    def keep_layers(self, n: int) -> list[int]:
        """Keep n of the blocks, evenly spaced from the first to the last, in place (a shallower copy of this
        model: DistilBERT's student is its teacher with every other layer). Returns the kept blocks' indices."""
        total = self.config.n_layer
        if not 1 <= n <= total:
            raise ValueError(f"keep_layers {n}: the model has {total} blocks")
        keep = sorted({round(i * (total - 1) / (n - 1)) for i in range(n)}) if n > 1 else [total - 1]
        self.blocks = nn.ModuleList(self.blocks[i] for i in keep)
        self.config.n_layer = n
        return keep

    def save_pretrained(self, path: str | Path, tokenizer=None) -> Path:
        from lmforge.interop.hf_bert import save_encoder_dir

        return save_encoder_dir(self, path, tokenizer=tokenizer)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the hidden states over real tokens (sentence-transformers' pooling), [B, d]."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
