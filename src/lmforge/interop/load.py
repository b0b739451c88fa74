"""Loading by path: an HF-layout directory, a .gguf file or the name of a packaged model, to the right family.

This is the I/O layer's front door. It sits above the models (it builds them) and below everything that uses a
model (train, generate, eval, tune, serve), so a model class never reads a file itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmforge.assets import MODELS, model_file
from lmforge.config import QUANTIZE
from lmforge.errors import ConfigError, ModelLoadError
from lmforge.interop.families import READERS
from lmforge.interop.gguf import FOUR_BIT_GROUP, four_bit_tensors, load_gguf
from lmforge.interop.hf import read_config, read_safetensors
from lmforge.interop.hub_cache import find_cached, is_repo_id, repo_dirs, split_repo_id
from lmforge.interop.peft import load_adapter
from lmforge.interop.quantized import is_quantized_dir, load_quantized
from lmforge.models.family import family_for_model_type
from lmforge.nn.lora import merge_and_unload
from lmforge.nn.quant import MODES, Int4Linear, quantize_model
from lmforge.runtime import resolve_dtype, use_device
from lmforge.tokenizer import Tokenizer


def resolve_model_path(path: str | Path) -> Path:
    """A model directory, a .gguf file, the name of a packaged model (e.g. smollm2-135m-instruct), or a Hub repo id
    (ORG/NAME or ORG/NAME@REVISION) already in the local Hugging Face cache: never downloaded."""
    p = Path(path)
    if p.exists():
        return p
    if str(path) in MODELS:
        return model_file(str(path))
    packaged = ", ".join(MODELS)
    if not is_repo_id(str(path)):
        raise ModelLoadError(f"model path {p} does not exist (packaged models: {packaged})")
    found = find_cached(str(path))
    if found is not None:
        return found
    repo, revision = split_repo_id(str(path))
    looked = ", ".join(str(d) for d in repo_dirs(repo))
    download = f"huggingface-cli download {repo}" + (f" --revision {revision}" if revision != "main" else "")
    raise ModelLoadError(
        f"model {path} is not a path, a packaged model ({packaged}), or in the local Hugging Face cache "
        f"(looked in {looked}); lmforge never downloads: copy it there ({download}) or pass a directory"
    )


def load_pretrained(
    path: str | Path,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
):
    """(model, tokenizer) from an HF-layout directory, a .gguf file or a packaged model name.
    adapter: a LoRA adapter directory (PEFT layout, from lmforge or PEFT), merged into the weights.
    quantize: a `quantize_model` mode applied after the merge, for inference: "int8" (weight-only int8 Linear
    weights), "int8-dynamic" (int8 activations too, the fast one for batched encoders on CPU) or "int4" (groups
    of 64; from a GGUF whose Linear weights are 4-bit blocks (Q4_0, Q4_1, Q4_K) those are kept as stored, in
    groups of 32, and the rest quantized in groups of 32 too); "auto": int4 when the file's own weights are
    4-bit (nothing is requantized: the fast path for decoding such a file), the model as it is otherwise;
    "none" or None: as it is.
    dtype: the weights' (and so the compute's) dtype for inference: "float32" (None), "bfloat16" (half the bytes
    a decoding step reads; norms and softmax still accumulate in fp32) or "auto" (runtime.pick_dtype: bf16 where
    the machine has fast bf16 units). Quantized weights are quantized from the fp32 ones first."""
    p = resolve_model_path(path)
    if quantize not in (None, *QUANTIZE, *MODES):
        raise ConfigError(f"quantize {quantize!r} is not one of: {', '.join(QUANTIZE + MODES[2:])}")
    auto = quantize == "auto"
    quantize = None if quantize == "none" else quantize
    group = 64
    use_device(device)
    if p.is_file() and p.suffix == ".gguf":
        # int4 from a GGUF's own 4-bit blocks: kept as stored (groups of 32), unless an adapter is merged first
        keep = quantize in ("int4", "auto") and not adapter
        model, tok = load_gguf(p, device=device, keep_4bit=keep)
        group = FOUR_BIT_GROUP if keep else group
    else:
        model, tok = load_model(p, device=device), Tokenizer.from_file(p)
    if quantize == "auto":  # int4 where the file's weights are 4-bit (and kept so above), else as they are
        kept = any(isinstance(m, Int4Linear) for m in model.modules()) and not getattr(model, "quantization", None)
        quantize = "int4" if kept else None
    elif quantize and getattr(model, "quantization", None):
        raise ConfigError(
            f"{p} is already quantized ({model.quantization['mode']}): load it with --quantize none "
            f"(or auto), or quantize the full-precision model to {quantize} instead"
        )
    if adapter and auto and quantize is None and p.suffix == ".gguf" and four_bit_tensors(p):
        print(
            f"lmforge: note: {p.name}'s 4-bit weights are merged with the adapter in full precision and not kept "
            "4-bit; add --quantize int4 to decode on the int4 kernel again",
            file=sys.stderr,
        )
    if adapter:
        merge_and_unload(load_adapter(model, adapter)).eval()
    if quantize:
        quantize_model(model, quantize, group)
    dt = resolve_dtype(dtype, device)
    if dt != torch.float32:
        model.to(dt)
    return model, tok


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a model from an HF-layout directory (config.json + safetensors) or a .gguf file."""
    p = resolve_model_path(path)
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf(p, device=device)[0]
    if not p.is_dir():
        raise ModelLoadError(f"{p} is not a model directory (config.json + model.safetensors) or a .gguf file")
    return load_model_dir(p, device=device)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A model from an HF-layout directory of any family (or a quantized directory of lmforge's own)."""
    path = Path(path)
    raw = read_config(path)
    if is_quantized_dir(raw):
        return load_quantized(path, raw, read_safetensors(path), device)
    family = family_for_model_type(raw.get("model_type"), str(path / "config.json"))
    return READERS[family.name](path, raw, read_safetensors(path), device)
