"""`lmforge finetune seq2seq`, `lmforge eval seq2seq` and span-corruption `lmforge pretrain` through the CLI,
and the bad inputs the issue names: an empty side, a missing column, over-long targets, a missing module."""

from __future__ import annotations

import json

import yaml

from conftest import run_cli
from test_cli import assert_user_error

WORDS = ("the lord said unto moses and aaron in the land of egypt saying speak unto all the congregation of "
         "israel that they take every man a lamb according to the house of their fathers").split()


def pairs_file(tmp_path, n: int = 80, name: str = "pairs.jsonl", **extra) -> str:
    """A toy 'translation': the target is the source's words reversed (deterministic, learnable)."""
    rows = []
    for i in range(n):
        src = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(4 + i % 5))
        rows.append({"source": src, "target": " ".join(reversed(src.split())), **extra})
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


FAST = ["--model", "t5-tiny", "--epochs", "1", "--batch-size", "16", "--max-len", "32", "--eval-limit", "8",
        "--num-beams", "2", "--set", "log_every=2"]


def test_finetune_seq2seq_from_scratch_and_eval(tmp_path):
    data = pairs_file(tmp_path)
    out = tmp_path / "run"
    r = run_cli("finetune", "seq2seq", "--data", data, "--out", str(out), "--prefix", "reverse: ", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test: BLEU" in r.stdout
    for f in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "predictions.jsonl",
              "summary.json", "metrics.jsonl", "report/report.html", "report/loss.png"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["from_scratch"] and summary["rows"]["train"] == 72 and summary["test"]["n"] == 4
    assert json.loads((out / "model/config.json").read_text())["model_type"] == "t5"

    # the saved model evaluates through `lmforge eval seq2seq` with beam search and the same prefix
    ev = tmp_path / "eval"
    r = run_cli("eval", "seq2seq", "--model", str(out / "model"), "--data", data, "--limit", "6", "--out", str(ev),
                "--prompt", "reverse: {source}", "--num-beams", "2", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"bleu", "chrf", "rouge1", "rouge2", "rougeL"} <= set(m) and m["n"] == 6
    assert (ev / "predictions.jsonl").is_file() and (ev / "report.html").is_file()


def test_empty_sides_and_long_targets_are_reported(tmp_path):
    """One run with two rows that have an empty side and targets over the limit: both are counted in a
    warning, and the run goes on with the rest."""
    p = tmp_path / "some-empty.jsonl"
    rows = [json.loads(line) for line in open(pairs_file(tmp_path))]
    rows[3]["target"] = ""
    rows[5]["source"] = "   "
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("finetune", "seq2seq", "--data", str(p), "--out", str(tmp_path / "run"), *FAST,
                "--max-target-len", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 rows" in r.stderr and "empty source or target" in r.stderr
    line = next(ln for ln in r.stderr.splitlines() if "truncated" in ln)
    assert "targets are longer than 8 tokens" in line and "--max-target-len" in line
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rows"]["targets_truncated"] > 0


def test_all_empty_pairs_is_an_error(tmp_path):
    q = tmp_path / "all-empty.jsonl"
    q.write_text("".join(json.dumps({"source": "x", "target": ""}) + "\n" for _ in range(5)))
    r = run_cli("finetune", "seq2seq", "--data", str(q), "--out", str(tmp_path / "run2"), *FAST)
    assert_user_error(r, "no pairs with both sides non-empty")
    assert not (tmp_path / "run2").exists()


def test_missing_source_column(tmp_path):
    data = pairs_file(tmp_path)
    r = run_cli("finetune", "seq2seq", "--data", data, "--source-col", "english", "--out",
                str(tmp_path / "run"), *FAST)
    assert_user_error(r, "no column 'english'", "--source-col")


def test_missing_debian_module_is_a_one_line_hint(tmp_path):
    r = run_cli("finetune", "seq2seq", "--data", "bible-en-es", "--out", str(tmp_path / "run"), *FAST,
                env={"LMFORGE_SWORD_ROOT": str(tmp_path / "no-sword")})
    assert_user_error(r, "apt-get install sword-text-kjv")


def test_top_k_is_refused_for_seq2seq(tmp_path):
    r = run_cli("finetune", "seq2seq", "--data", pairs_file(tmp_path), "--method", "top-k",
                "--out", str(tmp_path / "run"), *FAST)
    assert_user_error(r, "use full or lora")


def test_span_corruption_pretraining(tmp_path, small_corpus):
    cfg = {"model": {"preset": "t5-tiny", "vocab_size": 600, "max_seq_len": 64},
           "data": {"sources": [str(small_corpus)]},
           "train": {"objective": "span", "steps": 4, "batch_size": 4, "seq_len": 48, "eval_every": 2,
                     "eval_batches": 2, "ckpt_every": 2, "peak_tflops": 1.0}}
    rec = tmp_path / "t5.yaml"
    rec.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = run_cli("pretrain", "--config", str(rec), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((out / "summary.json").read_text())["final_val"]
    assert final["loss"] > 0 and 0 <= final["span_acc"] <= 1
    saved = json.loads((out / "model/config.json").read_text())
    assert saved["model_type"] == "t5" and saved["vocab_size"] <= 600
    tok = json.loads((out / "model/tokenizer.json").read_text())
    assert any(t["content"] == "<extra_id_0>" for t in tok["added_tokens"])

    # the objective needs the model family that goes with it
    cfg["model"] = {"preset": "bench-gpt2"}
    rec.write_text(yaml.safe_dump(cfg))
    r = run_cli("pretrain", "--config", str(rec), "--out", str(tmp_path / "run2"))
    assert_user_error(r, "objective=span needs an encoder-decoder model")
