"""`lmforge <verb>`: each verb parses its arguments and calls one library function.

A user error (an LmforgeError) prints one line, `lmforge: error: ...`, and exits with status 2. Each verb imports
what it needs inside its function: `lmforge --help` and a verb load only their own modules (torch alone: 1.5 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lmforge import __version__, torch_version
from lmforge.config import (
    DTYPES,
    INFERENCE_DTYPE_HELP,
    QUANTIZE,
    QUANTIZE_HELP,
    SamplingParams,
    ServeConfig,
    check_number,
)
from lmforge.data.clean import OFF_BY_DEFAULT, RULES, CleanConfig, clean_corpus, rules_off
from lmforge.errors import ConfigError, LmforgeError


def cmd_quickstart(a: argparse.Namespace) -> None:
    from lmforge.quickstart import quickstart

    quickstart(out=a.out, overrides=a.set + ([f"train.device={a.device}"] if a.device else []))


def cmd_tokenizer_train(a: argparse.Namespace) -> None:
    from lmforge.data.vocab import train_tokenizer

    tok = train_tokenizer(a.data, vocab_size=a.vocab_size, out=a.out, kind=a.kind, lowercase=False if a.cased else None)
    kind = {"bpe": "byte-level BPE", "wordpiece": "WordPiece", "unigram": "Unigram"}[a.kind]
    print(f"trained {kind}: {tok.vocab_size} tokens -> {a.out}")


def cmd_pretrain(a: argparse.Namespace) -> None:
    from lmforge.train.loop import pretrain_run

    summary = pretrain_run(
        a.config, a.set + ([f"train.device={a.device}"] if a.device else []), a.out, resume=a.resume
    ).summary()
    if summary:
        print(summary)


def cmd_generate(a: argparse.Namespace) -> None:
    from lmforge.generate import generate

    schema = None
    if a.json_schema:
        path = Path(a.json_schema)
        if not path.is_file():
            raise ConfigError(f"--json-schema {path}: no such file; give a JSON schema file")
        schema = path.read_text(encoding="utf-8")
    searching = a.num_beams != 1 or a.num_return_sequences != 1
    if not searching and (a.length_penalty is not None or a.early_stopping is not None):
        flag = "--length-penalty" if a.length_penalty is not None else "--early-stopping"
        raise ConfigError(
            f"{flag} steers beam search; without --num-beams N (N > 1) nothing uses it: drop it, or add --num-beams"
        )
    if a.stream and (a.no_stream or a.json or len(a.prompt) > 1 or searching):
        why = (
            "--no-stream"
            if a.no_stream
            else "--json"
            if a.json
            else "several --prompt"
            if len(a.prompt) > 1
            else "beam search (its best text is known only at the end)"
        )
        raise ConfigError(f"--stream shows one reply as it is written: it does not go with {why}")
    model, tok, draft = _load_for_decoding(a)
    prompts = [p.replace("\\n", "\n").replace("\\t", "\t") if a.escapes else p for p in a.prompt]
    stream = len(prompts) == 1 and not a.json and (a.stream or (not a.no_stream and sys.stdout.isatty()))

    def on_text(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    beams = (
        {}
        if not searching
        else dict(
            num_beams=a.num_beams,
            length_penalty=1.0 if a.length_penalty is None else a.length_penalty,
            early_stopping=False if a.early_stopping is None else a.early_stopping,
            num_return_sequences=a.num_return_sequences,
        )
    )
    stream = stream and not beams  # (beam search has its best text only at the end)
    if stream:
        sys.stdout.write(prompts[0])
    texts = generate(
        model,
        tok,
        prompts,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        repetition_penalty=a.repetition_penalty,
        stop=a.stop,
        seed=a.seed,
        on_text=on_text if stream else None,
        compile=a.compile,
        draft=draft,
        json_schema=schema,
        regex=a.regex,
        **beams,
    )
    if stream:
        sys.stdout.write("\n")
    elif a.json:
        print(json.dumps([{"prompt": p, "text": t} for p, t in zip(prompts, texts)], ensure_ascii=False))
    else:
        for i, (p, t) in enumerate(zip(prompts, texts)):
            for j, one in enumerate(t if isinstance(t, list) else [t]):
                head = [f"prompt {i}"] * (len(prompts) > 1) + [f"sequence {j}"] * isinstance(t, list)
                print((f"--- {', '.join(head)} ---\n" if head else "") + p + one)


def _load_for_decoding(a: argparse.Namespace):
    """generate / chat: the verb's defaults for the sampling flags not given (temperature: only when sampling),
    refuse out-of-range or inapplicable ones before the model loads (generate checks them too), note given ones
    that greedy decoding does not use; then load the model."""
    from lmforge.generate.speculative import make_drafter
    from lmforge.interop import load_pretrained
    from lmforge.runtime import tune_allocator

    beams = getattr(a, "num_beams", 1) != 1 or getattr(a, "num_return_sequences", 1) != 1
    given = [name for name in a.sampling_defaults if getattr(a, name) is not None]
    for name, default in a.sampling_defaults.items():
        if getattr(a, name) is None and not (beams and name == "temperature"):
            setattr(a, name, default)
    if beams:
        from lmforge.generate.beam import BeamParams

        check_number("--num-beams", a.num_beams, 1, integer=True)
        BeamParams(
            a.num_beams,
            1.0 if a.length_penalty is None else a.length_penalty,
            False if a.early_stopping is None else a.early_stopping,
            a.num_return_sequences,
        ).validate()
    SamplingParams(
        a.max_new_tokens,
        a.temperature if a.temperature is not None else 0.0,
        a.top_k,
        a.top_p,
        getattr(a, "repetition_penalty", 1.0),
        a.seed,
    ).validate(flags=True)
    unused = [f"--{n.replace('_', '-')}" for n in given if n in ("top_k", "top_p", "seed")]
    if a.temperature == 0 and unused:
        print(
            f"lmforge: note: {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect at "
            "--temperature 0 (greedy decoding picks the most likely token)",
            file=sys.stderr,
        )
    tune_allocator()
    model, tok = load_pretrained(a.model, device=a.device, quantize=a.quantize, adapter=a.adapter, dtype=a.dtype)
    return model, tok, make_drafter(a.speculative, model, device=a.device, quantize=a.quantize, dtype=a.dtype)


def cmd_convert(a: argparse.Namespace) -> None:
    from lmforge.interop.convert import convert

    out = convert(a.source, a.out)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer.json, generation_config.json)")


def cmd_export(a: argparse.Namespace) -> None:
    from lmforge.interop.convert import export

    out = export(a.model, a.out, type=a.type, adapter=a.adapter)
    print(f"wrote {out} ({a.type}, {out.stat().st_size / 2**20:.1f} MiB): runs in llama.cpp, Ollama and LM Studio")


def cmd_chat(a: argparse.Namespace) -> None:
    from lmforge.generate.chat import chat, chat_session

    model, tok, draft = _load_for_decoding(a)
    kw = dict(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
        compile=a.compile,
        draft=draft,
    )
    if a.prompt is not None:  # one shot, for scripts
        system = [{"role": "system", "content": a.system}] if a.system else []
        print(chat(model, tok, system + [{"role": "user", "content": a.prompt}], **kw))
        return
    chat_session(model, tok, system=a.system, **kw)


def cmd_eval(a: argparse.Namespace) -> None:
    from lmforge.eval.run import describe, evaluate

    task = a.everb
    kw = {
        k: getattr(a, k)
        for k in (
            "limit",
            "text_col",
            "label_col",
            "source_col",
            "target_col",
            "chat",
            "prompt",
            "max_new_tokens",
            "num_beams",
            "window",
            "stride",
            "device",
        )
        if hasattr(a, k)
    }
    m = evaluate(task, a.model, a.data, a.out, quantize=a.quantize, adapter=a.adapter, dtype=a.dtype, **kw)
    if a.json and task == "perplexity":  # (ppl and bpb: the names this output had before it went through evaluate)
        m = {**m, "ppl": m["perplexity"], "bpb": m["bits_per_byte"]}
    print(json.dumps(m) if a.json else describe(task, m) + (f"\nreport: {a.out}/report.html" if a.out else ""))


def cmd_explain(a: argparse.Namespace) -> None:
    from lmforge.explain import describe, explain

    text = a.text if a.text is not None else sys.stdin.read().strip()
    print(
        describe(
            explain(
                a.model,
                text,
                a.out,
                what=a.what,
                method=a.method,
                steps=a.steps,
                target=a.target,
                layer=a.layer,
                baseline=a.baseline,
                max_steps=a.max_steps,
                device=a.device,
            )
        )
    )


def cmd_quantize(a: argparse.Namespace) -> None:
    from lmforge.compress.pipeline import quantize

    quantize(
        a.model,
        a.mode,
        a.out,
        group_size=a.group_size,
        eval_data=a.eval_data,
        text_col=a.text_col,
        label_col=a.label_col,
        device=a.device,
    )


def cmd_prune(a: argparse.Namespace) -> None:
    from lmforge.compress.pipeline import prune

    prune(
        a.model,
        a.out,
        sparsity=a.sparsity,
        structure=a.structured,
        fraction=a.fraction,
        recover_steps=a.recover_steps,
        recover_data=a.recover_data,
        eval_data=a.eval_data,
        text_col=a.text_col,
        label_col=a.label_col,
        device=a.device,
    )


def cmd_merge(a: argparse.Namespace) -> None:
    from lmforge.compress.merge import merge

    weights = None
    if a.weights is not None:
        try:
            weights = [float(w) for w in a.weights.split(",")]
        except ValueError:
            raise ConfigError(f"--weights takes numbers separated by commas, got {a.weights!r}") from None
    merge(
        a.models,
        a.out,
        method=a.method,
        base=a.base,
        weights=weights,
        scale=a.scale,
        density=a.density,
        val_data=a.val_data,
        eval_data=a.eval_data,
        text_col=a.text_col,
        label_col=a.label_col,
        device=a.device,
    )


def cmd_distill(a: argparse.Namespace) -> None:
    from lmforge.compress.distill import distill

    if not a.resume and not a.data:
        raise ConfigError("distill needs --data (a labelled file for a classifier teacher, text for a causal LM)")
    result = distill(
        a.teacher,
        a.data,
        a.out,
        student=a.student,
        keep_layers=a.student_layers,
        alpha=a.alpha,
        temperature=a.temperature,
        top_k=a.top_k,
        sets=a.set,
        device=a.device,
        resume=a.resume,
    )
    if result is not None:
        print(result.summary())


def cmd_info(a: argparse.Namespace) -> None:
    from lmforge.info import format_info, model_info

    info = model_info(a.target)
    print(json.dumps(info, indent=2) if a.json else format_info(info))


def add_settings(group, rows, given_only: bool = True) -> None:
    """One flag per declared setting (`lmforge.config.setting`: help, choices, default), so a setting is written
    once: --name-with-dashes; a flag on (off) for a setting that defaults to false (true). given_only: a flag not
    given is None (for settings layered over a recipe), else its default."""
    for name, default, f in rows:
        flag = "--" + name.replace("_", "-")
        hint = f.metadata.get("help", "").replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(
                f"--no-{flag[2:]}" if default else flag,
                dest=name,
                default=None,
                action="store_false" if default else "store_true",
                help=f"turn off (on by default): {hint}" if default else hint,
            )
            continue
        kind = next((t for t in (int, float) if t.__name__ in str(f.type).split(" | ")), str)
        shown = f" (default {default})" if default not in (None, "") and name != "lr" else ""
        group.add_argument(
            flag,
            dest=name,
            type=kind,
            choices=f.metadata.get("choices"),
            help=hint + shown,
            default=None if given_only else default,
        )


def cmd_finetune(a: argparse.Namespace) -> None:
    from lmforge.tune.recipe import finetune, settings

    task = a.ftverb
    flags = {name: getattr(a, name) for name, _, _ in settings(task)}
    result = finetune(task, a.config, flags, a.set, resume=a.resume)
    if result is not None:  # (None: a torchrun process other than 0)
        print(result.summary())


def clean_config(a: argparse.Namespace) -> CleanConfig:
    """The CleanConfig of `lmforge data clean`'s flags (a flag not given keeps its default)."""
    given = {
        f.name: getattr(a, f.name) for f in dataclasses.fields(CleanConfig) if getattr(a, f.name, None) is not None
    }
    return CleanConfig(**{**given, "skip": rules_off(a.skip, a.enable)})


def cmd_data(a: argparse.Namespace) -> None:
    from lmforge.data.chat import write_chatterbot
    from lmforge.data.qa import write_shakespeare_qa

    if a.dverb == "clean":
        report = clean_corpus(a.sources, a.out, clean_config(a), progress=None)
        print(report.summary())
        print(f"wrote {a.out}/ ({report.kept} documents) and {a.out}/clean_report.html, clean_report.json")
        return
    if a.dverb == "chatterbot":
        counts, files = write_chatterbot(a.out, pairs=a.pairs, seed=a.seed), "train.jsonl, val.jsonl, test.jsonl"
        kind = "preference pairs" if a.pairs else "conversations"
    elif a.dverb == "bible-genres":
        from lmforge.data.sword import write_genre_documents

        counts, kind = write_genre_documents(a.out, per_genre=a.per_genre, seed=a.seed), "passages"
        files = "train.csv, test.csv"
    else:
        counts, kind = write_shakespeare_qa(a.out, n_per_play=a.per_play, seed=a.seed), "questions"
        files = "train.json, dev.json, test.json"
    print(f"wrote {a.out}/{files} (" + ", ".join(f"{k} {n}" for k, n in counts.items()) + f" {kind})")


def cmd_predict(a: argparse.Namespace) -> None:
    from lmforge.eval.classify import predict_file

    texts, preds, m = predict_file(
        a.model,
        a.input,
        a.text,
        a.text_col,
        a.label_col,
        vote=a.vote,
        batch_size=a.batch_size,
        device=a.device,
        quantize=a.quantize,
        dtype=a.dtype,
    )
    for text, p in zip(texts, preds):
        print(
            json.dumps({"text": text, **p}, ensure_ascii=False) if a.json else f"{p['label']}\t{p['score']:.3f}\t{text}"
        )
    if m:
        print(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ({m['n']} rows)", file=sys.stderr)


def cmd_embed(a: argparse.Namespace) -> None:
    from lmforge.predict import cosine_similarity, embed_file

    texts, vecs = embed_file(
        a.model,
        a.input,
        a.text,
        a.text_col,
        batch_size=a.batch_size,
        device=a.device,
        quantize=a.quantize,
        dtype=a.dtype,
    )
    sim = cosine_similarity(vecs, vecs) if a.similarity else None
    for i, (t, v) in enumerate(zip(texts, vecs.tolist())):
        print(
            "  ".join(f"{x:6.3f}" for x in sim[i].tolist()) + f"  {t[:60]}"
            if sim is not None
            else json.dumps({"text": t, "embedding": [round(x, 6) for x in v]}, ensure_ascii=False)
        )


def cmd_serve(a: argparse.Namespace) -> None:
    from lmforge.serve import serve

    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(ServeConfig) if getattr(a, f.name) is not None}
    key = a.api_key or os.environ.get("LMFORGE_API_KEY")
    serve(a.model, **{**kw, **({"api_key": key} if key else {})})


MODEL_HELP = "model directory, .gguf file or packaged model name"
SAMPLE_TEMPERATURE = 0.8  # generate's default temperature when it samples


def _early_stopping(value: str) -> bool | str:
    v = value.lower()
    if v not in ("true", "false", "never"):
        raise argparse.ArgumentTypeError(f"{value!r}: choose false, true or never")
    return {"true": True, "false": False}.get(v, v)


# decoding verbs take a file's own 4-bit weights on the int4 kernel by default (lossless, the fast path); eval and
# the encoders measure / run the model as it is unless asked
DECODE_QUANTIZE = dict(choices=QUANTIZE, default="auto", help=QUANTIZE_HELP + " (default: auto)")
ENCODER_QUANTIZE = dict(
    choices=["int8", "int8-dynamic"],
    help="int8 Linear weights at load time: weight-only, or "
    "int8-dynamic (int8 activations too: the fast one for batched encoders on CPU)",
)


DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: cpu)"


def model_flags(
    p: argparse.ArgumentParser, device: bool = True, adapter: bool = True, quantize: dict | None = None
) -> None:
    """--model (required), and the loading flags most verbs share: --device, --dtype, --quantize, --adapter."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    if device:
        p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    dtype_flag(p)
    p.add_argument("--quantize", **(quantize or dict(choices=QUANTIZE, default="none", help=QUANTIZE_HELP)))
    if adapter:
        p.add_argument("--adapter", help="a LoRA adapter directory (PEFT layout) to merge into the model")


def dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=DTYPES, help=INFERENCE_DTYPE_HELP)


def sampling_flags(p: argparse.ArgumentParser, repetition_penalty: bool = True, **defaults) -> None:
    """generate / chat: one flag per field of SamplingParams (its help and type), with the verb's own defaults
    (a chat reply is sampled more tightly), and --compile."""
    fields = [f for f in dataclasses.fields(SamplingParams) if repetition_penalty or f.name != "repetition_penalty"]
    add_settings(p, [(f.name, defaults.get(f.name, f.default), f) for f in fields])
    # (a flag not given is None; _load_for_decoding applies these, so it can tell a given flag from a default)
    p.set_defaults(sampling_defaults={f.name: defaults.get(f.name, f.default) for f in fields})
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile (tens of seconds to compile once, then faster steps)",
    )
    p.add_argument(
        "--speculative",
        metavar="ngram|MODEL",
        help="speculative decoding of one prompt: ngram (prompt lookup, no second model) or a smaller "
        "draft model with the same tokenizer (directory, .gguf or packaged name)",
    )


def build_parser() -> argparse.ArgumentParser:
    from lmforge.config import run_settings_text
    from lmforge.tune.recipe import TASK_HELP, TASKS, settings  # (light: tasks load only when they run)

    p = argparse.ArgumentParser(prog="lmforge", description="Train, adapt, inspect and serve language models.")
    p.add_argument("--version", action="version", version=f"lmforge {__version__} (torch {torch_version()})")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    q = sub.add_parser(
        "quickstart",
        help="train a small GPT on packaged Shakespeare, evaluate, sample",
        epilog=run_settings_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--out", help="run directory (default: runs/quickstart-DATE-TIME)")
    q.add_argument("--device", help="train.device: auto (default), cpu, cuda, cuda:N or mps")
    q.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. --set train.steps=200"
    )
    q.set_defaults(fn=cmd_quickstart)

    t = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = t.add_subparsers(dest="tverb", required=True, metavar="ACTION")
    tt = tsub.add_parser("train", help="train a byte-level BPE (decoders) or WordPiece (encoders) tokenizer")
    tt.add_argument("--data", nargs="+", required=True, help="corpus names, files, folders or globs")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument(
        "--kind",
        choices=("bpe", "wordpiece", "unigram"),
        default="bpe",
        help="byte-level BPE (decoders), WordPiece (encoders), Unigram with T5 sentinels (seq2seq)",
    )
    tt.add_argument("--cased", action="store_true", help="WordPiece: keep case (default lower-cases)")
    tt.add_argument("--out", required=True, help="tokenizer.json path or a folder")
    tt.set_defaults(fn=cmd_tokenizer_train)

    pt = sub.add_parser(
        "pretrain",
        help="pre-train a model from a YAML recipe (works under torchrun)",
        epilog=run_settings_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pt.add_argument("--config", help="YAML recipe (see configs/)")
    pt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4")
    pt.add_argument("--out", help="run directory (default: runs/pretrain-DATE-TIME)")
    pt.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    pt.add_argument(
        "--device",
        help="train.device: auto (the recipe's default), cpu, cuda, cuda:N or mps (under "
        "torchrun each process takes its own GPU)",
    )
    pt.set_defaults(fn=cmd_pretrain)

    g = sub.add_parser("generate", help="continue prompts with a model")
    model_flags(g, quantize=DECODE_QUANTIZE)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    sampling_flags(g, max_new_tokens=128, temperature=SAMPLE_TEMPERATURE)  # (temperature: unless beam search runs)
    g.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam search with this many beams (default 1: sample, "
        "or greedy at --temperature 0); the sampling flags do not apply to it",
    )
    g.add_argument(
        "--length-penalty",
        type=float,
        help="beam search: hypotheses are scored by their "
        "log-probability / length ** this (> 0 favours longer ones; default 1.0)",
    )
    g.add_argument(
        "--early-stopping",
        type=_early_stopping,
        metavar="false|true|never",
        help="beam search: stop when no beam can improve (false, the default), as soon as --num-beams "
        "hypotheses finished (true), or only at the length limit (never)",
    )
    g.add_argument(
        "--num-return-sequences",
        type=int,
        default=1,
        help="beam search: print this many of the best hypotheses per prompt (default 1)",
    )
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--escapes", action="store_true", help=r"interpret \n and \t in prompts")
    g.add_argument("--stream", action="store_true", help="stream even when stdout is not a terminal")
    g.add_argument("--no-stream", action="store_true", help="print only when done")
    g.add_argument("--json", action="store_true", help="print results as JSON")
    g.add_argument(
        "--json-schema", metavar="FILE", help="every reply is JSON that follows this JSON schema (constrained decoding)"
    )
    g.add_argument("--regex", help="every reply matches this regular expression (constrained decoding)")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("convert", help="convert a .gguf file (or a model directory) into an HF-layout directory")
    c.add_argument("source", help=".gguf file, model directory or packaged model name")
    c.add_argument("out", help="output directory")
    c.set_defaults(fn=cmd_convert)

    ex = sub.add_parser("export", help="write a decoder as one GGUF file (llama.cpp, Ollama, LM Studio)")
    ex.add_argument("model", help="model directory, .gguf file, packaged name or ORG/NAME in the local HF cache")
    ex.add_argument("out", help="output .gguf file")
    ex.add_argument(
        "--type",
        default="f16",
        choices=("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"),
        help="weight type (default f16; q4_k_m: llama.cpp's Q4_K / Q6_K mix)",
    )
    ex.add_argument("--adapter", help="a LoRA adapter directory to merge into the weights first")
    ex.set_defaults(fn=cmd_export)

    ch = sub.add_parser("chat", help="chat with a model through its chat template (streams)")
    model_flags(ch, quantize=DECODE_QUANTIZE)
    ch.add_argument("--system", help="system prompt")
    ch.add_argument("--prompt", help="one message, answer printed, then exit (for scripts)")
    sampling_flags(ch, repetition_penalty=False, max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.9)
    ch.set_defaults(fn=cmd_chat)

    ev = sub.add_parser("eval", help="evaluate a model")
    evsub = ev.add_subparsers(dest="everb", required=True, metavar="WHAT")
    pp = evsub.add_parser("perplexity", help="perplexity and bits per byte on text, with strided windows")
    model_flags(pp)
    pp.add_argument("--data", nargs="+", required=True, help="corpus names, files, folders or globs")
    pp.add_argument("--window", type=int, default=None, help="tokens per window (default: context, at most 1024)")
    pp.add_argument("--stride", type=int, default=None, help="tokens between windows (default: window / 2)")
    pp.add_argument("--out", help="write results.json, windows.jsonl (loss per window) and report.md/.html here")
    pp.add_argument("--json", action="store_true", help="print the metrics as JSON")
    pp.set_defaults(fn=cmd_eval)

    evc = argparse.ArgumentParser(add_help=False)
    model_flags(evc)
    evc.add_argument("--out", help="write results.json, predictions.jsonl and report.md/.html here")
    evc.add_argument("--limit", type=int, help="evaluate the first N examples only")
    evc.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ec = evsub.add_parser("classify", parents=[evc], help="accuracy, macro-F1, confusion matrix of a classifier")
    ec.add_argument("--data", required=True, help="labelled CSV/TSV/JSONL")
    ec.add_argument("--text-col"), ec.add_argument("--label-col")
    eq = evsub.add_parser("qa", parents=[evc], help="exact match and F1 of an extractive QA model")
    eq.add_argument("--data", required=True, help="SQuAD-format JSON/JSONL, or shakespeare-qa (its test split)")
    emc = evsub.add_parser("choice", parents=[evc], help="zero-shot multiple choice by log-likelihood")
    emc.add_argument("--data", required=True, help="JSONL rows {question, choices, answer}, or chatterbot-mc")
    emc.add_argument("--chat", action="store_true", help="ask through the model's chat template")
    emc.add_argument(
        "--prompt",
        help="template around each question, with {question} (default 'Question: "
        "{question}\\nAnswer:'; with --chat: the user turn's text, by default the question alone)",
    )
    es = evsub.add_parser("seq2seq", parents=[evc], help="BLEU, chrF and ROUGE of generations against references")
    es.add_argument(
        "--data",
        required=True,
        help="JSONL/CSV/TSV with source and target columns, or bible-en-es (its held-out test books)",
    )
    es.add_argument("--source-col"), es.add_argument("--target-col")
    es.add_argument("--prompt", help="template around each source, with {source} (e.g. 'Translate: {source}\\n')")
    es.add_argument("--chat", action="store_true", help="send each prompt through the model's chat template")
    es.add_argument("--max-new-tokens", type=int, default=64)
    es.add_argument(
        "--num-beams",
        type=int,
        default=None,
        help="beam search with this many beams (default: 4 for an encoder-decoder, 1 = greedy for a decoder)",
    )
    eb = evsub.add_parser(
        "bias",
        parents=[evc],
        help="counterfactual sentence pairs (only a group term differs): preferences or prediction flips by group",
    )
    eb.add_argument(
        "--data",
        default="templates",
        help="pairs: CSV/TSV/JSONL with sent_more and sent_less (CrowS-Pairs) or sentence_a and sentence_b, and "
        "an optional bias_type or category column; default: lmforge's template set (gender, age, nationality, "
        "religion)",
    )
    for p_ in (ec, eq, emc, es, eb):
        p_.set_defaults(fn=cmd_eval)

    ex = sub.add_parser(
        "explain",
        help="attention maps and token saliency (PNG + HTML) for a model and a text "
        "(encoder-decoders: encoder, decoder and cross-attention maps)",
    )
    ex.add_argument("--model", required=True, help=MODEL_HELP)
    ex.add_argument("--text", help="the text to explain (default: read standard input)")
    ex.add_argument(
        "--out",
        required=True,
        help="folder for attention.png/.html, saliency.png/.html, explain.json "
        "(encoder-decoders: attention_encoder/_decoder/_cross.png/.html)",
    )
    ex.add_argument(
        "--what",
        default="both",
        choices=["both", "attention", "saliency", "lens"],
        help="attention maps, saliency, both, or lens: a decoder's logit lens (--target: a token to follow)",
    )
    ex.add_argument("--device", default="cpu", help=DEVICE_HELP)
    ex.add_argument("--method", help="saliency: ig (integrated gradients, the default) or grad_x_input")
    ex.add_argument("--steps", type=int, help="integrated gradients: steps along the path (default 50)")
    ex.add_argument(
        "--max-steps",
        type=int,
        help="integrated gradients: refine up to this many steps where completeness fails (default 16 x steps)",
    )
    ex.add_argument("--baseline", help="integrated gradients: pad (the default), mask or zero embeddings")
    ex.add_argument(
        "--target",
        help="a class name or index (classifiers), a token or id:N (decoders); "
        "default: the model's prediction. Encoder-decoders (T5): the target text whose attention is "
        "drawn (--text is the source); default: the model's greedy output",
    )
    ex.add_argument("--layer", type=int, help="draw one layer's heads instead of the grid (negative: from the end)")
    ex.set_defaults(fn=cmd_explain)

    qz = sub.add_parser("quantize", help="quantize a model (int8, int4, int8-dynamic); prints size, speed, quality")
    qz.add_argument("--model", required=True, help=MODEL_HELP)
    qz.add_argument("--mode", required=True, help="int8 (weight-only), int4 (weight-only, group-wise), int8-dynamic")
    qz.add_argument("--group-size", type=int, help="int4: weights per scale / zero point (default 64)")
    qz.add_argument("--device", default="cpu", help="cpu: the int8 / int4 kernels lmforge quantizes for are CPU ones")
    qz.add_argument("--out", required=True, help="the quantized model directory to write")
    qz.add_argument("--eval-data", nargs="+", help="text (decoders: perplexity) or a labelled file (classifiers)")
    qz.add_argument("--text-col"), qz.add_argument("--label-col")
    qz.set_defaults(fn=cmd_quantize)

    pn = sub.add_parser("prune", help="magnitude or structured pruning, optional recovery; prints before/after")
    pn.add_argument("--model", required=True, help=MODEL_HELP)
    pn.add_argument("--sparsity", type=float, help="unstructured: the share of block weights set to zero, (0, 1)")
    pn.add_argument("--structured", choices=["heads", "neurons"], help="remove attention heads or MLP neurons")
    pn.add_argument("--fraction", type=float, help="structured: the share of heads / neurons removed, (0, 1)")
    pn.add_argument("--device", default="cpu", help=DEVICE_HELP + "; pruning, recovery and the measurements run there")
    pn.add_argument("--recover-steps", type=int, default=0, help="fine-tune this many steps after pruning")
    pn.add_argument("--recover-data", help="text (decoders) or a labelled file (classifiers) for recovery")
    pn.add_argument("--out", required=True, help="the pruned model directory to write")
    pn.add_argument("--eval-data", nargs="+", help="text (decoders: perplexity) or a labelled file (classifiers)")
    pn.add_argument("--text-col"), pn.add_argument("--label-col")
    pn.set_defaults(fn=cmd_prune)

    mg = sub.add_parser(
        "merge", help="merge models fine-tuned from one base (soups, task arithmetic, TIES); prints before/after"
    )
    mg.add_argument("models", nargs="+", help="model directories, or LoRA adapters of one base (PEFT layout)")
    mg.add_argument("--out", required=True, help="the merged model directory to write")
    mg.add_argument(
        "--method",
        choices=["uniform", "greedy", "task-arithmetic", "ties"],
        default="uniform",
        help="uniform: the mean of the weights; greedy: parents added best first while validation does not fall; "
        "task-arithmetic: base + scale x the sum of (parent - base); ties: trimmed, sign-elected task vectors "
        "(default uniform)",
    )
    mg.add_argument("--base", help="the model the parents were tuned from (task-arithmetic, ties; adapters' base)")
    mg.add_argument("--weights", help="one weight per model, comma-separated (uniform: normalised; default 1 each)")
    mg.add_argument("--scale", type=float, default=1.0, help="task-arithmetic and ties: the task vectors' scale")
    mg.add_argument("--density", type=float, default=0.2, help="ties: the share of each task vector kept")
    mg.add_argument(
        "--val-data", help="greedy: what picks the parents (a classifier's labelled file, a decoder's text)"
    )
    mg.add_argument("--eval-data", nargs="+", help="text (decoders: perplexity) or a labelled file (classifiers)")
    mg.add_argument("--text-col"), mg.add_argument("--label-col")
    mg.add_argument("--device", default="cpu", help=DEVICE_HELP + "; the models are loaded, merged and measured there")
    mg.set_defaults(fn=cmd_merge)

    di = sub.add_parser(
        "distill",
        help="train a smaller student on a teacher's softened outputs (a classifier's or a causal LM's)",
        description="A classifier teacher: finetune classify with --teacher on a labelled file; a causal-LM "
        "teacher: pre-training on text in its tokenizer, its top-k next tokens stored once. Settings of those runs "
        "go through --set (classifier: epochs=5, lr=1e-4, ...; causal LM: train.steps=300, model.n_layer=4, ...).",
    )
    di.add_argument("--teacher", required=True, help="a fine-tuned classifier, or a causal LM (directory, .gguf, name)")
    di.add_argument(
        "--data",
        nargs="+",
        help="classifier: one labelled CSV / TSV / JSONL file; causal LM: text files, folders, corpora",
    )
    di.add_argument("--out", required=True, help="the run folder")
    di.add_argument(
        "--student",
        help="classifier: an encoder to train (default: the teacher, with --student-layers); causal LM: a decoder "
        "preset (default quickstart)",
    )
    di.add_argument(
        "--student-layers", type=int, help="classifier: keep N of the (student's or teacher's) blocks, evenly spaced"
    )
    di.add_argument("--alpha", type=float, help="the soft term's share of the loss (default 0.5; 1: no labels)")
    di.add_argument("--temperature", type=float, help="softening temperature (default: classifier 2, causal LM 1)")
    di.add_argument("--top-k", type=int, help="causal LM: the teacher's next tokens stored per position (default 32)")
    di.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of the run")
    di.add_argument("--device", help=DEVICE_HELP)
    di.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    di.set_defaults(fn=cmd_distill)

    ft = sub.add_parser("finetune", help="fine-tune a pretrained model on a task")
    ftsub = ft.add_subparsers(dest="ftverb", required=True, metavar="TASK")
    for task in TASKS:
        fp = ftsub.add_parser(task, help=TASK_HELP[task])
        fp.add_argument("--config", help="YAML recipe (see configs/*-lora.yaml): flat keys, any setting below")
        fp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. lora_r=16")
        fp.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --out from its last checkpoint (its saved settings; flags override)",
        )
        add_settings(fp.add_argument_group("settings (flags override the --config recipe)"), settings(task))
        fp.set_defaults(fn=cmd_finetune)

    da = sub.add_parser("data", help="build datasets from packaged text")
    dasub = da.add_subparsers(dest="dverb", required=True, metavar="SET")
    dq = dasub.add_parser("shakespeare-qa", help="an extractive QA set (SQuAD format) from the packaged plays")
    dq.add_argument("--per-play", type=int, default=60, help="questions per play")
    dc = dasub.add_parser("chatterbot", help="chat JSONL (or DPO pairs) from the packaged chatterbot-corpus")
    dc.add_argument("--pairs", action="store_true", help="preference pairs (prompt, chosen, rejected) instead")
    dg = dasub.add_parser(
        "bible-genres",
        help="long passages (300-1,000 words) of the KJV labelled by genre, "
        "split by book: a long-document classification set",
    )
    dg.add_argument("--per-genre", type=int, default=200, help="passages of each genre per split at most")
    dl = dasub.add_parser(
        "clean",
        help="clean a corpus for pre-training: quality rules, exact and near-duplicate removal, with a report",
    )
    dl.add_argument("sources", nargs="+", help="corpus names (shakespeare), files, folders or globs")
    dl.add_argument("--out", required=True, help="folder for the kept documents and the report")
    dl.add_argument("--skip", help="rules to turn off, comma-separated: " + ", ".join(RULES))
    dl.add_argument("--enable", help="rules off by default to turn on: " + ", ".join(OFF_BY_DEFAULT))
    add_settings(
        dl,
        [
            (f.name, f.default, f)
            for f in dataclasses.fields(CleanConfig)
            if f.metadata.get("help") and f.name != "skip"
        ],
    )
    dl.set_defaults(fn=cmd_data)
    for d in (dq, dc, dg):
        d.add_argument("--out", required=True, help="folder for the train, validation and test files")
        d.add_argument("--seed", type=int, default=0)
        d.set_defaults(fn=cmd_data)

    pr = sub.add_parser("predict", help="classify texts with a fine-tuned classifier")
    pr.add_argument("input", nargs="?", help="a .txt file (one text per line), CSV/TSV/JSONL, or - for stdin")
    pr.add_argument(
        "--model",
        action="append",
        required=True,
        help="classifier model directory; repeat for an ensemble (same label names)",
    )
    pr.add_argument(
        "--vote",
        choices=["mean", "majority"],
        help="how an ensemble combines: average the probabilities (mean, the default), or majority vote",
    )
    pr.add_argument("--text", action="append", help="a text to classify (repeatable; instead of a file)")
    pr.add_argument("--text-col", help="text column of a CSV/TSV/JSONL input")
    pr.add_argument("--label-col", help="score against this label column of the input")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--device", default="cpu")
    dtype_flag(pr)
    pr.add_argument("--quantize", **ENCODER_QUANTIZE)
    pr.add_argument("--json", action="store_true", help="one JSON object per line with all class probabilities")
    pr.set_defaults(fn=cmd_predict)

    em = sub.add_parser("embed", help="sentence embeddings (mean-pooled, L2-normalised) from an encoder")
    em.add_argument("input", nargs="?", help="a .txt file (one text per line), CSV/TSV/JSONL, or - for stdin")
    model_flags(em, adapter=False, quantize=ENCODER_QUANTIZE)
    em.add_argument("--text", action="append", help="a text to embed (repeatable; instead of a file)")
    em.add_argument("--text-col", help="text column of a CSV/TSV/JSONL input")
    em.add_argument("--similarity", action="store_true", help="print the cosine-similarity matrix instead")
    em.add_argument("--batch-size", type=int, default=64)
    em.set_defaults(fn=cmd_embed)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching and a playground")
    sv.add_argument(
        "--model",
        action="append",
        required=True,
        help="model directory, .gguf or packaged name; repeat to serve several (a decoder for "
        "completions/chat, an encoder for embeddings)",
    )
    add_settings(sv, [(f.name, f.default, f) for f in dataclasses.fields(ServeConfig)])  # (serve tells given ones)
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
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
