"""Extractive QA: SQuAD metrics, windowed features over long contexts, span decoding, the Shakespeare QA set,
and fine-tuning through the CLI into a directory transformers loads."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from lmforge.data.qa import QAExample, best_spans, qa_features, read_squad, shakespeare_qa, write_squad
from lmforge.errors import DataError
from lmforge.eval.qa import normalize_answer, squad_scores, token_f1
from lmforge.interop import load_pretrained


def test_squad_metric_definitions():
    assert normalize_answer("The  Duke of York!") == "duke of york"
    assert token_f1("the duke of York", "Duke York") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    s = squad_scores(["PROTEUS", "a sheep", "wrong"], [["Proteus"], ["the sheep", "a lamb"], ["right"]])
    assert s["exact_match"] == pytest.approx(200 / 3) and s["f1"] == pytest.approx(200 / 3)


@pytest.fixture(scope="module")
def minilm():
    return load_pretrained("all-minilm-l6-v2")


def test_windows_cover_long_contexts_and_locate_answers(minilm):
    _, tok = minilm
    filler = " ".join(f"word{i}" for i in range(300))
    ctx = f"{filler} The treasure lies under the old oak tree. {filler}"
    start = ctx.index("under the old oak tree")
    ex = QAExample("x", ctx, "Where is the treasure?", [("under the old oak tree", start)])
    f = qa_features([ex], tok, max_len=128, stride=32)
    assert len(f.ids) > 5 and all(len(x) <= 128 for x in f.ids)
    hits = [i for i in range(len(f.ids)) if f.start[i] > 0]
    assert hits, "some window must hold the answer"
    for i in hits:
        s, e = f.offsets[i][f.start[i]][0], f.offsets[i][f.end[i]][1]
        assert ctx[s:e] == "under the old oak tree"
    # decoding a crafted logit pair returns exactly that span
    i = hits[0]
    T = len(f.ids[i])
    sl, el = torch.full((1, T), -5.0), torch.full((1, T), -5.0)
    sl[0, f.start[i]], el[0, f.end[i]] = 5.0, 5.0
    ((score, s, e),) = best_spans(sl, el, f, [i])
    assert ctx[s:e] == "under the old oak tree" and score == 10.0


def test_shakespeare_qa_is_real_split_by_play_and_deterministic():
    a, b = shakespeare_qa(n_per_play=10), shakespeare_qa(n_per_play=10)
    assert [e.id for e in a["test"]] == [e.id for e in b["test"]]
    plays = {k: {e.id.rsplit("-", 2)[0] for e in v} for k, v in a.items()}
    assert len(plays["test"]) == 6 and len(plays["dev"]) == 4 and not plays["test"] & plays["train"]
    for e in a["train"][:200]:
        ((text, s),) = e.answers
        assert e.context[s : s + len(text)] == text
    assert any(e.question.startswith("Who says") for e in a["train"])
    assert any(e.question.startswith("What does") for e in a["train"])


def test_read_squad_rejects_misplaced_answers(tmp_path):
    bad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": "abc def",
                        "qas": [{"id": "1", "question": "q?", "answers": [{"text": "def", "answer_start": 0}]}],
                    }
                ]
            }
        ]
    }
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="not at character 0"):
        read_squad(tmp_path / "b.json")
    (tmp_path / "n.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match="SQuAD format"):
        read_squad(tmp_path / "n.json")


def test_finetune_qa_cli_exports_bert_for_qa(tmp_path):
    transformers = pytest.importorskip("transformers")
    s = shakespeare_qa(n_per_play=2)
    write_squad(s["train"][:16], tmp_path / "train.json")
    write_squad(s["dev"][:4], tmp_path / "dev.json")
    write_squad(s["test"][:4], tmp_path / "test.json")
    out = tmp_path / "run"
    r = run_cli(
        "finetune",
        "qa",
        "--model",
        "all-minilm-l6-v2",
        "--data",
        str(tmp_path / "train.json"),
        "--val-data",
        str(tmp_path / "dev.json"),
        "--test-data",
        str(tmp_path / "test.json"),
        "--epochs",
        "1",
        "--max-len",
        "128",
        "--stride",
        "32",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "test: exact match" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"]["train_windows"] > 16  # contexts longer than 128 tokens were windowed
    assert len(json.loads((out / "predictions.json").read_text())) == 4
    ref = transformers.BertForQuestionAnswering.from_pretrained(str(out / "model")).eval()
    model, tok = load_pretrained(out / "model")
    ids = torch.tensor([tok.encode_for_encoder(["Who says hello?"], ["HAMLET. hello there"])[0].ids])
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(input_ids=ids)
    assert (ours[..., 0] - theirs.start_logits).abs().max() < 1e-5
    bad = run_cli(
        "finetune",
        "qa",
        "--model",
        str(out / "model"),
        "--data",
        str(tmp_path / "nope.json"),
        "--out",
        str(tmp_path / "o2"),
    )
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_stride_too_large_is_a_clear_error(minilm):
    _, tok = minilm
    ex = QAExample("x", "word " * 200, "What is the word that is repeated here so many times?", [])
    with pytest.raises(DataError, match="use a stride below"):
        qa_features([ex], tok, max_len=32, stride=20)


def test_jsonl_with_datasets_style_answers(tmp_path):
    row = {
        "id": "1",
        "context": "Romeo loves Juliet.",
        "question": "Whom does Romeo love?",
        "answers": {"text": ["Juliet"], "answer_start": [12]},
    }
    (tmp_path / "q.jsonl").write_text(json.dumps(row) + "\n")
    (ex,) = read_squad(tmp_path / "q.jsonl")
    assert ex.answers == [("Juliet", 12)]


def test_finetune_qa_with_lora_saves_a_peft_adapter(minilm, tmp_path, capsys):
    """`finetune qa --method lora` on a tiny random BERT over MiniLM's vocabulary: only the adapters and the QA
    head train (not the pooler QA never reads), and the adapter directory holds the whole outcome: the base
    plus the adapter is the run's model."""
    from safetensors.torch import load_file

    from lmforge.cli import main
    from lmforge.config import encoder_config
    from lmforge.interop import load_model
    from lmforge.interop.peft import load_adapter
    from lmforge.models.encoder import Encoder

    torch.manual_seed(0)
    tok = minilm[1]
    Encoder(
        encoder_config(
            "bert-mini", vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=128
        )
    ).save_pretrained(tmp_path / "base", tokenizer=tok)

    def around_answer(e: QAExample) -> QAExample:  # 150 characters each side: one window per question
        ((text, start),) = e.answers
        lo = max(0, start - 150)
        return QAExample(e.id, e.context[lo : start + len(text) + 150], e.question, [(text, start - lo)])

    s = shakespeare_qa(n_per_play=2)
    write_squad([around_answer(e) for e in s["train"][:32]], tmp_path / "train.json")
    write_squad([around_answer(e) for e in s["dev"][:4]], tmp_path / "dev.json")
    write_squad([around_answer(e) for e in s["test"][:4]], tmp_path / "test.json")
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            "qa",
            "--model",
            str(tmp_path / "base"),
            "--data",
            str(tmp_path / "train.json"),
            "--val-data",
            str(tmp_path / "dev.json"),
            "--test-data",
            str(tmp_path / "test.json"),
            "--method",
            "lora",
            "--lora-r",
            "4",
            "--epochs",
            "1",
            "--max-len",
            "128",
            "--stride",
            "32",
            "--lr",
            "1e-2",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err[-2000:]
    assert f"adapter (PEFT layout): {out / 'adapter'}" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "QUESTION_ANS" and cfg["r"] == 4
    assert cfg["modules_to_save"] == ["qa_outputs"] and cfg["target_modules"] == [
        "attention.output.dense",
        "attention.self.key",
        "attention.self.query",
        "attention.self.value",
    ]
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(".lora_" in k or ".qa_outputs." in k for k in tensors), sorted(tensors)
    assert len(tensors) == 2 * 4 * 2 + 2  # A and B on four projections in two layers, the head's weight and bias
    # what trained is exactly what the adapter holds, a small part of the model
    assert summary["method"] == "lora" and summary["rows"]["train_windows"] <= 48
    assert summary["trainable_params"] == sum(t.numel() for t in tensors.values())
    assert summary["trainable_params"] < 0.02 * summary["total_params"]
    base, trained = load_model(tmp_path / "base"), load_model(out / "model")
    assert torch.equal(trained.blocks[0].mlp.up.weight, base.blocks[0].mlp.up.weight)  # frozen
    assert torch.equal(trained.pooler.weight, base.pooler.weight)
    assert not torch.equal(trained.blocks[0].attn.q_proj.weight, base.blocks[0].attn.q_proj.weight)  # merged in
    on_base = load_adapter(base.with_head("qa"), out / "adapter").eval()
    ids = torch.tensor([tok.encode_for_encoder(["Who says hello?"], ["HAMLET. hello there"])[0].ids])
    with torch.no_grad():
        torch.testing.assert_close(on_base(ids).logits, trained(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow  # (about 90 s on 2 cores)
def test_extractive_qa_learns(tmp_path):
    """Fine-tuning MiniLM on Shakespeare QA raises exact match and F1 on held-out plays far above the same model
    with its untrained span head."""
    from lmforge.config import FinetuneConfig
    from lmforge.predict import answer
    from lmforge.tune.qa import finetune_qa

    s = shakespeare_qa(n_per_play=8, context_speeches=4)  # 184 / 32 / 48 questions on passages of ~180 tokens
    test = s["test"]
    write_squad(s["train"], tmp_path / "train.json")
    write_squad(s["dev"], tmp_path / "dev.json")
    write_squad(test, tmp_path / "test.json")
    torch.manual_seed(0)
    model, tok = load_pretrained("all-minilm-l6-v2")
    before = squad_scores(
        answer(model.with_head("qa").eval(), tok, test, 128, 32), [[t for t, _ in e.answers] for e in test]
    )
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=1e-4, max_len=128, metric="f1", ckpt_every=0)
    res = finetune_qa(
        "all-minilm-l6-v2",
        tmp_path / "train.json",
        tmp_path / "run",
        cfg,
        val_data=tmp_path / "dev.json",
        test_data=tmp_path / "test.json",
        stride=32,
        progress=False,
    )
    assert res.test["f1"] > before["f1"] + 20 and res.test["exact_match"] > before["exact_match"] + 10, (
        before,
        res.test,
    )
