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

from lmforge.config import FinetuneConfig
from lmforge.errors import CheckpointError
from lmforge.files import write_text
from lmforge.models.base import PretrainedModel
from lmforge.runtime import autocast as mixed_precision
from lmforge.runtime import lean_allocator, resolve_dtype, tune_allocator
from lmforge.train.checkpoint import (
    clean_run_dir,
    list_checkpoints,
    optimizer_tensors,
    read_checkpoint,
    restore_optimizer,
    restore_rng,
    rng_tensors,
    write_checkpoint,
)
from lmforge.train.optim import build_optimizer


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


def model_loss(model: nn.Module, batch: dict[str, Any], grad_checkpoint: bool = False) -> torch.Tensor:
    """The model's own loss on a batch: lmforge's models are asked for the loss alone (`loss_only=True`: no
    logits kept, the decoder's head and loss computed in chunks), with activation checkpointing when asked;
    any other module gets the batch as it is."""
    if isinstance(model, PretrainedModel):
        return model(**batch, loss_only=True, grad_checkpoint=grad_checkpoint).loss
    return model(**batch).loss


def fit(
    model: nn.Module,
    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    steps_per_epoch: int,
    evaluate: Callable[[], dict[str, float]],
    cfg: FinetuneConfig,
    metrics_path: Path | None = None,
    progress: bool | None = None,
    loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor] | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
) -> FitResult:
    """Train `model` on `batches(epoch)` (dicts of forward() arguments including labels) for cfg.epochs.
    loss_fn(model, batch) replaces `model_loss` (the model's own loss) for objectives that are not the model's
    own (DPO); it asks the model for activation checkpointing itself when cfg.grad_checkpoint is set.
    Only trainable parameters change, so only they are kept for the best validation point.

    cfg.dtype bfloat16 (or what auto picks) runs the forward passes and evaluations under autocast: products
    in bf16, the weights, gradients and optimizer in fp32.

    cfg.average > 0 also keeps the running mean of the weights at every evaluation in the last `average` share
    of the steps (weight averaging, as stochastic weight averaging does along a plateau of the loss: the mean
    of nearby solutions generalises better than each of them) and, at the end, evaluates it: it is kept when
    it scores at least as well on validation as the best single point.

    With a `run_dir`, every cfg.ckpt_every steps the loop's whole state goes to `run_dir/checkpoints/`: the
    trainable weights, the optimizer, the RNG, the best and averaged weights and the position in the epoch.
    resume=True continues from the newest one bitwise as if never stopped (the epoch's batches are rebuilt
    from their seed and the consumed ones skipped); with none there, the run starts over. `batches(epoch)` must
    be a function of the epoch alone, as length_buckets and the tasks' seeded shuffles are."""
    if cfg.grad_checkpoint:  # a run that asks for checkpointing is short of memory: let glibc return it
        lean_allocator()
    else:
        tune_allocator()
    device = torch.device(cfg.device)
    total = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    autocast = mixed_precision(resolve_dtype(cfg.dtype, device), device)  # the weights stay fp32

    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, layer_decay=cfg.layer_decay)
    state = _FitState()
    if run_dir is not None:
        clean_run_dir(run_dir)
    ckpts = list_checkpoints(run_dir) if run_dir is not None and resume else []
    if ckpts:
        total = state.load(ckpts[-1], model, opt)  # the saved schedule (a time budget sized it once)
        _rewrite_log(metrics_path, state.history)
    elif metrics_path is not None and resume:
        Path(metrics_path).unlink(missing_ok=True)  # killed before the first checkpoint: start over
    warmup = int(total * cfg.warmup)
    show = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=state.step, desc="fine-tune", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    log = open(metrics_path, "a", encoding="utf-8") if metrics_path else None
    t0 = time.time() - state.seconds

    def show(msg: str) -> None:  # above the progress bar when there is one
        (bar.write if bar is not None else lambda m: print(m, file=sys.stderr))(msg)

    def record(r: dict[str, Any]) -> None:
        state.history.append(r)
        if log is not None:
            log.write(json.dumps(r) + "\n")
            log.flush()

    def run_eval() -> None:
        model.eval()
        with autocast:
            m = evaluate()
        model.train()
        record({"step": state.step, "split": "val", "epoch": state.epoch, **m})
        show(f"step {state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
        if not state.best or m.get(cfg.metric, -math.inf) > state.best.get(cfg.metric, -math.inf):
            state.best = m
            state.best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        if cfg.average and state.step >= total * (1 - cfg.average):
            state.averaged += 1
            with torch.no_grad():
                if state.mean_state is None:
                    state.mean_state = {k: v.detach().clone() for k, v in model.named_parameters()
                                        if v.requires_grad}
                else:
                    for k, v in model.named_parameters():
                        if k in state.mean_state:
                            state.mean_state[k].add_(v.detach() - state.mean_state[k], alpha=1 / state.averaged)

    model.train()
    try:
        while state.step < total or state.rng is not None:  # (resumed at the last step: finish its epoch)
            epoch_batches = iter(batches(state.epoch))
            if state.rng is not None:  # resumed: skip what this epoch already trained on, then the RNG
                for _ in range(state.in_epoch):
                    next(epoch_batches, None)
                state.restore_rng()
            for batch in epoch_batches:
                if state.step >= total:
                    break
                lr = linear_schedule(state.step, total, warmup, cfg.lr)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with autocast:
                    loss = (loss_fn(model, batch) if loss_fn is not None
                            else model_loss(model, batch, grad_checkpoint=cfg.grad_checkpoint))
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                state.step += 1
                state.in_epoch += 1
                la = state.loss_avg
                state.loss_avg = loss.item() if math.isnan(la) else 0.9 * la + 0.1 * loss.item()
                if state.step % cfg.log_every == 0 or state.step == total:
                    record({"step": state.step, "loss": state.loss_avg, "lr": lr, "epoch": state.epoch,
                            "time": time.time() - t0})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"epoch {state.epoch + 1}  loss {state.loss_avg:.4f}")
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    run_eval()
                if run_dir is not None and cfg.ckpt_every and state.step % cfg.ckpt_every == 0:
                    state.seconds = time.time() - t0
                    state.save(run_dir, model, opt, total, cfg.keep_checkpoints)
                if state.step >= total:
                    break
            state.epoch += 1
            state.in_epoch = 0
            if not cfg.eval_every or state.step % cfg.eval_every:
                run_eval()
        named = dict(model.named_parameters())
        if state.mean_state is not None and state.averaged > 1:  # (inside the try: its record goes to the log)
            with torch.no_grad():
                for k, v in state.mean_state.items():
                    named[k].copy_(v)
            model.eval()
            with autocast:
                m = evaluate()
            record({"step": state.step, "split": "val", "epoch": state.epoch, "averaged_points": state.averaged,
                    **m})
            show(f"mean of the weights at the last {state.averaged} evaluations: " + "  ".join(
                f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
            if m.get(cfg.metric, -math.inf) >= state.best.get(cfg.metric, -math.inf):
                state.best, state.best_state = {**m, "averaged_points": state.averaged}, None  # keep the mean
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    if state.best_state is not None:
        with torch.no_grad():
            for k, v in state.best_state.items():
                named[k].copy_(v)
    model.eval()
    return FitResult(state.step, time.time() - t0, state.best, state.history)


@dataclass
class _FitState:
    """Everything `fit` carries from step to step, and so everything a checkpoint must hold to resume it."""
    step: int = 0
    epoch: int = 0
    in_epoch: int = 0  # batches of this epoch already trained on
    loss_avg: float = float("nan")
    seconds: float = 0.0  # training time before this session
    best: dict[str, Any] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] | None = None
    mean_state: dict[str, torch.Tensor] | None = None
    averaged: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, torch.Tensor] | None = None  # loaded, applied once the epoch's consumed batches are skipped

    def save(self, run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, total: int, keep: int) -> None:
        opt_tensors, groups = optimizer_tensors(opt)
        files = {"trainable": {k: v.detach().cpu().contiguous() for k, v in model.named_parameters()
                               if v.requires_grad},
                 "optimizer": opt_tensors, "rng": rng_tensors()}
        if self.best_state is not None:
            files["best"] = {k: v.cpu().contiguous() for k, v in self.best_state.items()}
        if self.mean_state is not None:
            files["mean"] = {k: v.cpu().contiguous() for k, v in self.mean_state.items()}
        meta = {"epoch": self.epoch, "in_epoch": self.in_epoch, "loss_avg": self.loss_avg, "total": total,
                "seconds": self.seconds, "best": self.best, "averaged": self.averaged, "history": self.history,
                "param_groups": groups}
        write_checkpoint(run_dir, self.step, files, meta, keep)

    def load(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int:
        """Restore the model's trainable weights, the optimizer and this state; returns the run's step total."""
        files, meta = read_checkpoint(path)
        named = dict(model.named_parameters())
        trainable = files.get("trainable", {})
        want = {k for k, v in named.items() if v.requires_grad}
        if set(trainable) != want or "optimizer" not in files or "rng" not in files:
            raise CheckpointError(f"checkpoint {path} was written by a different run (its trainable weights do "
                                  f"not match this model and method); resume with the settings it was made with")
        device = next(iter(named.values())).device
        with torch.no_grad():
            for k, v in trainable.items():
                if named[k].shape != v.shape:
                    raise CheckpointError(f"checkpoint {path} does not fit the model ({k}: {tuple(v.shape)} vs "
                                          f"{tuple(named[k].shape)})")
                named[k].copy_(v)
        restore_optimizer(opt, files["optimizer"], meta["param_groups"])
        self.step, self.epoch, self.in_epoch = meta["step"], meta["epoch"], meta["in_epoch"]
        self.loss_avg, self.seconds, self.best = meta["loss_avg"], meta["seconds"], meta["best"]
        self.averaged, self.history, self.rng = meta["averaged"], meta["history"], files["rng"]
        self.best_state = {k: v.to(device) for k, v in files["best"].items()} if "best" in files else None
        self.mean_state = {k: v.to(device) for k, v in files["mean"].items()} if "mean" in files else None
        return int(meta["total"])

    def restore_rng(self) -> None:
        restore_rng(self.rng)
        self.rng = None


def _rewrite_log(path: Path | None, history: list[dict[str, Any]]) -> None:
    """On resume, the metrics log becomes what it was at the checkpoint (later records are logged again)."""
    if path is not None:
        write_text(path, "".join(json.dumps(r) + "\n" for r in history))
