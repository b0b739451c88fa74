"""Weight-only int8 quantization for inference.

Each Linear weight row (one output feature) is stored as int8 with one float scale: w ~= q * scale, q in
[-127, 127], scale = max|w_row| / 127. Decoding reads a quarter of the fp32 bytes. On CPU the product runs in
PyTorch's int8-weight kernel (`aten._weight_int8pack_mm`, the one gpt-fast uses) with bfloat16 activations
and float accumulation; elsewhere the weight is dequantized on the fly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError

MODES = ("int8",)


class Int8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._fast = qweight.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        self._scales_bf16 = scales.to(torch.bfloat16)

    @classmethod
    def from_linear(cls, m: nn.Linear) -> Int8Linear:
        w = m.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if m.bias is None else m.bias.detach().clone()
        return cls(q.contiguous(), scales, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self._fast:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                   self._scales_bf16).to(x.dtype)
        else:
            y = F.linear(x2, self.qweight.to(x.dtype) * self.scales[:, None].to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace every nn.Linear by its weight-only quantized version, in place (inference only)."""
    if mode not in MODES:
        raise ConfigError(f"quantization mode {mode!r} is not supported; supported: {', '.join(MODES)}")
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear:
            setattr(model, name, Int8Linear.from_linear(child))
        else:
            quantize_model(child, mode)
    return model.eval()
