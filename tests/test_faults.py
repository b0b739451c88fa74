"""Fault tolerance: kill -9 at any moment, resume bitwise, nothing stale left behind.

The in-process cases interrupt `fit` and `pretrain` at chosen steps; the short kill -9 campaign
(benchmarks/faults.py, a few trials instead of ten) kills real CLI processes, half of them inside a checkpoint
write, and resumes them with `--resume`."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from conftest import call_cli, tiny_config
from lmforge.config import FinetuneConfig, load_run_config
from lmforge.models.decoder import DecoderLM
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.loop import pretrain
from lmforge.train.supervised import fit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import faults  # noqa: E402

# --- fit: interrupted at a chosen step, resumed ------------------------------------------------------------------


class Stop(Exception):
    pass


def _fit_run(run: Path, stop_at: int | None = None, resume: bool = False, optimizer: str = "adamw", **more):
    run.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", dropout=0.2))
    data = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 97, (40, 17), generator=data)

    def batches(epoch: int):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(epoch))
        for s in range(0, len(rows), 8):
            b = rows[order[s : s + 8]]
            yield {"input_ids": b[:, :-1], "labels": b[:, 1:]}

    def evaluate():
        with torch.no_grad():
            loss = model(input_ids=rows[:8, :-1], labels=rows[:8, 1:]).loss.item()
        return {"loss": loss, "neg_loss": -loss}

    seen = {"n": 0}

    def loss_fn(m, b):
        seen["n"] += 1
        if stop_at is not None and seen["n"] > stop_at:
            raise Stop  # the process dies between two steps
        return m(**b).loss

    cfg = FinetuneConfig(
        epochs=3,
        batch_size=8,
        lr=3e-3,
        eval_every=4,
        ckpt_every=3,
        average=0.5,
        log_every=1,
        optimizer=optimizer,
        **{"metric": "neg_loss", **more},
    )
    try:
        res = fit(model, batches, 5, evaluate, cfg, run / "metrics.jsonl", False, loss_fn, run_dir=run, resume=resume)
    except Stop:
        return None, model
    return res, model


def _records(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(x).items() if k != "time"}
        for x in (run / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize(
    "optimizer, more, steps, ckpt",
    [
        ("adamw", {}, 15, "step_000009"),
        ("muon", {}, 15, "step_000009"),
        # 5 batches an epoch in steps of 2 + 2 + 1; killed in batch 12, the second epoch's last step is 6
        ("adamw", {"grad_accum": 2, "schedule": "cosine"}, 9, "step_000006"),
        # "loss" as the score to raise: every evaluation after the first stalls, so the plateau schedule halves
        # the learning rate at each (the kill lands between two drops) and early stopping ends the run at its
        # fourth stalled evaluation, after the kill: both counts come back from the checkpoint
        (
            "adamw",
            {"metric": "loss", "schedule": "plateau", "plateau_patience": 1, "early_stopping": 4},
            12,
            "step_000009",
        ),
    ],
)
def test_fit_resumes_bitwise_with_best_and_averaged_weights(tmp_path, optimizer, more, steps, ckpt):
    ref, ref_model = _fit_run(tmp_path / "ref", optimizer=optimizer, **more)
    assert _fit_run(tmp_path / "cut", stop_at=11, optimizer=optimizer, **more)[0] is None  # killed in batch 12
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == [ckpt]
    res, model = _fit_run(tmp_path / "cut", resume=True, optimizer=optimizer, **more)
    assert res.steps == ref.steps == steps and res.best == ref.best
    assert res.stopped == ref.stopped and (res.stopped is not None) == ("early_stopping" in more)
    for (k, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    assert _records(tmp_path / "cut") == _records(tmp_path / "ref")  # dropout, schedule, evaluations alike


def test_grad_accum_takes_the_steps_of_a_larger_batch(tmp_path):
    """Two batches of 8 a step give the updates of one batch of 16 (up to float rounding), and the cosine schedule
    ends at a tenth of the peak learning rate."""
    torch.manual_seed(0)
    rows = torch.randint(0, 97, (32, 17), generator=torch.Generator().manual_seed(1))

    def run(batch: int, accum: int):
        torch.manual_seed(0)
        model = DecoderLM(tiny_config("llama"))

        def batches(epoch: int):
            for s in range(0, len(rows), batch):
                yield {"input_ids": rows[s : s + batch, :-1], "labels": rows[s : s + batch, 1:]}

        cfg = FinetuneConfig(
            epochs=2,
            batch_size=batch,
            grad_accum=accum,
            lr=3e-3,
            metric="neg_loss",
            log_every=1,
            schedule="cosine",
            warmup=0.0,
            ckpt_every=0,
        )
        res = fit(
            model, batches, len(rows) // batch, lambda: {"neg_loss": 0.0}, cfg, tmp_path / f"m{accum}.jsonl", False
        )
        return model, res, [json.loads(x) for x in (tmp_path / f"m{accum}.jsonl").read_text().splitlines()]

    big, res_big, log_big = run(16, 1)
    small, res_small, log_small = run(8, 2)
    assert res_big.steps == res_small.steps == 4
    for a, b in zip(big.parameters(), small.parameters()):
        assert (a - b).abs().max() < 1e-5
    lrs = [r["lr"] for r in log_small if "lr" in r]
    assert lrs == [r["lr"] for r in log_big if "lr" in r] and lrs[0] == pytest.approx(3e-3)
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3] >= 3e-4


def test_fit_resume_without_a_checkpoint_starts_over(tmp_path):
    ref, ref_model = _fit_run(tmp_path / "ref")
    _fit_run(tmp_path / "cut", stop_at=2)  # before the first checkpoint (step 3)
    assert not list_checkpoints(tmp_path / "cut")
    res, model = _fit_run(tmp_path / "cut", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), model.parameters()))
    assert _records(tmp_path / "cut") == _records(tmp_path / "ref")


# --- pretrain -----------------------------------------------------------------------------------------------------


def _tiny_pretrain(corpus, **train):
    t = dict(
        seed=3,
        steps=10,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        eval_every=5,
        eval_batches=2,
        ckpt_every=4,
        log_every=1,
    )  # (no peak_tflops: the peak is measured, as in a user's run)
    t.update(train)
    return {
        "model": {"preset": "bench-gpt2", "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 64, "dropout": 0.1},
        "data": {"sources": [str(corpus)], "vocab_size": 300, "val_fraction": 0.2},
        "train": t,
    }


def test_pretrain_resume_cleans_stale_temps_and_restarts_a_run_without_checkpoints(tmp_path, small_corpus):
    base = _tiny_pretrain(small_corpus)
    pretrain(load_run_config(base=base), tmp_path / "ref", progress=False)
    want = (tmp_path / "ref" / "model" / "model.safetensors").read_bytes()

    # killed before its first checkpoint: --resume starts it over from its own config.yaml
    run = tmp_path / "early"
    pretrain(load_run_config(base=base), run, progress=False, stop_after=2)
    assert not list_checkpoints(run) and (run / "config.yaml").is_file()
    pretrain(None, run, resume=True, progress=False)
    assert (run / "model" / "model.safetensors").read_bytes() == want

    # killed mid-run, with the debris of a save it interrupted: removed, and the resumed run is exact
    run = tmp_path / "mid"
    pretrain(load_run_config(base=base), run, progress=False, stop_after=6)
    stale = [run / "checkpoints" / ".step_000008.x1.tmp", run / ".model.x2.tmp", run / ".summary.json.x3.tmp"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    stale[1].mkdir()
    stale[2].write_text("{")
    pretrain(None, run, resume=True, progress=False)
    assert not any(p.exists() for p in stale)
    assert (run / "model" / "model.safetensors").read_bytes() == want


def test_pretrain_stops_early_on_validation_loss_and_resumes_its_count(tmp_path, small_corpus):
    """train.early_stopping=2 with a min_delta no fall can reach: the evaluations at steps 8 and 12 do not count
    as improving, so the run ends at step 12 of 20 with its model, summary and report written; a run killed at
    step 9 (its checkpoint at 8 holds one stalled evaluation) resumes and stops at the same step, bitwise."""
    base = _tiny_pretrain(small_corpus, steps=20, eval_every=4, early_stopping=2, min_delta=100.0)
    ref = pretrain(load_run_config(base=base), tmp_path / "ref", progress=False)
    assert ref.steps == 12 and ref.stopped["best_step"] == 4 and "stopped early at step 12" in ref.summary()
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["stopped"]["reason"].startswith("validation loss did not fall")
    assert (tmp_path / "ref" / "report" / "report.md").is_file()
    run = tmp_path / "cut"
    pretrain(load_run_config(base=base), run, progress=False, stop_after=9)
    assert list_checkpoints(run)[-1].name == "step_000008"
    res = pretrain(None, run, resume=True, progress=False)
    assert res.steps == 12 and res.stopped == ref.stopped
    want = (tmp_path / "ref" / "model" / "model.safetensors").read_bytes()
    assert (run / "model" / "model.safetensors").read_bytes() == want


def test_pretrain_resume_of_an_empty_folder_needs_a_config(tmp_path, capsys):
    r = call_cli(capsys, "pretrain", "--resume", "--out", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "holds no config.yaml" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "nothing").exists()


def test_output_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        model = DecoderLM(tiny_config("gpt2"))
        model.save_pretrained(tmp_path / "m")
        from lmforge.train.checkpoint import save_checkpoint

        opt = torch.optim.AdamW(model.parameters())
        save_checkpoint(tmp_path / "run", 1, model, opt, torch.Generator())
    finally:
        os.umask(old)
    files = [*(tmp_path / "m").iterdir(), *(tmp_path / "run" / "checkpoints" / "step_000001").iterdir()]
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# --- fine-tuning through the CLI: a new run refuses a used folder, a user error leaves none ------------------------


def test_finetune_refuses_a_used_folder_and_leaves_nothing_on_a_user_error(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    r = call_cli(
        capsys, "finetune", "classify", "--model", "all-minilm-l6-v2", "--data", str(used / "x"), "--out", str(used)
    )
    assert r.returncode == 2 and "--resume" in r.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nonly one class,a\nagain,a\n")
    out = tmp_path / "new"
    r = call_cli(capsys, "finetune", "classify", "--model", "all-minilm-l6-v2", "--data", str(bad), "--out", str(out))
    assert r.returncode == 2 and "single class" in r.stderr
    assert not out.exists()
    r = call_cli(capsys, "finetune", "classify", "--resume", "--out", str(tmp_path / "never"))
    assert r.returncode == 2 and "nothing to resume" in r.stderr


# --- kill -9 campaign, short ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job",
    [
        "classify",
        # (seq2seq trains its vocabulary in the run; benchmarks/faults.py kills it 4 times more; pre-training's
        # resume is bitwise by default in test_pretrain_stops_early_on_validation_loss_and_resumes_its_count)
        *(pytest.param(j, marks=pytest.mark.slow) for j in ("pretrain", "seq2seq", "mlm", "span", "qa", "dpo")),
    ],
)
def test_kill9_inside_a_checkpoint_write_resumes_bitwise(job, tmp_path):
    r = faults.run_job(job, 1, tmp_path, first_in_write=True, window=(0.0, 0.0))  # the first write
    t = r.trials[0]
    assert t["killed"] and t["in_write"] and t["temps_at_kill"] >= 1, t  # the kill hit a half-written checkpoint
    assert t["resumed"] and t["identical"] and t["leftovers"] == 0, str(t)  # (whole: the error is last)


@pytest.mark.slow
def test_kill9_trials_chat(tmp_path):
    r = faults.run_job("chat", 2, tmp_path)
    row = r.row()
    assert row["killed"] == 2 and row["resumed"] == row["identical"] == 2 and row["leftovers"] == 0, r.trials
