"""The fine-tuning loop: epochs over labelled batches, AdamW with linear warm-up and decay, gradient clipping,
evaluation after every epoch (or every `eval_every` steps), the best validation weights kept.

Task recipes (`lmforge.tune.classify`, `lmforge.tune.qa`) supply the batches and the evaluation; the loop is the
same for every task and reads top to bottom.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError

METHODS = ("full", "top-k", "lora", "qlora")


@dataclass
class FinetuneConfig:
    method: str = "full"  # full | top-k | lora | qlora
    top_k: int = 2  # blocks trained by method top-k
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scale is alpha / r
    lora_dropout: float = 0.05
    lora_targets: str = "attn"  # module patterns or groups (attn, mlp, all), comma-separated
    quant: str = "nf4"  # frozen base format under qlora: nf4, int4 (groups of 32, = a Q4_1 GGUF's grid) or int8
    grad_checkpoint: bool = False  # recompute block activations in backward (decoders): less memory, ~30% slower
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 5e-5
    optimizer: str = "adamw"  # adamw | adafactor (T5's optimizer: steps relative to each parameter's scale)
    weight_decay: float = 0.01
    warmup: float = 0.06  # share of steps spent warming up
    grad_clip: float = 1.0
    layer_decay: float = 1.0  # < 1: layer-wise learning-rate decay (block i of n learns at decay ** (n - i))
    label_smoothing: float = 0.0  # classification: share of each target spread over the other classes
    average: float = 0.0  # > 0: also try the mean of the weights at the evaluations in this last share of training
    max_len: int = 128  # tokens per example (longer ones are truncated, or windowed for QA)
    eval_every: int = 0  # steps between evaluations; 0 = after every epoch
    metric: str = "accuracy"  # the validation metric that picks the best weights (higher is better)
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown fine-tuning method {self.method!r}; known: {', '.join(METHODS)}")
        if self.method in ("lora", "qlora") and (self.lora_r <= 0 or self.lora_alpha <= 0
                                                 or not 0 <= self.lora_dropout < 1):
            raise ConfigError("lora_r and lora_alpha must be positive and lora_dropout in [0, 1)")
        if self.quant not in ("nf4", "int4", "int8"):
            raise ConfigError(f"quant must be nf4, int4 or int8, got {self.quant!r}")
        if not self.epochs > 0 or self.batch_size <= 0 or not self.lr > 0 or self.max_len < 8:
            raise ConfigError("epochs, batch size and learning rate must be positive, max_len at least 8")
        if self.optimizer not in ("adamw", "adafactor"):
            raise ConfigError(f"optimizer must be adamw or adafactor, got {self.optimizer!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a share of the steps in [0, 1), got {self.warmup}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.average <= 1:
            raise ConfigError(f"average is a share of the training steps in [0, 1], got {self.average}")


@dataclass
class FitResult:
    steps: int
    seconds: float
    best: dict[str, float] = field(default_factory=dict)  # validation metrics of the kept weights
    history: list[dict[str, Any]] = field(default_factory=list)


def length_buckets(n: int, length: Callable[[int], Any], batch_size: int, seed: int, per: int = 50) -> list[list[int]]:
    """Batches of example indices for one epoch: shuffled, then each run of `per` batches sorted by `length`
    and cut into batches (so a batch pads to similar lengths), and the batches shuffled again."""
    import random

    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    chunk = batch_size * per
    groups = []
    for s in range(0, n, chunk):
        part = sorted(order[s:s + chunk], key=length)
        groups += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(groups)
    return groups


def linear_schedule(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def fit(
    model: nn.Module,
    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    steps_per_epoch: int,
    evaluate: Callable[[], dict[str, float]],
    cfg: FinetuneConfig,
    metrics_path: Path | None = None,
    progress: bool | None = None,
    loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor] | None = None,
) -> FitResult:
    """Train `model` on `batches(epoch)` (dicts of forward() arguments including labels) for cfg.epochs.
    loss_fn(model, batch) replaces `model(**batch).loss` for objectives that are not the model's own (DPO).
    Only trainable parameters change, so only they are kept for the best validation point.

    cfg.average > 0 also keeps the running mean of the weights at every evaluation in the last `average` share
    of the steps (weight averaging, as stochastic weight averaging does along a plateau of the loss: the mean
    of nearby solutions generalises better than each of them) and, at the end, evaluates it: it is kept when
    it scores at least as well on validation as the best single point."""
    from lmforge.runtime import lean_allocator, tune_allocator

    if cfg.grad_checkpoint:  # a run that asks for checkpointing is short of memory: let glibc return it
        lean_allocator()
    else:
        tune_allocator()
    device = torch.device(cfg.device)
    total = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup = int(total * cfg.warmup)
    from lmforge.train.optim import build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, layer_decay=cfg.layer_decay)
    show = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="fine-tune", unit="step", dynamic_ncols=True, file=sys.stderr)
    log = open(metrics_path, "a", encoding="utf-8") if metrics_path else None
    history: list[dict[str, Any]] = []
    best: dict[str, float] = {}
    best_state: dict[str, torch.Tensor] | None = None
    mean_state: dict[str, torch.Tensor] | None = None  # weight averaging (cfg.average)
    averaged = 0
    t0, step, epoch, loss_avg = time.time(), 0, 0, float("nan")

    def show(msg: str) -> None:  # above the progress bar when there is one
        (bar.write if bar is not None else lambda m: print(m, file=sys.stderr))(msg)

    def record(r: dict[str, Any]) -> None:
        history.append(r)
        if log is not None:
            log.write(json.dumps(r) + "\n")
            log.flush()

    def run_eval() -> None:
        nonlocal best, best_state, mean_state, averaged
        model.eval()
        m = evaluate()
        model.train()
        record({"step": step, "split": "val", "epoch": epoch, **m})
        show(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
        if not best or m.get(cfg.metric, -math.inf) > best.get(cfg.metric, -math.inf):
            best = m
            best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        if cfg.average and step >= total * (1 - cfg.average):
            averaged += 1
            with torch.no_grad():
                if mean_state is None:
                    mean_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
                else:
                    for k, v in model.named_parameters():
                        if k in mean_state:
                            mean_state[k].add_(v.detach() - mean_state[k], alpha=1 / averaged)

    model.train()
    try:
        while step < total:
            for batch in batches(epoch):
                lr = linear_schedule(step, total, warmup, cfg.lr)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
                if step % cfg.log_every == 0 or step == total:
                    record({"step": step, "loss": loss_avg, "lr": lr, "epoch": epoch, "time": time.time() - t0})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"epoch {epoch + 1}  loss {loss_avg:.4f}")
                if cfg.eval_every and step % cfg.eval_every == 0:
                    run_eval()
                if step >= total:
                    break
            epoch += 1
            if not cfg.eval_every or step % cfg.eval_every:
                run_eval()
        params = dict(model.named_parameters())
        if mean_state is not None and averaged > 1:  # (inside the try: its record goes to the open log)
            with torch.no_grad():
                for k, v in mean_state.items():
                    params[k].copy_(v)
            model.eval()
            m = evaluate()
            record({"step": step, "split": "val", "epoch": epoch, "averaged_points": averaged, **m})
            show(f"mean of the weights at the last {averaged} evaluations: " + "  ".join(
                f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
            if m.get(cfg.metric, -math.inf) >= best.get(cfg.metric, -math.inf):
                best, best_state = {**m, "averaged_points": averaged}, None  # keep the averaged weights
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    if best_state is not None:
        with torch.no_grad():
            for k, v in best_state.items():
                params[k].copy_(v)
    model.eval()
    return FitResult(step, time.time() - t0, best, history)
