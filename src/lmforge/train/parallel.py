"""How a model trains across processes, the same for pre-training and every fine-tuning task.

    single  one process (world size 1)
    ddp     every process holds the whole model; gradients are averaged after backward
            (torch.nn.parallel.DistributedDataParallel)
    fsdp    FSDP2 (`torch.distributed.fsdp.fully_shard`): each process holds 1/N of every parameter, gradient and
            optimizer moment; a block's weights are gathered just before its forward and backward and freed after,
            so a model whose training state does not fit one device trains on N of them
    auto    ddp, or fsdp when the training state (weights, gradients and two AdamW moments: 16 bytes a parameter)
            would take more than a quarter of one device's memory

Under fsdp each block (the members of every `blocks` ModuleList, whatever the family) is one unit, and the root
(embeddings, head, final norms) another; tied embeddings stay together in the root. Checkpoints of an fsdp run are
sharded (`train.checkpoint.save_sharded_checkpoint`): each process writes its slices, no process ever holds the
whole optimizer, and a later run of any world size (one process included) resumes from them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.nn.packed import release_packed
from lmforge.train.distributed import DistEnv

STRATEGIES = ("auto", "ddp", "fsdp")
BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW's two moments


def device_memory(device: torch.device, local_world: int = 1) -> int:
    """Bytes one process can count on: the GPU's memory, or the machine's RAM shared by its local processes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 16 << 30
    return ram // max(1, local_world)


def choose_strategy(name: str, model: nn.Module, env: DistEnv, optimizer: str = "adamw") -> str:
    """single, ddp or fsdp for `name` (one of STRATEGIES) on this world; refuses what FSDP cannot shard."""
    if name not in STRATEGIES:
        raise ConfigError(f"strategy {name!r} is not one of {', '.join(STRATEGIES)}")
    if env.world == 1:
        return "single"
    if name == "auto":
        state = BYTES_PER_PARAM * sum(p.numel() for p in model.parameters())
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        name = "fsdp" if state > device_memory(env.device, local) // 4 else "ddp"
    if name == "fsdp":
        if optimizer in ("muon", "adafactor"):
            what = (
                "orthogonalises whole matrices"
                if optimizer == "muon"
                else "keeps each matrix's second moment as whole row and column means"
            )
            raise ConfigError(
                f"optimizer {optimizer} {what}, and under strategy fsdp each process holds a slice "
                f"of them; use strategy ddp (train.strategy=ddp / --strategy ddp), or optimizer adamw"
            )
        if any(not p.dtype.is_floating_point for p in model.parameters()):
            raise ConfigError(
                "strategy fsdp shards floating-point weights only, and this model has quantized ones "
                "(method qlora); use strategy ddp"
            )
    return name


def wrap(model: nn.Module, strategy: str, env: DistEnv, find_unused: bool = False) -> nn.Module:
    """The module the training loop calls. ddp wraps `model`; fsdp shards it in place (every parameter of `model`
    becomes a DTensor slice) and returns it; single returns it unchanged."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            for name, child in module.named_children():
                if name == "blocks" and isinstance(child, nn.ModuleList):
                    for block in child:
                        fully_shard(block)
        fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def accumulate(train_model: nn.Module, strategy: str, last: bool):
    """The context for one micro-step's forward and backward: gradients are synchronised on the last one only."""
    if last or strategy == "single":
        if strategy == "fsdp":
            train_model.set_requires_gradient_sync(True)
        return nullcontext()
    if strategy == "ddp":
        return train_model.no_sync()
    train_model.set_requires_gradient_sync(False)
    return nullcontext()


def clip_grad_norm(params, max_norm: float) -> float:
    """The gradients' global norm (before clipping, as a float), clipped to max_norm; under fsdp the norm of the
    whole gradient, not of this process's slice."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of process 0 (an empty dict on the others) from a sharded model;
    every process must call it. A model that is not sharded gives its own state_dict."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def flat_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict]]:
    """Model and optimizer state keyed by parameter name (`model.NAME`, `optim.NAME.MOMENT`) as this process
    holds them (DTensor slices under fsdp), and the optimizer's param groups (parameters by name). Fills in the
    optimizer's state first when it has none yet, so a fresh optimizer can be loaded into."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    flat: dict[str, Any] = {f"model.{k}": v for k, v in msd.items() if not (tied and k == "lm_head.weight")}
    for fqn, state in osd["state"].items():
        for k, v in state.items():
            flat[f"optim.{fqn}.{k}"] = v
    return flat, osd["param_groups"]


def load_flat_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, flat: dict[str, Any], groups: list[dict], full: bool = False
) -> None:
    """Put a `flat_state` layout (loaded into its tensors, or `full` tensors every process holds whole) back into
    the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    msd = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
    state: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        if k.startswith("optim."):
            fqn, name = k[len("optim.") :].rsplit(".", 1)
            state.setdefault(fqn, {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    set_state_dict(
        model,
        optimizer,
        model_state_dict=msd,
        optim_state_dict={"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=full, strict=False),
    )


def shard_batch(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """This process's rows of a global batch: a contiguous 1/world of them (tensors whose first dimension is the
    batch's row count are cut, except those a `shared` tuple of keys names; everything else is passed on). A batch
    with `row_group: g` keeps each run of g rows
    together (DPO's chosen/rejected pairs); a batch with fewer row groups than processes gives each process one
    (some repeated), so every process takes part in every step."""
    meta = ("row_group", "shared", "units")
    if world == 1:
        return {k: v for k, v in batch.items() if k not in meta}
    shared = set(batch.get("shared", ()))
    group = int(batch.get("row_group", 1))
    rows = next((v.size(0) for v in batch.values() if torch.is_tensor(v) and v.dim() > 0), 0)
    groups = max(1, rows // group)
    if groups >= world:
        lo, hi = groups * rank // world, groups * (rank + 1) // world
    else:
        lo = rank % groups
        hi = lo + 1
    if group > 1:  # rows are laid out [first of each group..., second of each group...]
        idx = torch.cat([torch.arange(lo, hi) + j * groups for j in range(group)])
    else:
        idx = torch.arange(lo, hi)
    return {
        k: (v[idx] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == rows and k not in shared else v)
        for k, v in batch.items()
        if k not in meta
    }


def loss_units(batch: dict[str, Any], units: str = "tokens") -> int:
    """What a batch's loss is the mean over: "tokens", its labelled tokens when `labels` is a [B, T] tensor
    (-100 = none: the causal and seq2seq token losses; its rows otherwise), or "rows" (one loss per example, or
    per row group: a DPO pair)."""
    labels = batch.get("labels")
    if units == "tokens" and torch.is_tensor(labels) and labels.dim() == 2:
        return int((labels != -100).sum())
    return next((v.size(0) for v in batch.values() if torch.is_tensor(v) and v.dim() > 0), 0)


def loss_share(batch: dict[str, Any], mine: dict[str, Any], world: int, units: str | None = "tokens") -> float:
    """The factor that makes this process's mean loss over its rows `mine` of `batch` count as its share of the
    whole batch's mean: units(mine) * world / units(batch). Gradients averaged over the processes (DDP, FSDP)
    then equal one process's on the whole batch, however unevenly the rows split the tokens (a mean of per-process
    means would weigh a process's few long rows like another's many short ones). 1 for one process, for
    units=None (a loss that sums across the processes itself: GRPO's), and where some process repeats a row
    (fewer row groups than processes)."""
    if world == 1 or units is None:
        return 1.0
    rows = next((v.size(0) for v in batch.values() if torch.is_tensor(v) and v.dim() > 0), 0)
    if rows // int(batch.get("row_group", 1)) < world:
        return 1.0
    total = loss_units(batch, units)
    return loss_units(mine, units) * world / total if total else 1.0


def world_size() -> int:
    """Processes in the group (1 outside torchrun)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(value: float) -> float:
    """`value` added over every process of the group (itself outside torchrun)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def release(model: nn.Module) -> None:
    """Empty a model's parameters (their objects stay, so the task's references do): under fsdp its weights live
    in the sharded copy meanwhile. Decoding's prepacked copies of them go too: weights gathered again later may
    land at the same addresses, and would be taken for the old ones."""
    release_packed(model)
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def gather_into(model: nn.Module, sharded: nn.Module, device: torch.device | None = None) -> None:
    """The sharded copy's weights, whole, into `model`'s parameters on every process (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    for name, p in model.named_parameters():
        p.data = full[name].to(device if device is not None else p.device)


@contextlib.contextmanager
def whole_weights(model: nn.Module, sharded: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `model` (whose weights were given to the FSDP-sharded copy `sharded`) holds the copy's
    current weights whole, on every process (gathered: a collective), so it can run alone, e.g. decode with no
    collective per step; they are released again at the end. (The price: one whole copy of the weights per
    process while the block runs, as an RL trainer's rollout engine holds.)"""
    gather_into(model, sharded)
    try:
        yield model
    finally:
        release(model)
