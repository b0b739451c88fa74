"""Inference-time Linear layers with weights prepacked for oneDNN (CPU only).

Decoding multiplies a handful of rows by every weight matrix, once per token. PyTorch's default CPU path for
such skinny products (MKL GEMV / small GEMM on the [out, in] weight) streams weights at well under the memory
bandwidth, and gets worse at batch 8. oneDNN with the weight reordered once into its blocked layout (what
`torch.compile`'s CPU freezing does) reads them several times faster. `packed_linears(model)` swaps every
nn.Linear's forward for the packed one while the context is open.

The packed copies are cached on the modules (keyed by the weight's storage and version, so a weight that
changes is repacked), which costs one extra copy of the Linear weights in memory; `release_packed(model)` frees
them. Results match the plain path to float rounding (about 1e-6 relative).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_ATTR = "_lmforge_packed"


def can_pack(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, getattr(self, _ATTR)[1], self.bias, "none", [], "")


def _pack(m: nn.Linear, batch_hint: int) -> None:
    key = (m.weight.data_ptr(), m.weight._version, m.weight.dtype)
    cached = getattr(m, _ATTR, None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_hint)
        setattr(m, _ATTR, (key, packed))


@contextmanager
def packed_linears(model: nn.Module, batch_hint: int = 1, enabled: bool = True) -> Iterator[nn.Module]:
    """Run the model's Linear layers through prepacked oneDNN weights inside the block (no-op off CPU)."""
    if not enabled or not can_pack(model) or torch.is_grad_enabled():
        yield model
        return
    swapped = []
    try:
        for m in model.modules():
            # (a module whose forward is already swapped belongs to another open context, e.g. the serving engine
            # while a caller generates on the same model: that context swaps it back)
            if type(m) is nn.Linear and "forward" not in m.__dict__:
                _pack(m, batch_hint)
                m.forward = types.MethodType(_packed_forward, m)
                swapped.append(m)
        yield model
    finally:
        for m in swapped:
            del m.forward  # back to the class's forward


def release_packed(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, _ATTR):
            delattr(m, _ATTR)
