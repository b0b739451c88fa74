"""Cross-entropy for language-model heads, with a hand-written backward.

The gradient of mean cross-entropy w.r.t. the logits is `(softmax(logits) - onehot(target)) / n`. Autograd's
route (log_softmax -> nll_loss) builds a dense one-hot gradient and then runs log_softmax's backward over the
whole [tokens, vocab] matrix: on CPU that costs several times the forward pass. Here the backward is one
exp, one scatter and one scale, in place on one buffer the size of the logits.
"""

from __future__ import annotations

import torch


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)  # one fused pass over the logits
        valid = target != ignore_index
        safe_t = torch.where(valid, target, torch.zeros_like(target))
        n = valid.sum().clamp(min=1)
        loss = -(logp.gather(-1, safe_t[:, None]).squeeze(-1) * valid).sum() / n
        ctx.save_for_backward(logp, safe_t, valid, n)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logp, safe_t, valid, n = ctx.saved_tensors
        grad = logp.exp()  # softmax
        grad.scatter_add_(-1, safe_t[:, None], torch.full_like(logp[:, :1], -1.0))
        grad.mul_((grad_loss / n) * valid[:, None])
        return grad.to(ctx.in_dtype), None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy; logits [N, V], target [N] (ignore_index entries do not count)."""
    return _CrossEntropy.apply(logits, target, ignore_index)
