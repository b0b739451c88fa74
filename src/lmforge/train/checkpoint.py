"""Checkpoints that resume exactly, stored without pickle.

A checkpoint is a folder `checkpoints/step_NNNNNN/` holding
    model.safetensors       the weights (lmforge names)
    optimizer.safetensors   AdamW's moments and step counts, flattened as `state.<param index>.<name>`
    rng.safetensors         the torch RNG (dropout) and the data sampler's generator
    trainer_state.json      step, tokens seen, optimizer hyper-parameters per group
It is written to a temporary folder and renamed into place, so a crash leaves the previous checkpoint whole.
Fine-tuning (`train.supervised.fit`) writes the same layout with its own files through `write_checkpoint`.

Under torchrun, rng.safetensors holds every process's generators (`rank1.torch_cpu`, ...: each process draws its
own dropout masks). A run sharded with FSDP writes `save_sharded_checkpoint`'s layout instead: its weights and
optimizer moments in `shards/` (safetensors files through torch.distributed.checkpoint, each process writing the
slices it holds, as `model.NAME` and `optim.NAME.MOMENT`), with the same rng.safetensors and trainer_state.json
(`"format": "sharded"`). `load_checkpoint` reads either layout into a model sharded or not, over any number of
processes: a sharded run resumes in one process, and a one-process checkpoint resumes sharded.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import CheckpointError
from lmforge.files import atomic_dir, publish_dir, remove_stale_temps, write_json
from lmforge.train.distributed import DistEnv, rank_seed
from lmforge.train.parallel import flat_state, is_sharded, load_flat_state

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer's state as flat tensors (`state.<param index>.<name>`) and its param groups (JSON)."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    return tensors, sd["param_groups"]


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(data_generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The torch RNG (dropout), CUDA's when in use, and a data sampler's generator."""
    rng = {"torch_cpu": torch.get_rng_state()}
    if data_generator is not None:
        rng["data"] = data_generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng(rng: dict[str, torch.Tensor], data_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if data_generator is not None:
        data_generator.set_state(rng["data"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])


def world_rng(env: DistEnv, data_generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """rng_tensors of every process (rank 0's under the plain names, rank r's as `rank{r}.NAME`); every process
    must call it, and each gets the whole dict."""
    mine = rng_tensors(data_generator)
    if env.world == 1:
        return mine
    import torch.distributed as dist

    out = dict(mine)
    for key in sorted(mine):
        t = mine[key].to(env.device)
        parts = [torch.empty_like(t) for _ in range(env.world)]
        dist.all_gather(parts, t)
        out.update({f"rank{r}.{key}": p.cpu() for r, p in enumerate(parts) if r})
    return out


def restore_world_rng(
    rng: dict[str, torch.Tensor], env: DistEnv, seed: int, step: int, data_generator: torch.Generator | None = None
) -> None:
    """This process's generators from `world_rng`'s dict. A process the checkpoint has none for (the run resumes
    on more processes than it was saved from) starts fresh streams from (seed, step, rank)."""
    if env.rank == 0:
        return restore_rng({k: v for k, v in rng.items() if not k.startswith("rank")}, data_generator)
    prefix = f"rank{env.rank}."
    mine = {k[len(prefix) :]: v for k, v in rng.items() if k.startswith(prefix)}
    if mine:
        return restore_rng(mine, data_generator)
    fresh = rank_seed(seed + step, env.rank)
    torch.manual_seed(fresh)
    if data_generator is not None:
        data_generator.manual_seed(fresh)


def write_checkpoint(
    run_dir: str | Path, step: int, files: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any], keep: int = 2
) -> Path:
    """`checkpoints/step_NNNNNN/` with one `NAME.safetensors` per entry of `files` and trainer_state.json
    (`meta` + the step), written atomically (temporary folder, every file and the folder fsynced, renamed);
    only the newest `keep` checkpoints stay."""
    root = Path(run_dir) / "checkpoints"
    target = root / f"step_{step:06d}"
    with atomic_dir(target) as tmp:
        for name, tensors in files.items():
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        write_json(tmp / "trainer_state.json", {"step": step, **meta})
    for old in list_checkpoints(run_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Every `NAME.safetensors` in a checkpoint folder (by NAME) and its trainer_state.json."""
    path = Path(path)
    try:
        files = {f.name[: -len(".safetensors")]: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
        meta = json.loads((path / "trainer_state.json").read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({str(e).splitlines()[0]}); remove it to resume from the one before"
        ) from None
    return files, meta


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A pre-training checkpoint: all weights, the optimizer, the RNGs (`rng`: world_rng's, default this
    process's) and the data sampler."""
    opt_tensors, groups = optimizer_tensors(optimizer)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
    return write_checkpoint(
        run_dir,
        step,
        {"model": state, "optimizer": opt_tensors, "rng": rng if rng is not None else rng_tensors(data_generator)},
        {"param_groups": groups, **(extra or {})},
        keep,
    )


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    env: DistEnv,
    rng: dict[str, torch.Tensor],
    files: dict[str, dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """A checkpoint of a model sharded with FSDP, written by every process together: each writes the slices of
    the weights and optimizer moments it holds (plus those of `files`, NAME -> tensors, as `NAME.KEY`), process 0
    the RNGs and trainer_state.json; the folder is renamed into place once all are done. Every process calls it."""
    root = Path(run_dir) / "checkpoints"
    target = root / f"step_{step:06d}"
    tmp = root / f".{target.name}.sharded.tmp"  # one name every process knows
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "shards").mkdir(parents=True)
    env.barrier()
    flat, groups = flat_state(model, optimizer)
    for name, tensors in (files or {}).items():
        flat.update({f"{name}.{k}": v for k, v in tensors.items()})
    dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / "shards"), save_distributed=True))
    env.barrier()
    if env.main:
        save_file(rng, str(tmp / "rng.safetensors"))
        write_json(
            tmp / "trainer_state.json",
            {
                "step": step,
                "format": "sharded",
                "world": env.world,
                "files": sorted(files or {}),
                "param_groups": groups,
                **(extra or {}),
            },
        )
        publish_dir(tmp, target)
        for old in list_checkpoints(run_dir)[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    env.barrier()
    return target


def read_sharded(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    like: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Load a sharded checkpoint into `model` and `optimizer` (sharded or not, any number of processes: each
    reads the slices it holds) and, for each NAME in `like`, tensors shaped as `like[NAME]` (filled in place).
    Returns ({NAME: tensors} with "rng", trainer_state.json)."""
    path = Path(path)
    meta = json.loads((path / "trainer_state.json").read_text())
    flat, _ = flat_state(model, optimizer)
    for name, tensors in (like or {}).items():
        flat.update({f"{name}.{k}": v for k, v in tensors.items()})
    try:
        dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(path / "shards")))
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable or does not fit the model "
            f"({str(e).splitlines()[0][:200]}); remove it to resume from the one before"
        ) from None
    load_flat_state(
        model, optimizer, {k: v for k, v in flat.items() if k.startswith(("model.", "optim."))}, meta["param_groups"]
    )
    out = {name: {k: flat[f"{name}.{k}"] for k in tensors} for name, tensors in (like or {}).items()}
    return {**out, "rng": rng}, meta


def into_sharded(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    opt_tensors: dict[str, torch.Tensor],
    groups: list[dict],
) -> None:
    """A one-process checkpoint (whole weights, optimizer state by parameter number) into a sharded model."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    flat: dict[str, Any] = {f"model.{k}": v for k, v in weights.items()}
    for key, t in opt_tensors.items():
        _, idx, name = key.split(".", 2)
        flat[f"optim.{order[int(idx)]}.{name}"] = t
    by_name = [{**g, "params": [order[i] for i in g["params"]]} for g in groups]
    load_flat_state(model, optimizer, flat, by_name, full=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator,
    env: DistEnv | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Restore model, optimizer and RNG states in place (either layout, into a model sharded or not); returns
    trainer_state.json's contents."""
    path, env = Path(path), env or DistEnv()
    if is_sharded_checkpoint(path):
        files, meta = read_sharded(path, model, optimizer)
        restore_world_rng(files["rng"], env, seed, meta["step"], data_generator)
        return meta
    files, meta = read_checkpoint(path)
    if not {"model", "optimizer", "rng"} <= set(files):
        raise CheckpointError(f"checkpoint {path} is incomplete (model, optimizer and rng .safetensors expected)")
    if is_sharded(model):
        into_sharded(model, optimizer, files["model"], files["optimizer"], meta["param_groups"])
    else:
        try:
            missing, unexpected = model.load_state_dict(files["model"], strict=False)
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {path} does not fit the model: {str(e).splitlines()[-1].strip()}; "
                f"model.* settings cannot change on resume"
            ) from None
        missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path} does not match the model ({(missing + unexpected)[0]})")
        restore_optimizer(optimizer, files["optimizer"], meta["param_groups"])
    restore_world_rng(files["rng"], env, seed, meta["step"], data_generator)
    return meta


def is_sharded_checkpoint(path: Path) -> bool:
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("format") == "sharded"
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({str(e).splitlines()[0]}); remove it to resume from the one before"
        ) from None


def clean_run_dir(run_dir: str | Path) -> None:
    """Remove what a killed save left behind (temporary files and folders) in a run and its checkpoints."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "report"):
        remove_stale_temps(folder)
