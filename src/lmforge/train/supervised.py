"""The fine-tuning loop: epochs over labelled batches, AdamW with linear warm-up and decay, gradient clipping,
evaluation after every epoch (or every `eval_every` steps), the best validation weights kept.

Task recipes (`lmforge.tune.classify`, `lmforge.tune.qa`) supply the batches and the evaluation; the loop is the
same for every task and reads top to bottom.

Under torchrun every process runs the whole task; `fit` joins the process group and each process trains on its
slice of every batch (`parallel.shard_batch`), gradients averaged by DDP, or with the model sharded by FSDP2
(cfg.strategy, see train/parallel.py). Under FSDP the sharded module is a copy: the task's model gives its weights
to it (its parameters are emptied while training runs), gets them back whole for every evaluation, and holds the
trained weights when `fit` returns. Evaluations run on every process (the same numbers); only process 0 logs and
writes, and `FitResult.main` tells a task whether to write its outputs.
"""

from __future__ import annotations

import copy
import itertools
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
from lmforge.runtime import lean_allocator, to_device, tune_allocator
from lmforge.train.checkpoint import (
    clean_run_dir,
    into_sharded,
    is_sharded_checkpoint,
    list_checkpoints,
    optimizer_tensors,
    read_checkpoint,
    read_sharded,
    restore_optimizer,
    restore_world_rng,
    save_sharded_checkpoint,
    world_rng,
    write_checkpoint,
)
from lmforge.train.core import Patience, RunLog, Stepper, dtype_note, precision, settle_dtype
from lmforge.train.distributed import DistEnv, init_distributed, rank_seed
from lmforge.train.optim import build_optimizer, schedule_lr
from lmforge.train.parallel import (
    choose_strategy,
    gather_into,
    is_sharded,
    loss_share,
    release,
    shard_batch,
    wrap,
)


@dataclass
class FitResult:
    steps: int
    seconds: float
    best: dict[str, float] = field(default_factory=dict)  # validation metrics of the kept weights
    history: list[dict[str, Any]] = field(default_factory=list)
    main: bool = True  # process 0 (the one that writes the task's outputs), or not
    stopped: dict[str, Any] | None = None  # early stopping: when and why the run ended before its last step


def length_buckets(
    n: int,
    length: Callable[[int], Any],
    batch_size: int,
    seed: int,
    per: int = 50,
    size: Callable[[int], int] | None = None,
) -> list[list[int]]:
    """Batches of example indices for one epoch: shuffled, then each run of `per` batches sorted by `length`
    and cut into batches (so a batch pads to similar lengths), and the batches shuffled again. With `size`, a
    batch holds examples until their sizes add up to batch_size (a long text read as several windows counts
    each; an example larger than that is a batch of its own)."""
    import random

    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    chunk = batch_size * per
    groups = []
    for s in range(0, n, chunk):
        part = sorted(order[s : s + chunk], key=length)
        if size is None:
            groups += [part[k : k + batch_size] for k in range(0, len(part), batch_size)]
            continue
        batch, used = [], 0
        for i in part:
            if batch and used + size(i) > batch_size:
                groups.append(batch)
                batch, used = [], 0
            batch.append(i)
            used += size(i)
        groups += [batch] if batch else []
    rng.shuffle(groups)
    return groups


def model_loss(model: nn.Module, batch: dict[str, Any], grad_checkpoint: bool = False) -> torch.Tensor:
    """The model's own loss on a batch: lmforge's models are asked for the loss alone (`loss_only=True`: no
    logits kept, the decoder's head and loss computed in chunks), with activation checkpointing when asked;
    any other module gets the batch as it is."""
    if isinstance(getattr(model, "module", model), PretrainedModel):  # (DDP wraps it as .module)
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

    cfg.early_stopping = N ends training after N evaluations in a row without cfg.metric improving by more than
    cfg.min_delta (FitResult.stopped says when and why; the best weights are kept as always). cfg.schedule
    "plateau" holds the learning rate after the warm-up and multiplies it by cfg.plateau_factor whenever
    cfg.plateau_patience evaluations in a row bring no such improvement (reduce-on-plateau).

    With a `run_dir`, every cfg.ckpt_every steps the loop's whole state goes to `run_dir/checkpoints/`: the
    trainable weights, the optimizer, the RNG, the best and averaged weights and the position in the epoch.
    resume=True continues from the newest one bitwise as if never stopped (the epoch's batches are rebuilt
    from their seed and the consumed ones skipped); with none there, the run starts over. `batches(epoch)` must
    be a function of the epoch alone, as length_buckets and the tasks' seeded shuffles are."""
    if cfg.grad_checkpoint:  # a run that asks for checkpointing is short of memory: let glibc return it
        lean_allocator()
    else:
        tune_allocator()
    env = init_distributed(cfg.device)  # world size 1 unless under torchrun
    device = torch.device(cfg.device) if env.world == 1 else env.device
    accum = cfg.grad_accum
    per_epoch = -(-steps_per_epoch // accum)  # optimizer steps an epoch (its last one may add fewer batches)
    total = max(1, math.ceil(per_epoch * cfg.epochs))
    strategy = choose_strategy(cfg.strategy, model, env, cfg.optimizer)
    settled = settle_dtype(cfg.dtype, device)
    if settled != cfg.dtype and env.main:  # ("auto", when the caller had not settled it: the driver does)
        print(dtype_note(settled, device), file=sys.stderr, flush=True)
    prec = precision(settled, device, strategy, env.main)  # (bf16: autocast; the weights stay fp32)
    train = inner = model  # what forward runs through; whose parameters the optimizer steps
    if strategy == "fsdp":
        inner = train = wrap(copy.deepcopy(model), "fsdp", env)
        release(model)
    elif strategy == "ddp":
        train = wrap(model, "ddp", env, find_unused=True)  # (a task may leave a parameter out of its loss)

    params = [p for p in inner.parameters() if p.requires_grad]
    opt = build_optimizer(inner, cfg.optimizer, cfg.lr, cfg.weight_decay, layer_decay=cfg.layer_decay)
    state = _FitState(
        stop=Patience(cfg.early_stopping, cfg.min_delta), plateau=Patience(cfg.plateau_patience, cfg.min_delta)
    )
    if run_dir is not None and env.main:
        clean_run_dir(run_dir)
    env.barrier()
    ckpts = list_checkpoints(run_dir) if run_dir is not None and resume else []
    if ckpts:
        total = state.load(ckpts[-1], inner, opt, prec.scaler)  # the saved schedule (a time budget sized it once)
        if env.main:
            _rewrite_log(metrics_path, state.history)
    else:
        if metrics_path is not None and resume and env.main:
            Path(metrics_path).unlink(missing_ok=True)  # killed before the first checkpoint: start over
        if env.rank:  # each process its own dropout masks
            torch.manual_seed(rank_seed(cfg.seed, env.rank))
    warmup = int(total * cfg.warmup)
    run_log = RunLog(metrics_path, total, state.step, "fine-tune", progress, env.main)
    stepper = Stepper(train, params, opt, strategy, prec, cfg.grad_clip)
    t0 = time.time() - state.seconds
    show = run_log.say

    def record(r: dict[str, Any]) -> None:
        state.history.append(r)
        run_log.record(r)

    def scored() -> dict[str, Any]:  # the task's evaluation, on its own model (given the weights back under fsdp)
        if strategy == "fsdp":
            gather_into(model, train, device)
        model.eval()
        with prec.autocast:
            m = evaluate()
        model.train()
        if strategy == "fsdp":
            release(model)
        return m

    def run_eval() -> None:
        m = scored()
        record({"step": state.step, "split": "val", "epoch": state.epoch, **m})
        show(f"step {state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
        if not state.best or m.get(cfg.metric, -math.inf) > state.best.get(cfg.metric, -math.inf):
            state.best = m
            state.best_state = {k: v.detach().clone() for k, v in inner.named_parameters() if v.requires_grad}
        value = float(m.get(cfg.metric, math.nan))
        state.stop.update(value, state.step)
        if cfg.schedule == "plateau" and not state.plateau.update(value, state.step) and state.plateau.exhausted:
            state.lr_scale *= cfg.plateau_factor
            state.plateau.bad = 0
            record({"step": state.step, "split": "plateau", "lr_scale": state.lr_scale})
            show(
                f"step {state.step}: {cfg.metric} stalled for {cfg.plateau_patience} evaluations: "
                f"learning rate x{state.lr_scale:g}"
            )
        if state.stop.exhausted and state.step < total:  # (at the last step it would end anyway)
            state.stopped = {
                "step": state.step,
                "reason": f"{cfg.metric} did not improve by more than {cfg.min_delta:g} "
                f"in {cfg.early_stopping} evaluations",
                "best_step": state.stop.best_step,
                "best": state.stop.best,
            }
            record({"step": state.step, "split": "stop", **state.stopped})
            show(f"early stop at step {state.step}: {state.stopped['reason']} (best at step {state.stop.best_step})")
        if cfg.average and state.step >= total * (1 - cfg.average):
            state.averaged += 1
            with torch.no_grad():
                if state.mean_state is None:
                    state.mean_state = {k: v.detach().clone() for k, v in inner.named_parameters() if v.requires_grad}
                else:
                    for k, v in inner.named_parameters():
                        if k in state.mean_state:
                            state.mean_state[k].add_(v.detach() - state.mean_state[k], alpha=1 / state.averaged)

    train.train()
    try:
        # (state.rng set: resumed, maybe at the last step, whose epoch is finished first)
        while (state.step < total or state.rng is not None) and state.stopped is None:
            epoch_batches = iter(batches(state.epoch))
            if state.rng is not None:  # resumed: skip what this epoch already trained on, then the RNG
                for _ in range(state.in_epoch):
                    next(epoch_batches, None)
                state.restore_rng(env, cfg.seed)
            group: list = []  # the batches of one optimizer step
            for batch in itertools.chain(epoch_batches, [None]):
                if state.step >= total:
                    break
                if batch is not None:
                    group.append(batch)
                if batch is not None and len(group) < accum or not group:
                    continue  # (None: the epoch ended; its last step adds the batches it has)
                lr = schedule_lr(cfg.schedule, state.step, total, warmup, cfg.lr) * state.lr_scale

                def loss_of(i: int, group: list = group) -> torch.Tensor:  # micro-batch i: this process's rows
                    whole = group[i]
                    batch = shard_batch(whole, env.rank, env.world)
                    share = loss_share(whole, batch, env.world, whole.get("units", "rows" if loss_fn else "tokens"))
                    batch = {k: to_device(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    loss = (
                        loss_fn(train, batch)
                        if loss_fn is not None
                        else model_loss(train, batch, grad_checkpoint=cfg.grad_checkpoint)
                    )
                    return loss * share if share != 1.0 else loss  # (its share of the batch's mean)

                loss, _ = stepper.step(len(group), loss_of, lr)
                consumed, group = len(group), []
                state.step += 1
                state.in_epoch += consumed
                la, lv = state.loss_avg, env.mean(loss.item())
                state.loss_avg = lv if math.isnan(la) else 0.9 * la + 0.1 * lv
                if state.step % cfg.log_every == 0 or state.step == total:
                    record(
                        {
                            "step": state.step,
                            "loss": state.loss_avg,
                            "lr": lr,
                            "epoch": state.epoch,
                            "time": time.time() - t0,
                        }
                    )
                run_log.advance(f"epoch {state.epoch + 1}  loss {state.loss_avg:.4f}")
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    run_eval()
                    if state.stopped is not None:
                        break
                if run_dir is not None and cfg.ckpt_every and state.step % cfg.ckpt_every == 0:
                    state.seconds = time.time() - t0
                    state.save(run_dir, inner, opt, total, cfg.keep_checkpoints, env, prec.scaler)
                if state.step >= total:
                    break
            if state.stopped is not None:
                break
            state.epoch += 1
            state.in_epoch = 0
            if not cfg.eval_every or state.step % cfg.eval_every:
                run_eval()
        named = dict(inner.named_parameters())
        if state.mean_state is not None and state.averaged > 1:  # (inside the try: its record goes to the log)
            with torch.no_grad():
                for k, v in state.mean_state.items():
                    named[k].copy_(v)
            m = scored()
            record({"step": state.step, "split": "val", "epoch": state.epoch, "averaged_points": state.averaged, **m})
            show(
                f"mean of the weights at the last {state.averaged} evaluations: "
                + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))
            )
            if m.get(cfg.metric, -math.inf) >= state.best.get(cfg.metric, -math.inf):
                state.best, state.best_state = {**m, "averaged_points": state.averaged}, None  # keep the mean
    finally:
        run_log.close()
    if state.best_state is not None:
        with torch.no_grad():
            for k, v in state.best_state.items():
                named[k].copy_(v)
    if strategy == "fsdp":
        gather_into(model, train, device)
    model.eval()
    return FitResult(state.step, time.time() - t0, state.best, state.history, main=env.main, stopped=state.stopped)


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
    stop: Patience = field(default_factory=lambda: Patience(0))  # early stopping's count
    plateau: Patience = field(default_factory=lambda: Patience(0))  # reduce-on-plateau's count
    lr_scale: float = 1.0  # what reduce-on-plateau has multiplied the learning rate by so far
    stopped: dict[str, Any] | None = None

    def save(
        self,
        run_dir: Path,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        total: int,
        keep: int,
        env: DistEnv,
        scaler=None,
    ) -> None:
        """Every process calls it: the RNGs are gathered from all, and a sharded model is written by all."""
        meta = {
            "epoch": self.epoch,
            "in_epoch": self.in_epoch,
            "loss_avg": self.loss_avg,
            "total": total,
            "seconds": self.seconds,
            "best": self.best,
            "averaged": self.averaged,
            "history": self.history,
            "stop": self.stop.state(),
            "plateau": self.plateau.state(),
            "lr_scale": self.lr_scale,
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        }
        rng = world_rng(env)
        kept = {name: st for name, st in (("best", self.best_state), ("mean", self.mean_state)) if st is not None}
        if is_sharded(model):
            save_sharded_checkpoint(run_dir, self.step, model, opt, env, rng, files=kept, extra=meta, keep=keep)
            return
        if env.main:
            opt_tensors, groups = optimizer_tensors(opt)
            files = {
                "trainable": {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad},
                "optimizer": opt_tensors,
                "rng": rng,
            }
            files.update({name: {k: v.cpu().contiguous() for k, v in st.items()} for name, st in kept.items()})
            write_checkpoint(run_dir, self.step, files, {**meta, "param_groups": groups}, keep)
        env.barrier()

    def load(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer, scaler=None) -> int:
        """Restore the model's trainable weights, the optimizer and this state (from either checkpoint layout,
        into a model sharded or not); returns the run's step total."""
        named = dict(model.named_parameters())
        want = {k for k, v in named.items() if v.requires_grad}
        device = next(iter(named.values())).device
        if is_sharded_checkpoint(path):
            saved = json.loads((path / "trainer_state.json").read_text()).get("files", [])
            like = {n: {k: v.detach().clone() for k, v in named.items() if k in want} for n in saved}
            files, meta = read_sharded(path, model, opt, like)
            self.best_state, self.mean_state = files.get("best"), files.get("mean")
        else:
            files, meta = read_checkpoint(path)
            trainable = files.get("trainable", {})
            if set(trainable) != want or "optimizer" not in files or "rng" not in files:
                raise CheckpointError(
                    f"checkpoint {path} was written by a different run (its trainable weights "
                    f"do not match this model and method); resume with the settings it was "
                    f"made with"
                )
            for k, v in trainable.items():
                if named[k].shape != v.shape:
                    raise CheckpointError(
                        f"checkpoint {path} does not fit the model ({k}: {tuple(v.shape)} vs {tuple(named[k].shape)})"
                    )
            if is_sharded(model):  # a one-process checkpoint, resumed sharded
                into_sharded(model, opt, trainable, files["optimizer"], meta["param_groups"])
                kept = {n: {k: _like(named[k], v) for k, v in files[n].items()} for n in ("best", "mean") if n in files}
            else:
                with torch.no_grad():
                    for k, v in trainable.items():
                        named[k].copy_(v)
                restore_optimizer(opt, files["optimizer"], meta["param_groups"])
                kept = {n: {k: v.to(device) for k, v in files[n].items()} for n in ("best", "mean") if n in files}
            self.best_state, self.mean_state = kept.get("best"), kept.get("mean")
        self.step, self.epoch, self.in_epoch = meta["step"], meta["epoch"], meta["in_epoch"]
        self.loss_avg, self.seconds, self.best = meta["loss_avg"], meta["seconds"], meta["best"]
        self.averaged, self.history, self.rng = meta["averaged"], meta["history"], files["rng"]
        self.stop.load(meta.get("stop"))
        self.plateau.load(meta.get("plateau"))
        self.lr_scale = meta.get("lr_scale", 1.0)
        if scaler is not None and "scaler" in meta:
            scaler.load_state_dict(meta["scaler"])
        return int(meta["total"])

    def restore_rng(self, env: DistEnv, seed: int) -> None:
        restore_world_rng(self.rng, env, seed, self.step)
        self.rng = None


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `param` is: the same slices when `param` is a sharded DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    return full.to(param.device)


def _rewrite_log(path: Path | None, history: list[dict[str, Any]]) -> None:
    """On resume, the metrics log becomes what it was at the checkpoint (later records are logged again)."""
    if path is not None:
        write_text(path, "".join(json.dumps(r) + "\n" for r in history))
