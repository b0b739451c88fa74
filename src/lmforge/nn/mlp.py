"""Position-wise feed-forward layers: the plain two-layer MLP (GPT-2, BERT, T5 v1.0) and the gated one
(SwiGLU for Llama, gated-GELU for T5 v1.1), where a second projection multiplies the activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.packed import FusedLinear

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """`down(act(up(x)))`, or `down(act(gate(x)) * up(x))` when gated."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.gated = kind in ("swiglu", "geglu")
        act_name = {"swiglu": "silu", "geglu": "gelu_tanh"}.get(kind, kind)
        self.act = ACTIVATIONS[act_name]
        if self.gated:
            self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.fused: FusedLinear | None  # gate and up as one product, set while decoding (lmforge.nn.packed)
        self.register_module("fused", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            fused = self.fused  # read once (see Attention.forward)
            g, u = fused(x) if fused is not None else (self.gate(x), self.up(x))
            return self.down(self.act(g) * u)
        return self.down(self.act(self.up(x)))
