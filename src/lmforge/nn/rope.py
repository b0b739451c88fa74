"""Rotary position embedding (RoPE) and the ways checkpoints stretch it past the context they were trained on.

A head's dimensions are rotated in pairs (x_i, x_{i + d/2}) (the "rotate half" layout HF checkpoints use) by the
angle position * inv_freq_i, inv_freq_i = theta ** (-2i / d). What differs between families is only `inv_freq`
and a factor on cos / sin, so a scaling is a function of the config (`rope_scaling`, HF's keys as they are):

    default   theta ** (-2i/d)                                 GPT-NeoX, Llama 2, Qwen2, most models
    linear    inv_freq / factor                                 positions interpolated (kaiokendev)
    dynamic   theta grown with the sequence past the context   NTK-aware, computed per call
    llama3    low frequencies / factor, high kept, a smooth ramp between (Llama 3.1-3.3)
    yarn      the llama3 idea with a linear ramp in dimension space, and cos / sin scaled (Qwen2.5 long context)
    longrope  per-frequency factors, a short and a long set, cos / sin scaled (Phi-3, Phi-4-mini)
    factors   per-frequency divisors as given (what GGUF files store for llama3 scaling: `rope_freqs`)

`partial` < 1 rotates only the first `partial * head_dim` dimensions of each head (Phi-3 / Phi-4-mini: 0.75).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmforge.config import ROPE_SCALINGS, rope_scaling_type


def inv_frequencies(
    dim: int, theta: float, scaling: dict[str, Any] | None = None, context: int = 2048, seq_len: int = 0
) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim / 2], factor on cos and sin) for `dim` rotated dimensions. `context`: the model's
    max_position_embeddings; `seq_len`: the length this call covers (dynamic and longrope depend on it)."""
    kind, s = rope_scaling_type(scaling), scaling or {}
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv = 1.0 / (theta**exponents)
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / s["factor"], 1.0
    if kind == "dynamic":
        n = max(seq_len, context)
        f = s["factor"]
        base = theta * ((f * n / context) - (f - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    if kind == "factors":
        return inv / torch.tensor(s["factors"], dtype=torch.float32), 1.0
    original = s.get("original_max_position_embeddings") or context
    if kind == "llama3":
        f, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        # long wavelengths (low frequencies) are divided by f, short ones kept; between, a ramp in 1 / wavelength
        ramp = ((original / wavelen - low) / (high - low)).clamp(0, 1)
        return (1 - ramp) * inv / f + ramp * inv, 1.0
    if kind == "yarn":
        f = s.get("factor") or context / original
        attn = s.get("attention_factor")
        if attn is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attn = _yarn_mscale(f, m) / _yarn_mscale(f, m_all) if m and m_all else _yarn_mscale(f)
        fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def rotations_dim(n: float) -> float:  # the dimension whose wavelength fits n turns in `original` tokens
            return dim * math.log(original / (n * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = rotations_dim(fast), rotations_dim(slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        keep = 1 - ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        return inv / f * (1 - keep) + inv * keep, float(attn)
    if kind == "longrope":
        f = s.get("factor") or context / original
        attn = s.get("attention_factor")
        if attn is None:
            attn = 1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(original))
        factors = s["long_factor"] if seq_len > original else s["short_factor"]
        return inv / torch.tensor(factors, dtype=torch.float32), float(attn)
    raise ValueError(f"rope scaling {kind!r} is not one of {', '.join(ROPE_SCALINGS)}")


def _yarn_mscale(factor: float, m: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


class Rotary(nn.Module):
    """cos / sin tables for positions; built for up to 4096 positions and grown on demand (a 128k-context model
    would otherwise carry hundreds of MB of tables it may never use). Scalings whose frequencies depend on the
    length of the call (dynamic, longrope past its original context) compute that call's tables afresh."""

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        theta: float = 10000.0,
        partial: float = 1.0,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.dim = int(head_dim * partial)
        self.theta, self.scaling, self.context = theta, scaling, max_seq_len
        kind = rope_scaling_type(scaling)
        original = (scaling or {}).get("original_max_position_embeddings") or max_seq_len
        # beyond this length the frequencies change with the call's length (None: never)
        self.varies_past = max_seq_len if kind == "dynamic" else original if kind == "longrope" else None
        self._build(min(max_seq_len, 4096))

    def _tables(self, n: int, device: torch.device | None, seq_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        inv, factor = inv_frequencies(self.dim, self.theta, self.scaling, self.context, seq_len)
        freqs = torch.outer(torch.arange(n, device=device).float(), inv.to(device))
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * factor, emb.sin() * factor

    def _build(self, n: int, device: torch.device | None = None) -> None:
        if torch.device(device or torch.empty(0).device).type == "meta":  # a shell to load into: shapes only
            for name in ("cos", "sin"):
                self.register_buffer(name, torch.empty(n, self.dim, device="meta"), persistent=False)
            return
        if self.varies_past is not None:
            n = min(n, self.varies_past)  # the table holds the lengths whose frequencies do not change
        cos, sin = self._tables(n, device)
        # not saved in state_dict: derived from the config
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reserve(self, n: int) -> None:
        """Make sure the tables cover positions 0..n-1 (a compiled decoding step cannot grow them itself)."""
        if n > self.cos.size(0) and (self.varies_past is None or self.cos.size(0) < self.varies_past):
            self._build(n, self.cos.device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B or 1, 1, T, dim] for the given positions [B or 1, T]."""
        if not _compiling():  # (reading the largest position back to Python would split a compiled graph)
            n = int(position_ids.max()) + 1
            if self.varies_past is not None and n > self.varies_past:  # this call's own frequencies
                cos, sin = self._tables(n, self.cos.device, seq_len=n)
                return cos.to(self.cos.dtype)[position_ids][:, None], sin.to(self.sin.dtype)[position_ids][:, None]
            self.reserve(n)
        return self.cos[position_ids][:, None], self.sin[position_ids][:, None]


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x rotated by (cos, sin); with partial rotary (tables narrower than the head) the rest passes as it is."""
    d = cos.size(-1)
    if d < x.size(-1):
        return torch.cat([apply_rotary(x[..., :d], cos, sin), x[..., d:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
