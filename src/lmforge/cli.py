"""`lmforge <verb>`: each verb parses its arguments and calls one library function.

A user error (an LmforgeError) prints one line, `lmforge: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lmforge.errors import LmforgeError


def cmd_quickstart(a: argparse.Namespace) -> None:
    from lmforge.quickstart import quickstart

    quickstart(out=a.out, overrides=a.set)


def cmd_tokenizer_train(a: argparse.Namespace) -> None:
    from lmforge.data.vocab import train_tokenizer

    tok = train_tokenizer(a.data, vocab_size=a.vocab_size, out=a.out, kind=a.kind, lowercase=not a.cased)
    kind = {"bpe": "byte-level BPE", "wordpiece": "WordPiece", "unigram": "Unigram"}[a.kind]
    print(f"trained {kind}: {tok.vocab_size} tokens -> {a.out}")


def cmd_pretrain(a: argparse.Namespace) -> None:
    from lmforge.config import load_run_config
    from lmforge.train.loop import pretrain

    if a.resume:
        if not a.out:
            raise LmforgeError("--resume needs --out RUN_DIR (the run to continue)")
        # (--config is used only when the folder holds no run yet: a run killed before it wrote its config)
        cfg = load_run_config(a.config, a.set) if a.config else None
        result = pretrain(cfg, a.out, resume=True, overrides=a.set)
    else:
        if not a.config and not a.set:
            raise LmforgeError("pretrain needs --config FILE.yaml (see configs/) or --set overrides")
        cfg = load_run_config(a.config, a.set)
        import time
        from pathlib import Path

        out = a.out or str(Path("runs") / time.strftime("pretrain-%Y%m%d-%H%M%S"))
        result = pretrain(cfg, out)
    if result.final:
        f = result.final
        from lmforge.train.loop import format_metrics

        print("validation: " + format_metrics(f))
        print(f"model: {result.model_dir}")


def cmd_generate(a: argparse.Namespace) -> None:
    from lmforge.generate import generate
    from lmforge.interop import load_pretrained
    from lmforge.runtime import tune_allocator

    _check_sampling(a)
    tune_allocator()
    model, tok = load_pretrained(a.model, device=a.device, quantize=a.quantize, adapter=a.adapter)
    prompts = [p.replace("\\n", "\n").replace("\\t", "\t") if a.escapes else p for p in a.prompt]
    stream = len(prompts) == 1 and not a.json and (a.stream or (not a.no_stream and sys.stdout.isatty()))

    def on_text(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if stream:
        sys.stdout.write(prompts[0])
    texts = generate(model, tok, prompts, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                     top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty, stop=a.stop,
                     seed=a.seed, on_text=on_text if stream else None, compile=a.compile)
    if stream:
        sys.stdout.write("\n")
        return
    if a.json:
        print(json.dumps([{"prompt": p, "text": t} for p, t in zip(prompts, texts)], ensure_ascii=False))
        return
    for i, (p, t) in enumerate(zip(prompts, texts)):
        if len(prompts) > 1:
            print(f"--- {i} ---")
        print(p + t)


def _check_sampling(a: argparse.Namespace) -> None:
    """generate / chat: refuse out-of-range decoding flags before the model loads (generate checks them too)."""
    from lmforge.generate.sampling import SamplingParams

    SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, getattr(a, "repetition_penalty", 1.0),
                   a.seed).validate(flags=True)


def cmd_convert(a: argparse.Namespace) -> None:
    from lmforge.interop.convert import convert

    out = convert(a.source, a.out)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer.json, generation_config.json)")


def cmd_chat(a: argparse.Namespace) -> None:
    from lmforge.generate.chat import chat
    from lmforge.interop import load_pretrained
    from lmforge.runtime import tune_allocator

    _check_sampling(a)
    tune_allocator()
    model, tok = load_pretrained(a.model, device=a.device, quantize=a.quantize, adapter=a.adapter)
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
              compile=a.compile)

    def out(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if a.prompt is not None:  # one shot, for scripts
        reply = chat(model, tok, history + [{"role": "user", "content": a.prompt}], **kw)
        print(reply)
        return
    print("chat: type a message; /reset clears the history, /system TEXT sets the system prompt, /quit ends",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history = [m for m in history if m["role"] == "system"]
            continue
        if text.startswith("/system"):
            history = [{"role": "system", "content": text[len("/system"):].strip()}] + [
                m for m in history if m["role"] != "system"]
            continue
        history.append({"role": "user", "content": text})
        sys.stdout.write("assistant> ")
        try:
            reply = chat(model, tok, history, on_text=out, **kw)
        except KeyboardInterrupt:  # stop this reply, keep the session
            history.pop()
            print()
            continue
        except LmforgeError as e:  # e.g. the conversation outgrew the context: keep the session
            history.pop()
            print(f"\nlmforge: {e} (type /reset to clear the history)", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_eval_perplexity(a: argparse.Namespace) -> None:
    from lmforge.eval.run import evaluate

    m = evaluate("perplexity", a.model, a.data, a.out, window=a.window, stride=a.stride, quantize=a.quantize,
                 adapter=a.adapter, device=a.device)
    if a.json:  # (ppl and bpb: the names this output had before it went through `evaluate`)
        print(json.dumps({**m, "ppl": m["perplexity"], "bpb": m["bits_per_byte"]}))
        return
    print(f"perplexity {m['perplexity']:.3f}  loss {m['loss']:.4f}  bits/byte {m['bits_per_byte']:.4f}  "
          f"({m['tokens']:,} tokens, {m['windows']:,} windows of {m['window']}, stride {m['stride']})")
    if a.out:
        print(f"report: {a.out}/report.html")


def cmd_eval(a: argparse.Namespace) -> None:
    from lmforge.eval.run import evaluate

    m = evaluate(a.everb, a.model, a.data, a.out, limit=a.limit, text_col=getattr(a, "text_col", None),
                 label_col=getattr(a, "label_col", None), source_col=getattr(a, "source_col", None),
                 target_col=getattr(a, "target_col", None), chat=getattr(a, "chat", False),
                 prompt=getattr(a, "prompt", None), max_new_tokens=getattr(a, "max_new_tokens", 64),
                 quantize=a.quantize, adapter=a.adapter, num_beams=getattr(a, "num_beams", 4))
    if a.json:
        print(json.dumps(m))
        return
    shown = {k: v for k, v in m.items() if isinstance(v, (int, float)) and k != "seconds"}
    print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    if a.out:
        print(f"report: {a.out}/report.html")


def cmd_explain(a: argparse.Namespace) -> None:
    from lmforge.explain import explain

    text = a.text if a.text is not None else sys.stdin.read().strip()
    r = explain(a.model, text, a.out, what=a.what, method=a.method, steps=a.steps, target=a.target, layer=a.layer,
                baseline=a.baseline, max_steps=a.max_steps)
    for note in r.get("notes", []):
        print(f"note: {note}")
    if r["kind"] == "seq2seq":
        print(f"target{' (the greedy output)' if r['generated'] else ''}: {r['target']!r}")
    sal = r.get("saliency")
    if sal:
        gap = sal.get("completeness_gap")
        print(f"target {sal['target']!r} (p = {sal['prob']:.3f}, predicted {sal['predicted']!r})"
              + (f", completeness gap {100 * gap:.2f}% after {sal['steps_used']} steps" if gap is not None else ""))
        print("most salient: " + ", ".join(f"{t!r} {v:+.3f}" for t, v in sal["top_tokens"][:8]))
    for f in r["files"].values():
        print(f"wrote {f}")


def cmd_quantize(a: argparse.Namespace) -> None:
    from lmforge.compress.pipeline import quantize

    quantize(a.model, a.mode, a.out, group_size=a.group_size, eval_data=a.eval_data, text_col=a.text_col,
             label_col=a.label_col)


def cmd_prune(a: argparse.Namespace) -> None:
    from lmforge.compress.pipeline import prune

    prune(a.model, a.out, sparsity=a.sparsity, structure=a.structured, fraction=a.fraction,
          recover_steps=a.recover_steps, recover_data=a.recover_data, eval_data=a.eval_data, text_col=a.text_col,
          label_col=a.label_col)


def cmd_info(a: argparse.Namespace) -> None:
    from lmforge.info import model_info

    info = model_info(a.target)
    if a.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{info['source']}: {info['family']}, model_type {info['model_type']}")
    print(f"parameters: {info['params']:,} ({info['params_non_embedding']:,} without embeddings)")
    print(f"FLOPs per token: {info['flops_per_token_forward'] / 1e6:,.1f} M forward, "
          f"{info['flops_per_token_train'] / 1e6:,.1f} M training")
    for k, v in info["config"].items():
        print(f"  {k}: {v}")


FT_FLAGS = ("method", "top_k", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "quant", "epochs",
            "batch_size", "lr", "max_len", "seed", "device", "out", "model", "data", "val_data", "test_data")
FT_TASK_FLAGS = {"classify": ("text_col", "label_col", "val_fraction", "test_fraction", "class_weights"),
                 "qa": ("stride",), "chat": ("packing", "eval_before", "max_new_tokens", "eval_limit"),
                 "dpo": ("beta",),
                 "seq2seq": ("source_col", "target_col", "prefix", "val_fraction", "test_fraction", "max_target_len",
                             "num_beams", "max_new_tokens", "eval_limit", "time_budget")}


def cmd_finetune(a: argparse.Namespace) -> None:
    from lmforge.tune.recipe import finetune

    task = a.ftverb
    flags = {k: getattr(a, k, None) for k in FT_FLAGS + FT_TASK_FLAGS[task]}
    r = finetune(task, a.config, flags, a.set, resume=a.resume)
    if task == "classify":
        t = r.test
        print(f"test: accuracy {t['accuracy']:.4f}  macro-F1 {t['macro_f1']:.4f}  ({r.rows['test']} rows, "
              f"{r.seconds:.0f} s training, {r.trainable_params:,} trainable parameters)")
        for name, m in t["per_class"].items():
            print(f"  {name:>12}: precision {m['precision']:.3f}  recall {m['recall']:.3f}  f1 {m['f1']:.3f}  "
                  f"n={m['support']}")
    elif task == "qa":
        print(f"test: exact match {r.test['exact_match']:.1f}  F1 {r.test['f1']:.1f}  ({r.rows['test']} questions, "
              f"{r.seconds:.0f} s training)")
    elif task == "chat":
        for name, m in (("before", r.before), ("after", r.after)):
            if m:
                print(f"held-out replies {name}: exact match {m['exact_match']:.1f}  F1 {m['f1']:.1f}  "
                      f"ROUGE-L {m['rougeL']:.1f}")
        print(f"{r.seconds:.0f} s training, peak memory {r.peak_train_memory_mb:,.0f} MiB, "
              f"{r.trainable_params:,} trainable parameters")
    elif task == "seq2seq":
        t = r.test
        print(f"test: BLEU {t['bleu']:.2f}  chrF {t['chrf']:.2f}  ROUGE-L {t['rougeL']:.2f}  ({t['n']} pairs, "
              f"{r.seconds:.0f} s training)")
        for d in r.samples[:3]:
            print(f"  {d['source'][:70]!r} -> {d['prediction'][:70]!r}")
    else:
        print(f"held-out preference accuracy: before {r.before['preference_accuracy']:.3f}  after "
              f"{r.after['preference_accuracy']:.3f}; reward accuracy {r.after['reward_accuracy']:.3f}, "
              f"margin {r.after['reward_margin']:.3f} ({r.seconds:.0f} s training)")
    if getattr(r, "adapter_dir", None):
        print(f"adapter (PEFT layout): {r.adapter_dir}")
    print(f"model: {r.model_dir}\nreport: {r.run_dir / 'report' / 'report.html'}")


def cmd_data_chatterbot(a: argparse.Namespace) -> None:
    from lmforge.data.chat import write_chatterbot

    counts = write_chatterbot(a.out, pairs=a.pairs, seed=a.seed)
    kind = "preference pairs" if a.pairs else "conversations"
    print(f"wrote {a.out}/train.jsonl, val.jsonl, test.jsonl (" + ", ".join(f"{k} {n}" for k, n in counts.items())
          + f" {kind})")


def cmd_data_shakespeare_qa(a: argparse.Namespace) -> None:
    from lmforge.data.qa import write_shakespeare_qa

    counts = write_shakespeare_qa(a.out, n_per_play=a.per_play, seed=a.seed)
    print(f"wrote {a.out}/train.json, dev.json, test.json (" + ", ".join(f"{k} {n}" for k, n in counts.items())
          + " questions)")


def cmd_predict(a: argparse.Namespace) -> None:
    from lmforge.data.labelled import read_labelled
    from lmforge.errors import DataError
    from lmforge.interop import load_pretrained
    from lmforge.predict import check_batch, predict, predict_ensemble

    check_batch(a.batch_size)  # settings and data before the models load
    gold = None
    if a.label_col:  # a labelled file: predict and score
        if not a.input or a.input == "-":
            raise DataError("--label-col needs a labelled data file (CSV/TSV/JSONL), not standard input")
        ds = read_labelled(a.input, a.text_col, a.label_col)
        _note_repaired(ds)
        texts, gold = ds.texts, ds.labels
    else:
        texts = _input_texts(a)
    members = [load_pretrained(m, device=a.device, quantize=a.quantize) for m in a.model]
    model, tok = members[0]
    labels = getattr(model.config, "labels", [])
    if gold is not None:
        unknown = sorted(set(gold) - set(labels))
        if unknown:
            raise DataError(f"{a.input} has labels the model never saw: {', '.join(unknown[:5])} "
                            f"(the model knows: {', '.join(labels)})")
    if len(members) > 1:
        preds = predict_ensemble(members, texts, vote=a.vote, batch_size=a.batch_size)
    else:
        preds = predict(model, tok, texts, batch_size=a.batch_size)
    for text, p in zip(texts, preds):
        if a.json:
            print(json.dumps({"text": text, **p}, ensure_ascii=False))
        else:
            print(f"{p['label']}\t{p['score']:.3f}\t{text}")
    if gold is not None:
        from lmforge.eval.classify import classification_metrics

        ids = {n: i for i, n in enumerate(labels)}
        m = classification_metrics([ids[g] for g in gold], [ids[p["label"]] for p in preds], labels)
        print(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ({len(gold)} rows)", file=sys.stderr)


def _input_texts(a: argparse.Namespace) -> list[str]:
    """predict / embed: the --text values, or the texts of the input file (or standard input)."""
    from lmforge.data.labelled import read_text_set

    if a.text:
        return a.text
    ds = read_text_set(a.input, a.text_col)
    _note_repaired(ds)
    return ds.texts


def _note_repaired(ds) -> None:
    if ds.repaired_rows:  # repaired, not dropped (see lmforge.data.labelled); say so, as finetune classify does
        print(f"lmforge: {ds.source}: {ds.repaired_rows} row{'s' if ds.repaired_rows != 1 else ''} repaired from "
              "non-UTF-8 bytes (decoded with a legacy single-byte encoding)", file=sys.stderr)


def cmd_embed(a: argparse.Namespace) -> None:
    from lmforge.interop import load_pretrained
    from lmforge.predict import check_batch, cosine_similarity, embed

    check_batch(a.batch_size)
    texts = _input_texts(a)
    model, tok = load_pretrained(a.model, device=a.device, quantize=a.quantize)
    vecs = embed(model, tok, texts, batch_size=a.batch_size)
    if a.similarity:
        sim = cosine_similarity(vecs, vecs)
        for i, t in enumerate(texts):
            print("  ".join(f"{v:6.3f}" for v in sim[i].tolist()) + f"  {t[:60]}")
        return
    for t, v in zip(texts, vecs.tolist()):
        print(json.dumps({"text": t, "embedding": [round(x, 6) for x in v]}, ensure_ascii=False))


def cmd_serve(a: argparse.Namespace) -> None:
    import os

    from lmforge.config import check_number
    from lmforge.serve import serve

    # (serve() checks --port; the engine checks its sizes once the models are loaded: refuse them before that)
    for flag, value, low in (("--port", a.port, 0), ("--max-batch", a.max_batch, 1), ("--max-queue", a.max_queue, 0),
                             ("--max-len", a.max_len, 1), ("--max-body", a.max_body, 1)):
        check_number(flag, value, low, 65535 if flag == "--port" else None, integer=True)
    check_number("--request-timeout", a.request_timeout, 0, low_open=True)
    serve(a.model, host=a.host, port=a.port, api_key=a.api_key or os.environ.get("LMFORGE_API_KEY") or None,
          max_batch=a.max_batch, max_queue=a.max_queue, max_len=a.max_len, quantize=a.quantize,
          max_body=a.max_body, log_level=a.log_level, request_timeout=a.request_timeout)


ENCODER_QUANTIZE = dict(choices=["int8", "int8-dynamic"], help="int8 Linear weights at load time: weight-only, or "
                        "int8-dynamic (int8 activations too: the fast one for batched encoders on CPU)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="Train, adapt, inspect and serve language models.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    q = sub.add_parser("quickstart", help="train a small GPT on packaged Shakespeare, evaluate, sample")
    q.add_argument("--out", help="run directory (default: runs/quickstart-DATE-TIME)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.steps=200")
    q.set_defaults(fn=cmd_quickstart)

    t = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = t.add_subparsers(dest="tverb", required=True, metavar="ACTION")
    tt = tsub.add_parser("train", help="train a byte-level BPE (decoders) or WordPiece (encoders) tokenizer")
    tt.add_argument("--data", nargs="+", required=True, help="corpus names, files, folders or globs")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--kind", choices=("bpe", "wordpiece", "unigram"), default="bpe",
                    help="byte-level BPE (decoders), WordPiece (encoders), Unigram with T5 sentinels (seq2seq)")
    tt.add_argument("--cased", action="store_true", help="WordPiece: keep case (default lower-cases)")
    tt.add_argument("--out", required=True, help="tokenizer.json path or a folder")
    tt.set_defaults(fn=cmd_tokenizer_train)

    pt = sub.add_parser("pretrain", help="pre-train a decoder LM from a YAML recipe (works under torchrun)")
    pt.add_argument("--config", help="YAML recipe (see configs/)")
    pt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4")
    pt.add_argument("--out", help="run directory (default: runs/pretrain-DATE-TIME)")
    pt.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    pt.set_defaults(fn=cmd_pretrain)

    g = sub.add_parser("generate", help="continue prompts with a model")
    g.add_argument("--model", required=True, help="model directory, .gguf file or packaged model name")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="cpu")
    g.add_argument("--quantize", choices=["int8"], help="weight-only int8 Linear weights (inference)")
    g.add_argument("--adapter", help="a LoRA adapter directory (PEFT layout) to merge into the model")
    g.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (tens of seconds to compile once, then faster steps)")
    g.add_argument("--escapes", action="store_true", help=r"interpret \n and \t in prompts")
    g.add_argument("--stream", action="store_true", help="stream even when stdout is not a terminal")
    g.add_argument("--no-stream", action="store_true", help="print only when done")
    g.add_argument("--json", action="store_true", help="print results as JSON")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("convert", help="convert a .gguf file (or a model directory) into an HF-layout directory")
    c.add_argument("source", help=".gguf file, model directory or packaged model name")
    c.add_argument("out", help="output directory")
    c.set_defaults(fn=cmd_convert)

    ch = sub.add_parser("chat", help="chat with a model through its chat template (streams)")
    ch.add_argument("--model", required=True, help="model directory, .gguf file or packaged model name")
    ch.add_argument("--system", help="system prompt")
    ch.add_argument("--prompt", help="one message, answer printed, then exit (for scripts)")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ch.add_argument("--top-k", type=int, default=50)
    ch.add_argument("--top-p", type=float, default=0.9)
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--device", default="cpu")
    ch.add_argument("--quantize", choices=["int8"], help="weight-only int8 Linear weights (inference)")
    ch.add_argument("--adapter", help="a LoRA adapter directory (PEFT layout) to merge into the model")
    ch.add_argument("--compile", action="store_true",
                    help="decode through torch.compile (tens of seconds to compile once, then faster steps)")
    ch.set_defaults(fn=cmd_chat)

    ev = sub.add_parser("eval", help="evaluate a model")
    evsub = ev.add_subparsers(dest="everb", required=True, metavar="WHAT")
    pp = evsub.add_parser("perplexity", help="perplexity and bits per byte on text, with strided windows")
    pp.add_argument("--model", required=True, help="model directory, .gguf file or packaged model name")
    pp.add_argument("--data", nargs="+", required=True, help="corpus names, files, folders or globs")
    pp.add_argument("--window", type=int, default=None, help="tokens per window (default: context, at most 1024)")
    pp.add_argument("--stride", type=int, default=None, help="tokens between windows (default: window / 2)")
    pp.add_argument("--device", default="cpu")
    pp.add_argument("--quantize", choices=["int8"], help="weight-only int8 Linear weights (inference)")
    pp.add_argument("--adapter", help="a LoRA adapter directory (PEFT layout) to merge into the model")
    pp.add_argument("--out", help="write results.json, windows.jsonl (loss per window) and report.md/.html here")
    pp.add_argument("--json", action="store_true", help="print the metrics as JSON")
    pp.set_defaults(fn=cmd_eval_perplexity)

    evc = argparse.ArgumentParser(add_help=False)
    evc.add_argument("--model", required=True, help="model directory, .gguf file or packaged model name")
    evc.add_argument("--out", help="write results.json, predictions.jsonl and report.md/.html here")
    evc.add_argument("--limit", type=int, help="evaluate the first N examples only")
    evc.add_argument("--quantize", choices=["int8"], help="weight-only int8 Linear weights (inference)")
    evc.add_argument("--adapter", help="a LoRA adapter directory (PEFT layout) to merge into the model")
    evc.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ec = evsub.add_parser("classify", parents=[evc], help="accuracy, macro-F1, confusion matrix of a classifier")
    ec.add_argument("--data", required=True, help="labelled CSV/TSV/JSONL")
    ec.add_argument("--text-col")
    ec.add_argument("--label-col")
    eq = evsub.add_parser("qa", parents=[evc], help="exact match and F1 of an extractive QA model")
    eq.add_argument("--data", required=True, help="SQuAD-format JSON/JSONL, or shakespeare-qa (its test split)")
    emc = evsub.add_parser("choice", parents=[evc], help="zero-shot multiple choice by log-likelihood")
    emc.add_argument("--data", required=True, help="JSONL rows {question, choices, answer}, or chatterbot-mc")
    emc.add_argument("--chat", action="store_true", help="ask through the model's chat template")
    emc.add_argument("--prompt", help="template for the question (default 'Question: {question}\\nAnswer:')")
    es = evsub.add_parser("seq2seq", parents=[evc], help="BLEU, chrF and ROUGE of generations against references")
    es.add_argument("--data", required=True, help="JSONL/CSV/TSV with source and target columns, or bible-en-es "
                    "(its held-out test books)")
    es.add_argument("--source-col")
    es.add_argument("--target-col")
    es.add_argument("--prompt", help="template around each source, with {source} (e.g. 'Translate: {source}\\n')")
    es.add_argument("--chat", action="store_true", help="send each prompt through the model's chat template")
    es.add_argument("--max-new-tokens", type=int, default=64)
    es.add_argument("--num-beams", type=int, default=4, help="beam width for encoder-decoder models (default 4)")
    for p_ in (ec, eq, emc, es):
        p_.set_defaults(fn=cmd_eval)

    ex = sub.add_parser("explain", help="attention maps and token saliency (PNG + HTML) for a model and a text "
                        "(encoder-decoders: encoder, decoder and cross-attention maps)")
    ex.add_argument("--model", required=True, help="model directory, .gguf file or packaged model name")
    ex.add_argument("--text", help="the text to explain (default: read standard input)")
    ex.add_argument("--out", required=True, help="folder for attention.png/.html, saliency.png/.html, explain.json "
                    "(encoder-decoders: attention_encoder/_decoder/_cross.png/.html)")
    ex.add_argument("--what", default="both", choices=["both", "attention", "saliency"])
    ex.add_argument("--method", default="ig", help="saliency: ig (integrated gradients) or grad_x_input")
    ex.add_argument("--steps", type=int, default=50, help="integrated gradients: steps along the path")
    ex.add_argument("--max-steps", type=int, help="integrated gradients: refine up to this many steps where "
                    "completeness fails (default 16 x steps)")
    ex.add_argument("--baseline", default="pad", help="integrated gradients: pad, mask or zero embeddings")
    ex.add_argument("--target", help="a class name or index (classifiers), a token or id:N (decoders); "
                    "default: the model's prediction. Encoder-decoders (T5): the target text whose attention is "
                    "drawn (--text is the source); default: the model's greedy output")
    ex.add_argument("--layer", type=int, help="draw one layer's heads instead of the grid (negative: from the end)")
    ex.set_defaults(fn=cmd_explain)

    qz = sub.add_parser("quantize", help="quantize a model (int8, int4, int8-dynamic); prints size, speed, quality")
    qz.add_argument("--model", required=True, help="model directory, .gguf file or packaged model name")
    qz.add_argument("--mode", required=True, help="int8 (weight-only), int4 (weight-only, group-wise), int8-dynamic")
    qz.add_argument("--group-size", type=int, default=64, help="int4: weights per scale / zero point")
    qz.add_argument("--out", required=True, help="the quantized model directory to write")
    qz.add_argument("--eval-data", nargs="+", help="text (decoders: perplexity) or a labelled file (classifiers)")
    qz.add_argument("--text-col")
    qz.add_argument("--label-col")
    qz.set_defaults(fn=cmd_quantize)

    pn = sub.add_parser("prune", help="magnitude or structured pruning, optional recovery; prints before/after")
    pn.add_argument("--model", required=True, help="model directory, .gguf file or packaged model name")
    pn.add_argument("--sparsity", type=float, help="unstructured: the share of block weights set to zero, (0, 1)")
    pn.add_argument("--structured", choices=["heads", "neurons"], help="remove attention heads or MLP neurons")
    pn.add_argument("--fraction", type=float, help="structured: the share of heads / neurons removed, (0, 1)")
    pn.add_argument("--recover-steps", type=int, default=0, help="fine-tune this many steps after pruning")
    pn.add_argument("--recover-data", help="text (decoders) or a labelled file (classifiers) for recovery")
    pn.add_argument("--out", required=True, help="the pruned model directory to write")
    pn.add_argument("--eval-data", nargs="+", help="text (decoders: perplexity) or a labelled file (classifiers)")
    pn.add_argument("--text-col")
    pn.add_argument("--label-col")
    pn.set_defaults(fn=cmd_prune)

    ft = sub.add_parser("finetune", help="fine-tune a pretrained model on a task")
    ftsub = ft.add_subparsers(dest="ftverb", required=True, metavar="TASK")
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("settings (flags override the --config recipe; defaults depend on the task)")
    g.add_argument("--config", help="YAML recipe (see configs/*-lora.yaml): flat keys, any setting below")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. lora_r=16")
    g.add_argument("--model", help="model directory or packaged name")
    g.add_argument("--data", help="training data file, or a built-in set")
    g.add_argument("--val-data", help="validation file (default: a share of --data)")
    g.add_argument("--test-data", help="test file (default: a share of --data)")
    g.add_argument("--method", choices=("full", "top-k", "lora", "qlora"),
                   help="what trains: everything, the top k blocks, LoRA adapters, LoRA on an NF4/int4/int8 base")
    g.add_argument("--top-k", type=int, help="blocks trained with --method top-k (default 2)")
    g.add_argument("--lora-r", type=int, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (default 0.05)")
    g.add_argument("--lora-targets", help="modules: attn, mlp, all, or patterns like q_proj,v_proj (default attn)")
    g.add_argument("--quant", choices=("nf4", "int4", "int8"),
                   help="frozen base format for --method qlora (default nf4; int4 keeps a Q4_1 GGUF's own grid)")
    g.add_argument("--epochs", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="default by task and method (adapters get larger steps)")
    g.add_argument("--max-len", type=int, help="tokens per example")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="cpu (default), cuda, mps")
    g.add_argument("--out", help="run directory (default: runs/TASK-DATE-TIME)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (its saved settings; flags override)")

    fc = ftsub.add_parser("classify", parents=[common],
                          help="text classification with an encoder (e.g. all-minilm-l6-v2)")
    fc.add_argument("--text-col", help="text column (default: text, sentence, tweet, ...)")
    fc.add_argument("--label-col", help="label column (default: label, sentiment, class, ...)")
    fc.add_argument("--val-fraction", type=float)
    fc.add_argument("--test-fraction", type=float)
    fc.add_argument("--class-weights", action="store_true", default=None,
                    help="weight the loss by inverse class frequency")
    fc.set_defaults(fn=cmd_finetune)

    fq = ftsub.add_parser("qa", parents=[common], help="extractive question answering (SQuAD format), encoder")
    fq.add_argument("--stride", type=int, help="tokens shared by neighbouring windows (default 64)")
    fq.set_defaults(fn=cmd_finetune)

    fs = ftsub.add_parser("chat", parents=[common],
                          help="instruction tuning (SFT) of a decoder on chat JSONL or chatterbot")
    fs.add_argument("--no-packing", dest="packing", action="store_false", default=None,
                    help="one conversation per row instead of packing short ones together")
    fs.add_argument("--no-eval-before", dest="eval_before", action="store_false", default=None,
                    help="skip scoring the starting model's held-out replies")
    fs.add_argument("--max-new-tokens", type=int, help="reply length for the held-out evaluation (default 64)")
    fs.add_argument("--eval-limit", type=int, help="score only the first N held-out questions")
    fs.set_defaults(fn=cmd_finetune)

    fd = ftsub.add_parser("dpo", parents=[common], help="preference tuning (DPO) on prompt/chosen/rejected JSONL")
    fd.add_argument("--beta", type=float, help="DPO temperature (default 0.1)")
    fd.set_defaults(fn=cmd_finetune)

    f2 = ftsub.add_parser("seq2seq", parents=[common],
                          help="translation / summarization with an encoder-decoder (T5), or one from scratch")
    f2.add_argument("--source-col", help="source column (default: source, src, input, text, document, en)")
    f2.add_argument("--target-col", help="target column (default: target, tgt, output, summary, es)")
    f2.add_argument("--prefix", help="task prefix put before every source, e.g. 'translate English to Spanish: '")
    f2.add_argument("--val-fraction", type=float)
    f2.add_argument("--test-fraction", type=float)
    f2.add_argument("--max-target-len", type=int, help="target tokens kept (default: --max-len)")
    f2.add_argument("--num-beams", type=int, help="beam width of the test-split decoding (default 4)")
    f2.add_argument("--max-new-tokens", type=int, help="longest output when decoding (default: target limit)")
    f2.add_argument("--eval-limit", type=int, help="test pairs decoded for the final scores (default 500)")
    f2.add_argument("--time-budget", type=float, help="seconds of training: the epochs are sized to fit")
    f2.set_defaults(fn=cmd_finetune)

    da = sub.add_parser("data", help="build datasets from packaged text")
    dasub = da.add_subparsers(dest="dverb", required=True, metavar="SET")
    dq = dasub.add_parser("shakespeare-qa", help="an extractive QA set (SQuAD format) from the packaged plays")
    dq.add_argument("--out", required=True, help="folder for train.json, dev.json, test.json")
    dq.add_argument("--per-play", type=int, default=60, help="questions per play")
    dq.add_argument("--seed", type=int, default=0)
    dq.set_defaults(fn=cmd_data_shakespeare_qa)
    dc = dasub.add_parser("chatterbot", help="chat JSONL (or DPO pairs) from the packaged chatterbot-corpus")
    dc.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl, test.jsonl")
    dc.add_argument("--pairs", action="store_true", help="preference pairs (prompt, chosen, rejected) instead")
    dc.add_argument("--seed", type=int, default=0)
    dc.set_defaults(fn=cmd_data_chatterbot)

    pr = sub.add_parser("predict", help="classify texts with a fine-tuned classifier")
    pr.add_argument("input", nargs="?", help="a .txt file (one text per line), CSV/TSV/JSONL, or - for stdin")
    pr.add_argument("--model", action="append", required=True,
                    help="classifier model directory; repeat for an ensemble (same label names)")
    pr.add_argument("--vote", choices=["mean", "majority"], default="mean",
                    help="how an ensemble combines: average the probabilities, or majority vote")
    pr.add_argument("--text", action="append", help="a text to classify (repeatable; instead of a file)")
    pr.add_argument("--text-col", help="text column of a CSV/TSV/JSONL input")
    pr.add_argument("--label-col", help="score against this label column of the input")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--quantize", **ENCODER_QUANTIZE)
    pr.add_argument("--json", action="store_true", help="one JSON object per line with all class probabilities")
    pr.set_defaults(fn=cmd_predict)

    em = sub.add_parser("embed", help="sentence embeddings (mean-pooled, L2-normalised) from an encoder")
    em.add_argument("input", nargs="?", help="a .txt file (one text per line), CSV/TSV/JSONL, or - for stdin")
    em.add_argument("--model", required=True, help="encoder model directory or packaged name (all-minilm-l6-v2)")
    em.add_argument("--text", action="append", help="a text to embed (repeatable; instead of a file)")
    em.add_argument("--text-col", help="text column of a CSV/TSV/JSONL input")
    em.add_argument("--similarity", action="store_true", help="print the cosine-similarity matrix instead")
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--device", default="cpu")
    em.add_argument("--quantize", **ENCODER_QUANTIZE)
    em.set_defaults(fn=cmd_embed)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching and a playground")
    sv.add_argument("--model", action="append", required=True,
                    help="model directory, .gguf or packaged name; repeat to serve several (a decoder for "
                         "completions/chat, an encoder for embeddings)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set LMFORGE_API_KEY)")
    sv.add_argument("--max-batch", type=int, default=16, help="sequences decoded together per model")
    sv.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; more get 429 at once")
    sv.add_argument("--max-len", type=int, help="prompt + new tokens per sequence (default: the model's context)")
    sv.add_argument("--quantize", choices=["int8"], help="weight-only int8 Linear layers")
    sv.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (413 above)")
    sv.add_argument("--request-timeout", type=float, default=10.0,
                    help="seconds a client has to send a request's head, and again its body (408 after; default 10)")
    sv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(fn=cmd_serve)

    i = sub.add_parser("info", help="describe a model directory or preset: shape, parameters, FLOPs")
    i.add_argument("target", help="model directory or preset name")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
