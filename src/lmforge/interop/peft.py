"""LoRA adapters in the PEFT layout: adapter_config.json + adapter_model.safetensors.

Tensor names are those of the transformers model the base directory loads as (`base_model.model.` + the HF
module path + `.lora_A.weight` / `.lora_B.weight`), so `peft.PeftModel.from_pretrained(hf_model, adapter_dir)`
reads what lmforge writes, and lmforge reads LoRA adapters PEFT wrote. Fully trained task heads (classifier,
pooler, QA head) travel as PEFT's `modules_to_save`.

Where HF fuses layers lmforge keeps apart (GPT-2's c_attn = q, k, v), the adapters are fused exactly: A is
stacked and B is block-diagonal, so the fused adapter has rank r x (parts) and alpha scaled with it
(`rank_pattern` / `alpha_pattern`); on the way back each part gets the whole A and its rows of B.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.errors import ModelLoadError
from lmforge.files import atomic_dir, write_json
from lmforge.interop.hf import check_output_dir, hf_config, tensor_rows
from lmforge.interop.hf_bert import name_rows
from lmforge.interop.hf_t5 import tensor_rows as t5_rows
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.nn.init import aligned_state
from lmforge.nn.lora import HEADS, LoRALinear, lora_modules, plain_state_dict

PREFIX = "base_model.model."


def weight_rows(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(HF tensor name, the lmforge tensors fused into it in order) for every tensor of the model."""
    if isinstance(model, Encoder):
        return [(hf, [n]) for hf, n in name_rows(model)]
    if isinstance(model, Seq2SeqLM):
        return [(hf, [n]) for hf, n in t5_rows(model.config)]

    rows = tensor_rows(model.config, hf_config(model.config)["model_type"])
    if rows:
        return [(hf, names) for hf, names, _ in rows]
    return [(n, [n]) for n in _plain_names(model)]


def _plain_names(model: nn.Module) -> list[str]:
    return list(plain_state_dict(model))


def _module_suffix(hf_module: str) -> str:
    """The name PEFT matches a target by: the path after the layer index (self_attn.q_proj, attention.self.query)."""
    m = re.match(r"^.*?\.\d+\.(.+)$", hf_module)
    return m.group(1) if m else hf_module


def save_adapter(model: nn.Module, path: str | Path, base_model: str | None = None, tokenizer: Any = None) -> Path:
    """Write the model's LoRA adapters (and fully trained heads) as a PEFT adapter directory, atomically."""
    mods = lora_modules(model)
    if not mods:
        raise ModelLoadError("the model has no LoRA adapters to save")
    by_ours = {names[0]: (hf, names) for hf, names in weight_rows(model)}
    for hf, names in weight_rows(model):
        for n in names:
            by_ours.setdefault(n, (hf, names))
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    targets: set[str] = set()
    done: set[str] = set()
    r0 = next(iter(mods.values())).r
    a0 = next(iter(mods.values())).alpha
    for name, m in mods.items():
        hf_w, parts = by_ours[name + ".weight"]
        if hf_w in done:
            continue
        done.add(hf_w)
        hf_mod = hf_w.removesuffix(".weight")
        present = [mods.get(p.removesuffix(".weight")) for p in parts]
        A = torch.cat([q.lora_A.detach() for q in present if q is not None])
        blocks = []
        for q, p in zip(present, parts):
            out = q.out_features if q is not None else model.get_submodule(p.removesuffix(".weight")).out_features
            row = [torch.zeros(out, x.r) for x in present if x is not None]
            if q is not None:
                row[[x for x in present if x is not None].index(q)] = q.lora_B.detach().float().cpu()
            blocks.append(torch.cat(row, dim=1))
        B = torch.cat(blocks)
        if len({(q.r, q.alpha) for q in present if q is not None}) > 1:
            raise ModelLoadError(f"fused layer {hf_mod}: its parts have different LoRA ranks or alphas")
        k = sum(q is not None for q in present)
        r, alpha = m.r * k, m.alpha * k  # same scaling alpha / r as each part
        suffix = _module_suffix(hf_mod)
        targets.add(suffix)
        if (r, alpha) != (r0, a0):
            ranks[suffix], alphas[suffix] = r, alpha
        tensors[f"{PREFIX}{hf_mod}.lora_A.weight"] = A.float().cpu().contiguous()
        tensors[f"{PREFIX}{hf_mod}.lora_B.weight"] = B.contiguous()
    saved_modules: set[str] = set()
    hf_of = {n: hf for hf, names in weight_rows(model) for n in names}
    for n, p in model.named_parameters():
        if p.requires_grad and n.startswith(HEADS) and n in hf_of:
            tensors[PREFIX + hf_of[n]] = p.detach().float().cpu().contiguous()
            saved_modules.add(hf_of[n].rsplit(".", 1)[0].removeprefix("bert."))
    lconf = next(iter(mods.values()))
    dropout = lconf.dropout.p if isinstance(lconf.dropout, nn.Dropout) else 0.0
    is_encoder = getattr(model.config, "family", "") == "encoder"
    head = getattr(model.config, "head", None)
    task = (
        {"classify": "SEQ_CLS", "qa": "QUESTION_ANS"}.get(head)
        if is_encoder
        else "SEQ_2_SEQ_LM"
        if getattr(model.config, "family", "") == "seq2seq"
        else "CAUSAL_LM"
    )
    config = {
        "peft_type": "LORA",
        "task_type": task,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": dropout,
        "target_modules": sorted(targets),
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "modules_to_save": sorted(saved_modules) or None,
        "bias": "none",
        "fan_in_fan_out": _fan_in_fan_out(model),
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    path = check_output_dir(path)
    with atomic_dir(path) as tmp:
        write_json(tmp / "adapter_config.json", config)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def _fan_in_fan_out(model: nn.Module) -> bool:
    if not isinstance(model, DecoderLM):
        return False

    return hf_config(model.config)["model_type"] == "gpt2"  # GPT-2's Conv1D stores weights [in, out]


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
    cfg_file, w_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise ModelLoadError(
            f"{path} is not a PEFT adapter directory (no adapter_config.json); give the adapter "
            "folder a LoRA run wrote (RUN/adapter)"
        )
    if not w_file.is_file():
        pickled = (path / "adapter_model.bin").exists()
        what = " (adapter_model.bin is a pickle: lmforge does not load those)" if pickled else ""
        raise ModelLoadError(f"{path}: adapter_model.safetensors is missing{what}; copy the whole adapter folder")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        tensors = aligned_state(load_file(str(w_file)))  # (see lmforge.nn.init.aligned)
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise ModelLoadError(
            f"{path}: cannot read the adapter ({str(e).splitlines()[0]}); it is truncated or "
            "corrupt: copy or save it again"
        ) from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_file}: not a JSON object of adapter settings")
    if cfg.get("peft_type") != "LORA":
        raise ModelLoadError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            raise ModelLoadError(f"{cfg_file}: {flag} adapters are not supported")
    return cfg, tensors


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_adapter(model: nn.Module, path: str | Path, trainable: bool = False) -> nn.Module:
    """Put the LoRA adapter at `path` (PEFT layout, from lmforge or PEFT) onto `model`, in place.

    Every tensor must name a layer of this model with the right shape: an adapter made for another base is
    refused, not half-applied."""
    cfg, tensors = read_adapter(path)
    if lora_modules(model):
        raise ModelLoadError("this model already has LoRA adapters")
    rows = weight_rows(model)
    parts_of = {hf.removesuffix(".weight"): names for hf, names in rows if hf.endswith(".weight")}
    ours_of = {hf: names[0] for hf, names in rows if len(names) == 1}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        name = re.sub(r"\.modules_to_save(\.default)?\.", ".", name)
        m = re.match(r"^(.*)\.lora_([AB])(\.default)?\.weight$", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        elif name in ours_of:
            heads[ours_of[name]] = t
        else:
            raise ModelLoadError(f"{path}: tensor {key!r} names nothing in this model (an adapter for another base?)")
    for p in model.parameters():
        p.requires_grad_(False)
    for hf_mod, ab in lora.items():
        if hf_mod not in parts_of:
            raise ModelLoadError(
                f"{path}: the adapter targets {hf_mod!r}, which this model does not have (an adapter for another base?)"
            )
        if set(ab) != {"A", "B"}:
            raise ModelLoadError(f"{path}: {hf_mod} has lora_A or lora_B but not both")
        A, B = ab["A"].float(), ab["B"].float()
        parts = [model.get_submodule(n.removesuffix(".weight")) for n in parts_of[hf_mod]]
        in_f, out_f = parts[0].in_features, sum(p.out_features for p in parts)
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_f or B.shape != (out_f, A.shape[0]):
            raise ModelLoadError(
                f"{path}: {hf_mod} adapter shapes A {tuple(A.shape)} B {tuple(B.shape)} do not fit "
                f"the layer ({out_f} x {in_f}): an adapter for another base?"
            )
        suffix = _module_suffix(hf_mod)
        r = int(_pattern_value(cfg.get("rank_pattern"), suffix, cfg.get("r", A.shape[0])))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), suffix, cfg.get("lora_alpha", r)))
        start = 0
        for name, layer in zip(parts_of[hf_mod], parts):
            wrapped = LoRALinear(
                layer, r=A.shape[0], alpha=alpha * A.shape[0] / r, dropout=float(cfg.get("lora_dropout") or 0.0)
            ).train(model.training)
            with torch.no_grad():
                wrapped.lora_A.copy_(A)
                wrapped.lora_B.copy_(B[start : start + layer.out_features])
            start += layer.out_features
            wrapped.lora_A.requires_grad_(trainable)
            wrapped.lora_B.requires_grad_(trainable)
            mod = name.removesuffix(".weight")
            parent, _, leaf = mod.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, wrapped)
    state = dict(model.named_parameters())
    for name, t in heads.items():
        if name not in state:
            raise ModelLoadError(f"{path}: the adapter carries {name!r}, which this model does not have")
        if state[name].shape != t.shape:
            raise ModelLoadError(f"{path}: {name} has shape {tuple(t.shape)}, the model {tuple(state[name].shape)}")
        with torch.no_grad():
            state[name].copy_(t)
        state[name].requires_grad_(trainable)
    return model
