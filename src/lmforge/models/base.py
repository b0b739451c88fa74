"""What every model family shares: its parameter count, and `from_pretrained` as a delegate to lmforge.interop
(which reads and writes model files; the model classes do no I/O of their own)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def call_block(block: nn.Module, *args, grad_checkpoint: bool = False):
    """block(*args). grad_checkpoint=True (activation checkpointing, what a training call may ask for) keeps only
    the block's inputs and runs its forward again in backward: about a third more compute for most of the
    activation memory. Every family runs its blocks through this."""
    if grad_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class PretrainedModel(nn.Module):
    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters counted once each (a tied embedding and output matrix is one parameter)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu"):
        """A delegate to `lmforge.interop.load_model` (the name users know from transformers). Each family's
        `save_pretrained` is the same kind of delegate: the only imports from a model to the I/O layer, made at
        call time, so models never depend on interop when they are imported (tests/test_architecture.py)."""
        from lmforge.interop import load_model

        model = load_model(path, device=device)
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model
