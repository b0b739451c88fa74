"""The loop core that pre-training (train/loop.py) and fine-tuning (train/supervised.py: `fit`) both run.

    precision   the run's dtype (auto picks bf16 where the machine has fast bf16 units), its autocast context,
                and float16's gradient scaler (refused under FSDP)
    Stepper     one optimizer step: the learning rate set, each micro-batch's forward under autocast and
                backward (gradients synchronised across processes on the last one only), the gradients
                unscaled, clipped and stepped, zeroed
    RunLog      the metrics log (JSON lines, process 0 only) and the progress bar (on terminals), with status
                lines printed above it
    Patience    evaluations since the validation metric last improved: early stopping and reduce-on-plateau

What stays in each loop is what differs: where batches come from (a token stream sampled per step; a task's
epochs of labelled batches), what is evaluated and kept, and what a checkpoint holds.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.runtime import autocast as mixed_precision
from lmforge.runtime import grad_scaler, pick_dtype, resolve_dtype
from lmforge.train.distributed import from_rank0
from lmforge.train.parallel import accumulate, clip_grad_norm


@dataclass
class Patience:
    """Evaluations in a row without the validation metric improving by more than `min_delta` on the best so far:
    early stopping ends a run when `patience` of them pass, reduce-on-plateau lowers the learning rate. Its state
    is plain numbers, saved in every checkpoint, so a resumed run counts on where it was."""

    patience: int  # evaluations without improvement that exhaust it (0: never)
    min_delta: float = 0.0
    higher: bool = True  # the metric improves upward (a task's score) or downward (a loss)
    best: float | None = None
    best_step: int = 0
    bad: int = 0  # evaluations since the last improvement

    def update(self, value: float, step: int) -> bool:
        """Count one evaluation; True when it improved on the best (a NaN never does)."""
        gain = math.nan if self.best is None else (value - self.best if self.higher else self.best - value)
        if not math.isnan(value) and (self.best is None or gain > self.min_delta):
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load(self, state: dict[str, Any] | None) -> None:
        if state:
            self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]


@dataclass
class Precision:
    dtype: torch.dtype
    autocast: Any  # the context every forward runs in (products in dtype, weights fp32)
    scaler: Any  # torch.amp.GradScaler under float16, else None


def settle_dtype(setting: str, device: str | torch.device) -> str:
    """A run's dtype setting made concrete once, at its start: "auto" becomes what `pick_dtype` finds here (it
    times a bf16 against an fp32 product, a measurement that a loaded machine can tip either way), process 0's
    choice under torchrun. The run records the result, so a resumed run, and every process, trains in the dtype
    the run began with. Quiet: `dtype_note` says what was chosen and why, once the run is past its checks (a user
    error stays the one line on stderr)."""
    if setting != "auto":
        return setting
    names = ("float32", "bfloat16", "float16")
    picked = str(resolve_dtype("auto", device, say=False)).removeprefix("torch.")
    return names[int(from_rank0(float(names.index(picked))))]


def dtype_note(settled: str, device: str | torch.device) -> str:
    """The line that says what `dtype: auto` settled on and why (pick_dtype's reason, measured once)."""
    return f"dtype auto: {settled} ({pick_dtype(device)[1]})"


def precision(setting: str, device: torch.device, strategy: str, main: bool, flag: str = "--dtype") -> Precision:
    """The run's precision from its dtype setting (`flag`: how the user names it, for the error)."""
    dtype = resolve_dtype(setting, device, say=main)
    scaler = grad_scaler(dtype, device)  # float16 only
    if scaler is not None and strategy == "fsdp":
        raise ConfigError(
            f"{flag} float16 (its gradient scaler) is not supported with FSDP; use bfloat16, or the ddp strategy"
        )
    return Precision(dtype, mixed_precision(dtype, device), scaler)


class Stepper:
    """One optimizer step of `model` (what forward runs through: the model, its DDP wrapper or its FSDP-sharded
    self) over some micro-batches."""

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[torch.Tensor],
        opt: torch.optim.Optimizer,
        strategy: str,
        prec: Precision,
        grad_clip: float,
    ) -> None:
        self.model, self.params, self.opt, self.strategy = model, list(params), opt, strategy
        self.prec, self.grad_clip = prec, grad_clip

    def step(self, n: int, loss_of: Callable[[int], torch.Tensor], lr: float) -> tuple[torch.Tensor, float]:
        """Set the learning rate (times each group's `lr_scale`), add up the gradients of loss_of(i), micro-batch
        i's loss (built when its turn comes), over i < n as one batch's mean, and step. Returns (the mean loss,
        detached; the gradient norm before clipping, NaN with clipping off)."""
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        scaler, losses = self.prec.scaler, []
        for i in range(n):
            with accumulate(self.model, self.strategy, last=i == n - 1):  # (forward and backward inside)
                with self.prec.autocast:
                    loss = loss_of(i)
                losses.append(loss.detach())
                if n > 1:
                    loss = loss / n  # the mean over the step's batches, as one larger batch's
                (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(self.opt)  # (so the clip sees the true gradient)
        norm = clip_grad_norm(self.params, self.grad_clip) if self.grad_clip > 0 else math.nan
        if scaler is not None:
            scaler.step(self.opt)  # skipped when the scaled gradients overflowed
            scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return (losses[0] if n == 1 else torch.stack(losses).mean()), norm


class RunLog:
    """A training loop's metrics log and progress bar. Only process 0 (`main`) writes or shows anything; the bar
    shows on terminals unless `progress` says otherwise."""

    def __init__(
        self, path: Path | None, total: int, initial: int, desc: str, progress: bool | None, main: bool
    ) -> None:
        self.main = main
        self.file = open(path, "a", encoding="utf-8") if path is not None and main else None
        self.bar = None
        if main and (progress if progress is not None else sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)

    def record(self, r: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(r) + "\n")
            self.file.flush()

    def say(self, msg: str) -> None:
        """A status line, above the bar when there is one."""
        if self.main:
            (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr, flush=True))(msg)

    def advance(self, status: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if status:
                self.bar.set_postfix_str(status)

    def status(self, status: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(status)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
