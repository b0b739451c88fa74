"""`lmforge finetune seq2seq`, `lmforge eval seq2seq` and span-corruption `lmforge pretrain` through the CLI,
and the bad inputs the issue names: an empty side, a missing column, over-long targets, a missing module."""

from __future__ import annotations

import json

import yaml

from conftest import run_cli
from test_cli import assert_user_error

WORDS = (
    "the lord said unto moses and aaron in the land of egypt saying speak unto all the congregation of "
    "israel that they take every man a lamb according to the house of their fathers"
).split()


def pairs_file(tmp_path, n: int = 80, name: str = "pairs.jsonl", **extra) -> str:
    """A toy 'translation': the target is the source's words reversed (deterministic, learnable)."""
    rows = []
    for i in range(n):
        src = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(4 + i % 5))
        rows.append({"source": src, "target": " ".join(reversed(src.split())), **extra})
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


FAST = [
    "--model",
    "t5-tiny",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--max-len",
    "32",
    "--eval-limit",
    "8",
    "--num-beams",
    "2",
    "--set",
    "log_every=2",
]


def test_finetune_seq2seq_from_scratch_and_eval(tmp_path):
    data = pairs_file(tmp_path)
    out = tmp_path / "run"
    r = run_cli("finetune", "seq2seq", "--data", data, "--out", str(out), "--prefix", "reverse: ", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test: BLEU" in r.stdout
    for f in (
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "predictions.jsonl",
        "summary.json",
        "metrics.jsonl",
        "report/report.html",
        "report/loss.png",
    ):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["from_scratch"] and summary["rows"]["train"] == 72 and summary["test"]["n"] == 4
    assert json.loads((out / "model/config.json").read_text())["model_type"] == "t5"

    # the saved model evaluates through `lmforge eval seq2seq` with beam search and the same prefix
    ev = tmp_path / "eval"
    r = run_cli(
        "eval",
        "seq2seq",
        "--model",
        str(out / "model"),
        "--data",
        data,
        "--limit",
        "6",
        "--out",
        str(ev),
        "--prompt",
        "reverse: {source}",
        "--num-beams",
        "2",
        "--json",
    )
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
    r = run_cli("finetune", "seq2seq", "--data", str(p), "--out", str(tmp_path / "run"), *FAST, "--max-target-len", "8")
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
    r = run_cli("finetune", "seq2seq", "--data", data, "--source-col", "english", "--out", str(tmp_path / "run"), *FAST)
    assert_user_error(r, "no column 'english'", "--source-col")


def test_missing_debian_module_is_a_one_line_hint(tmp_path):
    r = run_cli(
        "finetune",
        "seq2seq",
        "--data",
        "bible-en-es",
        "--out",
        str(tmp_path / "run"),
        *FAST,
        env={"LMFORGE_SWORD_ROOT": str(tmp_path / "no-sword")},
    )
    assert_user_error(r, "apt-get install sword-text-kjv")


def test_top_k_is_refused_for_seq2seq(tmp_path):
    r = run_cli(
        "finetune",
        "seq2seq",
        "--data",
        pairs_file(tmp_path),
        "--method",
        "top-k",
        "--out",
        str(tmp_path / "run"),
        *FAST,
    )
    assert_user_error(r, "use full or lora")


def test_span_corruption_pretraining(tmp_path, small_corpus):
    cfg = {
        "model": {"preset": "t5-tiny", "vocab_size": 600, "max_seq_len": 64},
        "data": {"sources": [str(small_corpus)]},
        "train": {
            "objective": "span",
            "steps": 4,
            "batch_size": 4,
            "seq_len": 48,
            "eval_every": 2,
            "eval_batches": 2,
            "ckpt_every": 2,
            "peak_tflops": 1.0,
        },
    }
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


def test_finetune_seq2seq_with_lora_saves_a_peft_adapter(tmp_path, capsys):
    """`finetune seq2seq --method lora` on a saved tiny T5: only the adapters train, the adapter directory is in the
    PEFT layout, and the base plus the adapter is the run's model."""
    import torch
    from safetensors.torch import load_file

    from lmforge.cli import main
    from lmforge.config import seq2seq_config
    from lmforge.interop import load_model
    from lmforge.interop.peft import load_adapter
    from lmforge.models.seq2seq import Seq2SeqLM
    from lmforge.tokenizer import Tokenizer

    data = pairs_file(tmp_path)
    rows = [json.loads(line) for line in open(data)]
    tok = Tokenizer.train_unigram([r["source"] for r in rows] + [r["target"] for r in rows], vocab_size=512)
    torch.manual_seed(0)
    cfg = seq2seq_config(
        "t5-tiny",
        vocab_size=tok.vocab_size,
        pad_token_id=tok.pad_id,
        eos_token_id=tok.eos_id,
        decoder_start_token_id=tok.pad_id,
    )
    Seq2SeqLM(cfg).save_pretrained(tmp_path / "base", tokenizer=tok)
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            "seq2seq",
            "--data",
            data,
            "--out",
            str(out),
            *FAST,
            "--model",
            str(tmp_path / "base"),
            "--method",
            "lora",
            "--lora-r",
            "4",
            "--lr",
            "1e-2",
        ]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    assert f"adapter (PEFT layout): {out / 'adapter'}" in capsys.readouterr().out
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["task_type"] == "SEQ_2_SEQ_LM"
    # "attn" targets: self-attention in both stacks and the decoder's cross-attention, q/k/v/o each
    assert adapter_cfg["r"] == 4 and sorted(adapter_cfg["target_modules"]) == sorted(
        [f"layer.0.SelfAttention.{p}" for p in "qkvo"] + [f"layer.1.EncDecAttention.{p}" for p in "qkvo"]
    )
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), sorted(tensors)[:8]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["steps"] > 0
    assert summary["trainable_params"] == sum(t.numel() for t in tensors.values())
    assert summary["trainable_params"] < 0.25 * summary["total_params"]
    gen = json.loads((out / "model" / "generation_config.json").read_text())
    assert gen["num_beams"] == 2  # the merged model keeps the run's decoding settings, as a full run's does
    base, trained = load_model(tmp_path / "base"), load_model(out / "model")
    assert torch.equal(base.tok_emb.weight, trained.tok_emb.weight)  # frozen: embeddings and the MLPs
    assert torch.equal(base.encoder.blocks[0].mlp.up.weight, trained.encoder.blocks[0].mlp.up.weight)
    load_adapter(base, out / "adapter").eval()
    x, y = torch.randint(3, tok.vocab_size, (2, 9)), torch.randint(3, tok.vocab_size, (2, 5))
    with torch.no_grad():
        merged, adapted = trained(x, decoder_input_ids=y).logits, base(x, decoder_input_ids=y).logits
    torch.testing.assert_close(adapted, merged, rtol=0, atol=1e-5)
