"""Scores for generated text against references: exact match and token F1 (SQuAD normalisation), ROUGE
(Google's rouge-score package, with stemming, as summarization papers report it), and corpus BLEU and chrF
(sacrebleu, with its default 13a tokenization: the numbers translation papers report)."""

from __future__ import annotations

from collections.abc import Sequence

from lmforge import require
from lmforge.eval.qa import squad_scores


def reference_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L F-measure, in percent. A reference may be a list of acceptable
    answers: each metric then takes the best of them (SQuAD's convention for several gold answers)."""
    rouge_scorer = require("rouge_score.rouge_scorer", "ROUGE scores", "eval")

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    n = max(len(predictions), 1)
    return squad_scores(list(predictions), refs) | {
        "rougeL": 100
        * sum(max(scorer.score(g, p)["rougeL"].fmeasure for g in gs) for p, gs in zip(predictions, refs))
        / n,
    }


def seq2seq_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu) and mean ROUGE-1/2/L F-measures (rouge-score), in percent."""
    sacrebleu = require("sacrebleu", "BLEU and chrF scores", "eval")
    rouge_scorer = require("rouge_score.rouge_scorer", "ROUGE scores", "eval")

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    preds, refs = list(predictions), [list(references)]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p) for p, r in zip(predictions, references)]
    n = max(len(rouge), 1)
    return {
        "bleu": sacrebleu.corpus_bleu(preds, refs).score,
        "chrf": sacrebleu.corpus_chrf(preds, refs).score,
        **{k: 100 * sum(x[k].fmeasure for x in rouge) / n for k in ("rouge1", "rouge2", "rougeL")},
    }
