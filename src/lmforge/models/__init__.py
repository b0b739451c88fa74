"""Model families and the one loader that picks the right one from a model directory."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import ModelLoadError
from lmforge.models.decoder import CausalLMOutput, DecoderLM

__all__ = ["CausalLMOutput", "DecoderLM", "load_model"]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a model from an HF-layout directory (config.json + safetensors)."""
    from lmforge.interop.hf import load_model_dir

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a model directory (expected config.json + model.safetensors)")
    return load_model_dir(path, device=device)
