"""Model families and the loaders that pick the right one from a path."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import ModelLoadError
from lmforge.models.decoder import CausalLMOutput, DecoderLM

__all__ = ["CausalLMOutput", "DecoderLM", "load_model", "load_pretrained", "resolve_model_path"]


def resolve_model_path(path: str | Path) -> Path:
    """A model directory, a .gguf file, or the name of a packaged model (e.g. smollm2-135m-instruct)."""
    from lmforge.data.assets import MODELS, model_file

    p = Path(path)
    if not p.exists() and str(path) in MODELS:
        return model_file(str(path))
    if not p.exists():
        raise ModelLoadError(f"model path {p} does not exist (packaged models: {', '.join(MODELS)})")
    return p


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", quantize: str | None = None,
                    adapter: str | Path | None = None):
    """(model, tokenizer) from an HF-layout directory, a .gguf file or a packaged model name.
    adapter: a LoRA adapter directory (PEFT layout, from lmforge or PEFT), merged into the weights.
    quantize: a `quantize_model` mode applied after the merge, for inference: "int8" (weight-only int8 Linear
    weights, the fast one for decoding), "int8-dynamic" (int8 activations too, the fast one for batched encoders
    on CPU) or "int4"."""
    from lmforge.tokenizer import Tokenizer

    p = resolve_model_path(path)
    if p.is_file() and p.suffix == ".gguf":
        from lmforge.interop.gguf import load_gguf

        model, tok = load_gguf(p, device=device)
    else:
        model, tok = load_model(p, device=device), Tokenizer.from_file(p)
    if adapter:
        from lmforge.interop.peft import load_adapter
        from lmforge.tune.lora import merge_and_unload

        merge_and_unload(load_adapter(model, adapter)).eval()
    if quantize:
        from lmforge.compress.quant import quantize_model

        quantize_model(model, quantize)
    return model, tok


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a model from an HF-layout directory (config.json + safetensors) or a .gguf file."""
    from lmforge.interop.hf import load_model_dir

    p = resolve_model_path(path)
    if p.is_file() and p.suffix == ".gguf":
        from lmforge.interop.gguf import load_gguf

        return load_gguf(p, device=device)[0]
    if not p.is_dir():
        raise ModelLoadError(f"{p} is not a model directory (config.json + model.safetensors) or a .gguf file")
    return load_model_dir(p, device=device)
