"""The decoder-only Transformer. GPT-2, Llama and today's families are the same class with different config values:

    GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings
    Llama: rotary positions, RMSNorm, SwiGLU MLP, no biases, grouped-query attention
    Llama 3.x / Qwen2.5 / Phi-3: the same with a rope scaling (nn.rope); Phi-3 rotates part of each head
    Mistral: a sliding window on every layer;  Qwen3: q/k norms;  SmolLM3: every fourth layer without rotary
    OLMo 2: norms on each branch's output instead of its input, q/k norms across heads
    Gemma 2 / 3: norms before and after each branch, (1 + w) norm scales, GeGLU, scaled embeddings, soft-capped
        scores and logits (2), q/k norms (3), sliding-window and global layers alternating, each with its own
        rotary base (3)

The block: x = x + post(attn(pre(x))); x = x + post(mlp(pre(x))), where `pre` is the norm in the pre-norm
layout (GPT-2, Llama) and `post` in the post-norm one (OLMo 2), both in the sandwich one (Gemma); a final norm;
the LM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import DecoderConfig
from lmforge.models.base import PretrainedModel, call_block
from lmforge.nn.attention import Attention, KVCache, StaticKVCache, padded_causal_mask
from lmforge.nn.loss import TeacherTargets, cross_entropy, distill_loss, linear_cross_entropy, linear_distill_loss
from lmforge.nn.mlp import MLP
from lmforge.nn.norm import make_norm
from lmforge.nn.rope import Rotary


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int = 0) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, cfg.norm_offset)

        pre, post = cfg.norm_layout in ("pre", "sandwich"), cfg.norm_layout in ("post", "sandwich")
        self.pre, self.post = pre, post  # (plain flags: the decoding step reads them in every layer)
        if pre:
            self.attn_norm = norm()
        self.attn = Attention(
            cfg.d_model,
            cfg.n_head,
            cfg.n_kv_head,
            cfg.head_dim,
            cfg.bias,
            cfg.dropout,
            qkv_bias=cfg.qkv_bias,
            scale=cfg.attn_scale,
            qk_norm=cfg.qk_norm,
            norm_eps=cfg.norm_eps,
            norm_offset=cfg.norm_offset,
            window=cfg.window(layer),
            softcap=cfg.attn_softcap,
        )
        if post:
            self.attn_post_norm = norm()
        if pre:
            self.mlp_norm = norm()
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, cfg.bias)
        if post:
            self.mlp_post_norm = norm()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, rotary=None, cache=None, layer=0):
        h = self.attn(self.attn_norm(x) if self.pre else x, mask, rotary, cache, layer)
        x = x + self.drop(self.attn_post_norm(h) if self.post else h)
        h = self.mlp(self.mlp_norm(x) if self.pre else x)
        return x + self.drop(self.mlp_post_norm(h) if self.post else h)


class DecoderLM(PretrainedModel):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_emb == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        else:
            self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_partial, cfg.rope_scaling)
            if cfg.rope_local_theta is not None:  # the sliding layers' own base, unscaled (Gemma 3)
                self.rotary_local = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_local_theta, cfg.rope_partial)
        # which rotary table each layer uses: "global", "local" or None (a layer without positions)
        self.rotary_of = [self._rotary_kind(i) for i in range(cfg.n_layer)]
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, cfg.norm_offset)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # one matrix reads tokens in and scores them out: fewer parameters, and it helps small models
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def _rotary_kind(self, layer: int) -> str | None:
        c = self.config
        if c.pos_emb != "rope" or layer in (c.no_rope_layers or ()):
            return None
        return "local" if c.rope_local_theta is not None and c.window(layer) else "global"

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norms and biases
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.constant_(p, 1.0 - self.config.norm_offset)
            elif name.endswith(("o_proj.weight", "down.weight")):
                # GPT-2's scaled init: each block adds two residual branches; scaling their output layers
                # by 1/sqrt(2 * n_layer) keeps the residual stream's variance from growing with depth
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | TeacherTargets | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
        loss_only: bool = False,
        grad_checkpoint: bool = False,
    ) -> CausalLMOutput:
        """input_ids [B, T]. labels [B, T] (-100 = ignore) gives the mean next-token loss; labels are the
        targets for each position (already shifted); a TeacherTargets (nn.loss) in their place gives the
        distillation loss, the teacher's top-k beside them. attention_mask [B, past + T] marks real tokens (1) and
        padding (0) over the cache and the new tokens, or holds segment ids of packed examples (see
        padded_causal_mask); a 4-D bool mask [B, 1, T, K] is used as given (the serving engine's rows each have
        their own length). last_only computes logits for the final position only; logits_at (bool [B, T])
        only where it is set, as a flat [N, V] (fine-tuning scores a few answer tokens: the vocabulary-wide
        projection of every other position would be most of the step's time and memory).

        loss_only=True (with labels; what the training loops ask for) returns the loss alone, logits None: it is
        computed straight from the final hidden states a chunk of tokens at a time (nn.loss), so the [tokens,
        vocab] logits and their gradient are never held whole (at GPT-2's vocabulary and 8 x 1024 tokens, 1.6 GB
        each; on CPU the step is as fast or a little faster). A quantized head takes the plain path; under
        autocast the chunks' products run in its dtype.
        grad_checkpoint=True (training only, no cache) recomputes each block in backward (models.base.call_block),
        and with logits_at the head and loss a chunk at a time too.
        The call decides; nothing is read from train/eval mode or the grad mode."""
        if grad_checkpoint and cache is not None:
            raise ValueError("grad_checkpoint is for training; it cannot be combined with a KV cache")
        B, T = input_ids.shape
        if position_ids is None:
            past = cache.length if cache is not None else 0
            if attention_mask is not None:
                position_ids = ((attention_mask != 0).long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        x, rotary = self._embed(input_ids, position_ids)
        mask = attention_mask
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = padded_causal_mask(attention_mask, T)
        for i, block in enumerate(self.blocks):
            x = call_block(block, x, mask, rotary[i], cache, i, grad_checkpoint=grad_checkpoint)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        teacher = labels if isinstance(labels, TeacherTargets) else None
        if logits_at is not None:
            x = x[logits_at]
            labels = (labels.select(logits_at) if teacher else labels[logits_at]) if labels is not None else None
            teacher = labels if teacher else None
            if loss_only and labels is not None and not teacher and grad_checkpoint and torch.is_grad_enabled():
                return CausalLMOutput(logits=None, loss=self._chunked_loss(x, labels))
        if loss_only and labels is not None and type(self.lm_head) is nn.Linear and not self.config.final_softcap:
            # the head, the loss and their gradients a chunk of tokens at a time (nn.loss)
            h = x.reshape(-1, x.size(-1))
            if teacher is not None:
                return CausalLMOutput(logits=None, loss=linear_distill_loss(h, self.lm_head.weight, teacher.flat()))
            return CausalLMOutput(logits=None, loss=linear_cross_entropy(h, self.lm_head.weight, labels.reshape(-1)))
        logits = self.head(x)
        loss = None
        if teacher is not None:
            t = teacher.flat()
            loss = distill_loss(logits.view(-1, logits.size(-1)), t.labels, t.idx, t.logp, t.alpha, t.temperature)
        elif labels is not None:
            loss = cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1))
        return CausalLMOutput(logits=None if loss_only else logits, loss=loss)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (soft-capped where the config says: Gemma 2)."""
        logits = self.lm_head(h)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _embed(self, ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The token embeddings (plus learned positions) and, per layer, the rotary (cos, sin) of these positions
        (None for a layer without them)."""
        x = self.tok_emb(ids)
        if self.config.embed_scale != 1.0:  # (in the embedding's dtype, as the checkpoints were trained)
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        if self.config.pos_emb == "learned":
            x = x + self.pos_emb(position_ids)
        return self.drop(x), self._rotaries(position_ids)

    def _rotaries(self, position_ids: torch.Tensor) -> list:
        tables = {None: None}
        if self.config.pos_emb == "rope":
            tables["global"] = self.rotary(position_ids)
            if hasattr(self, "rotary_local"):
                tables["local"] = self.rotary_local(position_ids)
        return [tables[k] for k in self.rotary_of]

    def staged_step(
        self,
        ids: torch.Tensor,
        chunk: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
        layers: tuple[int, int],
        last_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step of the serving engine (inference only): the running rows' decode step through every layer and a
        prompt chunk through layers [a, b) only, as one row (the paged cache's `mixed` step, lmforge.generate.kv). A
        long chunk's pass is spread over several steps this way, so each step costs the streams little more than
        their own. `cache` is that cache: the model only calls it, as every layer calls any cache.

        ids [1, rows]: the rows' next tokens; chunk: the chunk's token ids [1, n] when a == 0, else its hidden
        states after layer a - 1 [1, n, d_model]; position_ids [1, rows + n]. Returns the rows' logits [rows, V]
        and the chunk's hidden states after layer b - 1, or, when b is the last layer, the logits after its final
        token [V] if last_logits (else None)."""
        a, b = layers
        rows = ids.size(1)
        x, rotary = self._embed(ids, position_ids[:, :rows])
        if a == 0:
            chunk = self._embed(chunk, position_ids[:, rows:])[0]
        rot_all = self._rotaries(position_ids)
        for i, block in enumerate(self.blocks):
            if a <= i < b:
                y = block(torch.cat([x, chunk], dim=1), None, rot_all[i], cache, i)
                x, chunk = y[:, :rows], y[:, rows:]
            else:
                x = block(x, None, rotary[i], cache, i)
        cache.advance(1)
        logits = self.head(self.norm(x))[0]
        if b < len(self.blocks):
            return logits, chunk
        return logits, self.head(self.norm(chunk[:, -1]))[0] if last_logits else None

    def _chunked_loss(self, h: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Mean cross-entropy of lm_head(h) against labels, a chunk of positions at a time under checkpointing:
        no [N, vocab] logits (nor their softmax) are ever held for the whole batch."""
        n = (labels != -100).sum().clamp(min=1)

        def part(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
            k = (yc != -100).sum()
            return cross_entropy(self.head(hc), yc) * k

        total = sum(
            checkpoint(part, h[s : s + chunk], labels[s : s + chunk], use_reentrant=False)
            for s in range(0, h.size(0), chunk)
        )
        return total / n

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, static: bool = False) -> KVCache:
        """A preallocated KV cache; static=True gives the fixed-shape one compiled decoding needs."""
        c = self.config
        p = self.norm.weight  # (head and embedding may be quantized; the final norm keeps the compute dtype)
        if static:
            for m in self.modules():
                if isinstance(m, Rotary):
                    m.reserve(max_len)
        return (StaticKVCache if static else KVCache)(
            c.n_layer, batch, c.n_kv_head, c.head_dim, max_len, p.device, dtype or p.dtype
        )

    # ------------------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, tokenizer=None, generation_config: dict | None = None) -> Path:
        from lmforge.interop.hf import save_model_dir

        return save_model_dir(self, path, tokenizer=tokenizer, generation_config=generation_config)
