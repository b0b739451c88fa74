"""Token-level data augmentation for text classification (in the manner of EDA, Wei & Zou 2019, on token ids).

Each edit works on the tokens between a sequence's first and last (its [CLS] and [SEP]):

    delete      n random tokens removed (one at least kept)
    swap        n random pairs of tokens exchanged
    insert      n times, a near neighbour of a random token inserted at a random place
    substitute  n random tokens each replaced by one of its near neighbours

"Near neighbours" are the tokens closest to it by cosine similarity in the model's own input embeddings
(`token_neighbours`), not a thesaurus: the model's idea of what is interchangeable, in any language and
vocabulary. n is `rate` of the sequence's tokens (one at least). `augment_ids` picks one edit per sequence; what
is drawn comes from the caller's `random.Random`, so an epoch's edits are a function of its seed (a resumed run
replays them).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from lmforge.errors import ConfigError

OPS = ("delete", "swap", "insert", "substitute")


def check_ops(ops: str | Sequence[str]) -> tuple[str, ...]:
    names = tuple(o.strip() for o in (ops.split(",") if isinstance(ops, str) else ops) if o.strip())
    bad = [o for o in names if o not in OPS]
    if bad or not names:
        raise ConfigError(f"augment_ops (--augment-ops) takes {', '.join(OPS)} (comma-separated), got {ops!r}")
    return names


@torch.no_grad()
def token_neighbours(
    embeddings: torch.Tensor, tokens: Sequence[int], k: int = 8, exclude: Sequence[int] = ()
) -> dict[int, list[int]]:
    """For each of `tokens`, the k tokens nearest to it by cosine similarity of the rows of `embeddings`
    [vocab, dim] (itself and `exclude`, e.g. special tokens, left out)."""
    e = torch.nn.functional.normalize(embeddings.detach().float(), dim=-1)
    banned = torch.tensor(sorted(set(exclude)), dtype=torch.long)
    out: dict[int, list[int]] = {}
    tokens = sorted(set(tokens))
    for s in range(0, len(tokens), 1024):
        part = torch.tensor(tokens[s : s + 1024])
        sim = e[part] @ e.T  # [n, vocab]
        sim[torch.arange(len(part)), part] = -2.0
        if len(banned):
            sim[:, banned] = -2.0
        top = sim.topk(k, dim=-1).indices
        out.update(zip(part.tolist(), top.tolist()))
    return out


def augment_ids(
    ids: list[int],
    rate: float,
    rng: random.Random,
    neighbours: dict[int, list[int]],
    ops: Sequence[str] = OPS,
    max_len: int | None = None,
) -> list[int]:
    """`ids` ([CLS] ... [SEP]) with one edit drawn from `ops`, on `rate` of its inner tokens; at `max_len` an
    insertion becomes a substitution (the sequence never grows past it)."""
    head, body, tail = ids[:1], list(ids[1:-1]), ids[-1:]
    if not body:
        return list(ids)
    n = max(1, round(rate * len(body)))
    op = rng.choice(list(ops))
    if op == "insert" and max_len is not None and len(ids) + n > max_len:
        op = "substitute"
    if op == "delete" and len(body) > 1:
        drop = set(rng.sample(range(len(body)), min(n, len(body) - 1)))
        body = [t for i, t in enumerate(body) if i not in drop]
    elif op == "swap" and len(body) > 1:
        for _ in range(n):
            i, j = rng.sample(range(len(body)), 2)
            body[i], body[j] = body[j], body[i]
    elif op == "insert":
        for _ in range(n):
            near = neighbours.get(body[rng.randrange(len(body))])
            if near:
                body.insert(rng.randrange(len(body) + 1), rng.choice(near))
    elif op == "substitute":
        for i in rng.sample(range(len(body)), min(n, len(body))):
            near = neighbours.get(body[i])
            if near:
                body[i] = rng.choice(near)
    return head + body + tail
