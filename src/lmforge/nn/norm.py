"""Normalisation layers. LayerNorm is torch's; RMSNorm is written out because its eps placement matters
for parity with Llama/T5 checkpoints (eps inside the square root, scale applied in the input dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * w; with `offset` 1, x / rms(x) * (1 + w) (Gemma stores its scales as offsets from 1, and
    computes the product in fp32 before casting back)."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + self.offset if self.offset else self.weight
        if x.dtype == torch.float32:  # the fused kernel; the same arithmetic as below
            return F.rms_norm(x, (x.size(-1),), w, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * w.float()).to(dtype)
        return self.weight * x32.to(dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True, offset: float = 0.0) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, offset)
    return nn.LayerNorm(dim, eps=eps, bias=bias)
