"""Why did the model say that? Attention maps and token saliency for lmforge's decoders and encoders, and
attention maps for its encoder-decoders.

    attention_maps   every layer's and head's attention probabilities for a text       (attention.py)
    seq2seq_attention_maps   an encoder-decoder's encoder self-, decoder self- and cross-attention for a source
                     and a target (or the model's greedy output)                       (attention.py)
    saliency         per-token integrated gradients or gradient x input for a classifier's class or a
                     decoder's next token                                              (saliency.py)
    hooks            read or replace any block's residual stream, attention or MLP output by name   (hooks.py)
    logit_lens       each layer's top next tokens, and a target's rank per layer, for a decoder    (lens.py)
    causal_trace     where a decoder recalls a fact: the subject corrupted, one point restored at a time (trace.py)
    render           PNG grids and self-contained HTML pages of them                    (render.py)
    explain          all of it from a model name or path into a folder: what `lmforge explain` runs

Both methods run the model as it is (a recording switch on the attention modules, a forward hook on the token
embedding), so anything lmforge can load can be explained, and nothing here can change what a model computes.
Attention shows where information flows; saliency measures what the output depends on. They often disagree,
which is why both are here.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.explain.attention import AttentionMaps, Seq2SeqAttention, attention_maps, seq2seq_attention_maps
from lmforge.explain.hooks import hooks
from lmforge.explain.inputs import model_kind
from lmforge.explain.lens import LogitLens, logit_lens
from lmforge.explain.render import (
    attention_html,
    attention_png,
    lens_html,
    lens_png,
    saliency_html,
    saliency_png,
    trace_png,
)
from lmforge.explain.saliency import (
    BASELINES,
    METHODS,
    Saliency,
    check_saliency_model,
    check_steps,
    resolve_target,
    saliency,
)
from lmforge.explain.trace import CausalTrace, causal_trace
from lmforge.files import check_out_dir, write_json
from lmforge.interop import load_pretrained

__all__ = [
    "AttentionMaps",
    "CausalTrace",
    "LogitLens",
    "Saliency",
    "Seq2SeqAttention",
    "attention_html",
    "attention_maps",
    "attention_png",
    "causal_trace",
    "explain",
    "hooks",
    "lens_html",
    "lens_png",
    "logit_lens",
    "saliency",
    "saliency_html",
    "saliency_png",
    "trace_png",
    "seq2seq_attention_maps",
]

WHAT = ("both", "attention", "saliency", "lens")


def explain(
    model: str | Path,
    text: str,
    out: str | Path,
    what: str = "both",
    method: str | None = None,
    steps: int | None = None,
    target: str | int | None = None,
    layer: int | None = None,
    baseline: str | None = None,
    max_steps: int | None = None,
    device: str = "cpu",
) -> dict:
    """Explain `model` (a packaged name, model directory or .gguf) on `text`; write the pictures into `out`.

    what: "attention" (attention.png, attention.html), "saliency" (saliency.png, saliency.html), "both", or
    "lens" (a decoder's logit lens: lens.png, lens.html; `target` the token whose rank it follows).
    "both" on a model saliency cannot explain (an encoder without a classify head) writes the attention files
    and says why in `notes`. method "ig" (integrated gradients, `steps` Gauss-Legendre nodes, `baseline`) or
    "grad_x_input". IG refines its path where completeness fails, up to max_steps gradient evaluations
    (default 16 x steps; see `saliency`). target: a class name or index (classifiers), a token or "id:N"
    (decoders); default the model's own prediction. layer: draw one layer's heads (negative counts from the
    end) instead of the grid. method, steps and baseline default to "ig", 50 and "pad"; a saliency setting given
    where no saliency is drawn (what="attention", an encoder-decoder, IG's settings with grad_x_input) or a layer
    where no attention is drawn is refused.

    An encoder-decoder (T5) gets attention maps only: `text` is the source and `target` the target text
    (default: the model's greedy output), and each of its three kinds is drawn on its own: attention_encoder,
    attention_decoder and attention_cross (.png / .html; cross-attention has target tokens on the rows and
    source tokens on the columns). Under "both" the saliency is skipped with a note; "saliency" is refused.

    Returns {"model", "kind", "text", "tokens", "files", "notes", and with saliency "saliency": target,
    target_id, predicted, prob, method, steps, steps_used, baseline, f_input, f_baseline, completeness_gap
    (relative; IG only), top_tokens, scores}; an encoder-decoder's has "target", "target_tokens" and
    "generated" (whether the target is the model's own output) instead. The same dict is written to
    out/explain.json.
    """
    # argument errors first: loading a model takes seconds
    if what not in WHAT:
        raise LmforgeError(f"unknown explanation {what!r}; use one of {', '.join(WHAT)}")
    given = {
        flag: v is not None
        for flag, v in (("--method", method), ("--steps", steps), ("--max-steps", max_steps), ("--baseline", baseline))
    }
    if what == "attention" and any(given.values()):
        raise LmforgeError(
            f"{', '.join(f for f, on in given.items() if on)} set the saliency; --what attention "
            "draws none: drop them, or use --what both / saliency"
        )
    if what == "lens" and (any(given.values()) or layer is not None):
        raise LmforgeError(
            "--method, --steps, --max-steps, --baseline and --layer set the saliency and the attention maps; "
            "--what lens draws neither: drop them"
        )
    if what == "saliency" and layer is not None:
        raise LmforgeError(
            "--layer picks the attention maps' layer; --what saliency draws none: drop it, or use "
            "--what both / attention"
        )
    if method == "grad_x_input" and (given["--steps"] or given["--max-steps"] or given["--baseline"]):
        raise LmforgeError(
            "--steps, --max-steps and --baseline set integrated gradients' path; --method "
            "grad_x_input has none: drop them, or use --method ig"
        )
    method, steps, baseline = method or "ig", 50 if steps is None else steps, baseline or "pad"
    if method not in METHODS:
        raise LmforgeError(f"unknown saliency method {method!r}; use one of {', '.join(METHODS)}")
    check_steps(steps, max_steps)
    if baseline not in BASELINES:
        raise LmforgeError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise LmforgeError(f"layer must be a whole number, got {layer!r}")
    if not text.strip():
        raise LmforgeError("the text to explain is empty; give it with --text or on standard input")
    check_out_dir(out, "--out")

    m, tok = load_pretrained(model, device=device)
    kind = model_kind(m)
    if what == "lens":
        return _explain_lens(m, tok, model, text, Path(out), target)
    if layer is not None:
        # an encoder-decoder's layer must exist in both stacks (negative: counted from each one's end)
        n = min(m.config.n_layer, m.config.n_decoder_layer) if kind == "seq2seq" else m.config.n_layer
        if not -n <= layer < n:
            raise LmforgeError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1}, or -1..-{n})")
        layer = layer if kind == "seq2seq" else layer % n
    if kind == "seq2seq":
        if any(given.values()):
            raise LmforgeError(
                f"{', '.join(f for f, on in given.items() if on)} set the saliency, which covers "
                "decoders and encoder classifiers, not encoder-decoders (T5): drop them"
            )
        return _explain_seq2seq(m, tok, model, text, Path(out), what, target, layer)
    if what == "attention" and target is not None:
        raise LmforgeError(
            "--target picks what the saliency explains; --what attention draws none: drop it, or "
            "use --what both / saliency"
        )
    do_saliency = what in ("both", "saliency")
    notes: list[str] = []
    if do_saliency:
        try:
            check_saliency_model(m)
            resolve_target(m, tok, target)  # a bad target fails before any file is written
        except LmforgeError as e:
            if what == "saliency" or target is not None or kind != "encoder" or m.config.head == "classify":
                raise
            notes.append(f"saliency skipped: {e}")
            do_saliency = False

    out = Path(out)
    name = _display_name(model)
    result: dict = {
        "model": str(model),
        "kind": "classifier" if kind == "encoder" and m.config.head == "classify" else kind,
        "text": text,
        "files": {},
        "notes": notes,
    }
    if what in ("both", "attention"):
        maps = attention_maps(m, tok, text)
        where = f"layer {layer}" if layer is not None else f"{maps.n_layer} layers x {maps.n_head} heads"
        title = f"attention of {name}, {where}"
        result["tokens"] = maps.tokens
        result["files"]["attention_png"] = str(attention_png(maps, out / "attention.png", layer, title))
        result["files"]["attention_html"] = str(
            attention_html(maps, out / "attention.html", layer, f"attention of {name}")
        )
    if do_saliency:
        sal = saliency(m, tok, text, target=target, method=method, steps=steps, baseline=baseline, max_steps=max_steps)
        if method == "ig" and sal.relative_gap > 0.02:
            notes.append(
                f"integrated gradients miss completeness by {sal.relative_gap:.1%} after "
                f"{sal.steps_used} gradient evaluations; allow more with max_steps"
            )
        result["tokens"] = sal.tokens
        title = f"saliency of {name} ({'integrated gradients' if method == 'ig' else 'gradient x input'})"
        result["files"]["saliency_png"] = str(saliency_png(sal, out / "saliency.png", title))
        result["files"]["saliency_html"] = str(saliency_html(sal, out / "saliency.html", title))
        result["saliency"] = {
            "target": sal.target,
            "target_id": sal.target_id,
            "predicted": sal.predicted,
            "prob": sal.prob,
            "method": method,
            "steps": sal.steps,
            "steps_used": sal.steps_used,
            "baseline": baseline,
            "f_input": sal.f_input,
            "f_baseline": sal.f_baseline,
            "completeness_gap": sal.relative_gap if method == "ig" else None,
            "top_tokens": [[t, round(s, 6)] for t, s in sal.top(5)],
            "scores": [[t, round(float(s), 6)] for t, s in zip(sal.tokens, sal.scores)],
        }
    result["files"]["summary"] = str(out / "explain.json")
    write_json(out / "explain.json", result)
    return result


def _explain_lens(m, tok, model: str | Path, text: str, out: Path, target: str | int | None) -> dict:
    """`explain --what lens`: the logit lens of a decoder on `text` (and the rank of `target` per layer)."""
    if target is not None and not isinstance(target, str):
        raise LmforgeError("--target for the logit lens is the text of a token, e.g. ' Berlin'")
    lens = logit_lens(m, tok, text, target=target)
    name = _display_name(model)
    title = f"logit lens of {name}" + (f": {target.strip()!r} after the text" if target else "")
    files = {
        "lens_png": str(lens_png(lens, out / "lens.png", title)),
        "lens_html": str(lens_html(lens, out / "lens.html", title)),
        "summary": str(out / "explain.json"),
    }
    result = {
        "model": str(model),
        "kind": "decoder",
        "text": text,
        "tokens": lens.tokens,
        "files": files,
        "notes": [],
        "lens": {
            "target": target,
            "target_rank": lens.target_rank,
            "target_prob": lens.target_prob,
            "top_next": [[t[-1][0], round(float(p[-1, 0]), 6)] for t, p in zip(lens.top_tokens, lens.top_probs)],
        },
    }
    write_json(out / "explain.json", result)
    return result


def _display_name(model: str | Path) -> str:
    name = Path(str(model)).name
    if name == "model":  # a fine-tuning run's model folder: its run says more
        name = f"{Path(str(model)).parent.name}/{name}"
    return name


KIND_TITLES = {
    "encoder": "encoder self-attention",
    "decoder": "decoder self-attention",
    "cross": "cross-attention (target rows, source columns)",
}


def _explain_seq2seq(
    m, tok, model: str | Path, text: str, out: Path, what: str, target: str | int | None, layer: int | None
) -> dict:
    """`explain` for an encoder-decoder: the three kinds of attention, each drawn and paged on its own."""
    if what == "saliency":
        check_saliency_model(m)  # raises: saliency does not cover encoder-decoders
    notes = (
        ["saliency skipped: it explains decoders and encoder classifiers, not encoder-decoders (T5)"]
        if what == "both"
        else []
    )
    maps = seq2seq_attention_maps(m, tok, text, None if target is None else str(target))
    if maps.generated and len(maps.decoder.tokens) == 1:
        notes.append(
            "the model's greedy output is empty, so the decoder maps hold only its start token; pass "
            "--target TEXT to draw a target"
        )
    name = _display_name(model)
    result: dict = {
        "model": str(model),
        "kind": "seq2seq",
        "text": text,
        "tokens": maps.encoder.tokens,
        "target": maps.target,
        "target_tokens": maps.decoder.tokens,
        "generated": maps.generated,
        "files": {},
        "notes": notes,
    }
    for part, am in maps.parts().items():
        lay = None if layer is None else layer % am.n_layer
        where = f"layer {lay}" if lay is not None else f"{am.n_layer} layers x {am.n_head} heads"
        title = f"{KIND_TITLES[part]} of {name}"
        result["files"][f"attention_{part}_png"] = str(
            attention_png(am, out / f"attention_{part}.png", lay, f"{title}, {where}")
        )
        result["files"][f"attention_{part}_html"] = str(attention_html(am, out / f"attention_{part}.html", lay, title))
    result["files"]["summary"] = str(out / "explain.json")
    write_json(out / "explain.json", result)
    return result


def describe(r: dict) -> str:
    """What `lmforge explain` prints about `explain`'s result: notes, the target, the most salient tokens, files."""
    lines = [f"note: {note}" for note in r.get("notes", [])]
    if r["kind"] == "seq2seq":
        lines.append(f"target{' (the greedy output)' if r['generated'] else ''}: {r['target']!r}")
    sal = r.get("saliency")
    if sal:
        gap = sal.get("completeness_gap")
        lines.append(
            f"target {sal['target']!r} (p = {sal['prob']:.3f}, predicted {sal['predicted']!r})"
            + (f", completeness gap {100 * gap:.2f}% after {sal['steps_used']} steps" if gap is not None else "")
        )
        lines.append("most salient: " + ", ".join(f"{t!r} {v:+.3f}" for t, v in sal["top_tokens"][:8]))
    return "\n".join(lines + [f"wrote {f}" for f in r["files"].values()])
