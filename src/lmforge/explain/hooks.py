"""Hooks by name: read or replace what any block of any family computes, in one forward, with no copy of the model
code (in the manner of TransformerLens's hook points, on lmforge's own modules).

Every `blocks` list of a model (a decoder's and an encoder's, a T5's encoder and decoder stacks) gives each block
these points, named `PREFIX.blocks.I.POINT` (PREFIX empty for decoders and encoders, `encoder.` or `decoder.` for
T5):

    resid   the residual stream after the block (its output)
    attn    the self-attention's output, before it joins the residual stream
    cross   a T5 decoder block's cross-attention output
    mlp     the MLP's output, before it joins the residual stream

    with hooks(model) as h:
        h.record("blocks.*.resid")                              # glob patterns over the names
        h.replace("blocks.3.mlp", lambda out: out * 0)          # a function of the output, or a tensor
        model(ids)
    h.cache["blocks.5.resid"]                                   # [B, T, d], the last forward's

A replacement takes effect in that forward (what follows the point sees it); a recorded value is the point's
output after any replacement, detached. Leaving the `with` removes every hook: the model is as it was.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lmforge.errors import ConfigError

POINTS = {"resid": None, "attn": "attn", "cross": "cross_attn", "mlp": "mlp"}  # point -> the block's submodule


def hook_points(model: nn.Module) -> dict[str, nn.Module]:
    """Every hook point of `model` by name (see the module notes), in forward order within each stack."""
    points: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if not (path == "blocks" or path.endswith(".blocks")) or not isinstance(module, nn.ModuleList):
            continue
        for i, block in enumerate(module):
            for point, attr in POINTS.items():
                target = block if attr is None else getattr(block, attr, None)
                if target is not None:
                    points[f"{path}.{i}.{point}"] = target
    return points


class Hooks:
    """The hooks on one model (use `hooks(model)`): what to record, what to replace, and what was recorded."""

    def __init__(self, model: nn.Module) -> None:
        self.points = hook_points(model)
        self.cache: dict[str, torch.Tensor] = {}
        self._record: set[str] = set()
        self._replace: dict[str, torch.Tensor | Callable[[torch.Tensor], torch.Tensor]] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.points.items()]

    def names(self, pattern: str = "*") -> list[str]:
        """The point names matching a glob pattern (refused when none does, with what there is)."""
        found = [n for n in self.points if fnmatch.fnmatchcase(n, pattern)]
        if not found:
            some = ", ".join(list(self.points)[:4])
            raise ConfigError(f"no hook point matches {pattern!r}; they are named like {some}, ...")
        return found

    def record(self, *patterns: str) -> None:
        for p in patterns:
            self._record.update(self.names(p))

    def replace(self, pattern: str, value: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The output of the matching points replaced: by `value` (a tensor of the output's shape) or by
        `value(output)`."""
        for name in self.names(pattern):
            self._replace[name] = value

    def clear(self) -> None:
        """Forget what to record and replace (and what was recorded); the hooks stay until the `with` ends."""
        self.cache, self._record, self._replace = {}, set(), {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args, out):
            if name in self._replace:
                new = self._replace[name]
                out = new(out) if callable(new) else new.to(out.dtype)
            if name in self._record:
                self.cache[name] = out.detach()
            return out if name in self._replace else None

        return hook


@contextmanager
def hooks(model: nn.Module) -> Iterator[Hooks]:
    """Hook points on every block of `model` for the `with` block (see the module notes)."""
    h = Hooks(model)
    try:
        yield h
    finally:
        h.remove()
