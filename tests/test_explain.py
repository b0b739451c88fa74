"""lmforge.explain: attention maps against the formula (decoders, encoders, and an encoder-decoder's three kinds),
integrated gradients' completeness on tiny random models and the real MiniLM body, gradient x input against a
direct gradient, the files `explain` writes, and the one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from conftest import tiny_config
from lmforge.assets import model_file
from lmforge.config import encoder_config, seq2seq_config
from lmforge.errors import LmforgeError
from lmforge.explain import attention_maps, explain, saliency, seq2seq_attention_maps
from lmforge.interop import load_pretrained
from lmforge.models import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.tokenizer import Tokenizer

TEXT = "The flight was delayed for three hours and nobody told us why."
CORPUS = [
    "The flight was delayed for three hours.",
    "Nobody told us why the gate had changed.",
    "We waited at the airport, tired and hungry.",
    "The crew was friendly and the seats were fine.",
] * 3


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    return Tokenizer.from_file(model_file("all-minilm-l6-v2"))


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def classifier(wordpiece) -> Encoder:
    """A tiny random BERT classifier on MiniLM's vocabulary; a wide init so the output depends on the input."""
    torch.manual_seed(0)
    cfg = encoder_config(
        "bert-mini",
        vocab_size=wordpiece.vocab_size,
        n_layer=2,
        n_head=4,
        d_model=32,
        max_seq_len=40,
        head="classify",
        labels=["neg", "neu", "pos"],
        dropout=0.0,
        attn_dropout=0.0,
        init_std=0.2,
    )
    return Encoder(cfg).eval()


@pytest.fixture(scope="module")
def decoder(bpe) -> DecoderLM:
    """A tiny random Llama (grouped-query attention: 4 query heads share 2 K/V heads)."""
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=bpe.vocab_size, init_std=0.1)
    assert cfg.n_kv_head < cfg.n_head
    return DecoderLM(cfg).eval()


@pytest.fixture(scope="module")
def t5():
    """A tiny random T5 with a Unigram vocabulary, its EOS logit pinned to 0 so greedy decoding writes tokens."""
    tok = Tokenizer.train_unigram(CORPUS, vocab_size=120, extra_ids=4)
    torch.manual_seed(0)
    model = Seq2SeqLM(
        seq2seq_config(
            "t5-tiny", vocab_size=tok.vocab_size, dropout=0.0, max_seq_len=40, n_decoder_layer=3, tie_embeddings=False
        )
    ).eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = 0
    return model, tok


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 body under a fresh (random) classification head."""
    model, tok = load_pretrained("all-minilm-l6-v2")
    torch.manual_seed(0)
    return model.with_head("classify", labels=["negative", "neutral", "positive"]).eval(), tok


def _models(name, request):
    if name == "minilm":
        return request.getfixturevalue("minilm")
    if name == "classifier":
        return request.getfixturevalue("classifier"), request.getfixturevalue("wordpiece")
    return request.getfixturevalue("decoder"), request.getfixturevalue("bpe")


# --------------------------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("name", ["classifier", "decoder"])
def test_attention_rows_are_distributions(name, request):
    model, tok = _models(name, request)
    maps = attention_maps(model, tok, TEXT)
    L, H, T = model.config.n_layer, model.config.n_head, len(maps.tokens)
    assert maps.weights.shape == (L, H, T, T) and maps.weights.dtype == torch.float32
    assert torch.allclose(maps.weights.sum(-1), torch.ones(L, H, T), atol=1e-5)
    assert (maps.weights >= 0).all()
    if name == "decoder":
        assert maps.weights.triu(1).abs().max() == 0  # causal: no query reads a later key
        assert "".join(maps.tokens) == TEXT
    else:
        assert maps.tokens[0] == "[CLS]" and maps.tokens[-1] == "[SEP]" and "flight" in maps.tokens
        assert maps.weights.triu(1).abs().max() > 0.01  # an encoder reads both ways
    assert all(b.attn.record is None for b in model.blocks)  # recording switched off again


def test_attention_matches_the_formula(classifier, wordpiece):
    """Layer 0 of the encoder by hand: softmax(q k^T / sqrt(d)) over the embedded input."""
    maps = attention_maps(classifier, wordpiece, TEXT)
    ids = torch.tensor([wordpiece.encode_for_encoder([TEXT])[0].ids])
    m, T = classifier, ids.size(1)
    with torch.no_grad():
        h = m.emb_norm(m.tok_emb(ids) + m.pos_emb(torch.arange(T))[None] + m.type_emb(torch.zeros_like(ids)))
        a = m.blocks[0].attn
        q = a.q_proj(h).view(1, T, a.n_head, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(1, T, a.n_head, a.head_dim).transpose(1, 2)
        ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(a.head_dim), -1)[0]
    assert torch.allclose(maps.weights[0], ref, atol=1e-5)


def test_seq2seq_attention_has_three_kinds_that_match_the_formula(t5):
    model, tok = t5
    source, target = "The flight was delayed.", "Nobody told us why."
    maps = seq2seq_attention_maps(model, tok, source, target)
    enc, dec, cross = maps.encoder, maps.decoder, maps.cross
    S, T = len(enc.tokens), len(dec.tokens)
    assert enc.tokens[-1] == "</s>" and enc.special[-1] and "".join(enc.tokens[:-1]).strip() == source
    assert dec.tokens[0] == "<pad>" and dec.special[0] and "".join(dec.tokens[1:]).strip() == target
    assert enc.weights.shape == (2, 4, S, S) and dec.weights.shape == (3, 4, T, T)
    assert cross.weights.shape == (3, 4, T, S) and cross.tokens == dec.tokens and cross.keys == enc.tokens
    for m in (enc, dec, cross):  # every row a distribution
        assert torch.allclose(m.weights.sum(-1), torch.ones(m.weights.shape[:-1]), atol=1e-5)
    assert dec.weights.triu(1).abs().max() == 0 and enc.weights.triu(1).abs().max() > 0.01
    assert not maps.generated and maps.target == target

    # cross-attention of decoder block 0 by hand: softmax(q k^T) (T5 scales in the init) from the block's own
    # normalised input and the encoder output
    seen = {}
    handle = model.decoder.blocks[0].cross_attn.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    ids = torch.tensor([tok.encode(source) + [model.config.eos_token_id]])
    dec_ids = torch.tensor([[model.config.decoder_start_token_id] + tok.encode(target)])
    try:
        with torch.no_grad():
            model(ids, decoder_input_ids=dec_ids)
    finally:
        handle.remove()
    a = model.decoder.blocks[0].cross_attn
    with torch.no_grad():
        h = model.encode(ids)
        q = a.q_proj(seen["x"]).view(1, T, a.n_head, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(1, S, a.n_head, a.head_dim).transpose(1, 2)
        ref = torch.softmax(q @ k.transpose(-1, -2), -1)[0]
    assert torch.allclose(cross.weights[0], ref, atol=1e-5)
    assert all(b.attn.record is None and b.cross_attn.record is None for b in model.decoder.blocks)


def test_seq2seq_attention_defaults_to_the_greedy_output(t5):
    from lmforge.generate.seq2seq import Seq2SeqParams, generate_seq2seq

    model, tok = t5
    maps = seq2seq_attention_maps(model, tok, "We waited at the airport.", max_new_tokens=6)
    greedy = generate_seq2seq(model, tok, ["We waited at the airport."], Seq2SeqParams(max_new_tokens=6))[0]
    assert maps.generated and maps.target == greedy and greedy
    assert maps.cross.weights.shape[2] == len(maps.decoder.tokens) == 7  # the start token + 6 generated


# --------------------------------------------------------------------------------------------------------------
# saliency


@pytest.mark.parametrize("name", ["classifier", "decoder", "minilm"])
def test_integrated_gradients_complete_at_default_steps(name, request):
    """sum of scores = f(input) - f(baseline) within 2%, with the 50 default nodes alone (no refinement)."""
    model, tok = _models(name, request)
    s = saliency(model, tok, TEXT, max_steps=50)
    assert s.steps == s.steps_used == 50
    assert abs(s.delta) > 1e-3  # a real difference to account for
    assert s.relative_gap <= 0.02, (s.delta, float(s.scores.sum()))
    assert s.scores.shape == (len(s.tokens),) and s.scores.abs().max() > 0
    # special tokens keep their embedding in the baseline, so they carry nothing
    assert all(float(v) == 0 for v, sp in zip(s.scores, s.special) if sp)
    assert s.special == (
        [True] + [False] * (len(s.tokens) - 2) + [True] if name != "decoder" else [False] * len(s.tokens)
    )


def test_refinement_rescues_too_few_steps(minilm):
    model, tok = minilm
    coarse = saliency(model, tok, TEXT, steps=5, max_steps=5)
    refined = saliency(model, tok, TEXT, steps=5)
    assert coarse.relative_gap > 0.02  # 5 nodes are not enough on this path ...
    assert refined.relative_gap <= 0.01 and 5 < refined.steps_used <= 80  # ... and the refinement finds where


@pytest.mark.parametrize("name", ["classifier", "decoder"])
def test_grad_x_input_is_gradient_times_embedding(name, request):
    model, tok = _models(name, request)
    s = saliency(model, tok, TEXT, method="grad_x_input", target=1)
    # the same gradient the plain way: keep the token embeddings' grad and backpropagate log p(target)
    ids = torch.tensor([s.ids])
    kept = {}

    def keep(_m, _i, out):
        out.retain_grad()
        kept["emb"] = out

    handle = model.tok_emb.register_forward_hook(keep)
    try:
        out = model(ids).logits
        logits = out[0] if name == "classifier" else out[0, -1]
        torch.log_softmax(logits, -1)[1].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    emb = kept["emb"]
    expected = (emb.grad[0] * emb[0]).sum(-1).detach()
    assert torch.allclose(s.scores, expected, atol=1e-6, rtol=1e-4)
    assert s.target_id == 1 and s.steps is None and s.f_input == pytest.approx(math.log(s.prob))


def test_targets_by_name_index_and_token(classifier, wordpiece, decoder, bpe):
    a = saliency(classifier, wordpiece, TEXT, target="pos", method="grad_x_input")
    b = saliency(classifier, wordpiece, TEXT, target=2, method="grad_x_input")
    assert a.target == b.target == "pos" and torch.equal(a.scores, b.scores)
    default = saliency(classifier, wordpiece, TEXT, method="grad_x_input")
    assert default.target == default.predicted
    tid = bpe.vocab_size - 1  # the last merge: a multi-character token
    piece = bpe.decode([tid])
    assert len(piece) > 1 and bpe.encode(piece) == [tid]
    by_text = saliency(decoder, bpe, "The", target=piece, method="grad_x_input")
    by_entry = saliency(decoder, bpe, "The", target=bpe.id_to_token(tid), method="grad_x_input")
    by_id = saliency(decoder, bpe, "The", target=f"id:{tid}", method="grad_x_input")
    assert by_text.target_id == by_entry.target_id == by_id.target_id == tid and by_text.target == piece


# --------------------------------------------------------------------------------------------------------------
# files


def _png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def test_explain_writes_pictures_and_pages(classifier, wordpiece, decoder, bpe, tmp_path):
    classifier.save_pretrained(tmp_path / "cls", tokenizer=wordpiece)
    r = explain(str(tmp_path / "cls"), TEXT, tmp_path / "out", layer=-1)
    files = r["files"]
    assert set(files) == {"attention_png", "attention_html", "saliency_png", "saliency_html", "summary"}
    assert _png(files["attention_png"]) and _png(files["saliency_png"])
    page = open(files["saliency_html"], encoding="utf-8").read()
    assert all(f">{w}<" in page for w in ("flight", "delayed", "nobody"))  # tokens as coloured spans
    assert "<script src" not in page and "://" not in page  # self-contained
    att = open(files["attention_html"], encoding="utf-8").read()
    assert '"flight"' in att and '"[CLS]"' in att and "<select" in att and "://" not in att
    s = r["saliency"]
    assert r["kind"] == "classifier" and s["predicted"] in ("neg", "neu", "pos") and s["completeness_gap"] <= 0.02
    assert len(s["top_tokens"]) == 5 and s["top_tokens"][0][1] >= s["top_tokens"][-1][1]

    decoder.save_pretrained(tmp_path / "dec", tokenizer=bpe)
    r = explain(str(tmp_path / "dec"), "The flight was", tmp_path / "dec_out", method="grad_x_input")
    assert r["kind"] == "decoder" and r["saliency"]["completeness_gap"] is None
    assert " was</span>" in open(r["files"]["saliency_html"], encoding="utf-8").read()


def test_explain_attention_only_for_an_encoder_without_head(wordpiece, tmp_path):
    torch.manual_seed(0)
    body = Encoder(
        encoder_config("bert-mini", vocab_size=wordpiece.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=40)
    ).eval()
    body.save_pretrained(tmp_path / "body", tokenizer=wordpiece)
    r = explain(str(tmp_path / "body"), "great game!", tmp_path / "out")
    assert set(r["files"]) == {"attention_png", "attention_html", "summary"}
    assert "saliency" not in r and "classification head" in r["notes"][0]
    with pytest.raises(LmforgeError, match="classification head"):
        explain(str(tmp_path / "body"), "great game!", tmp_path / "out2", what="saliency")


def test_explain_cli_draws_an_encoder_decoder(t5, tmp_path, capsys):
    from lmforge.cli import main

    model, tok = t5
    model.save_pretrained(tmp_path / "t5", tokenizer=tok)
    out = tmp_path / "out"
    assert (
        main(
            [
                "explain",
                "--model",
                str(tmp_path / "t5"),
                "--text",
                "The crew was friendly.",
                "--target",
                "The seats were fine.",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "note: saliency skipped" in printed and "target: 'The seats were fine.'" in printed
    r = json.loads((out / "explain.json").read_text())
    assert r["kind"] == "seq2seq" and r["target"] == "The seats were fine." and not r["generated"]
    for part in ("encoder", "decoder", "cross"):
        assert _png(out / f"attention_{part}.png")
        page = (out / f"attention_{part}.html").read_text(encoding="utf-8")
        assert "<select" in page and "://" not in page
    cross = (out / "attention_cross.html").read_text(encoding="utf-8")
    assert '"keys": ["' in cross and '"\\u003c/s>"' in cross and "cross-attention" in cross  # (< escaped)
    assert set(r["files"]) == {
        f"attention_{p}_{x}" for p in ("encoder", "decoder", "cross") for x in ("png", "html")
    } | {"summary"}
    code = main(
        [
            "explain",
            "--model",
            str(tmp_path / "t5"),
            "--text",
            "The crew.",
            "--what",
            "saliency",
            "--out",
            str(tmp_path / "sal"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not encoder-decoders (T5); use --what attention" in err
    assert not (tmp_path / "sal").exists()


def test_attention_page_switches_heads_in_a_browser(classifier, wordpiece, t5, tmp_path):
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from lmforge.explain import attention_html

    maps = attention_maps(classifier, wordpiece, "great game!")
    cross = seq2seq_attention_maps(*t5, "The flight was delayed.", "Nobody told us.").cross  # not square
    pages = [(attention_html(maps, tmp_path / "a.html"), maps), (attention_html(cross, tmp_path / "c.html"), cross)]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        shown = []
        for page_file, m in pages:
            page.goto(page_file.resolve().as_uri())
            assert page.eval_on_selector_all("td.c", "cs => cs.length") == len(m.tokens) * len(m.keys)
            page.select_option("#layer", "1")
            page.select_option("#head", "3")
            shown.append(page.eval_on_selector_all("td.c", "cs => cs.map(c => +c.dataset.w)"))
        browser.close()
    assert not errors
    for values, (_, m) in zip(shown, pages):
        assert torch.allclose(torch.tensor(values).view(len(m.tokens), len(m.keys)), m.weights[1, 3], atol=0.01)


# --------------------------------------------------------------------------------------------------------------
# errors


def test_bad_inputs_are_one_line_errors(classifier, wordpiece, decoder, bpe, tmp_path):
    cases = [
        (lambda: attention_maps(classifier, wordpiece, "word " * 60), r"62 tokens .* at most 40"),
        (lambda: saliency(decoder, bpe, "the flight " * 40), r"\d+ tokens .* at most 64"),
        (lambda: saliency(classifier, wordpiece, TEXT, method="lime"), "unknown saliency method 'lime'"),
        (lambda: saliency(classifier, wordpiece, TEXT, steps=0), "steps must be .* at least 1"),
        (lambda: saliency(classifier, wordpiece, TEXT, target="happy"), "unknown target class 'happy'.*neg, neu"),
        (lambda: saliency(classifier, wordpiece, TEXT, target=3), "unknown target class 3"),
        (lambda: saliency(decoder, bpe, TEXT, target="flight delayed"), r"is \d+ tokens, not one"),
        (lambda: saliency(decoder, bpe, TEXT, target=10**6), "outside the vocabulary"),
        (lambda: saliency(decoder, bpe, "   "), "empty"),
        (lambda: explain("all-minilm-l6-v2", TEXT, tmp_path, method="shap"), "unknown saliency method"),
        (lambda: explain("all-minilm-l6-v2", TEXT, tmp_path, steps=0), "steps must be"),
        (lambda: explain("all-minilm-l6-v2", TEXT, tmp_path, what="everything"), "unknown explanation"),
    ]
    for call, pattern in cases:
        with pytest.raises(LmforgeError, match=pattern) as e:
            call()
        assert "\n" not in str(e.value)
    classifier.save_pretrained(tmp_path / "cls", tokenizer=wordpiece)
    with pytest.raises(LmforgeError, match=r"layer 2 is out of range: the model has 2 layers"):
        explain(str(tmp_path / "cls"), TEXT, tmp_path / "o", layer=2)
    assert not (tmp_path / "o").exists()  # nothing written for a refused request


@pytest.fixture(scope="module")
def classifier_dir(classifier, wordpiece, tmp_path_factory):
    d = tmp_path_factory.mktemp("explain") / "cls"
    classifier.save_pretrained(d, tokenizer=wordpiece)
    return d


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", "word " * 60], r"the text is 62 tokens but the model reads at most 40; shorten the text"),
        (["--text", TEXT, "--method", "lime"], r"unknown saliency method 'lime'; use one of ig, grad_x_input"),
        (["--text", TEXT, "--model", "no/such/model"], r"model path no/such/model does not exist"),
        (["--text", TEXT, "--target", "happy"], r"unknown target class 'happy'"),
        (["--text", "   "], r"the text to explain is empty"),
    ],
    ids=["too-long", "unknown-method", "missing-model", "unknown-target", "empty"],
)
def test_explain_cli_bad_input_is_one_line_exit_2(classifier_dir, tmp_path, capsys, args, message):
    from lmforge.cli import main

    code = main(["explain", "--model", str(classifier_dir), "--out", str(tmp_path / "out"), *args])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count("\n") == 1 and captured.err.startswith("lmforge: error: ")
    assert re.search(message, captured.err), captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "out").exists()  # nothing half-written
