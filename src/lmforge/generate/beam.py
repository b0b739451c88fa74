"""Beam search, one loop for every family: a decoder continuing its prompt, an encoder-decoder writing its
target from the start token.

Beam search keeps `num_beams` running hypotheses per input. Each step scores every (beam, next token) pair by the
summed log-probability, takes the best K = max(2, 1 + number of end tokens) x num_beams candidates (so that
enough survive when some end), keeps the best num_beams that did not end as the running beams, and offers the
ones that ended (an end token, a stop string, or the length limit) among the top num_beams to the finished list,
scored by sum / generated length ** length_penalty. With early_stopping=False the search stops once no running
beam can beat the worst finished one, judged at the current length; early_stopping=True stops as soon as
num_beams hypotheses have finished; "never" judges a positive length penalty at the longest length. These are
transformers' rules (its `_beam_search`), so the same weights decode to the same text: tests/test_seq2seq.py and
tests/test_beam.py check it against transformers for both families.

The model side is two callbacks: `step(seqs, cur)` returns the next-token logits of every running beam (whose
tokens are seqs[:, :cur]), and `reorder(rows)` moves the KV cache so that row i continues old row rows[i].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError

NEG = -1.0e9


@dataclass
class BeamParams:
    num_beams: int = 4
    length_penalty: float = 1.0  # > 0 favours longer hypotheses, < 0 shorter ones
    early_stopping: bool | str = False  # True, False or "never"
    num_return_sequences: int = 1
    no_repeat_ngram_size: int = 0  # no n-gram of this size occurs twice in an output (0 = off)

    def validate(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise LmforgeError(f"num_beams must be a whole number of at least 1, got {self.num_beams!r}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise LmforgeError(
                f"num_return_sequences ({self.num_return_sequences}) must be between 1 and num_beams ({self.num_beams})"
            )
        if self.early_stopping not in (True, False, "never"):
            raise LmforgeError(f"early_stopping must be true, false or never, got {self.early_stopping!r}")
        if self.no_repeat_ngram_size < 0:
            raise LmforgeError(f"no_repeat_ngram_size must be zero or positive, got {self.no_repeat_ngram_size}")


def ban_repeated_ngrams(seqs: torch.Tensor, length: int, n: int, scores: torch.Tensor) -> torch.Tensor:
    """Set to -inf the score of every token that would repeat an n-gram already in seqs[:, :length]."""
    if n <= 0 or length + 1 < n:
        return scores
    hist = seqs[:, :length].tolist()
    for row, toks in enumerate(hist):
        prefix = tuple(toks[length - n + 1 :]) if n > 1 else ()
        banned = [toks[i + n - 1] for i in range(length - n + 1) if tuple(toks[i : i + n - 1]) == prefix]
        if banned:
            scores[row, banned] = float("-inf")
    return scores


def beam_search(
    step: Callable[[torch.Tensor, int], torch.Tensor],
    reorder: Callable[[torch.Tensor], None],
    prefix: torch.Tensor,
    max_len: int,
    params: BeamParams,
    ends: Sequence[int],
    pad: int,
    stops: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best hypotheses of each input, [B, num_return_sequences, max_len] (the prefix [B, L0] first, then the
    generated tokens, `pad` after them), best first, and their scores [B, num_return_sequences].

    step(seqs [B * num_beams, max_len], cur) -> logits [B * num_beams, V] after seqs[:, :cur];
    reorder(rows [B * num_beams]) -> None; ends: end-token ids; stops(seqs [N, max_len], cur) -> bool [N]: a
    hypothesis whose tokens through position cur end it (stop strings), or None."""
    params.validate()
    B, L0 = prefix.shape
    nb, dev = params.num_beams, prefix.device
    K = max(2, 1 + len(ends)) * nb
    end_ids = torch.as_tensor(list(ends), dtype=torch.long, device=dev)

    run_seq = torch.full((B, nb, max_len), pad, dtype=torch.long, device=dev)
    run_seq[:, :, :L0] = prefix[:, None]
    run_score = torch.zeros(B, nb, device=dev)
    run_score[:, 1:] = NEG  # all beams start identical: let only the first one expand at step one
    fin_seq, fin_score = run_seq.clone(), torch.full((B, nb), NEG, device=dev)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    in_top = torch.arange(K, device=dev) < nb
    rows = torch.arange(B, device=dev)[:, None]
    cur = L0
    while True:
        logits = step(run_seq.view(B * nb, -1), cur)
        V = logits.size(-1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp = ban_repeated_ngrams(run_seq.view(B * nb, -1), cur, params.no_repeat_ngram_size, logp)
        total = (logp.view(B, nb, V) + run_score[..., None]).view(B, nb * V)
        top_score, top_idx = torch.topk(total, K)
        src, tok = top_idx // V, top_idx % V
        cand = run_seq[rows, src]  # [B, K, max_len]
        cand[:, :, cur] = tok
        ended = torch.isin(tok, end_ids) | (cur + 1 >= max_len)
        if stops is not None:
            ended |= stops(cand.view(B * K, -1), cur).view(B, K)

        # the running beams: the best nb candidates that did not end
        alive = top_score + ended.float() * NEG
        keep = torch.topk(alive, nb).indices
        run_seq, run_score, parent = cand[rows, keep], alive.gather(1, keep), src.gather(1, keep)

        # the finished list: candidates that ended within the top nb, length-normalised, merged with it
        score = top_score / float(cur + 1 - L0) ** params.length_penalty
        if params.early_stopping is True:
            score = score + fin_done.all(-1, keepdim=True).float() * NEG
        score = score + (~improvable).float() * NEG + (~(ended & in_top)).float() * NEG
        m_seq, m_score = torch.cat([fin_seq, cand], 1), torch.cat([fin_score, score], 1)
        m_done = torch.cat([fin_done, ended & in_top], 1)
        best = torch.topk(m_score, nb).indices
        fin_seq, fin_score, fin_done = m_seq[rows, best], m_score.gather(1, best), m_done.gather(1, best)

        reorder((rows * nb + parent).view(-1))
        cur += 1
        # can a running beam still beat the worst finished one?
        longest = max_len if params.early_stopping == "never" and params.length_penalty > 0 else cur
        best_running = run_score[:, :1] / float(longest - L0) ** params.length_penalty
        worst = torch.where(fin_done, fin_score.min(-1, keepdim=True).values, torch.full_like(fin_score, NEG))
        improvable = improvable & (best_running > worst).any(-1, keepdim=True)
        if not bool(improvable.any()) or (params.early_stopping is True and bool(fin_done.all())) or bool(ended.all()):
            break
    R = params.num_return_sequences
    return fin_seq[:, :R], fin_score[:, :R]


def decoder_beam_search(
    model,
    prompt: Sequence[int],
    max_new_tokens: int,
    params: BeamParams,
    ends: Sequence[int],
    pad: int = 0,
    stops: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> tuple[list[list[int]], list[float]]:
    """Beam search continuing one prompt with a decoder: the num_return_sequences best continuations (their new
    tokens, through the end token or stop string that ended them) and their scores. The prompt is read once and
    its keys and values copied into the num_beams rows of the cache."""
    device = next(model.parameters()).device
    L0 = len(prompt)
    max_len = L0 + max_new_tokens
    if max_len > model.config.max_seq_len:
        raise LmforgeError(
            f"prompt ({L0} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"of {model.config.max_seq_len} tokens; shorten the prompt or lower max_new_tokens"
        )
    nb = params.num_beams
    cache = model.new_cache(nb, max_len)

    def step(seqs: torch.Tensor, cur: int) -> torch.Tensor:
        if cur == L0:  # the prompt, once, into every beam's row
            one = model.new_cache(1, L0)
            logits = model(seqs[:1, :L0], cache=one, last_only=True).logits[:, -1]
            for store, src in ((cache.k, one.k), (cache.v, one.v)):
                for t, s in zip(store, src):
                    t[:, :, :L0] = s[:, :, :L0]
            cache.length = L0
            return logits.expand(nb, -1)
        return model(seqs[:, cur - 1 : cur], cache=cache, last_only=True).logits[:, -1]

    seqs, scores = beam_search(
        step, cache.reorder, torch.tensor([list(prompt)], device=device), max_len, params, ends, pad, stops
    )
    out = []
    end_set = set(ends)
    for row in seqs[0].tolist():
        new = row[L0:]
        cut = next((i + 1 for i, t in enumerate(new) if t in end_set), None)
        if cut is None and stops is not None:  # the stop string's token ends it
            t = torch.tensor([row], device=device)
            cut = next((i + 1 for i in range(len(new)) if bool(stops(t, L0 + i)[0])), None)
        out.append(new[:cut] if cut is not None else new)
    return out, scores[0].tolist()
