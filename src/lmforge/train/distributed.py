"""Process groups for torchrun. One process is simply world size 1: the same code path, no special cases.

Under `torchrun --nproc_per_node=N`, each process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment,
joins a process group (NCCL on GPUs, gloo on CPU) and trains its share of every global batch; DDP averages the
gradients, so N processes follow the same trajectory as one process with the same global batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.errors import ConfigError
from lmforge.runtime import use_device


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """Average a Python float over processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t


def from_rank0(value: float) -> float:
    """Process 0's value of a float on every process (a decision each process would make a little differently,
    e.g. from a timing, must be the same everywhere); the value itself outside torchrun."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return t.item()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process `rank`'s own random streams (dropout, masking): `seed` itself for rank 0, so one process
    draws what it always drew; distinct and reproducible for the others."""
    return seed if rank == 0 else (seed * 1_000_003 + rank * 7_919) % (2**63)


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device={spec!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is available; use train.device=cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto") -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = use_device(resolve_device(device, local))
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # a long timeout: collectives wait while a process reads, tokenizes or checkpoints more than its peers
        timeout = datetime.timedelta(seconds=float(os.environ.get("LMFORGE_DIST_TIMEOUT", "7200")))
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    return DistEnv(rank, world, local, dev)


def shutdown(env: DistEnv) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
