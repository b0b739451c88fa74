"""Pictures of attention maps, saliency and the logit lens: PNG through matplotlib, and self-contained HTML pages.

The HTML pages carry their data inline and draw it with a few lines of plain JavaScript: no CDN, no fonts or
scripts fetched, so a page opens the same from a laptop, a CI artifact or an air-gapped machine. Attention
weights travel as base64 bytes of round(255 * sqrt(w)): a 30-layer model's maps over a long text stay a few MB
where JSON numbers would be tens, and the square root keeps the small weights (most of a map) well resolved.

Colours: attention is sequential (white to dark blue on a square-root scale, since a few weights near 1 would
otherwise wash out everything else); saliency is diverging (blue toward the target, red against it, white for
nothing), scaled to the largest |score| over the text tokens.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import torch

from lmforge.explain.attention import AttentionMaps
from lmforge.explain.lens import LogitLens
from lmforge.explain.saliency import Saliency
from lmforge.explain.trace import CausalTrace
from lmforge.files import write_text
from lmforge.report import pyplot, save_png

METHOD_NAMES = {"ig": "integrated gradients", "grad_x_input": "gradient x input"}
TOWARD, AGAINST = (33, 102, 172), (178, 24, 43)  # ColorBrewer RdBu ends


def _label(token: str, width: int = 12) -> str:
    """A token as an axis label: spaces made visible where they are all there is, long pieces cut."""
    s = token.strip() or token.replace(" ", "\u2423").replace("\n", "\u21b5") or "\u2205"
    return s if len(s) <= width else s[: width - 1] + "\u2026"


# --------------------------------------------------------------------------------------------------------------
# attention


def attention_png(maps: AttentionMaps, path: str | Path, layer: int | None = None, title: str = "") -> Path:
    """All layers x heads as a grid (layer=None), or one layer's heads larger; tokens label the axes when the
    cells are big enough to read them (query tokens down the left, key tokens along the bottom; under
    cross-attention those differ, and the panels stay square).

    The panels are placed by hand, in inches: matplotlib's automatic layouts measure every tick label of every
    panel, which takes seconds per figure for a 72-panel grid and minutes for a 30-layer model."""
    plt = pyplot()  # (first: without matplotlib, the one-line error naming lmforge[plots])
    from matplotlib.colors import PowerNorm

    L, H = maps.n_layer, maps.n_head
    TQ, TK = len(maps.tokens), len(maps.keys)
    T = max(TQ, TK)  # what sizes the panels and the labels
    if layer is None:
        panels = [(i, h) for i in range(L) for h in range(H)]
        rows, cols = L, H
        # panels grow with the text until the figure is about 30 inches wide; beyond that the labels go
        size = min(4.0, 30 / H, max(1.2 if L * H <= 100 else 0.9, 0.13 * T))
        gap_x, gap_y = 0.12, 0.12
    else:
        panels = [(layer, h) for h in range(H)]
        cols = min(H, 3 if T > 24 else 4)
        rows = math.ceil(H / cols)
        size = min(7.0, max(2.6, 0.22 * T))
        gap_x, gap_y = 0.25, 0.4  # room for each panel's title
    font = min(9.0, 0.8 * size * 72 / T)  # points per cell, a little less
    labels = [_label(t) for t in maps.tokens] if font >= 4.5 else None
    key_labels = [_label(t) for t in maps.keys] if labels else None

    def label_inches(ls: list[str] | None) -> float:
        return max(len(t) for t in ls) * 0.62 * font / 72 + 0.08 if ls else 0.0

    left, right, top, bottom = 0.45 + label_inches(labels), 1.1, 0.75, 0.2 + label_inches(key_labels)
    width = left + cols * size + (cols - 1) * gap_x + right
    height = top + rows * size + (rows - 1) * gap_y + bottom
    fig = plt.figure(figsize=(width, height), dpi=100)

    def box(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:  # inches from top-left
        return x / width, 1 - (y + h) / height, w / width, h / height

    norm = PowerNorm(0.5, vmin=0.0, vmax=1.0)
    image = None
    for n, (lay, h) in enumerate(panels):
        r, c = divmod(n, cols)
        ax = fig.add_axes(box(left + c * (size + gap_x), top + r * (size + gap_y), size, size))
        image = ax.imshow(maps.weights[lay, h].numpy(), cmap="Blues", norm=norm, interpolation="nearest", aspect="auto")
        ax.set_xticks([])
        ax.set_yticks([])
        if labels and c == 0:
            ax.set_yticks(range(TQ), labels, fontsize=font)
        if key_labels and (r == rows - 1 or n + cols >= len(panels)):
            ax.set_xticks(range(TK), key_labels, fontsize=font, rotation=90)
        ax.tick_params(length=0, pad=1)
        if layer is None:
            if r == 0:
                ax.set_title(f"head {h}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"layer {lay}", fontsize=9)
        else:
            ax.set_title(f"layer {lay}, head {h}", fontsize=10)
    bar_h = min(rows * size + (rows - 1) * gap_y, 6.0)
    cax = fig.add_axes(box(width - right + 0.25, top, 0.15, bar_h))
    fig.colorbar(image, cax=cax, label="attention weight (query row -> key column)")
    fig.text(0.5, 1 - 0.15 / height, title or f"attention, {L} layers x {H} heads", ha="center", va="top", fontsize=12)
    return save_png(fig, path)


_ATTENTION_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.2em; color: #222; }
.controls { display: flex; gap: 1.2em; align-items: center; margin: .6em 0; flex-wrap: wrap; }
#thumbs { display: flex; gap: 6px; flex-wrap: wrap; margin: .4em 0 1em; }
#thumbs figure { margin: 0; text-align: center; font-size: 11px; cursor: pointer; }
#thumbs canvas { border: 2px solid #ddd; image-rendering: pixelated; display: block; }
#thumbs figure.on canvas { border-color: #2166ac; }
table { border-collapse: collapse; }
td.c { width: 18px; height: 18px; padding: 0; border: 1px solid #fff; }
th { font-weight: normal; font-size: 12px; white-space: pre; padding: 0 4px; color: #333; }
th.k { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; padding: 4px 0; }
th.q { text-align: right; }
th.sp { color: #888; }
th.hi { background: #fde7a7; }
#info { min-height: 1.4em; font-family: ui-monospace, monospace; }
.note { color: #555; max-width: 60em; }
</style></head><body>
<h2>__TITLE__</h2>
<div class="controls">
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span id="info"></span>
</div>
<div id="thumbs"></div>
<table id="map"></table>
<p class="note">Row = the query token (the one attending), column = the key token it reads; each row sums to 1.
Colour grows with the square root of the weight. Hover a cell for its value; click a thumbnail to pick a head.</p>
<script>
const D = __DATA__;
const raw = Uint8Array.from(atob(D.weights), c => c.charCodeAt(0));
const L = D.n_layer, H = D.n_head, TQ = D.tokens.length, TK = D.keys.length;
const weight = (l, h, q, k) => { const v = raw[((l * H + h) * TQ + q) * TK + k] / 255; return v * v; };
const at = (l, h, q, k) => {
  if (h >= 0) return weight(l, h, q, k);
  let s = 0; for (let j = 0; j < H; j++) s += weight(l, j, q, k); return s / H;
};
const colour = w => {  // white -> #08306b on a square-root scale
  const t = Math.sqrt(w);
  const c = [255 + (8 - 255) * t, 255 + (48 - 255) * t, 255 + (107 - 255) * t].map(Math.round);
  return `rgb(${c[0]},${c[1]},${c[2]})`;
};
const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
for (let l = 0; l < L; l++) layerSel.add(new Option(`${l}`, l));
headSel.add(new Option("mean of heads", -1));
for (let h = 0; h < H; h++) headSel.add(new Option(`${h}`, h));
layerSel.value = D.layer; headSel.value = 0;

const table = document.getElementById("map"), info = document.getElementById("info");
const head = table.insertRow(); head.appendChild(document.createElement("th"));
const keyHeads = [], queryHeads = [], cells = [];
D.keys.forEach((t, k) => {
  const th = document.createElement("th"); th.className = "k" + (D.key_special[k] ? " sp" : ""); th.textContent = t;
  head.appendChild(th); keyHeads.push(th);
});
D.tokens.forEach((t, q) => {
  const row = table.insertRow(), th = document.createElement("th");
  th.className = "q" + (D.special[q] ? " sp" : ""); th.textContent = t; row.appendChild(th); queryHeads.push(th);
  cells.push(D.keys.map((_, k) => {
    const td = row.insertCell(); td.className = "c"; td.dataset.q = q; td.dataset.k = k; return td;
  }));
});
let hover = null;
table.addEventListener("mouseover", e => {
  const td = e.target.closest("td.c");
  if (hover) hover.forEach(th => th.classList.remove("hi"));
  if (!td) { hover = null; return; }
  const q = +td.dataset.q, k = +td.dataset.k;
  hover = [queryHeads[q], keyHeads[k]]; hover.forEach(th => th.classList.add("hi"));
  info.textContent = `${JSON.stringify(D.tokens[q])} -> ${JSON.stringify(D.keys[k])}: ${td.dataset.w}`;
});

function drawThumbs() {
  const box = document.getElementById("thumbs"); box.textContent = "";
  const l = +layerSel.value, px = Math.max(1, Math.floor(72 / Math.max(TQ, TK)));
  for (let h = 0; h < H; h++) {
    const fig = document.createElement("figure"), cv = document.createElement("canvas");
    cv.width = TK * px; cv.height = TQ * px; const ctx = cv.getContext("2d");
    for (let q = 0; q < TQ; q++) for (let k = 0; k < TK; k++) {
      ctx.fillStyle = colour(weight(l, h, q, k)); ctx.fillRect(k * px, q * px, px, px);
    }
    fig.appendChild(cv); fig.append(`head ${h}`);
    if (h === +headSel.value) fig.className = "on";
    fig.onclick = () => { headSel.value = h; draw(); };
    box.appendChild(fig);
  }
}
function draw() {
  const l = +layerSel.value, h = +headSel.value;
  for (let q = 0; q < TQ; q++) for (let k = 0; k < TK; k++) {
    const w = at(l, h, q, k), td = cells[q][k];
    td.style.background = colour(w); td.dataset.w = w.toFixed(3);
    td.title = `${D.tokens[q]} -> ${D.keys[k]}: ${w.toFixed(3)}`;
  }
  drawThumbs();
}
layerSel.onchange = draw; headSel.onchange = draw;
draw();
</script></body></html>
"""


def _script_json(obj) -> str:
    """JSON that is safe inside <script>: no '</script>' or '<!--' can end or confuse the element."""
    return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c")


def attention_html(maps: AttentionMaps, path: str | Path, layer: int | None = None, title: str = "") -> Path:
    """One page: layer and head selectors (or the mean of a layer's heads), a heatmap table with the tokens on
    both axes, and thumbnails of the selected layer's heads."""
    q = torch.round(maps.weights.clamp(0, 1).sqrt() * 255).to(torch.uint8)
    data = {
        "tokens": maps.tokens,
        "special": maps.special,
        "keys": maps.keys,
        "key_special": maps.keys_special,
        "n_layer": maps.n_layer,
        "n_head": maps.n_head,
        "layer": 0 if layer is None else layer,
        "weights": base64.b64encode(q.contiguous().numpy().tobytes()).decode("ascii"),
    }
    title = title or f"attention, {maps.n_layer} layers x {maps.n_head} heads"
    page = _ATTENTION_PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", _script_json(data))
    write_text(path, page)
    return Path(path)


# --------------------------------------------------------------------------------------------------------------
# saliency


def _scale(sal: Saliency) -> float:
    """The largest |score| over the text tokens: the end of the colour scale (special tokens are clipped)."""
    text = [abs(float(s)) for s, sp in zip(sal.scores, sal.special) if not sp]
    return max(text, default=0.0) or 1.0


def _rgb(score: float, scale: float) -> tuple[tuple[int, int, int], float]:
    t = min(1.0, abs(score) / scale)
    end = TOWARD if score >= 0 else AGAINST
    return tuple(round(255 + (c - 255) * t) for c in end), t  # type: ignore[return-value]


def _pieces(sal: Saliency) -> list[tuple[str, str, int]]:
    """(text before the token, the token's own text, index) in reading order, from the character spans: the
    page shows the user's text as written, spaces included, whatever the tokenizer did to it."""
    out, prev = [], 0
    for i, (s, e) in enumerate(sal.spans):
        if sal.special[i]:
            out.append(("", sal.tokens[i], i))
            continue
        gap = sal.text[prev:s] if s > prev else ""
        piece = sal.text[max(s, prev) : e]
        if not piece:  # a later piece of a character split over several tokens
            piece = _label(sal.tokens[i])
        out.append((gap, piece, i))
        prev = max(prev, e)
    return out


def _summary_line(sal: Saliency) -> str:
    what = "class" if sal.kind == "encoder" else "next token"
    s = (
        f"target {what} {sal.target!r} (p = {sal.prob:.3f}; the model predicts {sal.predicted!r}); "
        f"f = log p(target): f(input) = {sal.f_input:.4f}, f(baseline) = {sal.f_baseline:.4f}, "
        f"sum of scores = {float(sal.scores.sum()):.4f}"
    )
    if sal.method == "ig":
        s += f", completeness gap {100 * sal.relative_gap:.2f}%"
    return s


def _method_line(sal: Saliency) -> str:
    if sal.method == "ig":
        return f"{METHOD_NAMES['ig']}, {sal.steps} steps, baseline {sal.baseline!r}"
    return METHOD_NAMES[sal.method]


def saliency_html(sal: Saliency, path: str | Path, title: str = "") -> Path:
    """The text with each token coloured by its score (hover: token, score, share of the total), a legend, the
    target and f values, and every token's score in a table."""
    scale = _scale(sal)
    total = float(sal.scores.abs().sum()) or 1.0
    spans = []
    for gap, piece, i in _pieces(sal):
        s = float(sal.scores[i])
        (r, g, b), t = _rgb(s, scale)
        tip = (
            f"{sal.tokens[i]!r}: {s:+.4f} ({100 * abs(s) / total:.1f}% of |scores|), "
            f"{'toward' if s >= 0 else 'against'} {sal.target!r}"
        )
        cls = "tok sp" if sal.special[i] else "tok"
        fg = "#fff" if t > 0.55 else "#111"
        spans.append(
            f'{html.escape(gap)}<span class="{cls}" style="background:rgb({r},{g},{b});color:{fg}" '
            f'title="{html.escape(tip)}" data-score="{s:.6g}">{html.escape(piece)}</span>'
        )
    rows = "".join(
        f'<tr><td>{i}</td><td class="t">{html.escape(repr(tok))}</td><td>{float(s):+.5f}</td></tr>'
        for i, (tok, s) in enumerate(zip(sal.tokens, sal.scores))
    )
    title = title or f"saliency: {_method_line(sal)}"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; margin: 1.2em; color: #222; max-width: 60em; }}
.text {{ font-size: 22px; line-height: 2; white-space: pre-wrap; border: 1px solid #ddd; padding: .6em .8em;
        border-radius: 6px; }}
.tok {{ border-radius: 3px; padding: 1px 0; }}
.tok:hover {{ outline: 2px solid #222; }}
.sp {{ font-size: 13px; padding: 1px 4px; margin: 0 3px; border: 1px dashed #999; }}
.legend {{ display: flex; align-items: center; gap: .6em; margin: 1em 0; font-size: 13px; }}
.bar {{ width: 18em; height: 14px; border: 1px solid #ccc;
        background: linear-gradient(to right, rgb{AGAINST}, #fff, rgb{TOWARD}); }}
.meta {{ color: #444; font-size: 14px; }}
table {{ border-collapse: collapse; font-size: 13px; }} td {{ padding: 1px 10px; text-align: right; }}
td.t {{ text-align: left; font-family: ui-monospace, monospace; white-space: pre; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p class="meta">{html.escape(_summary_line(sal))}</p>
<div class="text">{"".join(spans)}</div>
<div class="legend"><span>against {html.escape(repr(sal.target))}</span><span>{-scale:+.3g}</span>
<span class="bar"></span><span>{scale:+.3g}</span><span>toward {html.escape(repr(sal.target))}</span></div>
<p class="meta">Score of a token: its share of f, summed over the embedding dimension ({_method_line(sal)}).
Hover a token for its score.</p>
<details><summary>all tokens</summary><table><tr><th>#</th><th>token</th><th>score</th></tr>{rows}</table></details>
</body></html>
"""
    write_text(path, page)
    return Path(path)


def saliency_png(sal: Saliency, path: str | Path, title: str = "", max_bars: int = 40) -> Path:
    """The text with tokens coloured as in the HTML view, and below it a bar per token (the max_bars largest
    |scores| for long texts), in reading order."""
    plt = pyplot()
    scale = _scale(sal)
    pieces = _pieces(sal)
    order = list(range(len(sal.ids)))
    if len(order) > max_bars:
        order = sorted(sorted(order, key=lambda i: -abs(float(sal.scores[i])))[:max_bars])

    width, font = 11.0, 14
    # lay the text out first, in pixels, to know how many lines (hence how tall a figure) it needs
    probe = plt.figure(figsize=(width, 2), dpi=100)
    renderer = probe.canvas.get_renderer()

    def px(s: str) -> float:
        t = probe.text(0, 0, s, fontsize=font)
        w = t.get_window_extent(renderer).width
        t.remove()
        return w

    space, line_w = px("a b") - px("ab"), (width - 0.6) * 100
    placed, x, line = [], 0.0, 0
    for gap, piece, i in pieces:
        lead = space if (gap and gap.isspace()) or (sal.special[i] and x > 0) or piece.startswith(" ") else 0.0
        text = piece.strip() or piece
        w = px(text) + 4
        if x + lead + w > line_w and x > 0:
            line, x, lead = line + 1, 0.0, 0.0
        placed.append((x + lead, line, text, i))
        x += lead + w
    plt.close(probe)

    # vertical layout in inches, from the top: titles, the text, a gap, the bars, the x label
    text_h, bars_h = 0.42 * (line + 1) + 0.1, 0.24 * len(order) + 0.2
    height = 0.85 + text_h + 0.35 + bars_h + 0.55
    fig = plt.figure(figsize=(width, height), dpi=100)

    def box(left: float, top: float, w: float, h: float) -> tuple[float, float, float, float]:
        return left / width, 1 - (top + h) / height, w / width, h / height

    ax_t = fig.add_axes(box(0.3, 0.85, width - 0.6, text_h))
    ax_t.set_xlim(0, line_w)
    ax_t.set_ylim(text_h * 100, 0)
    ax_t.axis("off")
    for x0, ln, text, i in placed:
        (r, g, b), t = _rgb(float(sal.scores[i]), scale)
        ax_t.text(
            x0,
            21 + 42 * ln,
            text,
            fontsize=font - (3 if sal.special[i] else 0),
            va="center",
            color="white" if t > 0.55 else "#111",
            bbox=dict(
                boxstyle="round,pad=0.15",
                facecolor=(r / 255, g / 255, b / 255),
                edgecolor="#999" if sal.special[i] else "none",
                linestyle="--",
            ),
        )
    fig.text(0.5, 1 - 0.12 / height, title or f"saliency ({_method_line(sal)})", ha="center", va="top", fontsize=13)
    fig.text(
        0.5,
        1 - 0.5 / height,
        f"target {sal.target!r}, p = {sal.prob:.3f}"
        + (f" (the model predicts {sal.predicted!r})" if sal.predicted != sal.target else "")
        + "; blue: toward the target, red: against it",
        ha="center",
        va="top",
        fontsize=10,
        color="#444",
    )

    ax_b = fig.add_axes(box(2.2, 0.85 + text_h + 0.35, width - 3.0, bars_h))
    vals = [float(sal.scores[i]) for i in order]
    colours = [tuple(c / 255 for c in _rgb(v, scale)[0]) for v in vals]
    ax_b.barh(range(len(order)), vals, color=colours, edgecolor="#666", linewidth=0.5)
    ax_b.set_yticks(range(len(order)), [_label(sal.tokens[i], 16) for i in order], fontsize=9)
    ax_b.invert_yaxis()
    ax_b.axvline(0, color="#333", linewidth=0.8)
    ax_b.set_xlabel(f"score (contribution to log p({sal.target!r}))", fontsize=9)
    ax_b.tick_params(axis="x", labelsize=8)
    for side in ("top", "right"):
        ax_b.spines[side].set_visible(False)
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------------------------
# logit lens


def lens_png(lens: LogitLens, path: str | Path, title: str = "") -> Path:
    """Layers (rows, the first at the bottom) x prompt positions (columns): each cell's colour is the probability
    of its layer's top next token there, written in the cell; with a target, its rank after the last position
    per layer beside the grid."""
    plt = pyplot()
    L, T = lens.top_probs.shape[:2]
    fig, ax = plt.subplots(figsize=(1.0 + 0.95 * T + (1.3 if lens.target else 0), 0.8 + 0.32 * L))
    ax.imshow(lens.top_probs[:, :, 0].numpy(), origin="lower", cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(L):
        for t in range(T):
            p = float(lens.top_probs[i, t, 0])
            ax.text(
                t,
                i,
                _label(lens.top_tokens[i][t][0], 9),
                ha="center",
                va="center",
                fontsize=6.5,
                color="white" if p > 0.55 else "black",
            )
    ax.set_xticks(range(T), [_label(t, 9) for t in lens.tokens], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(L), [str(i) for i in range(L)], fontsize=6)
    ax.set_ylabel("layer (the residual stream after it)")
    if lens.target:
        ax2 = ax.twinx()
        ax2.set_ylim(ax.get_ylim())
        ax2.set_yticks(range(L), [str(r) for r in lens.target_rank], fontsize=6)
        ax2.set_ylabel(f"rank of {lens.target.strip()!r} after the last token")
    ax.set_title(title or "logit lens", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi=130)


def lens_html(lens: LogitLens, path: str | Path, title: str = "") -> Path:
    """The same as a table: every cell holds its layer's top tokens and their probabilities (shaded by the first)."""
    L, T = lens.top_probs.shape[:2]
    head = "".join(f"<th>{html.escape(_label(t, 14))}</th>" for t in lens.tokens)
    extra = f"<th>rank of {html.escape(lens.target)!s}</th>" if lens.target else ""
    rows = []
    for i in reversed(range(L)):
        cells = []
        for t in range(T):
            p = float(lens.top_probs[i, t, 0])
            tip = html.escape(
                ", ".join(f"{tok!r} {float(q):.3f}" for tok, q in zip(lens.top_tokens[i][t], lens.top_probs[i, t]))
            )
            shade = f"rgba(33,102,172,{p:.3f})"
            ink = "white" if p > 0.55 else "black"
            cells.append(
                f'<td title="{tip}" style="background:{shade};color:{ink}">'
                f"{html.escape(_label(lens.top_tokens[i][t][0], 14))}</td>"
            )
        rank = f"<td>{lens.target_rank[i]} ({lens.target_prob[i]:.3f})</td>" if lens.target else ""
        rows.append(f"<tr><th>{i}</th>{''.join(cells)}{rank}</tr>")
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title or 'logit lens')}</title>"
        "<style>body{font:13px system-ui,sans-serif}td,th{padding:2px 6px;border:1px solid #ddd;"
        "white-space:pre}table{border-collapse:collapse}</style>"
        f"<h3>{html.escape(title or 'logit lens')}</h3><p>each layer's top next token at each position "
        "(hover for the top ones and their probabilities); the last layer is the model's own prediction</p>"
        f"<table><tr><th>layer</th>{head}{extra}</tr>{''.join(rows)}</table>"
    )
    write_text(path, page)
    return Path(path)


# --------------------------------------------------------------------------------------------------------------
# causal tracing


def trace_png(trace: CausalTrace, path: str | Path, title: str = "") -> Path:
    """One heat map per kind of point (layers down, prompt positions along): the answer's probability with that
    point restored, from the corrupted run's (white) up to the clean run's (dark); the subject's tokens starred."""
    plt = pyplot()
    kinds = list(trace.restored)
    L, T = trace.restored[kinds[0]].shape
    fig, axes = plt.subplots(1, len(kinds), figsize=(1.2 + len(kinds) * (0.9 + 0.55 * T), 1.2 + 0.16 * L))
    axes = [axes] if len(kinds) == 1 else list(axes)
    names = {"resid": "residual stream", "attn": "attention output", "mlp": "MLP output"}
    labels = [_label(t, 10) + ("*" if i in trace.subject else "") for i, t in enumerate(trace.tokens)]
    for ax, kind in zip(axes, kinds):
        im = ax.imshow(
            trace.restored[kind].numpy(),
            origin="lower",
            cmap="Purples",
            aspect="auto",
            vmin=trace.corrupt_prob,
            vmax=max(trace.clean_prob, trace.corrupt_prob + 1e-9),
        )
        ax.set_xticks(range(T), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(names.get(kind, kind), fontsize=8)
        ax.tick_params(axis="y", labelsize=6)
    axes[0].set_ylabel("layer restored")
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"p({trace.target.strip()!r})")
    fig.suptitle(
        title
        or f"causal trace: p({trace.target.strip()!r}) clean {trace.clean_prob:.3f}, corrupted "
        f"{trace.corrupt_prob:.3f}",
        fontsize=9,
    )
    return save_png(fig, path, dpi=130)
