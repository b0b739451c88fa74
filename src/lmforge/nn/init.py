"""Memory every kernel takes: loaded tensors moved to 64-byte-aligned storage (model building from loaded tensors
is in lmforge.interop.weights).

A tensor read from a file (safetensors maps the file; GGUF dequantizes into numpy) starts wherever its bytes lie:
safetensors places tensors one after another with no padding, so an int8 matrix after three floats starts at a
byte offset of 12 from a page-aligned base, and numpy aligns its arrays to 16 bytes. Some CPU kernels assume
more: PyTorch's int8 weight-only product (`_weight_int8pack_mm`) crashes with a segmentation fault on CPUs with
AMX (Intel Sapphire Rapids) when its weight is not 64-byte aligned. `aligned` is applied once, where tensors are
read, so every fast path sees memory laid out as a fresh allocation would be (PyTorch's CPU allocator aligns
those to 64 bytes), on any x86-64 CPU."""

from __future__ import annotations

import torch

ALIGNMENT = 64  # bytes: a cache line, and what AVX-512 / AMX loads want


def is_aligned(t: torch.Tensor, alignment: int = ALIGNMENT) -> bool:
    return t.data_ptr() % alignment == 0


def aligned(t: torch.Tensor, alignment: int = ALIGNMENT) -> torch.Tensor:
    """`t` itself when its data starts on an `alignment`-byte boundary (or it is not in CPU memory), otherwise a
    fresh contiguous copy that does (detached: this is for tensors being loaded). A fresh CPU tensor is 64-byte
    aligned with PyTorch's allocator; should an allocator give less, the copy is placed at an aligned offset
    inside a slightly larger buffer. Under torch.compile it returns `t`: the compiler allocates its own buffers,
    and a data pointer cannot be traced."""
    if torch.compiler.is_compiling() or t.device.type != "cpu" or t.is_quantized or is_aligned(t, alignment):
        return t
    out = torch.empty(t.shape, dtype=t.dtype)
    if not is_aligned(out, alignment):
        nbytes = t.numel() * t.element_size()
        raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
        start = -raw.data_ptr() % alignment
        out = raw[start : start + nbytes].view(t.dtype).view(t.shape)
    return out.copy_(t.detach())


def aligned_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`aligned` over every tensor of a state dict just read from a file."""
    return {k: aligned(v) for k, v in tensors.items()}
