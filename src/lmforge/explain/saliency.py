"""Saliency: how much each input token pushed the model toward one output.

What is explained, f:
    classifier (an Encoder with a classify head)  f = log p(target class | text)
    decoder                                        f = log p(target token | text), the token after the text
The target defaults to the model's own choice (the argmax). Log-probability rather than the raw logit: a logit
can rise together with every other logit and change nothing, while log p moves only when the target gains on
the alternatives, and its differences add up as evidence.

What is attributed to: the token embeddings, the output of `model.tok_emb`. Position and token-type embeddings
are left as they are, so a score says which token mattered, not which position. A forward hook on `tok_emb`
replaces the lookup's output with the tensor we pass in; the model code never changes, and the interpolation
steps of integrated gradients become rows of one batch. A token's score is the sum over the embedding
dimension of its per-dimension attributions.

Methods:
    grad_x_input   s_t = sum_d x_td * df/dx_td at the input. One backward pass; a first-order picture, which
                   need not add up to anything.
    ig             integrated gradients (Sundararajan et al., 2017):
                   s_t = sum_d (x - x')_td * integral_0^1 df/dx_td(x' + a (x - x')) da
                   The scores add up to f(x) - f(x') (completeness) up to the quadrature error. The integral
                   uses composite Gauss-Legendre rules (panels of about 10 nodes, `steps` nodes in all): for a
                   smooth path the error falls exponentially with the node count, where an evenly spaced
                   Riemann sum needs hundreds of steps. A path that is not smooth at that scale (a real LLM's
                   can turn within a thousandth of its length) is caught by completeness itself, checked panel
                   by panel with one forward pass per panel edge, and refined where it fails (max_steps).

The baseline x' (IG, and the reported f_baseline):
    "pad"   (default) the [PAD] embedding at every text position (a decoder without a pad token: its EOS,
            which is what `Tokenizer.pad_id` falls back to)
    "mask"  the [MASK] embedding (encoders with a masked-LM vocabulary)
    "zero"  zero vectors
Special tokens ([CLS], [SEP]) keep their own embedding in every baseline: the path stays a well-formed input
and they get exactly zero IG score. Zeros are not the default: a zero embedding is no token the model has seen,
and in a Llama-style decoder (nothing added to the token embedding) the residual stream starts at exactly zero,
where RMSNorm's output leaps from 0 to unit scale over the first percents of the path (SmolLM2's path from
zeros is much rougher than from its pad token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.explain.inputs import Encoded, device_of, display_token, encode_text, model_kind
from lmforge.tokenizer import Tokenizer

METHODS = ("ig", "grad_x_input")
BASELINES = ("pad", "mask", "zero")


@dataclass
class Saliency:
    text: str
    ids: list[int]
    tokens: list[str]  # display strings, one per position
    spans: list[tuple[int, int]]  # character offsets into text ((0, 0) for special tokens)
    special: list[bool]  # [CLS] / [SEP]
    scores: torch.Tensor  # [T] float32 attribution per token (positive = toward the target)
    kind: str  # "encoder" (a classifier) or "decoder"
    method: str  # "ig" or "grad_x_input"
    steps: int | None  # IG quadrature nodes asked for (first pass)
    steps_used: int  # gradient evaluations spent (IG: steps plus any refinement)
    baseline: str
    target: str  # class name, or the target token as text
    target_id: int  # class index or token id
    predicted: str  # the model's own top class / next token
    prob: float  # p(target | text)
    f_input: float  # log p(target | text)
    f_baseline: float  # log p(target | baseline)

    @property
    def delta(self) -> float:
        """f(input) - f(baseline): what IG's scores add up to."""
        return self.f_input - self.f_baseline

    @property
    def completeness_gap(self) -> float:
        """|sum of scores - (f(input) - f(baseline))|; small for IG only."""
        return abs(float(self.scores.sum()) - self.delta)

    @property
    def relative_gap(self) -> float:
        """The completeness gap as a fraction of |f(input) - f(baseline)|."""
        return self.completeness_gap / abs(self.delta) if self.delta else float("inf")

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k highest-scoring text tokens (special tokens left out), highest first."""
        order = sorted((i for i in range(len(self.ids)) if not self.special[i]), key=lambda i: -float(self.scores[i]))
        return [(self.tokens[i], float(self.scores[i])) for i in order[:k]]


# --------------------------------------------------------------------------------------------------------------
# arguments and targets


def check_steps(steps: int, max_steps: int | None = None) -> None:
    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not whole(steps) or steps < 1:
        raise LmforgeError(f"--steps must be a whole number of at least 1, got {steps!r}")
    if max_steps is not None and (not whole(max_steps) or max_steps < steps):
        raise LmforgeError(f"--max-steps must be a whole number of at least --steps ({steps}), got {max_steps!r}")


def check_saliency_model(model: nn.Module) -> str:
    """The model's kind, if saliency can explain it."""
    kind = model_kind(model)
    if kind == "seq2seq":
        raise LmforgeError(
            "saliency explains decoders and encoder classifiers, not encoder-decoders (T5); use --what attention"
        )
    if kind == "encoder" and model.config.head != "classify":
        raise LmforgeError(
            f"saliency on an encoder needs a classification head (this one has head "
            f"{model.config.head!r}); fine-tune one with `lmforge finetune classify`"
        )
    return kind


def resolve_target(model: nn.Module, tokenizer: Tokenizer, target: str | int | None) -> int | None:
    """A class index (classifiers) or token id (decoders) for `target`; None means the model's argmax.

    Classifiers take a class name or an index (an int, or digits that are no class's name). Decoders take a
    token id (an int, or "id:1234"), a vocabulary entry ("Ġcat") or a text that is one token (" cat")."""
    if target is None:
        return None
    kind = check_saliency_model(model)
    if kind == "encoder":
        labels = model.config.labels
        if isinstance(target, str) and target in labels:
            return labels.index(target)
        if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
            if 0 <= int(target) < len(labels):
                return int(target)
        raise LmforgeError(
            f"unknown target class {target!r}; give one of {', '.join(labels)} or an index 0..{len(labels) - 1}"
        )
    vocab = model.config.vocab_size
    if isinstance(target, str) and target.startswith("id:") and target[3:].isdigit():
        target = int(target[3:])
    if isinstance(target, int):
        if 0 <= target < vocab:
            return target
        raise LmforgeError(f"target token id {target} is outside the vocabulary (0..{vocab - 1})")
    tid = tokenizer.token_id(target)
    if tid is None:
        ids = tokenizer.encode(target)
        if len(ids) != 1:
            raise LmforgeError(
                f"target {target!r} is {len(ids)} tokens, not one; give a single token (e.g. "
                f"' Paris' with its space) or an id as 'id:1234'"
            )
        tid = ids[0]
    if tid >= vocab:
        raise LmforgeError(f"target {target!r} (id {tid}) is outside the model's vocabulary of {vocab}")
    return tid


# --------------------------------------------------------------------------------------------------------------
# the explained function f, with the token embeddings swapped in


def log_probs(model: nn.Module, kind: str, ids: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """log-softmax [S, classes or vocab] of the model's output for the token ids [T], with the token
    embeddings replaced by the rows of `emb` [S, T, d] (everything else, positions included, as usual)."""
    rows = ids[None].expand(emb.size(0), -1)
    handle = model.tok_emb.register_forward_hook(lambda _module, _inputs, out: emb.to(out.dtype))
    try:
        if kind == "encoder":
            logits = model(rows).logits
        else:
            logits = model(rows, last_only=True).logits[:, -1]
    finally:
        handle.remove()
    return torch.log_softmax(logits.float(), dim=-1)


def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the n-point Gauss-Legendre rule moved from [-1, 1] to [0, 1] (float64)."""
    t, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy((t + 1) / 2), torch.from_numpy(w / 2)


def baseline_embeddings(
    model: nn.Module, tokenizer: Tokenizer, enc: Encoded, x: torch.Tensor, baseline: str
) -> torch.Tensor:
    """x' [T, d]: the baseline token's embedding at text positions, special tokens' own embedding kept."""
    if baseline == "zero":
        fill = torch.zeros_like(x[0])
    else:
        tid = tokenizer.pad_id if baseline == "pad" else tokenizer.token_id(tokenizer.mask_token)
        if tid is None:
            raise LmforgeError("this tokenizer has no [MASK] token; use baseline 'pad' or 'zero'")
        fill = model.tok_emb(torch.tensor([tid], device=x.device))[0].to(x.dtype)
    keep = torch.tensor(enc.special, device=x.device)[:, None]
    return torch.where(keep, x, fill.expand_as(x))


# --------------------------------------------------------------------------------------------------------------
# the methods


def saliency(
    model: nn.Module,
    tokenizer: Tokenizer,
    text: str,
    target: str | int | None = None,
    method: str = "ig",
    steps: int = 50,
    baseline: str = "pad",
    max_steps: int | None = None,
    tol: float = 0.01,
    batch_tokens: int = 2048,
) -> Saliency:
    """Per-token attributions of f = log p(target | text) (see the module docstring for f, methods, baseline).

    target: a class name / index (classifiers) or a token / id (decoders); None = the model's prediction.
    steps: IG gradient evaluations (Gauss-Legendre nodes) in the first pass; where the scores then miss
    completeness by more than tol (relative), the worst parts of the path are refined, up to max_steps
    evaluations in all (default 16 x steps; max_steps=steps turns refinement off). batch_tokens bounds
    rows x tokens per forward pass (the IG nodes run as batches)."""
    check_steps(steps, max_steps)
    if method not in METHODS:
        raise LmforgeError(f"unknown saliency method {method!r}; use one of {', '.join(METHODS)}")
    if not tol > 0:
        raise LmforgeError(f"tol is a relative completeness gap and must be positive, got {tol!r}")
    if baseline not in BASELINES:
        raise LmforgeError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")
    kind = check_saliency_model(model)
    target_id = resolve_target(model, tokenizer, target)
    enc = encode_text(model, tokenizer, text)
    dev = device_of(model)
    ids = torch.tensor(enc.ids, device=dev)

    was_training = model.training
    model.eval()  # dropout would make f random and break completeness
    try:
        with torch.no_grad():
            x = model.tok_emb(ids).float()
            x0 = baseline_embeddings(model, tokenizer, enc, x, baseline)
            lp = log_probs(model, kind, ids, torch.stack([x, x0]))
        pred = int(lp[0].argmax())
        if target_id is None:
            target_id = pred
        f_input, f_baseline = float(lp[0, target_id]), float(lp[1, target_id])
        used = 1
        with torch.enable_grad():
            if method == "grad_x_input":
                e = x[None].clone().requires_grad_(True)
                (g,) = torch.autograd.grad(log_probs(model, kind, ids, e)[:, target_id].sum(), e)
                scores = (g[0] * x).sum(-1)
            else:
                scores, used = _integrated_gradients(
                    model,
                    kind,
                    ids,
                    x,
                    x0,
                    target_id,
                    (f_baseline, f_input),
                    steps,
                    max_steps or 16 * steps,
                    tol,
                    batch_tokens,
                )
    finally:
        model.train(was_training)

    names = model.config.labels if kind == "encoder" else None
    show = (lambda i: names[i]) if names else (lambda i: display_token(tokenizer, i))
    return Saliency(
        text=enc.text,
        ids=enc.ids,
        tokens=enc.tokens,
        spans=enc.spans,
        special=enc.special,
        scores=scores.detach().float().cpu(),
        kind=kind,
        method=method,
        steps=steps if method == "ig" else None,
        steps_used=used,
        baseline=baseline,
        target=show(target_id),
        target_id=target_id,
        predicted=show(pred),
        prob=float(np.exp(f_input)),
        f_input=f_input,
        f_baseline=f_baseline,
    )


def _integrated_gradients(
    model: nn.Module,
    kind: str,
    ids: torch.Tensor,
    x: torch.Tensor,
    x0: torch.Tensor,
    target_id: int,
    f_ends: tuple[float, float],
    steps: int,
    max_steps: int,
    tol: float,
    batch_tokens: int,
) -> tuple[torch.Tensor, int]:
    """Per-token IG scores [T] and the number of gradient evaluations spent.

    The path [0, 1] is cut into panels of about 10 Gauss-Legendre nodes each (`steps` nodes in all). On a
    panel [a, b] the scores must add up to f(b) - f(a), and f is one cheap forward pass away: that residual is
    an exact error measure of the panel's sum. Panels whose residual is more than their share of tol * |f(1) -
    f(0)| are halved (the worst first; each half gets half the nodes, at least 4) until the residuals fit or
    max_steps is spent. Smooth paths (small encoders) stop after the first round; a real LLM's path can turn within a
    thousandth of its length (a softmax flipping between tokens), which no fixed grid of 50 nodes resolves."""
    rows = max(1, batch_tokens // len(ids))
    diff = x - x0

    def path(a: torch.Tensor) -> torch.Tensor:
        return x0 + a.to(x.device, x.dtype)[:, None, None] * diff

    def f_at(alphas: list[float]) -> list[float]:
        out = []
        with torch.no_grad():
            for s in range(0, len(alphas), rows):
                a = torch.tensor(alphas[s : s + rows], dtype=torch.float64)
                out += log_probs(model, kind, ids, path(a))[:, target_id].tolist()
        return out

    def integrate(panels: list[tuple[float, float, int]]) -> list[torch.Tensor]:
        """Each panel's per-token integral of (x - x') . df/dx, all panels' nodes batched together."""
        nodes, weights, owner = [], [], []
        for j, (a, b, k) in enumerate(panels):
            t, w = gauss_legendre(k)
            nodes.append(a + (b - a) * t)
            weights.append((b - a) * w)
            owner += [j] * k
        alphas, w = torch.cat(nodes), torch.cat(weights)
        per_node = []
        for s in range(0, len(alphas), rows):
            e = path(alphas[s : s + rows]).requires_grad_(True)
            # rows are independent inputs, so the gradient of their sum is each row's own gradient
            (g,) = torch.autograd.grad(log_probs(model, kind, ids, e)[:, target_id].sum(), e)
            per_node.append((g * diff).sum(-1).double())
        weighted = torch.cat(per_node) * w.to(x.device)[:, None]
        owner_t = torch.tensor(owner, device=x.device)
        return [weighted[owner_t == j].sum(0) for j in range(len(panels))]

    n = -(-steps // 10)
    counts = [steps // n + (j < steps % n) for j in range(n)]
    edges = [j / n for j in range(n + 1)]
    f_edge = [f_ends[0], *f_at(edges[1:-1]), f_ends[1]]
    panels = [(edges[j], edges[j + 1], counts[j]) for j in range(n)]
    ends = [(f_edge[j], f_edge[j + 1]) for j in range(n)]
    parts = integrate(panels)
    used = steps
    allowed = tol * abs(f_ends[1] - f_ends[0]) + 1e-6  # the floor: float32 noise in f itself
    while True:
        resid = [abs(float(p.sum()) - (fb - fa)) for p, (fa, fb) in zip(parts, ends)]
        if sum(resid) <= allowed:
            break
        # halve the worst panels until what is left unsplit would fit in half the allowance
        split, left = [], sum(resid)
        for j in sorted(range(len(panels)), key=lambda j: -resid[j]):
            half = max(4, panels[j][2] // 2)
            if left <= allowed / 2 or used + 2 * half > max_steps:
                break
            split.append(j)
            left -= resid[j]
            used += 2 * half
        if not split:
            break
        mids = [(panels[j][0] + panels[j][1]) / 2 for j in split]
        f_mid = f_at(mids)
        halves, half_ends = [], []
        for j, m, fm in zip(split, mids, f_mid):
            (a, b, k), (fa, fb) = panels[j], ends[j]
            k = max(4, k // 2)  # a sharp turn needs a short panel more than many nodes
            halves += [(a, m, k), (m, b, k)]
            half_ends += [(fa, fm), (fm, fb)]
        new = integrate(halves)
        keep = [j for j in range(len(panels)) if j not in set(split)]
        panels = [panels[j] for j in keep] + halves
        ends = [ends[j] for j in keep] + half_ends
        parts = [parts[j] for j in keep] + new
    return torch.stack(parts).sum(0).float(), used
