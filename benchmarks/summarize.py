"""Summarization on real text: lead generation on the King James Bible, against the lead baseline, in one run.

task       `bible-lead` (lmforge.data.pairs.bible_lead): the source is a chapter after its first verse (about
           120 words), the target is the first verse, the chapter's opening. 1,188 chapters; the test and
           validation books (lmforge.data.sword.DEFAULT_TEST_BOOKS / DEFAULT_VAL_BOOKS) are held out whole
baselines  lead: the source's first sentence (up to the first . ; : ? or !), as news summarization's lead-3
           untrained: the model before fine-tuning
systems    scratch:   t5-tiny-sized model fine-tuned from random weights
           pretrained: the same shape, first pre-trained with span corruption (15% noise, mean span 3) on the
                       KJV text of the training books only, then fine-tuned: T5's recipe
scores     ROUGE-1/2/L (rouge-score, stemmed) on the held-out chapters, beam search (4 beams), and again with
           no repeated trigram (no_repeat_ngram_size 3, the summarization convention)

python benchmarks/summarize.py            # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from lmforge.config import (
    FinetuneConfig,  # noqa: E402
    load_run_config,  # noqa: E402
)
from lmforge.data import sword  # noqa: E402
from lmforge.eval.generation import seq2seq_scores  # noqa: E402
from lmforge.train.loop import pretrain  # noqa: E402
from lmforge.tune.seq2seq import finetune_seq2seq, load_splits  # noqa: E402

SHAPE = dict(
    n_layer=3,
    n_head=4,
    d_model=256,
    d_ff=768,
    mlp="relu",
    rel_buckets=32,
    rel_max_distance=128,
    dropout=0.1,
    max_seq_len=256,
)


def lead(text: str) -> str:
    m = re.search(r"[.;:?!]", text)
    return text[: m.end()] if m else text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--epochs", type=float, default=6.0)
    ap.add_argument("--out", default="runs/bench-summarize")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    sp = load_splits("bible-lead", None, None, None, None, 0.05, 0.05, 0)
    srcs, refs = sp.test.sources, sp.test.targets
    print(f"bible-lead: {len(sp.train)} train / {len(sp.val)} val / {len(sp.test)} test chapters ({sp.how})")
    rows = [("lead (first sentence)", seq2seq_scores([lead(s) for s in srcs], refs), 0.0)]

    # span-corruption pre-training on the training books' text (no held-out book is read)
    held = set(sword.DEFAULT_TEST_BOOKS) | set(sword.DEFAULT_VAL_BOOKS)
    corpus = out / "kjv-train-books"
    corpus.mkdir()
    books: dict[str, list[str]] = {}
    for v in sword.read_module(sword.KJV):
        if v.book not in held:
            books.setdefault(v.book, []).append(v.text)
    for b, verses in books.items():
        (corpus / f"{b}.txt").write_text("\n".join(verses) + "\n", encoding="utf-8")
    cfg = load_run_config(
        base={
            "model": {"preset": "t5-tiny", **SHAPE, "vocab_size": 8000},
            "data": {"sources": [str(corpus)], "val_fraction": 0.05},
            "train": {
                "objective": "span",
                "steps": a.pretrain_steps,
                "batch_size": 32,
                "seq_len": 128,
                "lr": 1e-2,
                "optimizer": "adafactor",
                "min_lr": 1e-3,
                "warmup_steps": 40,
                "eval_every": 200,
                "eval_batches": 8,
                "ckpt_every": 0,
                "seed": 0,
                "weight_decay": 0.0,
            },
        }
    )
    t0 = time.time()
    pre = pretrain(cfg, out / "pretrain", progress=sys.stderr.isatty())
    pre_s = time.time() - t0
    print(
        f"pre-training: {a.pretrain_steps} steps in {pre_s / 60:.1f} min, span loss {pre.final['loss']:.3f}, "
        f"span accuracy {pre.final['span_acc']:.3f}"
    )

    # the untrained baseline and the from-scratch start: the pre-trained shape and vocabulary, random weights
    import torch

    from lmforge.generate.seq2seq import Seq2SeqParams, generate_seq2seq
    from lmforge.interop import load_pretrained
    from lmforge.models.seq2seq import Seq2SeqLM

    pretrained, tok = load_pretrained(pre.model_dir)
    torch.manual_seed(0)
    scratch = Seq2SeqLM(pretrained.config).eval()
    scratch.save_pretrained(out / "scratch-init", tokenizer=tok)
    hyps = generate_seq2seq(scratch, tok, srcs, Seq2SeqParams(max_new_tokens=64, num_beams=4), max_source_len=256)
    rows.append(("untrained model", seq2seq_scores(hyps, refs), 0.0))

    results = {}
    # Adafactor at T5's rates: 1e-3 to fine-tune a pre-trained model, 1e-2 from random weights
    for name, model, lr in (
        ("pretrained + fine-tuned", pre.model_dir, 1e-3),
        ("fine-tuned from scratch", out / "scratch-init", 1e-2),
    ):
        ft = FinetuneConfig(
            method="full",
            epochs=a.epochs,
            batch_size=16,
            lr=lr,
            optimizer="adafactor",
            weight_decay=0.0,
            warmup=0.05,
            max_len=256,
            metric="neg_loss",
            seed=0,
        )
        r = finetune_seq2seq(
            str(model),
            "bible-lead",
            out / name.split()[0],
            ft,
            num_beams=4,
            max_new_tokens=64,
            progress=sys.stderr.isatty(),
        )
        rows.append((name, r.test, r.seconds))
        results[name] = r
    # the summarization convention (BART, PEGASUS): no repeated trigram in the output
    for name in list(results):
        m, t = load_pretrained(results[name].model_dir)
        hyps = generate_seq2seq(
            m, t, srcs, Seq2SeqParams(max_new_tokens=64, num_beams=4, no_repeat_ngram_size=3), max_source_len=256
        )
        rows.append((f"{name}, no rep. 3", seq2seq_scores(hyps, refs), results[name].seconds))

    print(f"\nlead generation on {len(srcs)} held-out chapters (books never trained on), beam 4")
    print(f"{'system':<38}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}{'train s':>9}")
    for name, m, secs in rows:
        print(f"{name:<38}{m['rouge1']:>9.2f}{m['rouge2']:>9.2f}{m['rougeL']:>9.2f}{secs:>9.0f}")
    best = results["pretrained + fine-tuned"]
    print("\nsamples (pretrained + fine-tuned):")
    for d in best.samples[:4]:
        print(f"  source  {d['source'][:160]}...\n  output  {d['prediction']}\n  ref     {d['reference']}\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "test_chapters": len(srcs),
                "pretrain_seconds": pre_s,
                "pretrain_final": pre.final,
                "rows": {n: m for n, m, _ in rows},
                "samples": best.samples[:10],
            },
            ensure_ascii=False,
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
