"""Classification metrics (scikit-learn does the arithmetic) and the confusion-matrix picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge import missing_extra
from lmforge.data.labelled import input_texts, note_repaired, read_labelled
from lmforge.errors import DataError
from lmforge.interop import load_pretrained
from lmforge.predict import check_batch, predict, predict_ensemble
from lmforge.report import can_plot, pyplot, save_png


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict[str, Any]:
    """accuracy, macro-F1, per-class precision / recall / F1 / support, and the confusion matrix (rows: true)."""
    try:
        from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
    except ImportError as e:
        raise missing_extra(e, "classification metrics", "eval") from None

    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "per_class": {
            labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i in ids
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "labels": list(labels),
    }


def plot_confusion(metrics: dict[str, Any], path: str | Path, title: str = "confusion matrix") -> Path | None:
    if not can_plot():
        return None
    plt = pyplot()
    cm, labels = metrics["confusion"], metrics["labels"]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.1 * n + 1.8), dpi=110)
    totals = [max(1, sum(row)) for row in cm]
    frac = [[c / t for c in row] for row, t in zip(cm, totals)]
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{cm[i][j]}\n{frac[i][j]:.0%}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if frac[i][j] > 0.5 else "black",
            )
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.1%}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.tight_layout()
    return save_png(fig, path)


def predict_file(
    models: list[str],
    path: str | Path | None = None,
    texts: list[str] | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    vote: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    quantize: str | None = None,
    dtype: str | None = None,
) -> tuple[list[str], list[dict], dict[str, Any]]:
    """`lmforge predict`: (texts, predictions, metrics) for the texts of `path` (or `texts`) under one classifier
    or an ensemble of several (`vote`: mean of the probabilities, or majority). With `label_col` the file is
    labelled and the metrics score the predictions against it ({} otherwise). Settings and data are checked
    before any model loads. vote: "mean" by default (given with one model, refused)."""
    check_batch(batch_size)
    vote_given, vote = vote is not None, vote or "mean"
    if vote not in ("mean", "majority"):
        raise DataError(f"--vote is mean or majority, got {vote!r}")
    gold = None
    if label_col:  # a labelled file: predict and score
        if not path or path == "-":
            raise DataError("--label-col needs a labelled data file (CSV/TSV/JSONL), not standard input")
        if texts:
            raise DataError(
                "--label-col scores the texts of a labelled file; --text gives texts without labels: drop one"
            )
        ds = read_labelled(path, text_col, label_col)
        note_repaired(ds)
        texts, gold = ds.texts, ds.labels
    else:
        texts = input_texts(path, texts, text_col)
    if vote_given and len(models) == 1:
        raise DataError("--vote combines an ensemble's members; give two or more --model, or drop it")
    members = [load_pretrained(m, device=device, quantize=quantize, dtype=dtype) for m in models]
    model, tok = members[0]
    labels = getattr(model.config, "labels", [])
    if gold is not None and set(gold) - set(labels):
        raise DataError(
            f"{path} has labels the model never saw: {', '.join(sorted(set(gold) - set(labels))[:5])} "
            f"(the model knows: {', '.join(labels)})"
        )
    preds = (
        predict_ensemble(members, texts, vote=vote, batch_size=batch_size)
        if len(members) > 1
        else predict(model, tok, texts, batch_size=batch_size)
    )
    if gold is None:
        return texts, preds, {}
    ids = {n: i for i, n in enumerate(labels)}
    m = classification_metrics([ids[g] for g in gold], [ids[p["label"]] for p in preds], labels)
    return texts, preds, {**m, "n": len(gold)}
