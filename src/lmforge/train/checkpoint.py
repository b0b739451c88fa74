"""Checkpoints that resume exactly, stored without pickle.

A checkpoint is a folder `checkpoints/step_NNNNNN/` holding
    model.safetensors       the weights (lmforge names)
    optimizer.safetensors   AdamW's moments and step counts, flattened as `state.<param index>.<name>`
    rng.safetensors         the torch RNG (dropout) and the data sampler's generator
    trainer_state.json      step, tokens seen, optimizer hyper-parameters per group
It is written to a temporary folder and renamed into place, so a crash leaves the previous checkpoint whole.
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
from lmforge.files import atomic_dir, write_json

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    return tensors, sd["param_groups"]


def save_checkpoint(
    run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator, extra: dict[str, Any] | None = None, keep: int = 2,
) -> Path:
    root = Path(run_dir) / "checkpoints"
    target = root / f"step_{step:06d}"
    opt_tensors, groups = _optimizer_tensors(optimizer)
    rng = {"torch_cpu": torch.get_rng_state(), "data": data_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
    with atomic_dir(target) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        write_json(tmp / "trainer_state.json", {"step": step, "param_groups": groups, **(extra or {})})
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


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
    try:
        weights = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
        meta = json.loads((path / "trainer_state.json").read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({str(e).splitlines()[0]})") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {str(e).splitlines()[-1].strip()}; "
                              f"model.* settings cannot change on resume") from None
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model ({(missing + unexpected)[0]})")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in opt_tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(rng["torch_cpu"])
    data_generator.set_state(rng["data"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return meta
