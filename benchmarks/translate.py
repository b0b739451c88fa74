"""English -> Spanish translation trained from scratch on the Bible pairs, against two baselines in the same run.

data       King James (EN) and Reina-Valera 1909 (ES) verses from Debian's SWORD modules (sword-text-kjv,
           sword-text-sparv), aligned by verse; held out BY BOOK (lmforge.data.sword.DEFAULT_TEST_BOOKS for
           test, DEFAULT_VAL_BOOKS for validation): no verse of a test book is ever trained on
model      t5-translate (T5 v1.1 style: gated-GELU, RMSNorm, relative positions), a shared Unigram vocabulary
           trained on the training verses of both languages
training   `lmforge finetune seq2seq` (the library call) with a wall-clock budget: the epochs are sized to fit
scores     sacreBLEU and chrF on every test verse, beam search (4 beams), beside
             copy      the English source itself as the "translation" (names and numbers overlap)
             untrained the same model and vocabulary before training (beam search too, on the first
                       --baseline-limit test verses: it never emits EOS, so each verse costs 128 beam steps)

python benchmarks/translate.py                      # 30 minutes of training (the issue's budget)
python benchmarks/translate.py --minutes 2 --limit 200   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from lmforge.config import FinetuneConfig  # noqa: E402
from lmforge.eval.generation import seq2seq_scores  # noqa: E402
from lmforge.generate.seq2seq import Seq2SeqParams, generate_seq2seq  # noqa: E402
from lmforge.tune.seq2seq import finetune_seq2seq, load_splits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="training budget (wall clock)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test verses")
    ap.add_argument("--preset", default="t5-translate")
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--baseline-limit", type=int, default=200, help="test verses the untrained model decodes")
    ap.add_argument("--out", default="runs/bench-translate")
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)

    sp = load_splits("bible-en-es", None, None, None, None, 0.05, 0.05, 0)
    n = min(len(sp.test), a.limit or len(sp.test))
    sources, refs = sp.test.sources[:n], sp.test.targets[:n]
    print(f"data: {len(sp.train):,} train / {len(sp.val):,} val / {len(sp.test):,} test verses; split {sp.how}")
    rows = []
    copy = seq2seq_scores(sources, refs)
    rows.append(("copy the source", copy, 0.0))

    cfg = FinetuneConfig(
        method="full",
        epochs=1.0,
        batch_size=a.batch_size,
        lr=a.lr,
        optimizer="adafactor",
        weight_decay=0.0,
        warmup=0.03,
        max_len=128,
        metric="neg_loss",
        seed=0,
    )
    t0 = time.time()
    r = finetune_seq2seq(
        a.preset,
        "bible-en-es",
        out / "run",
        cfg,
        num_beams=4,
        eval_limit=a.limit,
        time_budget=a.minutes * 60,
        progress=sys.stderr.isatty(),
    )
    total = time.time() - t0

    # the untrained baseline: the same shape and vocabulary, random weights
    from lmforge.interop import load_pretrained
    from lmforge.models.seq2seq import Seq2SeqLM

    trained, tok = load_pretrained(r.model_dir)
    torch.manual_seed(0)
    untrained = Seq2SeqLM(trained.config).eval()
    t1 = time.time()
    k = min(n, a.baseline_limit)
    hyps = generate_seq2seq(untrained, tok, sources[:k], Seq2SeqParams(max_new_tokens=128, num_beams=4), batch_size=32)
    rows.append((f"untrained ({k} verses)", seq2seq_scores(hyps, refs[:k]), time.time() - t1))
    rows.append((f"trained {r.seconds / 60:.1f} min", r.test, r.test["decode_seconds"]))

    print(
        f"\nEN->ES on {n:,} held-out verses (books never trained on), beam 4; {r.rows['train']:,} training pairs, "
        f"{r.seconds / 60:.1f} min training on {torch.get_num_threads()} threads ({total / 60:.1f} min in all)"
    )
    print(f"{'system':<22}{'BLEU':>8}{'chrF':>8}{'ROUGE-L':>9}{'decode s':>10}")
    for name, m, secs in rows:
        print(f"{name:<22}{m['bleu']:>8.2f}{m['chrf']:>8.2f}{m['rougeL']:>9.2f}{secs:>10.1f}")
    print(f"BLEU ratio trained / copy: {r.test['bleu'] / max(copy['bleu'], 1e-9):.1f}x")
    print("\nsamples:")
    for d in r.samples[:6]:
        print(f"  EN  {d['source']}\n  ES  {d['prediction']}\n  ref {d['reference']}\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "test_verses": n,
                "train_pairs": r.rows["train"],
                "train_seconds": r.seconds,
                "split": sp.how,
                "rows": {name: m for name, m, _ in rows},
                "samples": r.samples[:20],
            },
            ensure_ascii=False,
            indent=1,
        )
    )
    print(f"report: {r.run_dir / 'report' / 'report.html'}")


if __name__ == "__main__":
    main()
