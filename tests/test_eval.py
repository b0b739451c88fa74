"""`lmforge eval`: perplexity and bits per byte (against a direct computation), the multiple-choice harness
(against a direct log-likelihood computation), the packaged chatterbot-mc set, seq2seq metrics, classification
and extractive QA runs, and the reports every evaluation writes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from lmforge.cli import main
from lmforge.config import encoder_config
from lmforge.data.choice import chatterbot_mc
from lmforge.data.qa import QAExample, write_squad
from lmforge.errors import DataError
from lmforge.eval.choice import choice_logprobs, evaluate_choices, read_choices
from lmforge.eval.generation import seq2seq_scores
from lmforge.eval.qa import exact_match, token_f1
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.predict import encode, predict_proba
from lmforge.tokenizer import Tokenizer

TEXT = ["the cat sat on the mat.", "the dog ate the bone.", "a bird sang in the tree."] * 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = Tokenizer.train_bpe(TEXT, vocab_size=300)
    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", vocab_size=tok.vocab_size)).eval()
    d = tmp_path_factory.mktemp("m") / "tiny"
    model.save_pretrained(d, tokenizer=tok)
    return model, tok, d


def _png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_eval_perplexity_writes_results_and_matches_a_direct_computation(tiny, tmp_path, capsys):
    model, tok, d = tiny
    text = "the cat sat on the mat. the dog ate the bone, and a bird sang in the tree."
    ids = tok.encode(text)
    assert 10 < len(ids) <= model.config.max_seq_len  # one window holds it all
    f = tmp_path / "short.txt"
    f.write_text(text, encoding="utf-8")
    assert main(["eval", "perplexity", "--model", str(d), "--data", str(f), "--out", str(tmp_path / "r")]) == 0
    assert "report:" in capsys.readouterr().out
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    m = res["metrics"]
    with torch.no_grad():  # every token after the first, scored by one forward pass over the whole text
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    nats = -sum(float(lp[i, t]) for i, t in enumerate(ids[1:]))
    assert res["task"] == "perplexity" and m["tokens"] == len(ids) - 1 and m["windows"] == 1
    assert m["bytes"] == len(text.encode("utf-8"))
    assert m["bits_per_byte"] == pytest.approx(nats / math.log(2) / m["bytes"], rel=1e-5)
    assert m["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6)
    for name in ("report.md", "report.html", "windows.jsonl"):
        assert (tmp_path / "r" / name).is_file(), name
    assert _png(tmp_path / "r" / "windows.png") and "windows.png" in (tmp_path / "r" / "report.html").read_text()

    # a longer text over several strided windows: the rows account for every scored token and every nat
    long = tmp_path / "long.txt"
    long.write_text(" ".join(TEXT[:12]), encoding="utf-8")
    assert (
        main(
            [
                "eval",
                "perplexity",
                "--model",
                str(d),
                "--data",
                str(long),
                "--window",
                "16",
                "--stride",
                "8",
                "--out",
                str(tmp_path / "r2"),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (tmp_path / "r2" / "windows.jsonl").read_text().splitlines()]
    assert out["windows"] == len(rows) > 3 and out["window"] == 16 and out["stride"] == 8
    assert sum(r["tokens"] for r in rows) == out["tokens"] == len(tok.encode(long.read_text())) - 1
    assert out["bits_per_byte"] == pytest.approx(
        sum(r["loss"] * r["tokens"] for r in rows) / math.log(2) / len(long.read_bytes()), rel=1e-6
    )
    assert out["ppl"] == out["perplexity"] and out["bpb"] == out["bits_per_byte"]  # the older names still work
    md = (tmp_path / "r2" / "report.md").read_text()
    assert "bits_per_byte" in md and "![windows.png](windows.png)" in md


def test_choice_logprobs_equal_a_direct_computation(tiny):
    model, tok, _ = tiny
    ctx, choices = "Question: where did the cat sit?\nAnswer:", [" on the mat", " in the tree now"]
    got = choice_logprobs(model, tok, ctx, choices)
    for c, g in zip(choices, got):
        a, b = tok.encode(ctx), tok.encode(c)
        ids = torch.tensor([a + b])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        expected = sum(float(lp[len(a) - 1 + i, t]) for i, t in enumerate(b))
        assert abs(g - expected) < 1e-4


def test_accuracy_and_length_normalisation(tiny, monkeypatch):
    model, tok, _ = tiny
    rows = [{"question": "q", "choices": ["aa", "bbbbbbbb"], "answer": 1}]
    import lmforge.eval.choice as ch

    # the long choice has the lower total but the higher per-character score
    monkeypatch.setattr(ch, "choice_logprobs", lambda *a, **k: [-4.0, -6.0])
    r = evaluate_choices(model, tok, rows, progress=False)
    assert r["accuracy"] == 0.0 and r["accuracy_norm"] == 1.0 and r["chance"] == 0.5


def test_chatterbot_mc_is_real_and_well_formed():
    rows = chatterbot_mc()
    assert len(rows) > 500
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["answer"] < 4
    assert any(r["question"] == "What is AI?" for r in rows)
    assert rows == chatterbot_mc()  # deterministic
    answers = [r["answer"] for r in rows]
    assert min(answers.count(k) for k in range(4)) > len(rows) / 8  # the right answer is not always first


def test_read_choices_errors(tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text('{"question": "q", "choices": ["a", "b"], "answer": "b"}\n')
    assert read_choices(f)[0]["answer"] == 1
    f.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(DataError, match="mc.jsonl:1: .*at least two"):
        read_choices(f)
    f.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    with pytest.raises(DataError, match="answer"):
        read_choices(f)
    f.write_text("not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        read_choices(f)


def test_seq2seq_scores():
    refs = ["the cat sat on the mat", "a dog ate a bone in the garden"]
    perfect = seq2seq_scores(refs, refs)
    assert perfect["bleu"] == pytest.approx(100) and perfect["rougeL"] == pytest.approx(100)
    partial = seq2seq_scores(["the cat sat", "a dog ate a bone"], refs)
    assert 0 < partial["bleu"] < 100 and 0 < partial["chrf"] < 100 and partial["rouge2"] < partial["rouge1"]


def test_eval_cli_choice_and_seq2seq_write_reports(tiny, tmp_path, capsys):
    _, _, d = tiny
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps(
                {"question": f"what did the {a} do?", "choices": ["sat on the mat", "ate the bone"], "answer": i % 2}
            )
            + "\n"
            for i, a in enumerate(["cat", "dog", "bird"])
        )
    )
    assert main(["eval", "choice", "--model", str(d), "--data", str(mc), "--out", str(tmp_path / "r")]) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    m = res["metrics"]
    assert m["n"] == 3 and m["chance"] == 0.5 and 0 <= m["accuracy"] <= 1
    preds = [json.loads(x) for x in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert m["accuracy"] == sum(p["pick"] == p["answer"] for p in preds) / 3
    assert (tmp_path / "r" / "scores.png").stat().st_size > 1000
    assert "accuracy" in (tmp_path / "r" / "report.html").read_text()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": s, "target": s}) + "\n" for s in TEXT[:3]))
    assert (
        main(
            [
                "eval",
                "seq2seq",
                "--model",
                str(d),
                "--data",
                str(pairs),
                "--max-new-tokens",
                "4",
                "--prompt",
                "Repeat: {source}\n",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"bleu", "chrf", "rouge1", "rouge2", "rougeL"} <= set(out) and out["n"] == 3


SENTENCES = [
    "i love this film",
    "what a lovely day",
    "the weather is fine",
    "this is terrible news",
    "i hate rainy mondays",
    "nothing happened today",
    "the cat sat on the mat",
    "a dog ate the bone",
]


@pytest.fixture(scope="module")
def wordpiece():
    return Tokenizer.train_wordpiece(SENTENCES * 5, vocab_size=200)


def _encoder(wordpiece, **kw) -> Encoder:
    torch.manual_seed(0)
    cfg = encoder_config(
        "bert-mini",
        vocab_size=wordpiece.vocab_size,
        n_layer=2,
        n_head=4,
        d_model=32,
        max_seq_len=64,
        dropout=0.0,
        attn_dropout=0.0,
        init_std=0.2,
        **kw,
    )
    return Encoder(cfg).eval()


def test_eval_cli_classify_writes_metrics_and_confusion_matrix(wordpiece, tmp_path, capsys):
    model = _encoder(wordpiece, head="classify", labels=["neg", "neu", "pos"])
    # a prototype head, so the predictions vary by construction rather than by the luck of a random init:
    # class c's row is the unit pooled vector of one sentence, which then scores its own class highest
    # (Cauchy-Schwarz), so all three classes are predicted at least once
    with torch.no_grad():
        pooled = encode(model, wordpiece, [SENTENCES[3], SENTENCES[2], SENTENCES[0]], what="pooled")
        model.classifier.weight.copy_(torch.nn.functional.normalize(pooled, dim=-1) * 10)
        model.classifier.bias.zero_()
    model.save_pretrained(tmp_path / "cls", tokenizer=wordpiece)
    gold = ["pos", "pos", "neu", "neg", "neg", "neu", "neu", "pos"]
    data = tmp_path / "labelled.csv"
    data.write_text("text,label\n" + "".join(f"{t},{g}\n" for t, g in zip(SENTENCES, gold)))
    out = tmp_path / "r"
    assert main(["eval", "classify", "--model", str(tmp_path / "cls"), "--data", str(data), "--out", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    m = json.loads((out / "results.json").read_text())["metrics"]
    # the predictions are the model's own argmax, and the metrics follow from them
    expected = [["neg", "neu", "pos"][i] for i in predict_proba(model, wordpiece, SENTENCES).argmax(-1).tolist()]
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == expected and [r["label"] for r in rows] == gold
    assert set(expected) == {"neg", "neu", "pos"} and expected[3] == "neg" and expected[0] == "pos"
    assert m["n"] == 8 and m["accuracy"] == pytest.approx(sum(p == g for p, g in zip(expected, gold)) / 8)
    f1s = []
    for c in ("neg", "neu", "pos"):
        tp = sum(p == g == c for p, g in zip(expected, gold))
        n_pred, n_gold = expected.count(c), gold.count(c)
        f1s.append(2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0)
    assert m["macro_f1"] == pytest.approx(sum(f1s) / 3)
    cm = m["confusion"]  # rows: true class, columns: predicted
    assert [sum(row) for row in cm] == [gold.count(c) for c in ("neg", "neu", "pos")]
    assert [sum(col) for col in zip(*cm)] == [expected.count(c) for c in ("neg", "neu", "pos")]
    assert _png(out / "confusion.png")
    page = (out / "report.html").read_text()
    assert "confusion.png" in page and "macro_f1" in page and "accuracy" in (out / "report.md").read_text()


def test_eval_cli_qa_writes_exact_match_and_f1(wordpiece, tmp_path, capsys):
    model = _encoder(wordpiece, head="qa")
    model.save_pretrained(tmp_path / "qa", tokenizer=wordpiece)
    context = "i love this film . what a lovely day . the cat sat on the mat . a dog ate the bone ."
    qs = [
        ("what sat on the mat ?", "the cat"),
        ("what did the dog eat ?", "the bone"),
        ("what kind of day ?", "lovely"),
        ("what do i love ?", "this film"),
    ]
    write_squad(
        [QAExample(str(i), context, q, [(a, context.index(a))]) for i, (q, a) in enumerate(qs)], tmp_path / "qa.json"
    )
    out = tmp_path / "r"
    assert (
        main(
            [
                "eval",
                "qa",
                "--model",
                str(tmp_path / "qa"),
                "--data",
                str(tmp_path / "qa.json"),
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = json.loads((out / "results.json").read_text())["metrics"]
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert m["n"] == len(rows) == 4 and printed["exact_match"] == m["exact_match"]
    assert all(r["prediction"] in context for r in rows)  # extractive: a span of the context
    em = [max(exact_match(r["prediction"], a) for a in r["answers"]) for r in rows]
    f1 = [max(token_f1(r["prediction"], a) for a in r["answers"]) for r in rows]
    assert m["exact_match"] == pytest.approx(100 * sum(em) / 4) and m["f1"] == pytest.approx(100 * sum(f1) / 4)
    assert 0 <= m["exact_match"] <= m["f1"] <= 100
    assert _png(out / "scores.png") and "exact_match" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "classify", "--data", "x.csv"], "needs a classifier"),
        (["eval", "qa", "--data", "x.json"], "extractive QA model"),
        (["eval", "choice", "--data", "missing.jsonl"], "does not exist"),
        (["eval", "choice", "--data", "chatterbot-mc", "--limit", "0"], "--limit must be positive"),
        (["eval", "perplexity", "--data", "missing.txt"], "not found"),
        (["eval", "perplexity", "--data", "shakespeare", "--window", "100"], "need 2 <= window <= 64"),
    ],
)
def test_eval_cli_errors(tiny, capsys, args, message):
    code = main([*args, "--model", str(tiny[2])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
