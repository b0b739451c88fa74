"""Scores for generated text against references: exact match and token F1 (SQuAD normalisation), ROUGE-L
(Google's rouge-score package, with stemming, as summarization papers report it)."""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.eval.qa import exact_match, token_f1


def reference_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L F-measure, in percent."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    n = max(len(predictions), 1)
    return {
        "exact_match": 100 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
        "f1": 100 * sum(token_f1(p, r) for p, r in zip(predictions, references)) / n,
        "rougeL": 100 * sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / n,
    }
