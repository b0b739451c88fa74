"""Building a model from loaded tensors without allocating it twice: construct it on the meta device, then adopt
the tensors (assigned, not copied). Every reader of a model file (HF directories of each family, GGUF) uses this."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lmforge.errors import ModelLoadError
from lmforge.nn.rope import Rotary

_INITS = (
    "normal_",
    "uniform_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "zeros_",
    "ones_",
    "constant_",
)


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
    model.load_state_dict(state, strict=False, assign=True)
    cfg = model.config
    if getattr(cfg, "tie_embeddings", False):
        model.lm_head.weight = model.tok_emb.weight
    for m in model.modules():
        if isinstance(m, Rotary):
            m._build(min(cfg.max_seq_len, 4096))
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"{where}: no weights for {missing[0]}")
    return model
