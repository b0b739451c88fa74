"""Attention: `softmax(Q K^T / sqrt(d_k) + mask) V`, multi-head and grouped-query, with rotary positions and a
preallocated KV cache.

The arithmetic itself runs in `torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel
(flash / memory-efficient on GPU, a flash-style kernel on CPU) and never materialises the T x T score matrix when
it can avoid it; bf16 on a CPU runs as two batched products instead while the score matrix is small
(`_bf16_scores`: the CPU kernel does not use the bf16 units). `attention_reference` spells the formula out for
the tests and for readers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn import invariant
from lmforge.nn.norm import RMSNorm
from lmforge.nn.packed import FusedLinear
from lmforge.nn.rope import _compiling, apply_rotary

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
# KV cache


class KVCache:
    """Preallocated keys and values for every layer: [B, n_kv_head, max_len, head_dim] each.

    Decoding writes one slot per step in place, so no step allocates or copies the history (a growing
    `torch.cat` cache copies O(T) per step). All rows share one write position: left padding aligns prompts
    at the right edge, and the key padding mask hides the pad slots.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch, n_kv_head, _room(max_len), head_dim)
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

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes old row rows[i] (beam search keeps the histories of the beams it continues). Only the
        filled slots are copied: the preallocated rest holds nothing yet."""
        n = self.length
        for store in (self.k, self.v):
            for t in store:
                t[:, :, :n] = t[:, :, :n].index_select(0, rows)


def _room(max_len: int) -> int:
    """Positions a cache allocates for max_len: a whole number of the batch-invariant attention's key blocks, so
    that it reads the hidden positions after a row's keys in place (lmforge.nn.invariant) instead of copying."""
    return -(-max_len // invariant.KEY_BLOCK) * invariant.KEY_BLOCK


class StaticKVCache(KVCache):
    """A KVCache whose decoding steps all have the same shapes, so that `torch.compile` builds one graph for
    every step: a step writes its token's keys and values at the slot held in the tensor `at` and attends over
    all max_len slots, with the caller's mask hiding the ones not written yet. The prompt (while `at` is None)
    fills slots as KVCache does; after it, the caller moves `at` and `length` between steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.at is None:
            return super().update(layer, k, v)
        self.k[layer].index_copy_(2, self.at, k)
        self.v[layer].index_copy_(2, self.at, v)
        return self.k[layer][:, :, : self.max_len], self.v[layer][:, :, : self.max_len]

    def advance(self, n: int) -> None:
        if self.at is None:  # (a compiled step must not touch a Python int: each value would be a new graph)
            self.length += n


# --------------------------------------------------------------------------------------------------------------
# the module


class Attention(nn.Module):
    """Multi-head self-attention with optional grouped-query K/V heads (n_kv_head < n_head) and rotary positions.

    Q, K, V and the output are separate Linear layers (q_proj, k_proj, v_proj, o_proj): checkpoints, LoRA target
    names and PEFT adapters all address them one by one.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        head_dim: int,
        bias: bool = True,
        dropout: float = 0.0,
        causal: bool = True,
        qkv_bias: bool | None = None,
        scale: float | None = None,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        norm_offset: float = 0.0,
        window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.causal, self.dropout = causal, dropout
        self.scale = scale  # None: 1/sqrt(head_dim); T5 uses 1 (the scale lives in the query's init)
        self.window = window  # sliding window: a query sees itself and the window - 1 keys before it (Mistral)
        self.softcap = softcap  # scores -> softcap * tanh(scores / softcap) before the softmax (Gemma 2)
        # RMSNorm of queries and keys before the rotation: per head (Qwen3, Gemma 3) or across all heads (OLMo 2)
        self.qk_norm = qk_norm
        if qk_norm:
            width = (lambda n: head_dim) if qk_norm == "head" else (lambda n: n * head_dim)
            self.q_norm = RMSNorm(width(n_head), norm_eps, norm_offset)
            self.k_norm = RMSNorm(width(n_kv_head), norm_eps, norm_offset)
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.q_proj = nn.Linear(d_model, n_head * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_head * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_head * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_head * head_dim, d_model, bias=bias)
        self.fused: FusedLinear | None  # q, k and v as one product, set while decoding (lmforge.nn.packed)
        self.register_module("fused", None)
        self.record: list[torch.Tensor] | None = None  # a list here collects each forward's attention weights

    def _explicit(self, q, k, v, mask):
        """The formula spelled out (no fused kernel): while recording (the weights are kept), and for soft-capped
        scores, which no fused kernel computes."""
        if k.size(1) != q.size(1):
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        if mask is None and self.causal and q.size(2) > 1:
            mask = causal_mask(q.size(2), k.size(2), q.device)
        scores = q @ k.transpose(-2, -1) * (self.scale if self.scale is not None else 1 / math.sqrt(q.size(-1)))
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        if self.record is not None:
            self.record.append(weights)
        if self.dropout and self.training:
            weights = F.dropout(weights, self.dropout)
        return weights @ v

    def core(self, q, k, v, mask=None, decoding: bool = False):
        """softmax(q k^T * scale + mask) v for q [B, H, Tq, D], k / v [B, Hkv, Tk, D] (the keys after the cache):
        the sliding window applied to the mask, then the fused kernel, or the formula where soft-capped or
        recorded. mask None means causal over the last Tq of Tk positions. The serving cache's mixed steps call
        this too (lmforge.generate.kv: PagedKVCache.attend), so a layer's attention is defined in this one place."""
        if self.window is not None and k.size(2) > self.window:
            mask = _windowed(mask, q.size(2), k.size(2), self.window, q.device)
        if self.record is not None or self.softcap is not None:
            return self._explicit(q, k, v, mask)
        if decoding and not self.training:  # decoding: batch-invariant where it is on
            return decode_attention(q, k, v, mask, causal=self.causal, scale=self.scale)
        return sdpa(q, k, v, mask, causal=self.causal, dropout=self.dropout if self.training else 0.0, scale=self.scale)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model]. kv: keys and values from `project_kv` of another sequence (cross-attention: the
        decoder attends to the encoder's output, projected once and reused at every decoding step)."""
        B, T, _ = x.shape
        fused = self.fused  # read once: another thread's packed_linears context may end meanwhile
        if fused is not None and kv is None:
            q, k, v = fused(x)
            q, (k, v) = self._heads_q(q), self._heads_kv(k, v)
        else:
            q = self._heads_q(self.q_proj(x))
            k, v = kv if kv is not None else self.project_kv(x)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None and getattr(cache, "attends", False):  # a serving step of decode rows + a chunk
            y = cache.attend(layer, q, k, v, self.core)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = self.core(q, k, v, mask, decoding=cache is not None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def _heads_q(self, q: torch.Tensor) -> torch.Tensor:
        """Projected queries [B, T, H * D] -> [B, H, T, D], normalised where the config says."""
        B, T, _ = q.shape
        if self.qk_norm == "full":
            q = self.q_norm(q)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        return self.q_norm(q) if self.qk_norm == "head" else q

    def _heads_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = k.shape
        if self.qk_norm == "full":
            k = self.k_norm(k)
        k = k.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        return (self.k_norm(k) if self.qk_norm == "head" else k), v

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of x [B, S, d_model], each [B, n_kv_head, S, head_dim]."""
        return self._heads_kv(self.k_proj(x), self.v_proj(x))


_last_window: tuple = ()  # (key, mask): the last windowed mask, for the next windowed layer of the same forward


def _windowed(mask: torch.Tensor | None, q_len: int, k_len: int, window: int, device) -> torch.Tensor:
    """window_mask, made once per forward: every windowed layer of a step passes the same mask object (or None)
    at the same sizes."""
    global _last_window
    key = (mask, q_len, k_len, window, device)
    last = _last_window
    if last and last[0][0] is mask and last[0][1:] == key[1:]:
        return last[1]
    out = window_mask(mask, q_len, k_len, window, device)
    _last_window = (key, out)
    return out


def window_mask(mask: torch.Tensor | None, q_len: int, k_len: int, window: int, device) -> torch.Tensor:
    """`mask` (bool, or None for causal over the last q_len of k_len keys) with each query further limited to
    its own key slot and the window - 1 slots before it. A query's own slot is the last key it may see (every
    causal mask here lets a query see itself), so one rule serves training, padded batches, the KV caches and
    the serving engine's rows, each of which puts its keys at its own slots."""
    if mask is None:
        mask = causal_mask(q_len, k_len, device)
    elif mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min
    slots = torch.arange(k_len, device=device)
    own = torch.where(mask, slots, -1).amax(-1, keepdim=True)
    return mask & (slots > own - window)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over a KV cache while decoding: lmforge.nn.invariant's batch-invariant attention (a row's output
    the same whatever else is in the step, whose keys start at its cache's position 0), or `sdpa` where that is
    off or a step is being compiled.

    Keys and values laid out heads-first ([B, Hkv, Tk, D] viewed over [Hkv, B, Tk, D] storage: what the paged KV
    cache gathers, lmforge.generate.kv) are read as they are, each key head's rows as a batch of their own."""
    B, Hkv = k.shape[:2]
    if B > 1 and Hkv > 1 and k.stride(1) == B * k.stride(0) and v.stride(1) == B * v.stride(0):
        H, Tq = q.size(1), q.size(2)
        G = H // Hkv
        fold = lambda x: x.transpose(0, 1).reshape(Hkv * B, 1, *x.shape[2:])  # noqa: E731 - (a view here)
        qf = q.reshape(B, Hkv, G, Tq, q.size(-1)).transpose(0, 1).reshape(Hkv * B, G, Tq, q.size(-1))
        y = decode_attention(qf, fold(k), fold(v), _fold_mask(mask, B, H, Hkv), causal=causal, scale=scale)
        return y.view(Hkv, B, G, Tq, -1).transpose(0, 1).reshape(B, H, Tq, -1)
    if invariant.active(q):
        return invariant.attention(q, k, v, mask, causal=causal, scale=scale)
    return sdpa(q, k, v, mask, causal=causal, scale=scale)


_last_fold: tuple = ()  # (mask, key, folded): a decoding step's mask, folded once for all its layers


def _fold_mask(mask: torch.Tensor | None, B: int, H: int, Hkv: int) -> torch.Tensor | None:
    """A mask broadcastable to [B, H, Tq, Tk] as the heads-first fold's [Hkv * B, H / Hkv, Tq, Tk] (see
    decode_attention); kept for the next call with the same mask object (every layer of a step passes it)."""
    global _last_fold
    if mask is None or mask.dim() < 4 or mask.size(0) == 1 and mask.size(1) == 1:
        return mask
    key = (B, H, Hkv)
    if _last_fold and _last_fold[0] is mask and _last_fold[1] == key:
        return _last_fold[2]
    m = mask.expand(B, -1, -1, -1)
    if m.size(1) == 1:
        folded = m.repeat(Hkv, 1, 1, 1)
    else:
        m = m.expand(B, H, -1, -1)
        folded = m.reshape(B, Hkv, H // Hkv, *m.shape[2:]).transpose(0, 1).reshape(Hkv * B, H // Hkv, *m.shape[2:])
    _last_fold = (mask, key, folded)
    return folded


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    dropout: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention for q [B, H, Tq, D] and k, v [B, Hkv, Tk, D].

    With no explicit mask, a causal model uses the kernel's own causal flag when Tq == Tk (no mask tensor at
    all) and needs nothing when Tq == 1 (one new token sees the whole cache). Grouped-query heads are expanded
    with `enable_gqa`, which shares K/V memory instead of repeating it.
    """
    Tq, Tk = q.size(2), k.size(2)
    if Tq == 1 and _compiling() and dropout == 0.0:
        return _one_query(q, k, v, mask, scale)
    if q.device.type == "cpu" and q.dtype == k.dtype == torch.bfloat16 and not _compiling():
        if Tq == 1 and not torch.is_grad_enabled():  # a decoding step: the fp32 kernel is 2.5x faster here
            return sdpa(q.float(), k.float(), v.float(), mask, causal, dropout, scale).to(q.dtype)
        if q.size(0) * q.size(1) * Tq * Tk <= BF16_SCORES_MAX:
            return _bf16_scores(q, k, v, mask, causal, dropout, scale)
    is_causal = False
    if mask is None and causal and Tq > 1:
        if Tq == Tk:
            is_causal = True
        else:
            mask = causal_mask(Tq, Tk, q.device)
    gqa = q.size(1) != k.size(1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, enable_gqa=gqa, scale=scale
    )


# the bf16 score matrices (batch x heads x queries x keys) up to which _bf16_scores runs: 32 MiB each
BF16_SCORES_MAX = 1 << 24


def _bf16_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    dropout: float,
    scale: float | None,
) -> torch.Tensor:
    """bf16 attention on a CPU as two batched products and a softmax over the whole score matrix. PyTorch's CPU
    flash kernel runs bf16 at about fp32's speed (measured at 8 x 6 heads x 256 tokens on AVX-512 BF16: 20 ms a
    layer forward and backward, against 7.5 ms this way), while bf16 products run several times faster than
    fp32 ones; below BF16_SCORES_MAX the score matrix is small enough to hold. The mask becomes an additive bias
    with the dtype's lowest finite value (a row with no visible key averages its values instead of turning NaN).
    Runs outside autocast: its inputs are already bf16 and the softmax accumulates in fp32 inside the kernel."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    G = H // Hkv
    low = torch.finfo(q.dtype).min
    bias = None
    if mask is None and causal:
        bias = torch.zeros(Tq, Tk, dtype=q.dtype, device=q.device).masked_fill_(~causal_mask(Tq, Tk, q.device), low)
    elif mask is not None:
        bias = (
            torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, low)
            if mask.dtype == torch.bool
            else mask.to(q.dtype).clamp(min=low)
        )
    with torch.autocast(q.device.type, enabled=False):
        qg = q.reshape(B * Hkv, G * Tq, D)  # the query heads that share one key / value head, stacked
        kt = k.reshape(B * Hkv, Tk, D).transpose(1, 2)
        alpha = scale if scale is not None else 1 / math.sqrt(D)
        if bias is None:
            scores = torch.bmm(qg, kt).mul_(alpha)
        else:
            if bias.dim() == 2:
                b = bias.expand(B * Hkv, G * Tq, Tk) if G == 1 else bias.repeat(G, 1).expand(B * Hkv, G * Tq, Tk)
            else:  # [B or 1, H or 1, Tq, Tk]
                b = bias.expand(B, H, Tq, Tk).reshape(B * Hkv, G * Tq, Tk)
            scores = torch.baddbmm(b, qg, kt, alpha=alpha)
        p = torch.softmax(scores, dim=-1)
        if dropout > 0:
            p = F.dropout(p, dropout)
        return torch.bmm(p, v.reshape(B * Hkv, Tk, D)).view(B, H, Tq, D)


def _one_query(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """One query per row (a compiled decoding step) as sums over the cache, which inductor fuses into the step's
    own loops: the fused kernel's fixed cost per call (about 0.15 ms on 2 CPU cores) is more than the attention
    itself costs at this size. Grouped-query heads read their shared K/V through a view."""
    B, H, _, D = q.shape
    Hkv = k.size(1)
    qg = q.reshape(B, Hkv, H // Hkv, 1, D)
    s = (qg * k[:, :, None]).sum(-1) * (scale if scale is not None else 1 / math.sqrt(D))  # [B, Hkv, G, Tk]
    if mask is not None:
        m = mask  # [B or 1, 1, 1, Tk] broadcasts as it is; per-head masks split like the query heads
        if mask.dim() == 4 and mask.size(1) > 1:
            m = mask.reshape(mask.size(0), Hkv, H // Hkv, mask.size(-1))
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return (p[..., None] * v[:, :, None]).sum(-2).reshape(B, H, 1, D)


# --------------------------------------------------------------------------------------------------------------
# relative position bias (T5)


def relative_position_bucket(
    relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int
) -> torch.Tensor:
    """Bucket ids for key-minus-query distances. Half of the buckets hold exact small distances; the rest cover
    distances up to max_distance on a log scale (everything further shares the last bucket), because a word
    two places away matters differently from one three places away, but one 90 places away hardly differs from
    one 100 away. A bidirectional stack (the encoder) spends half of its buckets on keys after the query; the
    decoder's causal attention only ever sees keys at or before it."""
    out = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        out = out + (relative > 0).long() * buckets
        dist = relative.abs()
    else:
        dist = (-relative).clamp(min=0)
    exact = buckets // 2
    # log-spaced buckets for the far distances; clamp(min=1) only keeps log() finite where `exact` wins anyway
    far = (
        exact
        + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    )
    far = far.clamp(max=buckets - 1)
    return out + torch.where(dist < exact, dist, far)


class RelativePositionBias(nn.Module):
    """A learned scalar per (distance bucket, head), added to the attention scores: [1, H, Tq, Tk]. One table
    per stack, computed once per forward and shared by every block of the stack."""

    def __init__(self, n_head: int, buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.buckets, self.max_distance, self.bidirectional = buckets, max_distance, bidirectional
        self.bias = nn.Embedding(buckets, n_head)

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        """Bias for queries at positions offset..offset+q_len-1 against keys 0..k_len-1."""
        device = self.bias.weight.device
        q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        ids = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.buckets, self.max_distance)
        return self.bias(ids).permute(2, 0, 1)[None]
