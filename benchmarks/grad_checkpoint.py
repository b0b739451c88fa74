"""Activation checkpointing (`train.grad_checkpoint` / `finetune --grad-checkpoint`) for every family: the memory a
training step needs and the time it takes, with and without.

One model per family at a shape where activations dominate (a GPT-2-style decoder, a BERT-style encoder under
masked LM, a T5-style encoder-decoder), a step = forward + backward + AdamW, through `model_loss` as the
training loops call it. Each (family, setting) runs in its own fresh process: 2 warm-up steps, 5 timed ones
(median), then one more step under `lmforge.runtime.TensorMemory`, which counts the peak of live tensor bytes
(weights, gradients, optimizer state and activations: the figure checkpointing changes; resident memory also holds
the allocator's caches). The systems alternate over ROUNDS rounds.

    python benchmarks/grad_checkpoint.py            # prints the table
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, run_worker, table  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "2"))
SHAPES = {  # family: (config overrides, batch, sequence length)
    "decoder": (dict(preset="bench-gpt2", dropout=0.0), 8, 256),
    "encoder": (dict(preset="bert-mini", head="mlm", dropout=0.0, attn_dropout=0.0), 32, 128),
    "seq2seq": (dict(preset="t5-translate", dropout=0.0), 32, 128),
}


def build(family: str):
    from lmforge.models.family import FAMILIES

    over, batch, seq = SHAPES[family]
    f = FAMILIES[family]
    over = dict(over)
    cfg = f.config_cls(**{**f.presets[over.pop("preset")], **over})
    torch.manual_seed(0)
    model = f.model_cls(cfg).train()
    x = torch.randint(5, cfg.vocab_size, (batch, seq))
    if family == "encoder":
        b = {"input_ids": x, "labels": x.masked_fill(torch.rand(x.shape) > 0.15, -100)}
    elif family == "seq2seq":
        b = {"input_ids": x, "labels": torch.randint(5, cfg.vocab_size, (batch, seq // 4))}
    else:
        b = {"input_ids": x, "labels": x}
    return model, b


def worker(family: str, ckpt: bool) -> None:
    from lmforge.runtime import TensorMemory, peak_memory_mb
    from lmforge.train.supervised import model_loss

    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    model, batch = build(family)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model_loss(model, batch, grad_checkpoint=ckpt).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with TensorMemory(model, opt) as tm:
        step()
    print(
        json.dumps(
            {
                "s": statistics.median(times),
                "tensor_peak_mb": tm.peak_mb,
                "rss_peak_mb": peak_memory_mb(),
                "tokens": int(batch["input_ids"].numel()),
                "params": model.num_params(),
            }
        )
    )


def main() -> None:
    print(machine_header())
    runs: dict[tuple[str, bool], list[dict]] = {}
    for _ in range(ROUNDS):
        for family in SHAPES:
            for ckpt in (False, True):
                runs.setdefault((family, ckpt), []).append(run_worker(__file__, family, str(int(ckpt))))
    rows = []
    for (family, ckpt), rs in runs.items():
        r = {k: statistics.median(x[k] for x in rs) for k in ("s", "tensor_peak_mb", "rss_peak_mb")}
        base = runs[(family, False)]
        b = {k: statistics.median(x[k] for x in base) for k in ("s", "tensor_peak_mb")}
        over, batch, seq = SHAPES[family]
        rows.append(
            {
                "family": f"{family} ({over['preset']}, {rs[0]['params'] / 1e6:.1f}M, {batch}x{seq})",
                "ckpt": "on" if ckpt else "off",
                "ms": r["s"] * 1e3,
                "tok_s": rs[0]["tokens"] / r["s"],
                "peak": r["tensor_peak_mb"],
                "rss": r["rss_peak_mb"],
                "mem_x": r["tensor_peak_mb"] / b["tensor_peak_mb"],
                "time_x": r["s"] / b["s"],
            }
        )
    print(
        table(
            rows,
            [
                ("family", "family (preset, params, batch x seq)", ""),
                ("ckpt", "checkpointing", ""),
                ("ms", "ms / step", ".0f"),
                ("tok_s", "tokens/s", ",.0f"),
                ("peak", "tensor peak MiB", ",.0f"),
                ("rss", "peak RSS MiB", ",.0f"),
                ("mem_x", "x memory", ".2f"),
                ("time_x", "x time", ".2f"),
            ],
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3] == "1")
    else:
        main()
