"""Cross-entropy for language-model heads, with a hand-written backward.

The gradient of mean cross-entropy w.r.t. the logits is `(softmax(logits) - onehot(target)) / n`. Autograd's
route (log_softmax -> nll_loss) builds a dense one-hot gradient and then runs log_softmax's backward over the
whole [tokens, vocab] matrix: on CPU that costs several times the forward pass. Here the backward is one
exp, one scatter and one scale, in place on one buffer the size of the logits.

`linear_cross_entropy` goes one step further for training: the head's product, the loss and both gradients a
chunk of tokens at a time, so the [tokens, vocab] logits are never held whole. Each chunk's logits (a few MB)
are still in cache when the softmax and the gradient products read them, and the memory the logits took is
gone; the arithmetic is the same as the head followed by `cross_entropy`.

Distillation (Hinton et al. 2015) mixes that loss with the teacher's: `(1 - alpha) * CE(labels) + alpha * T^2 *
KL(teacher_T || student_T)`, both distributions softened by the temperature T (T^2 keeps the soft term's gradient
on the scale of the hard one's). A causal LM's teacher is stored as its top-k log-probabilities per position
(`TeacherTargets`); its distribution is renormalised over those k, which holds nearly all of its mass at k = 32.
`linear_distill_loss` is that loss chunk by chunk, like `linear_cross_entropy`; `distill_loss` the same on logits
held whole (the reference, and the path for heads the chunked one does not take).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


def _chunk_state(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """What both chunked losses start from: the rows that count and their number, the gradient buffers the forward
    pass fills (None where no gradient is wanted), and the loss sum in fp32 (or wider)."""
    valid = target != ignore_index
    grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
    grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
    total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    return valid, valid.sum().clamp(min=1), grad_h, grad_w, total


def _scaled_grads(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both chunked losses' backward: the gradients the forward pass computed, scaled by the incoming one."""
    grad_h, grad_w = ctx.saved_tensors
    return (None if grad_h is None else grad_h * grad_loss, None if grad_w is None else grad_w * grad_loss)


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
        valid, n, grad_h, grad_w, total = _chunk_state(ctx, h, weight, target, ignore_index)
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
        return (*_scaled_grads(ctx, grad_loss), None, None, None, None)


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


# --- distillation -------------------------------------------------------------------------------------------------
@dataclass
class TeacherTargets:
    """What a distilled causal LM learns from, passed as its `labels`: the hard next tokens and the teacher's top-k
    next-token log-probabilities at every position (its full-vocabulary log-softmax at temperature 1)."""

    labels: torch.Tensor  # [..., ] next-token ids (-100: ignored)
    idx: torch.Tensor  # [..., k] the teacher's k likeliest next tokens
    logp: torch.Tensor  # [..., k] their log-probabilities
    alpha: float  # the soft term's share
    temperature: float

    def to(self, device: torch.device | str) -> TeacherTargets:
        return replace(self, labels=self.labels.to(device), idx=self.idx.to(device), logp=self.logp.to(device))

    def flat(self) -> TeacherTargets:
        k = self.idx.size(-1)
        return replace(self, labels=self.labels.reshape(-1), idx=self.idx.reshape(-1, k), logp=self.logp.reshape(-1, k))

    def select(self, where: torch.Tensor) -> TeacherTargets:
        return replace(self, labels=self.labels[where], idx=self.idx[where], logp=self.logp[where])


def distill_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_idx: torch.Tensor | None,
    teacher_logp: torch.Tensor,
    alpha: float,
    temperature: float,
    ignore_index: int = -100,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """`(1 - alpha) * CE(logits, labels) + alpha * T^2 * KL(teacher_T || student_T)`, mean over the rows whose
    label is not ignore_index. logits [N, V]; teacher_logp [N, k] at the vocabulary entries teacher_idx [N, k]
    (None: k = V, the teacher's whole distribution, as a classifier's is); the teacher's distribution is
    renormalised over its k entries. `weight` and `label_smoothing` go to the hard term (a classifier's)."""
    t = temperature
    valid = labels != ignore_index
    n = valid.sum().clamp(min=1)
    logits = logits.float()
    hard = torch.nn.functional.cross_entropy(
        logits, torch.where(valid, labels, 0), weight=weight, reduction="none", label_smoothing=label_smoothing
    )
    if weight is not None:  # (cross_entropy's own weighted mean: divided by the weights' sum)
        hard_mean = (hard * valid).sum() / (weight[torch.where(valid, labels, 0)] * valid).sum().clamp(min=1e-12)
    else:
        hard_mean = (hard * valid).sum() / n
    logq = torch.log_softmax(logits / t, dim=-1)
    if teacher_idx is not None:
        logq = logq.gather(-1, teacher_idx)
    logp = torch.log_softmax(teacher_logp.float() / t, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return (1 - alpha) * hard_mean + alpha * t * t * (kl * valid).sum() / n


class _LinearDistill(torch.autograd.Function):
    """distill_loss of `h @ weight.T`, chunk by chunk, with the gradients computed in the forward pass (see
    _LinearCrossEntropy): per row, (1 - alpha) (softmax(z) - onehot) + alpha T (softmax(z / T) - p_teacher)."""

    @staticmethod
    def forward(ctx, h, weight, target, idx, logp, alpha, t, ignore_index, chunk, compute):
        valid, n, grad_h, grad_w, total = _chunk_state(ctx, h, weight, target, ignore_index)
        w = weight if compute is None else weight.to(compute)
        for s in range(0, h.size(0), chunk):
            hc, tc, vc = h[s : s + chunk], target[s : s + chunk], valid[s : s + chunk]
            ic = idx[s : s + chunk]
            if compute is not None:
                hc = hc.to(compute)
            z = (hc @ w.T).to(total.dtype)
            safe = torch.where(vc, tc, torch.zeros_like(tc))
            hard = torch.logsumexp(z, dim=-1) - z.gather(-1, safe[:, None]).squeeze(-1)
            zt = z / t
            logq_all = zt - torch.logsumexp(zt, dim=-1, keepdim=True)
            p_logp = torch.log_softmax(logp[s : s + chunk].to(total.dtype) / t, dim=-1)
            p = p_logp.exp()
            kl = (p * (p_logp - logq_all.gather(-1, ic))).sum(-1)
            total += (((1 - alpha) * hard + alpha * t * t * kl) * vc).sum()
            if grad_h is None and grad_w is None:
                continue
            g = logq_all.exp_().mul_(alpha * t)  # alpha T softmax(z / T), in place
            g.scatter_add_(-1, ic, p * -(alpha * t))
            g += torch.softmax(z, dim=-1).mul_(1 - alpha)
            g.scatter_add_(-1, safe[:, None], torch.full_like(g[:, :1], -(1 - alpha)))
            g = g.mul_((vc / n)[:, None]).to(hc.dtype)
            if grad_h is not None:
                grad_h[s : s + chunk] = g @ w
            if grad_w is not None:
                grad_w += (g.T @ hc).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_scaled_grads(ctx, grad_loss), *([None] * 8))


def linear_distill_loss(
    h: torch.Tensor, weight: torch.Tensor, targets: TeacherTargets, ignore_index: int = -100, chunk: int = 1024
) -> torch.Tensor:
    """distill_loss of the logits `h @ weight.T` (h [N, d], weight [V, d], targets flat: labels [N], idx and
    logp [N, k]) without holding the [N, V] logits, as linear_cross_entropy does for the plain loss."""
    kind = h.device.type
    args = (targets.labels, targets.idx, targets.logp, targets.alpha, targets.temperature, ignore_index, chunk)
    if torch.is_autocast_enabled(kind):
        compute = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            return _LinearDistill.apply(h, weight, *args, compute)
    return _LinearDistill.apply(h, weight, *args, None)
