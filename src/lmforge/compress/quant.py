"""Weight-only quantization: int8 for inference, and int8 / NF4 frozen bases for quantized-base LoRA (QLoRA).

Each Linear weight row (one output feature) is stored as int8 with one float scale: w ~= q * scale, q in
[-127, 127], scale = max|w_row| / 127. Decoding reads a quarter of the fp32 bytes. On CPU the product runs in
PyTorch's int8-weight kernel (`aten._weight_int8pack_mm`, the one gpt-fast uses) with bfloat16 activations
and float accumulation; elsewhere the weight is dequantized on the fly.

NF4 (the QLoRA paper's 4-bit NormalFloat) stores each block of 64 weights as 4-bit indices into 16 levels
placed at quantiles of a standard normal (pre-trained weights are close to normal), scaled by the block's
absolute maximum: 0.5 byte per weight plus one float per block, about 1/7 of fp32. Unlike the paper we keep the
block scales in fp32 (no double quantization: 0.06 byte per weight more).

A frozen quantized base under LoRA is used through `frozen_linear`, whose backward dequantizes the weight
again instead of keeping the dequantized copy alive between forward and backward: that copy would bring the
fp32 memory back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError

MODES = ("int8",)
BASE_MODES = ("int8", "nf4")  # frozen bases for LoRA


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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scales[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:
            y = frozen_linear(x2, self)
        elif self._fast:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                   self._scales_bf16).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def _nf4_levels() -> torch.Tensor:
    """16 levels: 0, 8 positive and 7 negative quantiles of N(0, 1), scaled to [-1, 1] (asymmetric so that 0 is
    exact), built the way the QLoRA paper describes."""
    offset = 0.9677083  # the paper's choice: mean of the outermost quantile pairs for 15 and 16 levels
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


NF4_LEVELS = _nf4_levels()


class NF4Linear(nn.Module):
    """A frozen Linear stored as block-wise NF4 (see the module notes); computes in the input's dtype."""

    block = 64

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int],
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.register_buffer("packed", packed)  # uint8, two 4-bit indices per byte
        self.register_buffer("scales", scales)  # fp32 absmax per block of 64 weights
        self.register_buffer("levels", NF4_LEVELS.clone())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, m: nn.Linear) -> NF4Linear:
        w = m.weight.detach().float().reshape(-1)
        n = w.numel()
        pad = (-n) % cls.block
        w = F.pad(w, (0, pad)).view(-1, cls.block)
        scales = w.abs().amax(dim=1).clamp(min=1e-12)
        idx = torch.empty(w.shape, dtype=torch.uint8)
        for s in range(0, w.size(0), 4096):  # nearest level, in slices to bound the [n, 16] distance matrix
            part = w[s:s + 4096] / scales[s:s + 4096, None]
            idx[s:s + 4096] = (part[..., None] - NF4_LEVELS).abs().argmin(-1).to(torch.uint8)
        idx = idx.view(-1)
        packed = (idx[0::2] << 4) | idx[1::2]
        bias = None if m.bias is None else m.bias.detach().clone()
        return cls(packed.contiguous(), scales, tuple(m.weight.shape), bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        idx = torch.stack([self.packed >> 4, self.packed & 15], dim=-1).view(-1, self.block).long()
        w = self.levels[idx] * self.scales[:, None]
        return w.view(-1)[: self.out_features * self.in_features].view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_linear(x, self) if torch.is_grad_enabled() and x.requires_grad else F.linear(
            x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """A frozen embedding stored as int8 rows with one scale per token. Under quantized-base LoRA a tied output
    head shares these buffers (an Int8Linear over the same qweight), so the vocabulary matrix, often the largest
    of a small model, is held once at a quarter of its fp32 size."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_embedding(cls, e: nn.Embedding) -> Int8Embedding:
        w = e.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        return cls(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scales)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scales[:, None].to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scales[ids][..., None]

    def head(self) -> Int8Linear:
        return Int8Linear(self.qweight, self.scales, None)


def _rows(module: nn.Module, dtype: torch.dtype, chunk: int):
    """(start, dequantized rows) of a quantized weight, `chunk` output rows at a time for int8 (one piece for
    NF4): a vocabulary-sized matrix is never dequantized whole."""
    if isinstance(module, (Int8Linear, Int8Embedding)) and module.qweight.size(0) > chunk:
        for s in range(0, module.qweight.size(0), chunk):
            yield s, module.qweight[s:s + chunk].to(dtype) * module.scales[s:s + chunk, None].to(dtype)
    else:
        yield 0, module.dequantize(dtype)


class _FrozenLinear(torch.autograd.Function):
    """x @ W^T for a frozen quantized W, dequantized in forward and again in backward (nothing fp32 is kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        parts = [F.linear(x, w) for _, w in _rows(module, x.dtype, 8192)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gx = None
        for s, w in _rows(ctx.module, grad.dtype, 8192):
            part = grad[..., s:s + w.size(0)] @ w
            gx = part if gx is None else gx + part
        return gx, None


def frozen_linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return _FrozenLinear.apply(x, module)


def quantize_linear(m: nn.Linear, mode: str) -> nn.Module:
    if mode not in BASE_MODES:
        raise ConfigError(f"quantized base {mode!r} is not supported; supported: {', '.join(BASE_MODES)}")
    return (NF4Linear if mode == "nf4" else Int8Linear).from_linear(m)


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
