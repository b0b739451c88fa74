"""Quantized model directories: the HF layout, with lmforge's quantized tensors.

A quantized directory is an ordinary model directory (config.json, model.safetensors, tokenizer files) whose
config.json carries

    "quantization_config": {"quant_method": "lmforge", "mode": "int8" | "int4" | "int8-dynamic",
                            "group_size": 64 | null, "format_version": 1, "lmforge_config": {...}}

`lmforge_config` is the model's own config (DecoderConfig or EncoderConfig fields), so the module tree is rebuilt
exactly; the HF keys beside it still describe the shapes for any tool that reads them. model.safetensors holds
lmforge's parameter names. A quantized Linear `name` is stored as

    int8, int8-dynamic   name.qweight  int8  [out, in]        name.scales  fp32 [out]       w = q * scale
    int4                 name.qweight  uint8 [out, in / 2]    name.scales, name.zeros  fp32 [out, in / g]
                         (two codes per byte, high nibble first; w = (q - 8) * scale + zero per group of g)

and a quantized embedding `tok_emb` as tok_emb.qweight int8 [vocab, d] + tok_emb.scales [vocab]; a tied output
head is not stored again. Everything else is fp32 under its usual name. Loading reads safetensors only (no
pickle); transformers does not read this format (dequantize with `lmforge convert` is not offered: load the
original model instead).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.errors import ModelLoadError
from lmforge.files import atomic_dir, write_json
from lmforge.interop.families import HF_CONFIG, generation_config
from lmforge.interop.hf import check_output_dir
from lmforge.models.family import FAMILIES, family_for_model_type, family_of
from lmforge.nn.quant import MODES, Int4Linear, Int8Embedding, Int8Linear, dynamic_int8, int8_rows

FORMAT_VERSION = 1


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save: quantized modules as their codes and scales, the rest as fp32, no tensor twice."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if name and _inside_quantized(model, name):
            continue
        if isinstance(m, (Int8Linear, Int4Linear, Int8Embedding)) or _is_dynamic(m):
            if _is_dynamic(m):
                q, s = int8_rows(m)
                tensors = {"qweight": q, "scales": s}
                b = m.bias()
                if b is not None:
                    tensors["bias"] = b.detach()
            else:
                tensors = {k: v for k, v in m.named_buffers(recurse=False)}
                tensors.update({k: v.detach() for k, v in m.named_parameters(recurse=False)})
            for k, v in tensors.items():
                if id(v) in seen or v.data_ptr() in seen:
                    continue  # a tied head shares the embedding's codes
                seen.update((id(v), v.data_ptr()))
                out[prefix + k] = v.contiguous()
            continue
        for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if k in ("cos", "sin") or v.data_ptr() in seen:  # rotary tables are rebuilt; tied weights once
                continue
            seen.add(v.data_ptr())
            out[prefix + k] = v.detach().contiguous()
    return out


def _is_dynamic(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.ao.nn.quantized")


def _inside_quantized(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        m = model.get_submodule(".".join(parts[:i]))
        if isinstance(m, (Int8Linear, Int4Linear, Int8Embedding)) or _is_dynamic(m):
            return True
    return False


def save_quantized(model: nn.Module, path: str | Path, tokenizer: Any = None) -> Path:
    """Write a model of any family quantized by `quantize_model` as a model directory (see the module notes),
    atomically."""
    q = getattr(model, "quantization", None)
    if not q:
        raise ModelLoadError("this model is not quantized: run lmforge.nn.quant.quantize_model first")
    path = check_output_dir(path)
    family = family_of(model)
    cfg = HF_CONFIG[family.name](model.config)
    cfg["quantization_config"] = {
        "quant_method": "lmforge",
        "mode": q["mode"],
        "group_size": q["group_size"],
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "lmforge_config": dataclasses.asdict(model.config),
    }
    with atomic_dir(path) as tmp:
        write_json(tmp / "config.json", cfg)
        save_file(quantized_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gen = generation_config(family.name, model.config)
        if gen is not None:
            write_json(tmp / "generation_config.json", gen)
        if tokenizer is not None:
            tokenizer.save(tmp, model_max_length=model.config.max_seq_len)
    return path


def is_quantized_dir(raw: dict) -> bool:
    return (raw.get("quantization_config") or {}).get("quant_method") == "lmforge"


def load_quantized(
    path: Path, raw: dict, tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a quantized model from its directory: the module tree from lmforge_config, quantized modules from
    their stored codes."""
    qc = raw["quantization_config"]
    where = str(path / "config.json")
    mode = qc.get("mode")
    if mode not in MODES or qc.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{where}: quantization {mode!r} (format {qc.get('format_version')}) is not one this "
            f"lmforge reads ({', '.join(MODES)}, format {FORMAT_VERSION})"
        )
    fields = dict(qc.get("lmforge_config") or {})
    # (directories written before the family was recorded: their model_type says it)
    family = FAMILIES.get(qc.get("family")) or family_for_model_type(raw.get("model_type"), where)
    cls_cfg, cls_model = family.config_cls, family.model_cls
    try:
        known = {f.name for f in dataclasses.fields(cls_cfg)}
        cfg = cls_cfg(**{k: v for k, v in fields.items() if k in known})
        cfg.validate()
    except Exception as e:  # noqa: BLE001 - any bad field is the file's fault
        raise ModelLoadError(f"{where}: lmforge_config does not describe a model: {e}") from None
    model = cls_model(cfg)
    tied = family.name != "encoder" and cfg.tie_embeddings
    built = set()  # modules rebuilt from their stored codes: their tensors are already in place
    if "tok_emb.qweight" in tensors:
        built.update({"tok_emb", "lm_head"} if tied else {"tok_emb"})
        model.tok_emb = Int8Embedding(tensors.pop("tok_emb.qweight"), tensors.pop("tok_emb.scales"))
        if tied:
            model.lm_head = model.tok_emb.head()
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or f"{name}.qweight" not in tensors:
            continue
        q, s = tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scales")
        bias = tensors.pop(f"{name}.bias", None)
        if mode == "int4":
            new = Int4Linear(q, s, tensors.pop(f"{name}.zeros"), qc["group_size"], bias)
        else:
            new = Int8Linear(q, s, bias)  # (int8-dynamic: converted once everything else is loaded)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        built.add(name)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith((".cos", ".sin")) and k.rsplit(".", 1)[0] not in built]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: the weights do not match lmforge_config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if mode == "int8-dynamic":
        for name in sorted(built - ({"tok_emb", "lm_head"} if tied else {"tok_emb"})):
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, child, dynamic_int8(getattr(holder, child)))
    model.quantization = {"mode": mode, "group_size": qc.get("group_size")}
    return model.to(device).eval()
