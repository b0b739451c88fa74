"""A fine-tuning method is a transform of the model before the one training loop runs:

    full    every parameter trains
    top-k   only the last k blocks and the head (`freeze.py`)
    lora    frozen model + low-rank adapters on the target Linear layers + the head (`lora.py`)
    qlora   lora on a base whose block Linear layers are stored in NF4 (or int4 in groups of 32, or int8) and frozen
"""

from __future__ import annotations

import os
import sys

from torch import nn

from lmforge.config import METHODS
from lmforge.errors import ConfigError
from lmforge.files import check_out_dir
from lmforge.interop.peft import save_adapter
from lmforge.nn.attention import Attention
from lmforge.nn.lora import apply_lora, lora_targets, trainable_params
from lmforge.runtime import current_memory_mb, lean_allocator
from lmforge.train.checkpoint import clean_run_dir
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
        return apply_lora(model, cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          quantize=cfg.quant if m == "qlora" else None)
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


def save_outputs(model: nn.Module, out, tokenizer, base: str, cfg, generation_config: dict | None = None):
    """The run's model directory (adapters merged in: any HF tool loads it; generation_config.json gains
    `generation_config`) and, under LoRA, the adapter alone in the PEFT layout. Returns (model_dir, adapter_dir or
    None)."""
    from pathlib import Path

    out = Path(out)
    adapter = None
    if cfg.method in ("lora", "qlora"):
        adapter = save_adapter(model, out / "adapter", base_model=str(base), tokenizer=tokenizer)
    extra = {"generation_config": generation_config} if generation_config else {}
    return model.save_pretrained(out / "model", tokenizer=tokenizer, **extra), adapter



def start_run(cfg, out, resume: bool = False) -> tuple:
    """What every task recipe does first: a run folder that is new or empty (or, resuming, this run's own, its
    stale temporary files removed), glibc's memory settings for a checkpointed run (before anything large is
    allocated), and the resident memory before the model, which the run's peak is reported against. Returns
    (out as a Path, baseline MiB)."""
    from pathlib import Path

    out = check_out_dir(Path(out))
    if resume:
        clean_run_dir(out)
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; continue its run with --resume, or choose a new --out")
    if cfg.grad_checkpoint:
        lean_allocator()
    return out, current_memory_mb()


def say(msg: str) -> None:
    """A progress or status line for the person running the job: stderr, so stdout stays the results (under
    torchrun, from process 0 only)."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


def run_footer(result) -> str:
    """The last lines every task's summary ends with: where the adapter, the model and the report are."""
    lines = [f"adapter (PEFT layout): {result.adapter_dir}"] if getattr(result, "adapter_dir", None) else []
    return "\n".join(lines + [f"model: {result.model_dir}", f"report: {result.run_dir / 'report' / 'report.html'}"])
