"""Classification metrics (scikit-learn does the arithmetic) and the confusion-matrix picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.report import pyplot, save_png


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict[str, Any]:
    """accuracy, macro-F1, per-class precision / recall / F1 / support, and the confusion matrix (rows: true)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "per_class": {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                  "support": int(s[i])} for i in ids},
        "confusion": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "labels": list(labels),
    }


def plot_confusion(metrics: dict[str, Any], path: str | Path, title: str = "confusion matrix") -> Path:
    plt = pyplot()
    cm, labels = metrics["confusion"], metrics["labels"]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.1 * n + 1.8), dpi=110)
    totals = [max(1, sum(row)) for row in cm]
    frac = [[c / t for c in row] for row, t in zip(cm, totals)]
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm[i][j]}\n{frac[i][j]:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if frac[i][j] > 0.5 else "black")
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.1%}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.tight_layout()
    return save_png(fig, path)
