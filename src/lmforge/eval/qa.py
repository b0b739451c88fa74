"""Extractive QA metrics with the SQuAD v1.1 definitions: answers are normalised (lower case, punctuation and
the articles a / an / the removed, whitespace squeezed); exact match is equality, F1 is over the bag of tokens;
each question takes its best score over the gold answers."""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Mean exact match and F1 in percent, as the SQuAD evaluation script reports them."""
    em = [max(exact_match(p, g) for g in gs) if gs else float(not p) for p, gs in zip(predictions, golds)]
    f1 = [max(token_f1(p, g) for g in gs) if gs else float(not p) for p, gs in zip(predictions, golds)]
    n = max(len(em), 1)
    return {"exact_match": 100 * sum(em) / n, "f1": 100 * sum(f1) / n}
