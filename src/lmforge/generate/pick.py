"""From logits to tokens, and from tokens to text: the repetition penalty, top-k and top-p filters, sampling by
inverse transform (one uniform draw per row, so each row can draw from its own seeded generator), and incremental
detokenization with stop strings. Every decoding path (the engine, beam search, speculative decoding, seq2seq)
picks its tokens here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.config import SamplingParams

# --------------------------------------------------------------------------------------------------------------
# logits -> next token


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: tokens already in the sequence get their logit divided (if > 0) or multiplied by `penalty`.
    seen: [B, V] bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities sum to at least p (always at least the best one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of strictly better tokens
    remove_sorted = before >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. generator: one for the batch, or one per row (each row's draw then
    depends on its own generator only)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generator])
    else:
        u = torch.rand(logits.size(0), generator=generator, device=logits.device)
    return sample(logits / params.temperature, params.top_k, params.top_p, u)


def row_generators(seed: int | None, rows: int, device) -> list[torch.Generator | None]:
    """One generator per row, row i seeded with seed + i (as the server seeds choice i of n): a row's samples do
    not depend on how many rows decode beside it. All None without a seed."""
    if seed is None:
        return [None] * rows
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(rows)]


CANDIDATES = 256  # top-p alone first looks among this many best tokens (see sample)


def sample(logits: torch.Tensor, top_k: int | None, top_p: float | None, u: torch.Tensor) -> torch.Tensor:
    """Token ids [B] drawn from softmax(logits [B, V]) (already divided by the temperature) under top-k and
    top-p, by inverse transform: row b takes the first candidate whose cumulative probability exceeds u[b]
    (uniform in [0, 1), one per row, so each row can draw from its own seeded generator while the batch is
    sampled in one pass).

    Only the tokens that can win are sorted: the k best under top-k (top-p then keeps the smallest prefix of
    those whose share of their mass reaches p); under top-p alone the CANDIDATES best, widened eightfold while
    any row's candidates hold less than p of its probability (then the nucleus may reach past them), which
    keeps the nucleus exact and spares the sort of the whole vocabulary (2 ms a row at 49k tokens). Ties at the
    k-th logit keep k tokens."""
    V = logits.size(-1)
    p = top_p if top_p is not None and top_p < 1.0 else None
    if top_k is None and p is None:
        probs = torch.softmax(logits, dim=-1)
        idx = None
    else:
        k = min(top_k, V) if top_k is not None else min(CANDIDATES, V)
        while True:
            vals, idx = torch.topk(logits, k, dim=-1)  # sorted, best first
            if p is None:
                probs = torch.softmax(vals, dim=-1)
                break
            # each candidate's probability among the kept tokens: the k best under top-k, else all of them
            probs = (
                torch.softmax(vals, dim=-1)
                if top_k is not None
                else torch.exp(vals - torch.logsumexp(logits, dim=-1, keepdim=True))
            )
            before = probs.cumsum(-1) - probs  # mass of strictly better candidates
            if top_k is not None or k == V or bool((before[:, -1] + probs[:, -1] >= p).all()):
                probs = probs.masked_fill(before >= p, 0.0)
                break
            k = min(V, k * 8)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp_(max=probs.size(-1) - 1)
    return (pick if idx is None else idx.gather(-1, pick)).squeeze(-1)


# --------------------------------------------------------------------------------------------------------------
# tokens -> text


class TextStream:
    """Incremental detokenization with stop strings, for one sequence: push token ids, get the text that is safe
    to show. A piece never splits a multi-byte character (an incomplete UTF-8 sequence waits for the next token)
    and never shows the start of what may still become a stop string; a completed stop string ends the stream
    and is not shown (`stopped`). `text` is everything shown so far.

    Each push decodes only the last few tokens, not the whole reply: the text of ids[prefix:] minus that of
    ids[prefix:read], where `read` is how far the text is settled and `prefix` a few tokens before it, so a
    decoder that treats a sequence's first or last token specially (SentencePiece drops a leading space, and a
    lone trailing word marker) sees the same context in both (vLLM's detokenizer works the same way). The cost
    per token is constant, where decoding everything was quadratic in the reply's length."""

    CONTEXT = 4  # settled tokens decoded again with each new one

    def __init__(self, tokenizer, stop: Sequence[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) - 1 for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # shown
        self.decoded = ""  # settled: the text of ids[:read]
        self.prefix = self.read = 0
        self.stopped = False

    def _settle(self) -> bool:
        """Extend `decoded` by the new tokens' text; False while it ends inside a multi-byte character."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if after.endswith("\ufffd"):
            return False
        if after.startswith(before):
            self.decoded += after[len(before) :]
        else:  # (a decoder that rewrites earlier text: fall back to the whole sequence)
            self.decoded = self.tokenizer.decode(self.ids)
        self.read = len(self.ids)
        self.prefix = max(0, self.read - self.CONTEXT)
        return True

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        if not self._settle():
            return ""
        full = self.decoded
        # a stop string cannot start inside what was shown: a tail that could begin one is always held back
        at = max(0, len(self.text) - 1)
        cut = min((i for i in (full.find(s, at) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._show(full[:cut])
        for h in range(min(self.hold, len(full)), 0, -1):  # hold back a tail that could begin a stop string
            if any(s.startswith(full[-h:]) for s in self.stop):
                full = full[:-h]
                break
        return self._show(full)

    def flush(self) -> str:
        """The sequence ended (EOS, length): show what was held back."""
        if self.stopped or not self.ids:
            return ""
        return self._show(self.tokenizer.decode(self.ids) if self.read < len(self.ids) else self.decoded)

    def _show(self, text: str) -> str:
        if len(text) <= len(self.text) or not text.startswith(self.text):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece
