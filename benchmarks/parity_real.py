"""Parity on the real model, printed: SmolLM2-135M-Instruct from the packaged GGUF, lmforge's own loader against
transformers loading the same file, fp32. The tests (tests/test_gguf.py) assert the bounds; this prints the
figures: max |logit difference| on five prompts (the tests' prompts, ASCII to emoji), and the perplexity of a
Shakespeare sample through the same strided windows (256, stride 128) in both.

    python benchmarks/parity_real.py
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "ROMEO.\nBut soft, what light through yonder window",
    "In 1492, Columbus",
    "Naïve café owners serve crème brûlée 🍮 and",
]
WINDOW, STRIDE = 256, 128


def reference_nll(ref, ids: list[int]) -> tuple[float, int]:
    """transformers' loss over the same windows as lmforge.eval.lm.strided_nll: each window scores only the
    tokens no earlier window scored."""
    total, count, scored = 0.0, 0, 1
    for begin in range(0, len(ids) - 1, STRIDE):
        end = min(begin + WINDOW, len(ids))
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, : max(scored, begin + 1) - begin] = -100
        n = int((labels[:, 1:] != -100).sum())
        if n:
            total += ref(x, labels=labels).loss.item() * n
            count += n
        scored = end
        if end == len(ids):
            break
    return total, count


def main() -> None:
    import transformers

    from lmforge.assets import corpus_files, model_file
    from lmforge.eval.lm import strided_nll
    from lmforge.interop.gguf import load_gguf

    path = model_file("smollm2-135m-instruct")
    model, tok = load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    rows = []
    with torch.no_grad():
        for p in PROMPTS:
            x = torch.tensor([tok.encode(p)])
            rows.append(
                {
                    "prompt": repr(p)[:48],
                    "tokens": x.shape[1],
                    "delta": (model(x).logits - ref(x).logits).abs().max().item(),
                }
            )
        text = corpus_files("shakespeare")[0].read_text(encoding="utf-8")[5000:9000]
        ids = tok.encode(text)
        ours, n = strided_nll(model, ids, window=WINDOW, stride=STRIDE)
        theirs, m = reference_nll(ref, ids)
    print(
        f"SmolLM2-135M-Instruct (packaged GGUF), fp32, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(table(rows, [("prompt", "prompt", ""), ("tokens", "tokens", "d"), ("delta", "max |logit diff|", ".2e")]))
    a, b = math.exp(ours / n), math.exp(theirs / m)
    print(
        f"\nperplexity on {n} Shakespeare tokens (windows {WINDOW}, stride {STRIDE}): lmforge {a:.4f}, "
        f"transformers {b:.4f}, difference {100 * (a - b) / b:+.4f}%"
    )
    worst = max(r["delta"] for r in rows)
    print(
        f"goal: max |logit diff| <= 1e-3 ({worst:.2e}: {'met' if worst <= 1e-3 else 'NOT met'}); "
        f"perplexity within 0.5% ({abs(100 * (a - b) / b):.4f}%: {'met' if abs(a - b) / b < 0.005 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
