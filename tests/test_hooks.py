"""Hooks by name (lmforge.explain.hooks) and the logit lens (lmforge.explain.lens): hooks that change nothing leave
the logits bitwise equal in every family, a replaced point changes what follows it, patching the last block's
output from a clean run restores the clean logits exactly, and the last layer's lens is the model's own
next-token distribution."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from lmforge.config import encoder_config, seq2seq_config
from lmforge.errors import LmforgeError
from lmforge.explain.hooks import hook_points, hooks
from lmforge.explain.lens import logit_lens
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.tokenizer import Tokenizer


def _models():
    torch.manual_seed(0)
    return {
        "gpt2": DecoderLM(tiny_config("gpt2")).eval(),
        "llama": DecoderLM(tiny_config("llama")).eval(),
        "encoder": Encoder(encoder_config("bert-mini", n_layer=2, n_head=2, d_model=32, d_ff=64, vocab_size=97)).eval(),
        "t5": Seq2SeqLM(seq2seq_config("t5-tiny", d_model=32, n_head=2, d_ff=64, vocab_size=97)).eval(),
    }


def _run(name, m, ids):
    if name == "t5":
        return m(ids, decoder_input_ids=ids[:, :5]).logits
    return m(ids).logits if name != "encoder" else m(ids).hidden


@pytest.fixture(scope="module")
def cat_lm():
    """A tiny random Llama-style decoder with a BPE of a short text: (model, tokenizer)."""
    text = "the cat sat on the mat and the dog sat on the log " * 4
    tok = Tokenizer.train_bpe([text], vocab_size=280)
    torch.manual_seed(0)
    return DecoderLM(tiny_config("llama", vocab_size=tok.vocab_size)).eval(), tok


@pytest.mark.parametrize("name", ["gpt2", "llama", "encoder", "t5"])
def test_hooks_that_record_everything_change_nothing(name):
    m = _models()[name]
    ids = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        want = _run(name, m, ids)
        with hooks(m) as h:
            h.record("*")
            got = _run(name, m, ids)
            h.replace("*blocks.0.mlp", lambda out: out + 0)  # (an identity replacement)
            again = _run(name, m, ids)
        assert torch.equal(got, want) and torch.equal(again, want)
        assert set(h.cache) == set(h.points) and not m._forward_hooks
        assert all(not b._forward_hooks and not b.mlp._forward_hooks for b in m.modules() if hasattr(b, "mlp"))
    points = hook_points(m)
    if name == "t5":
        assert "encoder.blocks.0.attn" in points and "decoder.blocks.0.cross" in points
        assert "encoder.blocks.0.cross" not in points
    else:
        assert {"blocks.1.resid", "blocks.1.attn", "blocks.1.mlp"} <= set(points)


def test_a_replacement_changes_what_follows_and_patching_restores_the_clean_run():
    m = _models()["llama"]
    clean, corrupt = torch.randint(3, 97, (1, 10)), torch.randint(3, 97, (1, 10))
    with torch.no_grad(), hooks(m) as h:
        h.record("blocks.*.resid")
        want = m(clean).logits
        saved = dict(h.cache)
        h.clear()
        h.replace("blocks.0.mlp", lambda out: out * 0)  # (the first MLP knocked out)
        assert not torch.equal(m(clean).logits, want)
        h.clear()
        h.replace("blocks.1.resid", saved["blocks.1.resid"])  # the last block's output, from the clean run
        assert torch.equal(m(corrupt).logits, want)
    with pytest.raises(LmforgeError, match="no hook point matches"), hooks(m) as h:
        h.record("blocks.9.resid")


def test_the_last_layers_lens_is_the_models_own_distribution(cat_lm):
    m, tok = cat_lm
    lens = logit_lens(m, tok, "the cat sat on the", target=" mat", k=3)
    with torch.no_grad():
        p = torch.softmax(m(torch.tensor([tok.encode("the cat sat on the")])).logits[0], -1)
    top_p, top_i = p.topk(3, -1)
    assert torch.equal(lens.top_ids[-1], top_i)
    torch.testing.assert_close(lens.top_probs[-1], top_p)
    mat = tok.encode(" mat")[0]
    assert lens.target_rank[-1] == int((p[-1] > p[-1, mat]).sum())
    assert len(lens.target_rank) == 2 and len(lens.top_tokens) == 2 and len(lens.tokens) == len(lens.top_tokens[0])
    with pytest.raises(LmforgeError, match="decoder"):
        logit_lens(_models()["encoder"], tok, "the cat")


def test_explain_what_lens_writes_the_pictures_and_refuses_saliency_settings(cat_lm, tmp_path, capsys):
    from conftest import call_cli

    m, tok = cat_lm
    m.save_pretrained(tmp_path / "m", tokenizer=tok)
    r = call_cli(
        capsys,
        "explain",
        "--model",
        str(tmp_path / "m"),
        "--text",
        "the cat sat on the",
        "--what",
        "lens",
        "--target",
        " mat",
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert len(summary["lens"]["target_rank"]) == 2 and len(summary["lens"]["top_next"]) == 2
    assert (tmp_path / "out" / "lens.png").stat().st_size > 1000
    assert "logit lens" in (tmp_path / "out" / "lens.html").read_text()
    r = call_cli(
        capsys,
        "explain",
        "--model",
        str(tmp_path / "m"),
        "--text",
        "the cat",
        "--what",
        "lens",
        "--steps",
        "8",
        "--out",
        str(tmp_path / "out2"),
    )
    assert r.returncode == 2 and "--what lens draws neither" in r.stderr


def test_causal_trace_restores_exactly_where_it_must_and_nothing_before_the_subject(cat_lm):
    from lmforge.explain.trace import causal_trace, subject_positions

    m, tok = cat_lm
    prompt = "the cat sat on the"
    assert subject_positions(tok, prompt, "cat") == [1]
    tr = causal_trace(m, tok, prompt, "cat", target=" mat", noise=3.0, samples=3)
    assert tr.subject == [1] and tr.corrupt_prob != tr.clean_prob
    # the last block's output at the last position decides the answer: restoring it gives the clean probability
    torch.testing.assert_close(float(tr.restored["resid"][-1, -1]), tr.clean_prob)
    # the noise is on the subject: nothing before it differs, so restoring there changes nothing
    torch.testing.assert_close(tr.restored["resid"][:, 0], torch.full((2,), tr.corrupt_prob))
    assert set(tr.restored) == {"resid", "attn", "mlp"} and tr.restored["mlp"].shape == (2, 5)
    still = causal_trace(m, tok, prompt, "cat", target=" mat", noise=0.0, samples=2, kinds=("resid",))
    torch.testing.assert_close(still.corrupt_prob, still.clean_prob)
    with pytest.raises(LmforgeError, match="not in the text"):
        causal_trace(m, tok, prompt, "dog")
