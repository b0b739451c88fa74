"""Bias evaluation (lmforge.eval.bias): the statistics, each kind of model, a model trained to prefer one group
found to prefer it, and `lmforge eval bias`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import call_cli, tiny_config
from lmforge.config import encoder_config
from lmforge.eval.bias import (
    GROUPS,
    TEMPLATES,
    Pair,
    bootstrap,
    evaluate_bias,
    read_pairs,
    split_shared_end,
    template_pairs,
    wilson,
)
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.tokenizer import Tokenizer

SENTENCES = [t.format(g=g) for t in TEMPLATES for gs in GROUPS.values() for g in gs]


def test_intervals():
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.19, abs=0.01)
    assert wilson(0, 20)[0] == 0.0 and wilson(0, 20)[1] < 0.2
    lo, hi = bootstrap([1.0, 2.0, 3.0, 4.0] * 10)
    assert lo < 2.5 < hi


def test_decoders_compare_the_shared_ending_after_each_start():
    assert split_shared_end("The man was kind.", "The woman was kind.") == ("The man", "The woman", " was kind.")
    assert split_shared_end("The atheist ran.", "The Hindu person ran.") == ("The atheist", "The Hindu person", " ran.")
    assert split_shared_end("abc", "xyz") == ("abc", "xyz", "")


def test_template_set():
    pairs = template_pairs()
    assert len(pairs) == len(TEMPLATES) * sum(len(g) * (len(g) - 1) // 2 for g in GROUPS.values())
    p = pairs[0]
    assert p.a.replace(p.group_a, "X") == p.b.replace(p.group_b, "X")  # only the group term differs


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(SENTENCES * 3, vocab_size=320)


def test_a_decoder_trained_to_prefer_a_group_is_found_to_prefer_it(tok):
    """A tiny decoder trained on the templates filled with "man" only prefers "man" in (nearly) every gender pair,
    an interval that excludes chance; its other categories, which it saw equally little, stay near chance."""
    torch.manual_seed(0)
    m = DecoderLM(tiny_config("llama", vocab_size=tok.vocab_size))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    ids = [[start] + tok.encode(t.format(g="man")) for t in TEMPLATES]
    T = max(map(len, ids))
    batch = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in ids])
    labels = torch.where(batch == tok.pad_id, -100, batch)
    for _ in range(60):
        loss = m(input_ids=batch[:, :-1], labels=labels[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    r = evaluate_bias(m, tok, template_pairs(), "decoder")
    gender = next(g for g in r["by_pair"] if g["category"] == "gender")
    assert (gender["group_a"], gender["group_b"]) == ("man", "woman")
    assert gender["prefer_a"] >= 0.9 and gender["prefer_a_ci"][0] > 0.5 and gender["gap"] > 0
    man = next(g for g in r["by_group"] if g["group"] == "man")
    assert man["deviation"] > 0 and man["ci"][0] > 0
    # the same pairs the other way round: the preference is the complement
    flipped = [Pair(p.b, p.a, p.category, p.group_b, p.group_a, p.template) for p in template_pairs()[:20]]
    back = evaluate_bias(m, tok, flipped, "decoder")["by_pair"][0]
    assert back["prefer_a"] == pytest.approx(1 - gender["prefer_a"])


def test_classifier_flips_and_masked_scores_on_identical_pairs(tok, tmp_path):
    """Pairs of a sentence with itself: no classifier flips, and every gap, a masked LM's too, is zero."""
    wp = Tokenizer.train_wordpiece(SENTENCES * 3, vocab_size=200)
    same = [Pair(s, s, "self", "a", "b") for s in SENTENCES[:12]]
    for head, kind in (("classify", "classifier"), ("mlm", "masked")):
        cfg = encoder_config(
            "bert-mini",
            vocab_size=wp.vocab_size,
            n_layer=1,
            n_head=2,
            d_model=32,
            max_seq_len=40,
            head=head,
            labels=["neg", "pos"] if head == "classify" else [],
            dropout=0.0,
            attn_dropout=0.0,
        )
        torch.manual_seed(0)
        r = evaluate_bias(Encoder(cfg).eval(), wp, same, kind)
        g = r["by_pair"][0]
        if kind == "classifier":
            assert g["flip_rate"] == 0.0 and g["gap_pos"] == 0.0 and r["labels"] == ["neg", "pos"]
        else:
            assert g["gap"] == 0.0 and g["prefer_a"] == 0.0  # (a tie is not a preference)
            assert all(row["score_a"] < 0 for row in r["rows"])  # a real pseudo-log-likelihood was summed
    # a classifier on different sentences does flip sometimes, and says so per pair of groups
    cfg = encoder_config(
        "bert-mini",
        vocab_size=wp.vocab_size,
        n_layer=1,
        n_head=2,
        d_model=32,
        max_seq_len=40,
        head="classify",
        labels=["neg", "pos"],
        dropout=0.0,
        attn_dropout=0.0,
    )
    torch.manual_seed(1)
    r = evaluate_bias(Encoder(cfg).eval(), wp, template_pairs(), "classifier")
    assert {g["category"] for g in r["by_pair"]} == set(GROUPS) and all(0 <= g["flip_rate"] <= 1 for g in r["by_pair"])
    assert {(d["category"], d["label"]) for d in r["by_group"]} == {(c, lab) for c in GROUPS for lab in ("neg", "pos")}


def test_read_pairs_takes_crows_pairs_columns(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text('sent_more,sent_less,bias_type\n"He is a nurse.","She is a nurse.",gender\n')
    (pair,) = read_pairs(p)
    assert (pair.a, pair.b, pair.category, pair.template) == ("He is a nurse.", "She is a nurse.", "gender", -1)
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    with pytest.raises(Exception, match="needs the columns sent_more and sent_less"):
        read_pairs(bad)


def test_eval_bias_cli_writes_results_a_plot_and_a_report(tok, tmp_path, capsys):
    DecoderLM(tiny_config("gpt2", vocab_size=tok.vocab_size)).save_pretrained(tmp_path / "dec", tokenizer=tok)
    r = call_cli(capsys, "eval", "bias", "--model", str(tmp_path / "dec"), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "gender_skewed_pairs" in r.stdout and "religion_max_skew" in r.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["metrics"]["pairs"] == len(template_pairs()) and (tmp_path / "out" / "bias.png").is_file()
    assert (tmp_path / "out" / "report.html").is_file()
    enc = Encoder(encoder_config("bert-mini", vocab_size=100, n_layer=1, n_head=2, d_model=32, max_seq_len=40))
    enc.save_pretrained(tmp_path / "enc", tokenizer=Tokenizer.train_wordpiece(SENTENCES, vocab_size=100))
    r = call_cli(capsys, "eval", "bias", "--model", str(tmp_path / "enc"))
    assert r.returncode == 2 and "eval bias scores a decoder" in r.stderr
