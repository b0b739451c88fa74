"""Building a model whose weights are about to be loaded, and giving loaded tensors memory every kernel takes.

A tensor read from a file (safetensors maps the file; GGUF dequantizes into numpy) starts wherever its bytes lie:
safetensors places tensors one after another with no padding, so an int8 matrix after three floats starts at a
byte offset of 12 from a page-aligned base, and numpy aligns its arrays to 16 bytes. Some CPU kernels assume
more: PyTorch's int8 weight-only product (`_weight_int8pack_mm`) crashes with a segmentation fault on CPUs with
AMX (Intel Sapphire Rapids) when its weight is not 64-byte aligned. `aligned` is applied once, where tensors are
read, so every fast path sees memory laid out as a fresh allocation would be (PyTorch's CPU allocator aligns
those to 64 bytes), on any x86-64 CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

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
        out = raw[start:start + nbytes].view(t.dtype).view(t.shape)
    return out.copy_(t.detach())


def aligned_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`aligned` over every tensor of a state dict just read from a file."""
    return {k: aligned(v) for k, v in tensors.items()}


_INITS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
          "xavier_normal_", "zeros_", "ones_", "constant_")


@contextmanager
def meta_init() -> Iterator[None]:
    """Construct modules on the meta device without running their initialisers: loaders build the model shell
    here and assign the loaded tensors into it. (On meta, PyTorch's random initialisers run through its Python
    reference implementations, whose first use imports torch._dynamo: about 2 s and 40 MiB in every process
    that loads a model.) The initialisers in torch.nn.init are swapped for no-ops while the block runs, as
    transformers' no_init_weights does, so don't initialise another model in another thread meanwhile."""
    saved = {name: getattr(nn.init, name) for name in _INITS}

    def keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return tensor

    try:
        for name in _INITS:
            setattr(nn.init, name, keep)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def adopt_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Give a model built under `meta_init` its loaded tensors (assigned, not copied), tie the output matrix to
    the embedding when the config says so, rebuild the rotary tables (derived from the config, never stored),
    and refuse a model left with a parameter that no tensor filled."""
    from lmforge.errors import ModelLoadError
    from lmforge.nn.attention import Rotary

    model.load_state_dict(state, strict=False, assign=True)
    cfg = model.config
    if getattr(cfg, "tie_embeddings", False):
        model.lm_head.weight = model.tok_emb.weight
    rotary = getattr(model, "rotary", None)
    if isinstance(rotary, Rotary):
        rotary._build(min(cfg.max_seq_len, 4096))
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"{where}: no weights for {missing[0]}")
    return model
