"""A fine-tuning method is a transform of the model before the one training loop runs:

full    every parameter trains
top-k   only the last k blocks and the head (`freeze.py`)
lora    frozen model + low-rank adapters on the target Linear layers + the head (`lora.py`)
qlora   lora on a base whose block Linear layers are stored in NF4 (or int4 in groups of 32, or int8) and frozen
"""

from __future__ import annotations

from torch import nn

from lmforge.config import METHODS
from lmforge.errors import ConfigError
from lmforge.nn.attention import Attention
from lmforge.nn.lora import apply_lora, lora_targets, trainable_params
from lmforge.tune.freeze import freeze_all_but_top


def apply_method(model: nn.Module, cfg) -> int:
    """Prepare `model` for fine-tuning as `cfg` (a FinetuneConfig) says; returns the trainable parameter count."""
    if cfg.attn_dropout is not None:  # a training setting: the saved config keeps the model's own value
        for mod in model.modules():
            if isinstance(mod, Attention):
                mod.dropout = cfg.attn_dropout
    m = cfg.method
    if m == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return trainable_params(model)
    if m == "top-k":
        return freeze_all_but_top(model, cfg.top_k)
    if m in ("lora", "qlora"):
        return apply_lora(
            model,
            cfg.lora_targets,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            quantize=cfg.quant if m == "qlora" else None,
        )
    raise ConfigError(f"unknown fine-tuning method {m!r}; known: {', '.join(METHODS)}")


def check_method(model: nn.Module, cfg) -> None:
    """Refuse what `apply_method` would refuse for this model, before a recipe prints or computes anything."""
    if cfg.method in ("lora", "qlora"):
        lora_targets(model, cfg.lora_targets)


def describe(cfg, n_layer: int) -> str:
    if cfg.method == "top-k":
        return f"top-k, top {cfg.top_k} of {n_layer} blocks"
    if cfg.method in ("lora", "qlora"):
        base = f", {cfg.quant} base" if cfg.method == "qlora" else ""
        return f"{cfg.method}, r={cfg.lora_r} alpha={cfg.lora_alpha:g} on {cfg.lora_targets}{base}"
    return cfg.method
