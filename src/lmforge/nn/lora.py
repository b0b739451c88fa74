"""LoRA: a frozen Linear plus a trainable low-rank update, y = W x + (alpha / r) * B A x.

A [r, in] starts random and B [out, r] at zero, so training starts from the unchanged model. `apply_lora`
turns a model into a LoRA model in place: every parameter is frozen, the Linear layers whose names match the
target patterns are wrapped, and the task head (classifier, pooler, QA head) stays fully trainable, as PEFT's
`modules_to_save` does. With `quantize="int8"`, `"nf4"` or `"int4"` every Linear inside the Transformer blocks is stored
quantized and frozen first (quantized-base LoRA, as in QLoRA); the adapters themselves stay fp32.

The wrapped layer keeps the original as `.base`, so the adapter can be merged into the weight (W + s B A) and
unmerged again, switched off (`lora_disabled`: the base model, e.g. DPO's reference), saved alone in the PEFT
layout (`lmforge.interop.peft`), or folded away (`merge_and_unload`) for export.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.nn.quant import Int4Linear, Int8Embedding, Int8Linear, NF4Linear, base_int8, quantize_linear

# short names users can give instead of module patterns
TARGET_GROUPS = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["mlp.gate", "mlp.up", "mlp.down"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate", "mlp.up", "mlp.down"],
}
HEADS = ("classifier", "pooler", "qa_head", "nsp_head")  # trained in full under LoRA when the model has them


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ConfigError(f"LoRA rank must be positive, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does for its own weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def quantized(self) -> bool:
        return not isinstance(self.base, nn.Linear)

    @property
    def weight(self) -> torch.Tensor:  # the effective weight (what code reading `.weight` of a Linear expects)
        return self.base_weight() + (0 if self.merged else self.delta())

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def base_weight(self) -> torch.Tensor:
        return self.base.dequantize() if self.quantized else self.base.weight

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.disabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.quantized:
            raise ConfigError("a LoRA adapter on a quantized base cannot be merged in place; use merge_and_unload")
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def expand_targets(targets: str | Sequence[str]) -> list[str]:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: list[str] = []
    for t in targets:
        out += TARGET_GROUPS.get(t, [t])
    return out


def _target_candidates(model: nn.Module) -> dict[str, nn.Module]:
    linear_types = (nn.Linear, Int8Linear, NF4Linear, Int4Linear)
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, linear_types) and n != "lm_head" and not n.startswith(HEADS)
    }


def lora_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """The Linear layers of `model` that the target patterns choose; a ConfigError naming the model's layers when
    they choose none (recipes call this before they start, so a bad pattern is the only thing they print)."""
    patterns = expand_targets(targets)
    if not patterns:
        raise ConfigError("LoRA needs at least one target module pattern (e.g. attn, mlp, all, q_proj)")
    candidates = _target_candidates(model)
    chosen = [n for n in candidates if any(_matches(n, p) for p in patterns)]
    if not chosen:
        examples = sorted({n.split(".", 2)[-1] for n in candidates})[:8]
        raise ConfigError(
            f"LoRA target patterns {', '.join(patterns)} match no Linear layer; this model's are "
            f"named like {', '.join(examples)}"
        )
    return chosen


def apply_lora(
    model: nn.Module,
    targets: str | Sequence[str] = "attn",
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    quantize: str | None = None,
    train_heads: bool = True,
) -> int:
    """Make `model` a LoRA model in place; returns the number of trainable parameters.

    targets: module-name patterns (a name, a dotted suffix such as `mlp.up`, or a glob such as `blocks.1*.attn.*`),
    or the groups attn / mlp / all. quantize: None, "int8", "nf4" or "int4" (groups of 32) for a frozen quantized
    base."""
    if lora_modules(model):
        raise ConfigError("this model already has LoRA adapters")
    chosen = lora_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    candidates = _target_candidates(model)
    for name, m in candidates.items():
        if quantize and isinstance(m, nn.Linear) and name.startswith("blocks."):
            m = quantize_linear(m, quantize)
        if name in chosen:
            m = LoRALinear(m, r, alpha, dropout)
        if m is not candidates[name]:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, m)
    if quantize and hasattr(model, "tok_emb") and hasattr(model, "lm_head") and isinstance(model.tok_emb, nn.Embedding):
        # a decoder's vocabulary matrix is a frozen base weight too: int8 rows, shared with a tied head
        tied = model.lm_head.weight is model.tok_emb.weight
        model.tok_emb = Int8Embedding.from_embedding(model.tok_emb)
        model.lm_head = base_int8(model.tok_emb.head()) if tied else quantize_linear(model.lm_head, quantize)
    if train_heads:
        for name, p in model.named_parameters():
            if name.startswith(HEADS):
                p.requires_grad_(True)
    return trainable_params(model)


def trainable_params(model: nn.Module) -> int:
    seen: set[int] = set()
    return sum(p.numel() for p in model.parameters() if p.requires_grad and not (id(p) in seen or seen.add(id(p))))


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into a plain fp32 nn.Linear (a quantized base is dequantized), in place."""
    for name, m in lora_modules(model).items():
        with torch.no_grad():
            w = m.base_weight().float() + (0 if m.merged else m.delta().float())
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    return model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as if it had no adapters and no quantized layers: `X.weight` is the merged,
    dequantized weight. Model-directory writers use it, so saving a LoRA model writes the merged model."""
    state = model.state_dict()
    wrapped = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (LoRALinear, Int8Linear, NF4Linear, Int4Linear, Int8Embedding))
    }
    if not wrapped:
        return state
    out = {}
    skip = tuple(n + "." for n in wrapped)
    for k, v in state.items():
        if not k.startswith(skip):
            out[k] = v
    for n, m in wrapped.items():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                out[n + ".weight"] = m.base_weight().float() + (0 if m.merged else m.delta().float())
        elif any(n.startswith(w + ".") for w in wrapped):
            continue  # a quantized base inside a LoRA layer: handled by its wrapper
        else:
            out[n + ".weight"] = m.dequantize()
        if getattr(m, "bias", None) is not None:
            out[n + ".bias"] = m.bias.detach()
    return out


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter is skipped while the context is open."""
    mods = list(lora_modules(model).values())
    if any(m.merged for m in mods):
        raise ConfigError("adapters are merged into the weights; unmerge them before disabling")
    for m in mods:
        m.disabled = True
    try:
        yield
    finally:
        for m in mods:
            m.disabled = False
