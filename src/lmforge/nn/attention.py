"""Attention: `softmax(Q K^T / sqrt(d_k) + mask) V`, multi-head and grouped-query, with rotary positions and a
preallocated KV cache.

The arithmetic itself runs in `torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel
(flash / memory-efficient on GPU, a flash-style kernel on CPU) and never materialises the T x T score matrix when
it can avoid it. `attention_reference` spells the formula out for the tests and for readers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------------------
# the formula


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Explicit `softmax(QK^T/sqrt(d_k) + mask) V`; mask is additive (0 / -inf) or boolean (True = attend)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, float("-inf"))
        scores = scores + mask
    return torch.softmax(scores, dim=-1) @ v


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [q_len, k_len]: query i (the last q_len of k_len positions) sees keys 0..offset+i."""
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(k_len, device=device)[None, :] <= q_pos


def padded_causal_mask(key_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean [B, 1, q_len, k_len] from a key padding mask [B, k_len] (1 = real token).

    The mask may also hold segment ids (1, 2, 3, ... for examples packed into one row, 0 for padding): a token
    then sees only earlier tokens of its own segment. A 0/1 mask is the one-segment case.

    A padding query still sees itself, so its softmax row is never empty: fully masked rows would give NaN,
    and a NaN value in the cache would poison real rows through `0 * NaN`.
    """
    k_len = key_mask.size(1)
    m = causal_mask(q_len, k_len, key_mask.device)[None, None] & key_mask.bool()[:, None, None, :]
    if key_mask.dtype != torch.bool and q_len > 1 and bool((key_mask > 1).any()):
        m = m & (key_mask[:, None, -q_len:, None] == key_mask[:, None, None, :])
    diag = torch.zeros(q_len, k_len, dtype=torch.bool, device=key_mask.device)
    diag[torch.arange(q_len), torch.arange(k_len - q_len, k_len)] = True
    return m | diag


# --------------------------------------------------------------------------------------------------------------
# rotary position embedding (RoPE), in the "rotate half" layout HF Llama checkpoints use


class Rotary(nn.Module):
    """cos/sin tables for positions; built for up to 4096 positions and grown on demand (a 128k-context model
    would otherwise carry hundreds of MB of tables it may never use)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._build(min(max_seq_len, 4096))

    def _build(self, n: int, device: torch.device | None = None) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        freqs = torch.outer(torch.arange(n, device=device).float(), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        # not saved in state_dict: derived from the config
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B or 1, 1, T, head_dim] for the given positions [B or 1, T]."""
        if int(position_ids.max()) >= self.cos.size(0):
            self._build(int(position_ids.max()) + 1, self.cos.device)
        return self.cos[position_ids][:, None], self.sin[position_ids][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values for every layer: [B, n_kv_head, max_len, head_dim] each.

    Decoding writes one slot per step in place, so no step allocates or copies the history (a growing
    `torch.cat` cache copies O(T) per step). All rows share one write position: left padding aligns prompts
    at the right edge, and the key padding mask hides the pad slots.
    """

    def __init__(
        self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0  # filled slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


# --------------------------------------------------------------------------------------------------------------
# the module


class Attention(nn.Module):
    """Multi-head self-attention with optional grouped-query K/V heads (n_kv_head < n_head) and rotary positions.

    Q, K, V and the output are separate Linear layers (q_proj, k_proj, v_proj, o_proj): checkpoints, LoRA target
    names and PEFT adapters all address them one by one.
    """

    def __init__(
        self, d_model: int, n_head: int, n_kv_head: int, head_dim: int, bias: bool = True,
        dropout: float = 0.0, causal: bool = True, qkv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.causal, self.dropout = causal, dropout
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.q_proj = nn.Linear(d_model, n_head * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_head * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_head * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_head * head_dim, d_model, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = sdpa(q, k, v, mask, causal=self.causal, dropout=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
    causal: bool = True, dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention for q [B, H, Tq, D] and k, v [B, Hkv, Tk, D].

    With no explicit mask, a causal model uses the kernel's own causal flag when Tq == Tk (no mask tensor at
    all) and needs nothing when Tq == 1 (one new token sees the whole cache). Grouped-query heads are expanded
    with `enable_gqa`, which shares K/V memory instead of repeating it.
    """
    Tq, Tk = q.size(2), k.size(2)
    is_causal = False
    if mask is None and causal and Tq > 1:
        if Tq == Tk:
            is_causal = True
        else:
            mask = causal_mask(Tq, Tk, q.device)
    gqa = q.size(1) != k.size(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                          enable_gqa=gqa)
