"""What every model family shares: its parameter count and loading by path (an HF-layout directory, a .gguf file
or a packaged model name). Saving differs per family (each writes its own HF config) and stays with the family."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class PretrainedModel(nn.Module):
    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters counted once each (a tied embedding and output matrix is one parameter)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu"):
        from lmforge.models import load_model

        model = load_model(path, device=device)
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model
