"""`lmforge eval <task>`: one entry point for every kind of evaluation, each writing the same outputs.

    perplexity  decoders on text: perplexity, loss, bits per byte (strided windows; the plot: loss per window)
    classify    classifiers on a labelled file: accuracy, macro-F1, per-class precision / recall, confusion matrix
    qa          extractive QA on SQuAD-format data: exact match and token F1 (SQuAD definitions)
    choice      zero-shot multiple choice by log-likelihood: accuracy and length-normalised accuracy
    seq2seq     generation scored against references: BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score)
    bias        counterfactual sentence pairs (a group term changed): which side a decoder or masked LM prefers,
                how often a classifier's prediction flips, per category and group, with intervals (eval/bias.py)

With `out`, a run writes results.json (the metrics and the settings), report.md and report.html with a plot,
and the per-example rows: predictions.jsonl (perplexity: windows.jsonl, one row per scored window).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmforge.config import check_number
from lmforge.data.chat import apply_chat_template
from lmforge.data.labelled import read_labelled
from lmforge.data.pairs import held_out_by_group
from lmforge.data.pairs import read_pairs as read_pair_set
from lmforge.data.qa import read_squad, shakespeare_qa
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.eval import bias
from lmforge.eval.choice import evaluate_choices, read_choices
from lmforge.eval.classify import classification_metrics, plot_confusion
from lmforge.eval.generation import seq2seq_scores
from lmforge.eval.lm import evaluate_perplexity
from lmforge.eval.qa import squad_scores
from lmforge.files import check_out_dir, write_json, write_text
from lmforge.generate import generate
from lmforge.generate.chat import end_of_turn_ids
from lmforge.generate.seq2seq import Seq2SeqParams, generate_seq2seq
from lmforge.interop import load_pretrained
from lmforge.models.decoder import DecoderLM
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.predict import answer, predict
from lmforge.report import bar_plot, series_plot, write_report

TASKS = ("perplexity", "classify", "qa", "choice", "seq2seq", "bias")


def describe(task: str, m: dict) -> str:
    """One line of `evaluate`'s metrics, as `lmforge eval` prints them."""
    if task == "perplexity":
        return (
            f"perplexity {m['perplexity']:.3f}  loss {m['loss']:.4f}  bits/byte {m['bits_per_byte']:.4f}  "
            f"({m['tokens']:,} tokens, {m['windows']:,} windows of {m['window']}, stride {m['stride']})"
        )
    shown = {k: v for k, v in m.items() if isinstance(v, (int, float)) and k != "seconds"}
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def evaluate(
    task: str,
    model: str,
    data: list[str] | str,
    out: str | Path | None = None,
    *,
    limit: int | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    source_col: str | None = None,
    target_col: str | None = None,
    chat: bool = False,
    prompt: str | None = None,
    max_new_tokens: int = 64,
    window: int | None = None,
    stride: int | None = None,
    quantize: str | None = None,
    adapter: str | None = None,
    batch_size: int = 16,
    num_beams: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
) -> dict:
    """Evaluate `model` on `data` for `task`; returns the metrics (and writes the report when `out` is given).
    dtype: the weights' dtype (load_pretrained: float32, bfloat16 or auto). num_beams (seq2seq): beam search
    with this many beams; None: 4 for an encoder-decoder, 1 (greedy) for a decoder."""
    if task not in TASKS:
        raise LmforgeError(f"unknown evaluation {task!r}; choose one of {', '.join(TASKS)}")
    # settings and the output folder first: loading the model and reading the data take the time
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LmforgeError(f"--limit must be positive, got {limit}")
    for flag, value, low in (
        ("--window", window, 2),
        ("--stride", stride, 1),
        ("--max-new-tokens", max_new_tokens, 1),
        ("--num-beams", num_beams, 1),
        ("--batch-size", batch_size, 1),
    ):
        check_number(flag, value, low, integer=True)
    if window is not None and stride is not None and stride > window:
        raise ConfigError(
            f"--stride {stride} is longer than --window {window}: windows would skip tokens; use a "
            "stride of at most the window"
        )
    if out is not None:
        check_out_dir(out, "--out")
    sources = [data] if isinstance(data, (str, Path)) else list(data)
    m, tok = load_pretrained(model, device=device, quantize=quantize, adapter=adapter, dtype=dtype)
    t0 = time.time()
    fn = {
        "perplexity": _perplexity,
        "classify": _classify,
        "qa": _qa,
        "choice": _choice,
        "seq2seq": _seq2seq,
        "bias": _bias,
    }[task]
    options = {
        "limit": limit,
        "text_col": text_col,
        "label_col": label_col,
        "source_col": source_col,
        "target_col": target_col,
        "chat": chat,
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "window": window,
        "stride": stride,
        "batch_size": batch_size,
        "num_beams": num_beams,
    }
    metrics, plot, details = fn(m, tok, sources, options)
    metrics["seconds"] = round(time.time() - t0, 2)
    if out is not None:
        _write(Path(out), task, model, sources, metrics, plot, details)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# tasks: each returns (metrics, (plot values, title) or None, per-example details)


def _kind(m, want: str, task: str) -> None:
    is_decoder = isinstance(m, DecoderLM)
    if want == "decoder" and not is_decoder:
        what = "an encoder-decoder (T5)" if hasattr(m, "decoder") else "an encoder"
        raise LmforgeError(f"eval {task} needs a decoder (a causal LM); this model is {what}")
    if want == "classifier" and (is_decoder or getattr(m.config, "head", None) != "classify"):
        raise LmforgeError(f"eval {task} needs a classifier (an encoder fine-tuned with `lmforge finetune classify`)")
    if want == "qa" and (is_decoder or getattr(m.config, "head", None) != "qa"):
        raise LmforgeError(f"eval {task} needs an extractive QA model (from `lmforge finetune qa`)")


def _perplexity(m, tok, sources, o):
    _kind(m, "decoder", "perplexity")
    r = evaluate_perplexity(m, tok, sources, window=o["window"], stride=o["stride"])
    met = {"perplexity": r["ppl"], "loss": r["loss"], "bits_per_byte": r["bpb"]}
    met.update({k: r[k] for k in ("tokens", "bytes", "windows", "window", "stride")})
    details = [{"document": d, "start": begin, "tokens": n, "loss": loss} for d, begin, loss, n in r["per_window"]]
    return met, ("windows", [x[2] for x in r["per_window"]], r["loss"]), details


def _classify(m, tok, sources, o):
    _kind(m, "classifier", "classify")
    ds = read_labelled(sources[0], o["text_col"], o["label_col"])
    texts, gold = ds.texts[: o["limit"]], ds.labels[: o["limit"]]
    labels = m.config.labels
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise DataError(
            f"{sources[0]} has labels the model never saw: {', '.join(unknown[:5])} (the model knows: "
            f"{', '.join(labels)})"
        )
    preds = predict(m, tok, texts)
    ids = {n: i for i, n in enumerate(labels)}
    met = classification_metrics([ids[g] for g in gold], [ids[p["label"]] for p in preds], labels)
    details = [
        {"text": t, "label": g, "prediction": p["label"], "score": p["score"]} for t, g, p in zip(texts, gold, preds)
    ]
    met["n"] = len(texts)
    return met, ("confusion", met), details


def _qa(m, tok, sources, o):
    _kind(m, "qa", "qa")
    examples = shakespeare_qa()["test"] if sources[0] == "shakespeare-qa" else read_squad(sources[0])
    examples = examples[: o["limit"]]
    max_len = min(384, m.config.max_seq_len)
    # windows overlap by a third (128 tokens at the usual 384): a fixed 128 would not fit a small context
    preds = answer(m, tok, examples, max_len, min(128, max_len // 3))
    met = squad_scores(preds, [[t for t, _ in e.answers] for e in examples])
    met["n"] = len(examples)
    details = [
        {"question": e.question, "prediction": p, "answers": [t for t, _ in e.answers]} for e, p in zip(examples, preds)
    ]
    return met, ({"exact match": met["exact_match"], "F1": met["f1"]}, "extractive QA"), details


def _choice(m, tok, sources, o):
    _kind(m, "decoder", "choice")
    rows = read_choices(sources[0])[: o["limit"]]
    r = evaluate_choices(m, tok, rows, chat=o["chat"], template=o["prompt"])
    details = [{**row, **d} for row, d in zip(rows, r.pop("rows"))]
    plot = {
        "accuracy": 100 * r["accuracy"],
        "accuracy (length-norm.)": 100 * r["accuracy_norm"],
        "chance": 100 * r["chance"],
    }
    return r, (plot, "zero-shot multiple choice (%)"), details


def _bias(m, tok, sources, o):
    head = getattr(m.config, "head", None)
    if isinstance(m, DecoderLM):
        kind = "decoder"
    elif head == "classify":
        kind = "classifier"
    elif head in ("mlm", "pretrain"):
        kind = "masked"
    else:
        raise LmforgeError(
            "eval bias scores a decoder (log-likelihood), a masked LM (pseudo-log-likelihood) or a classifier "
            f"(prediction flips); this model is {type(m).__name__}" + (f" with a {head} head" if head else "")
        )
    pairs = bias.read_pairs(sources[0])[: o["limit"]]
    result = bias.evaluate_bias(m, tok, pairs, kind)
    details = result.pop("rows")
    return {**bias.summary(result), "kind": kind, "details": result}, ("bias", result), details


def _seq2seq(m, tok, sources, o):
    pairs = read_pairs(sources[0], o["source_col"], o["target_col"])[: o["limit"]]
    template = o["prompt"] or "{source}"
    if "{source}" not in template:
        raise DataError("the prompt template needs a {source} placeholder")
    prompts = [template.format(source=s) for s, _ in pairs]
    if isinstance(m, Seq2SeqLM):  # an encoder-decoder reads the source and writes the target: beam search
        if o["chat"]:
            raise LmforgeError(
                "--chat sends prompts through a decoder's chat template; this model is an "
                "encoder-decoder (T5), which reads the source as it is: drop --chat"
            )
        hyps = generate_seq2seq(
            m,
            tok,
            prompts,
            Seq2SeqParams(max_new_tokens=o["max_new_tokens"], num_beams=o["num_beams"] or 4),
            batch_size=32,
        )
        return _seq2seq_scored(pairs, hyps)
    _kind(m, "decoder", "seq2seq")
    ends: list[int] = []
    if o["chat"]:
        prompts = [apply_chat_template(tok, [{"role": "user", "content": p}]) for p in prompts]
        ends = end_of_turn_ids(tok)
    # greedy (or beam search with --num-beams), a raw model's answer ending at its line's end
    how = dict(temperature=0.0) if (o["num_beams"] or 1) == 1 else dict(num_beams=o["num_beams"])
    hyps: list[str] = []
    bs = o["batch_size"]
    for s in range(0, len(prompts), bs):
        hyps += [
            h.strip()
            for h in generate(
                m,
                tok,
                prompts[s : s + bs],
                max_new_tokens=o["max_new_tokens"],
                stop=None if o["chat"] else ["\n"],
                end_token_ids=ends,
                **how,
            )
        ]
    return _seq2seq_scored(pairs, hyps)


def _seq2seq_scored(pairs, hyps):
    refs = [t for _, t in pairs]
    met = seq2seq_scores(hyps, refs)
    met["n"] = len(pairs)
    details = [{"source": s, "reference": t, "prediction": h} for (s, t), h in zip(pairs, hyps)]
    return (
        met,
        ({k: met[k] for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL")}, "generation vs references"),
        details,
    )


def read_pairs(path: str, source_col: str | None, target_col: str | None) -> list[tuple[str, str]]:
    """(source, target) rows from JSONL / CSV / TSV (see lmforge.data.pairs for the column names it guesses;
    rows with an empty side are skipped). The packaged Bible (bible-en-es, bible-es-en) is scored on its
    held-out test books, the ones `finetune seq2seq` never trains on."""
    ps = read_pair_set(path, source_col, target_col)
    if ps.groups is not None:
        ps = ps.subset(held_out_by_group(ps)[2])
    return list(zip(ps.sources, ps.targets))


# ----------------------------------------------------------------------------------------------------------------
# outputs


def _write(out: Path, task: str, model: str, sources: list[str], metrics: dict, plot, details: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "results.json", {"task": task, "model": str(model), "data": [str(s) for s in sources], "metrics": metrics}
    )
    if details:
        name = "windows.jsonl" if task == "perplexity" else "predictions.jsonl"
        write_text(out / name, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in details))
    images = []
    if plot is not None and plot[0] == "windows":
        series_plot(
            plot[1],
            out / "windows.png",
            f"{Path(str(model)).name}: loss per window",
            xlabel="window (in reading order)",
            ylabel="loss (nats / token)",
            mean=plot[2],
        )
        images.append("windows.png")
    elif plot is not None and plot[0] == "bias":
        if bias.plot_bias(plot[1], out / "bias.png", f"{Path(str(model)).name}: counterfactual groups") is not None:
            images.append("bias.png")
    elif plot is not None and plot[0] == "confusion":
        plot_confusion(plot[1], out / "confusion.png", title=f"{Path(str(model)).name} on {Path(sources[0]).name}")
        images.append("confusion.png")
    elif plot is not None:
        bar_plot(plot[0], out / "scores.png", plot[1])
        images.append("scores.png")
    rows = [("task", task), ("model", str(model)), ("data", ", ".join(map(str, sources)))]
    rows += [(k, _fmt(v)) for k, v in metrics.items() if not isinstance(v, (dict, list))]
    write_report(out, f"Evaluation: {task}", rows, images)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
