"""Checkpoints that resume exactly, stored without pickle.

A checkpoint is a folder `checkpoints/step_NNNNNN/` holding
    model.safetensors       the weights (lmforge names)
    optimizer.safetensors   AdamW's moments and step counts, flattened as `state.<param index>.<name>`
    rng.safetensors         the torch RNG (dropout) and the data sampler's generator
    trainer_state.json      step, tokens seen, optimizer hyper-parameters per group
It is written to a temporary folder and renamed into place, so a crash leaves the previous checkpoint whole.
Fine-tuning (`train.supervised.fit`) writes the same layout with its own files through `write_checkpoint`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import CheckpointError
from lmforge.files import atomic_dir, remove_stale_temps, write_json

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


def write_checkpoint(run_dir: str | Path, step: int, files: dict[str, dict[str, torch.Tensor]],
                     meta: dict[str, Any], keep: int = 2) -> Path:
    """`checkpoints/step_NNNNNN/` with one `NAME.safetensors` per entry of `files` and trainer_state.json
    (`meta` + the step), written atomically (temporary folder, every file and the folder fsynced, renamed);
    only the newest `keep` checkpoints stay."""
    root = Path(run_dir) / "checkpoints"
    target = root / f"step_{step:06d}"
    with atomic_dir(target) as tmp:
        for name, tensors in files.items():
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        write_json(tmp / "trainer_state.json", {"step": step, **meta})
    for old in list_checkpoints(run_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Every `NAME.safetensors` in a checkpoint folder (by NAME) and its trainer_state.json."""
    path = Path(path)
    try:
        files = {f.name[:-len(".safetensors")]: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
        meta = json.loads((path / "trainer_state.json").read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({str(e).splitlines()[0]}); remove it to "
                              f"resume from the one before") from None
    return files, meta


def save_checkpoint(
    run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator, extra: dict[str, Any] | None = None, keep: int = 2,
) -> Path:
    """A pre-training checkpoint: all weights, the optimizer, the RNGs and the data sampler."""
    opt_tensors, groups = optimizer_tensors(optimizer)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
    return write_checkpoint(run_dir, step, {"model": state, "optimizer": opt_tensors,
                                            "rng": rng_tensors(data_generator)},
                            {"param_groups": groups, **(extra or {})}, keep)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data_generator: torch.Generator
) -> dict[str, Any]:
    """Restore model, optimizer and RNG states in place; returns trainer_state.json's contents."""
    path = Path(path)
    files, meta = read_checkpoint(path)
    if not {"model", "optimizer", "rng"} <= set(files):
        raise CheckpointError(f"checkpoint {path} is incomplete (model, optimizer and rng .safetensors expected)")
    try:
        missing, unexpected = model.load_state_dict(files["model"], strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {str(e).splitlines()[-1].strip()}; "
                              f"model.* settings cannot change on resume") from None
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model ({(missing + unexpected)[0]})")
    restore_optimizer(optimizer, files["optimizer"], meta["param_groups"])
    restore_rng(files["rng"], data_generator)
    return meta


def clean_run_dir(run_dir: str | Path) -> None:
    """Remove what a killed save left behind (temporary files and folders) in a run and its checkpoints."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "report"):
        remove_stale_temps(folder)
