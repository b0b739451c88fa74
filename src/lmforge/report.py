"""Run reports: the loss curve as a PNG and a short Markdown + HTML summary, made from metrics.jsonl alone."""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Any

from lmforge import available, require
from lmforge.files import atomic_path, write_text


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run; its other events (an early stop, a plateau's learning-rate
    drop: records with another "split") are left out."""
    path = Path(run_dir) / "metrics.jsonl"
    train, val = [], []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                if "split" not in r:
                    train.append(r)
                elif r["split"] == "val":
                    val.append(r)
    return train, val


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported when a plot is drawn."""
    matplotlib = require("matplotlib", "drawing PNG plots", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_NOTED: list[bool] = []


def can_plot() -> bool:
    """Whether matplotlib (the [plots] extra) is installed. Without it a report is written without its pictures,
    and the first one to skip them says so on stderr; a command whose output is a picture needs it (pyplot)."""
    if available("matplotlib"):
        return True
    if not _NOTED:
        _NOTED.append(True)
        print(
            "lmforge: note: reports are written without plots (matplotlib is not installed): "
            "pip install 'lmforge[plots]'",
            file=sys.stderr,
        )
    return False


def save_png(fig: Any, path: str | Path, dpi: int | None = None) -> Path:
    """Write fig as a PNG atomically (temp file + rename) and free it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **({"dpi": dpi} if dpi else {}))
    pyplot().close(fig)
    return path


def plot_loss(run_dir: str | Path, path: str | Path | None = None) -> Path | None:
    if not can_plot():
        return None
    plt = pyplot()
    run_dir = Path(run_dir)
    path = Path(path) if path else run_dir / "report" / "loss.png"
    train, val = read_metrics(run_dir)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train", color="#4c72b0")
    val = [r for r in val if "loss" in r]  # (a QA evaluation reports exact match and F1 only)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", ms=3, label="validation", color="#dd8452")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if train:
        ax2.plot([r["step"] for r in train], [r["lr"] for r in train], color="#55a868")
        ax2.set_xlabel("step")
        ax2.set_ylabel("learning rate")
        ax2.set_title("schedule")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def write_run_report(run_dir: str | Path, samples: list[tuple[str, str]] | None = None) -> Path:
    """report/loss.png, report/report.md and report/report.html for a run directory."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    plotted = plot_loss(run_dir, out / "loss.png") is not None
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    if samples is None and (out / "samples.json").is_file():
        samples = [tuple(s) for s in json.loads((out / "samples.json").read_text())]
    train, val = read_metrics(run_dir)
    final = summary.get("final_val", {})
    rows = [
        ("steps", f"{summary.get('steps', len(train))}"),
        ("tokens seen", f"{summary.get('tokens', 0):,}"),
        ("parameters", f"{summary.get('params', 0):,}"),
        ("wall time", f"{summary.get('seconds', 0):.0f} s"),
        ("final train loss", f"{train[-1]['loss']:.4f}" if train else "-"),
        ("validation loss", f"{final.get('loss', float('nan')):.4f}"),
        (
            "validation perplexity" + (" (masked tokens)" if "masked_acc" in final else ""),
            f"{final.get('ppl', float('nan')):.2f}",
        ),
    ]
    rows += [
        (name, f"{final[k]:.4f}")
        for k, name in (
            ("bpb", "validation bits per byte"),
            ("masked_acc", "validation masked-token accuracy"),
            ("nsp_acc", "validation next-sentence accuracy"),
        )
        if k in final
    ]
    rows += [
        ("throughput (last)", f"{train[-1]['tok_per_s']:,.0f} tok/s, MFU {train[-1]['mfu']:.0%}" if train else "-"),
    ]
    md = [
        f"# Run report: {run_dir.name}",
        "",
        *(["![loss](loss.png)", ""] if plotted else []),
        "| metric | value |",
        "|---|---|",
    ]
    md += [f"| {k} | {v} |" for k, v in rows]
    if samples:
        md += ["", "## Samples", ""]
        for prompt, text in samples:
            md += [f"**{prompt.strip() or '(empty prompt)'}**", "", "```", prompt + text, "```", ""]
    write_text(out / "report.md", "\n".join(md) + "\n")
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    sample_html = "".join(
        f"<h3>{html.escape(p.strip() or '(empty prompt)')}</h3><pre><b>{html.escape(p)}</b>{html.escape(t)}</pre>"
        for p, t in (samples or [])
    )
    write_text(
        out / "report.html",
        f"""<!doctype html><meta charset="utf-8"><title>{html.escape(run_dir.name)}</title>
<style>body{{font:15px system-ui;max-width:900px;margin:2em auto;padding:0 1em}}table{{border-collapse:collapse}}
td{{border:1px solid #ccc;padding:4px 10px}}pre{{background:#f6f6f6;padding:1em;white-space:pre-wrap}}</style>
<h1>Run report: {html.escape(run_dir.name)}</h1>{'<img src="loss.png" style="max-width:100%">' if plotted else ""}
<table>{body}</table>{"<h2>Samples</h2>" + sample_html if samples else ""}
""",
    )
    return out / "report.html"


def write_task_report(
    run_dir: str | Path, title: str, rows: list[tuple[str, str]], images: list[str] | None = None
) -> Path:
    """report/loss.png plus report.md and report.html with a table of (name, value) rows and the images
    (file names inside report/) for a fine-tuning run."""
    run_dir = Path(run_dir)
    plot_loss(run_dir, run_dir / "report" / "loss.png")
    return write_report(run_dir / "report", title, rows, images or ["loss.png"])


def write_report(out: str | Path, title: str, rows: list[tuple[str, str]], images: list[str] | None = None) -> Path:
    """report.md and report.html in `out`: the images (file names inside `out`) and a table of (name, value)."""
    out = Path(out)
    images = [i for i in (images or []) if (out / i).is_file()]
    md = [f"# {title}", ""] + [f"![{i}]({i})" for i in images] + ["", "| metric | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    write_text(out / "report.md", "\n".join(md) + "\n")
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    imgs = "".join(f'<img src="{html.escape(i)}" style="max-width:100%;margin:0 1em 1em 0">' for i in images)
    write_text(
        out / "report.html",
        f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:15px system-ui;max-width:960px;margin:2em auto;padding:0 1em}}table{{border-collapse:collapse}}
td{{border:1px solid #ccc;padding:4px 10px}}</style>
<h1>{html.escape(title)}</h1>{imgs}<table>{body}</table>
""",
    )
    return out / "report.html"


def bar_plot(values: dict[str, float], path: str | Path, title: str, ylabel: str = "") -> Path | None:
    """A bar chart of named scores (evaluation reports)."""
    if not can_plot():
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(values) + 2), 3.4))
    bars = ax.bar(list(values), list(values.values()), color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def series_plot(
    values: list[float], path: str | Path, title: str, xlabel: str = "", ylabel: str = "", mean: float | None = None
) -> Path | None:
    """A line of values in order (e.g. the loss of each evaluation window), with their mean as a dashed line."""
    if not can_plot():
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.4))
    xs = list(range(len(values)))
    ax.plot(xs, values, "o-" if len(values) <= 60 else "-", ms=3, lw=1, color="#4c72b0")
    if mean is not None:
        ax.axhline(mean, ls="--", lw=1, color="#dd8452", label=f"overall {mean:.3f}")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)
