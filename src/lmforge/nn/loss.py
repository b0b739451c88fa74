"""Cross-entropy for language-model heads, with a hand-written backward.

The gradient of mean cross-entropy w.r.t. the logits is `(softmax(logits) - onehot(target)) / n`. Autograd's
route (log_softmax -> nll_loss) builds a dense one-hot gradient and then runs log_softmax's backward over the
whole [tokens, vocab] matrix: on CPU that costs several times the forward pass. Here the backward is one
exp, one scatter and one scale, in place on one buffer the size of the logits.

`linear_cross_entropy` goes one step further for training: the head's product, the loss and both gradients a
chunk of tokens at a time, so the [tokens, vocab] logits are never held whole. Each chunk's logits (a few MB)
are still in cache when the softmax and the gradient products read them, and the memory the logits took is
gone; the arithmetic is the same as the head followed by `cross_entropy`.
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


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against target, chunk by chunk. The gradients are computed in the
    forward pass (while each chunk's logits are at hand) and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(
        ctx,
        h: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int,
        chunk: int,
        compute: torch.dtype | None,
    ) -> torch.Tensor:
        valid = target != ignore_index
        n = valid.sum().clamp(min=1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
        # the products in `compute` (autocast's dtype) when given; softmax, loss and weight gradient sums in fp32
        w = weight if compute is None else weight.to(compute)
        for s in range(0, h.size(0), chunk):
            hc, tc, vc = h[s : s + chunk], target[s : s + chunk], valid[s : s + chunk]
            if compute is not None:
                hc = hc.to(compute)
            logits = (hc @ w.T).to(total.dtype)
            lse = torch.logsumexp(logits, dim=-1)
            safe = torch.where(vc, tc, torch.zeros_like(tc))
            total += ((lse - logits.gather(-1, safe[:, None]).squeeze(-1)) * vc).sum()
            if grad_h is None and grad_w is None:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g.scatter_add_(-1, safe[:, None], torch.full_like(g[:, :1], -1.0))
            g = g.mul_((vc / n)[:, None]).to(hc.dtype)
            if grad_h is not None:
                if compute is None:
                    torch.mm(g, w, out=grad_h[s : s + chunk])
                else:
                    grad_h[s : s + chunk] = g @ w
            if grad_w is not None:
                if compute is None:
                    grad_w.addmm_(g.T, hc)
                else:
                    grad_w += g.T @ hc
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_loss,
            None if grad_w is None else grad_w * grad_loss,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, chunk: int = 1024
) -> torch.Tensor:
    """Mean token cross-entropy of the logits `h @ weight.T` (h [N, d], weight [V, d], target [N]) without holding
    the [N, V] logits: `chunk` rows at a time. Equal to `cross_entropy(h @ weight.T, target)` in value and
    gradients, up to float rounding. Under autocast the products run in its dtype, as the head's Linear would."""
    kind = h.device.type
    if torch.is_autocast_enabled(kind):
        compute = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            return _LinearCrossEntropy.apply(h, weight, target, ignore_index, chunk, compute)
    return _LinearCrossEntropy.apply(h, weight, target, ignore_index, chunk, None)
