"""Compression: quantized models (int8, int4, int8-dynamic) saved and reloaded exactly, pruning (magnitude, heads,
neurons) with its shapes and recovery, ensembles of classifiers, and the CLI's before/after tables and errors."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

from conftest import run_cli, tiny_config
from lmforge.compress.measure import size_mb
from lmforge.compress.prune import magnitude_prune, prune_heads, prune_neurons, recover, sparsity_of
from lmforge.config import encoder_config
from lmforge.interop import load_model, load_pretrained
from lmforge.interop.quantized import save_quantized
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.nn.quant import Int4Linear, Int8Embedding, Int8Linear, quantize_model
from lmforge.predict import predict_ensemble, predict_proba
from lmforge.tokenizer import Tokenizer

TEXTS = [
    "the cat sat on the mat",
    "a dog ate the bone",
    "what a lovely day",
    "this is terrible news",
    "i love this film",
    "i hate rainy mondays",
    "the weather is fine",
    "nothing happened today",
] * 4


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(TEXTS * 5, vocab_size=300)


@pytest.fixture(scope="module")
def wordpiece():
    return Tokenizer.train_wordpiece(TEXTS * 5, vocab_size=200)


def _decoder(style: str, **kw) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(tiny_config(style, vocab_size=300, d_model=64, d_ff=128, **kw)).eval()


def _classifier(seed: int = 0, labels=("neg", "pos")) -> Encoder:
    torch.manual_seed(seed)
    cfg = encoder_config(
        "bert-mini",
        vocab_size=200,
        n_layer=2,
        n_head=4,
        d_model=64,
        max_seq_len=40,
        head="classify",
        labels=list(labels),
        dropout=0.0,
        attn_dropout=0.0,
    )
    return Encoder(cfg).eval()


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


# ----------------------------------------------------------------------------------------------------------------
# quantization


@pytest.mark.parametrize("mode", ["int8", "int4", "int8-dynamic"])
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_quantized_decoder_saves_and_reloads_exactly(style, mode, bpe, tmp_path):
    model = _decoder(style)
    with torch.no_grad():
        ref = model(_ids()).logits
    full = size_mb(model)
    quantize_model(model, mode, group_size=32)
    assert isinstance(model.tok_emb, Int8Embedding)
    if model.config.tie_embeddings:  # one int8 matrix serves both
        assert model.lm_head.qweight is model.tok_emb.qweight
    kinds = {type(model.blocks[0].attn.q_proj).__name__}
    assert kinds == {"Int8Linear" if mode == "int8" else "Int4Linear" if mode == "int4" else "Linear"}
    with torch.no_grad():
        got = model(_ids()).logits
    # quantization error is small next to the logits' spread (and not zero: the weights really changed)
    err = (got - ref).abs().max() / ref.std()
    assert 0 < err < (0.5 if mode == "int4" else 0.1), err
    save_quantized(model, tmp_path / "q", bpe)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["mode"] == mode and cfg["quantization_config"]["quant_method"] == "lmforge"
    again, tok = load_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, got)
    assert tok.vocab_size == bpe.vocab_size
    assert size_mb(again) < full * (0.3 if mode == "int4" else 0.35)  # (small models keep fp32 positions, norms)
    stored = (tmp_path / "q" / "model.safetensors").stat().st_size / 2**20
    assert abs(stored - size_mb(again)) < 0.05  # the size reported is what the directory holds


@pytest.mark.parametrize("group", [16, 32])  # 32 runs PyTorch's int4 kernel, 16 (which it refuses) dequantizes
def test_int4_codes_round_trip_and_group_errors(group):
    lin = torch.nn.Linear(64, 64)
    q = Int4Linear.from_linear(lin, group_size=group)
    w = lin.weight.detach()
    # every weight within half a step of its group's grid
    step = q.scales.repeat_interleave(group, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), x @ q.dequantize().T + lin.bias, atol=0.05)
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        assert bool(q._kernel) == (group == 32)
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="does not divide"):
        Int4Linear.from_linear(torch.nn.Linear(48, 8), group_size=32)


def test_quantized_classifier_keeps_its_head(wordpiece, tmp_path):
    model = _classifier()
    ref = predict_proba(model, wordpiece, TEXTS[:8])
    quantize_model(model, "int8")
    assert isinstance(model.tok_emb, Int8Embedding) and isinstance(model.blocks[0].mlp.up, Int8Linear)
    assert type(model.classifier) is torch.nn.Linear  # the task head stays in full precision
    save_quantized(model, tmp_path / "qc", wordpiece)
    again = load_model(tmp_path / "qc")
    got = predict_proba(again, wordpiece, TEXTS[:8])
    assert torch.allclose(got, ref, atol=0.02) and again.config.labels == ["neg", "pos"]


# ----------------------------------------------------------------------------------------------------------------
# pruning


def test_magnitude_pruning_hits_the_sparsity_and_recovery_keeps_zeros(bpe, tmp_path):
    model = _decoder("llama")
    w0 = model.blocks[0].mlp.up.weight.detach().abs().clone()
    masks = magnitude_prune(model, 0.5)
    assert abs(sparsity_of(model) - 0.5) < 0.01
    keep = masks["blocks.0.mlp.up"]
    assert w0[keep].min() >= w0[~keep].max()  # the smallest magnitudes went
    assert torch.equal(model.blocks[0].mlp.up.weight.abs(), w0 * keep)
    (tmp_path / "t.txt").write_text(" ".join(TEXTS * 20))
    losses = recover(model, bpe, str(tmp_path / "t.txt"), steps=5, masks=masks, lr=1e-3, seq_len=16)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert abs(sparsity_of(model) - 0.5) < 0.01  # the zeros stayed zero


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_head_and_neuron_pruning_shrink_and_round_trip(style, bpe, tmp_path):
    model = _decoder(style)
    n_head, n_kv = model.config.n_head, model.config.n_kv_head
    info = prune_heads(model, 0.5)
    assert info["heads_after"] == n_head // 2 and model.config.n_kv_head == n_kv // 2
    assert model.blocks[0].attn.q_proj.out_features == n_head // 2 * model.config.head_dim
    prune_neurons(model, 0.25)
    assert model.blocks[1].mlp.up.out_features == model.config.d_ff == 96
    with torch.no_grad():
        out = model(_ids()).logits
    assert torch.isfinite(out).all()
    model.save_pretrained(tmp_path / "p", tokenizer=bpe)
    again = load_model(tmp_path / "p")
    with torch.no_grad():
        assert torch.allclose(again(_ids()).logits, out, atol=1e-5)


def test_head_pruning_removes_the_weakest_heads():
    model = _decoder("gpt2")
    D = model.config.head_dim
    with torch.no_grad():  # make head 1 of block 0 nearly silent
        model.blocks[0].attn.v_proj.weight[D : 2 * D] *= 1e-3
    q_before = model.blocks[0].attn.q_proj.weight.clone()
    prune_heads(model, 0.25)  # 4 heads -> 3
    kept = model.blocks[0].attn.q_proj.weight
    assert torch.equal(kept[:D], q_before[:D]) and torch.equal(kept[D : 2 * D], q_before[2 * D : 3 * D])


def test_encoder_neuron_and_head_pruning(wordpiece, tmp_path):
    model = _classifier()
    prune_heads(model, 0.5)
    prune_neurons(model, 0.5)
    p = predict_proba(model, wordpiece, TEXTS[:4])
    assert torch.allclose(p.sum(-1), torch.ones(4), atol=1e-5)
    model.save_pretrained(tmp_path / "pe", tokenizer=wordpiece)
    again = load_model(tmp_path / "pe")
    assert again.config.n_head == 2 and again.config.head_dim == 16 and again.config.d_ff == 128
    assert torch.allclose(predict_proba(again, wordpiece, TEXTS[:4]), p, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# ensembles


def test_ensemble_averages_members_with_their_own_label_order(wordpiece):
    a, b = _classifier(0, ("neg", "pos")), _classifier(1, ("pos", "neg"))
    pa, pb = predict_proba(a, wordpiece, TEXTS[:6]), predict_proba(b, wordpiece, TEXTS[:6])
    out = predict_ensemble([(a, wordpiece), (b, wordpiece)], TEXTS[:6])
    for i, r in enumerate(out):
        assert abs(r["probs"]["neg"] - (pa[i, 0] + pb[i, 1]) / 2) < 1e-6
        assert r["label"] == max(r["probs"], key=r["probs"].get) and sum(r["votes"].values()) == 2
    maj = predict_ensemble([(a, wordpiece), (b, wordpiece), (a, wordpiece)], TEXTS[:6], vote="majority")
    for i, r in enumerate(maj):
        assert r["label"] == ["neg", "pos"][int(pa[i].argmax())]  # a votes twice
    c = _classifier(2, ("neg", "neutral"))
    from lmforge.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="share their labels"):
        predict_ensemble([(a, wordpiece), (c, wordpiece)], TEXTS[:2])


# ----------------------------------------------------------------------------------------------------------------
# the CLI


@pytest.fixture(scope="module")
def classifier_dirs(wordpiece, tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    for seed in (0, 1):
        _classifier(seed).save_pretrained(d / f"c{seed}", tokenizer=wordpiece)
    rng = random.Random(0)
    with open(d / "labelled.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for t in TEXTS:
            w.writerow([t, rng.choice(["neg", "pos"])])
    return d


def test_cli_quantize_prune_and_ensemble(classifier_dirs, tmp_path):
    d = classifier_dirs
    r = run_cli(
        "quantize",
        "--model",
        str(d / "c0"),
        "--mode",
        "int8",
        "--out",
        str(tmp_path / "q"),
        "--eval-data",
        str(d / "labelled.csv"),
    )
    assert r.returncode == 0, r.stderr
    assert "size MiB" in r.stdout and "accuracy %" in r.stdout and "sequences/s" in r.stdout
    summary = json.loads((tmp_path / "q" / "compression.json").read_text())
    assert summary["after"]["size_mb"] < summary["before"]["size_mb"] / 2
    r = run_cli(
        "prune",
        "--model",
        str(d / "c0"),
        "--structured",
        "neurons",
        "--fraction",
        "0.5",
        "--recover-steps",
        "2",
        "--recover-data",
        str(d / "labelled.csv"),
        "--out",
        str(tmp_path / "p"),
        "--eval-data",
        str(d / "labelled.csv"),
    )
    assert r.returncode == 0, r.stderr
    assert (
        "recovery: 2 steps" in r.stdout
        and json.loads((tmp_path / "p" / "config.json").read_text())["intermediate_size"] == 128
    )
    r = run_cli("predict", "--model", str(d / "c0"), "--model", str(d / "c1"), "--text", "what a lovely day", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert set(row["votes"]) == {"neg", "pos"} and sum(row["votes"].values()) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--sparsity", "1.5"], "sparsity must be between 0 and 1 (exclusive), got 1.5"),
        (["prune", "--sparsity", "1.0"], "sparsity must be between 0 and 1 (exclusive), got 1.0"),
        (["prune", "--sparsity", "0"], "sparsity must be between 0 and 1 (exclusive), got 0.0"),
        (["prune", "--sparsity", "-0.1"], "sparsity must be between 0 and 1 (exclusive), got -0.1"),
        (
            ["prune", "--structured", "heads", "--fraction", "1.0"],
            "fraction of heads or neurons to prune must be between 0 and 1 (exclusive), got 1.0",
        ),
        (["prune", "--structured", "neurons", "--fraction", "-1"], "between 0 and 1 (exclusive), got -1.0"),
        (["prune", "--structured", "heads"], "--fraction"),
        (["prune"], "either --sparsity"),
        (["quantize", "--mode", "int3"], "int8, int4, int8-dynamic"),
        (["quantize", "--mode", "int4", "--group-size", "7"], "even number"),
        # a mode this model cannot take (not a parse error): groups of 48 do not divide its 64-wide layers
        (
            ["quantize", "--mode", "int4", "--group-size", "48"],
            "int4 group size 48 does not divide the 64 inputs of blocks.0.attn.q_proj; --group-size 64 divides them all",  # noqa: E501
        ),
    ],
)
def test_cli_compress_errors(classifier_dirs, tmp_path, capsys, args, message):
    from lmforge.cli import main  # in-process: the same code path as the console script, without its start-up

    code = main([*args[:1], "--model", str(classifier_dirs / "c0"), *args[1:], "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith("lmforge: error: ") and not (tmp_path / "x").exists()  # nothing written


def test_int4_refusal_leaves_the_model_unchanged():
    """quantize_model checks every layer before it converts any, so a refused mode changes nothing."""
    from lmforge.errors import ConfigError

    model = _decoder("llama")  # d_model 64, d_ff 128: groups of 48 fit neither
    with pytest.raises(ConfigError, match="does not divide the 64 inputs of blocks.0.attn.q_proj; --group-size 64"):
        quantize_model(model, "int4", group_size=48)
    assert type(model.tok_emb) is torch.nn.Embedding and type(model.blocks[0].attn.q_proj) is torch.nn.Linear
    assert not hasattr(model, "quantization")


@pytest.mark.parametrize("mode", ["int8", "int4", "int8-dynamic"])
@pytest.mark.parametrize("tied", [True, False], ids=["t5-v1.0-tied", "t5-v1.1-untied"])
def test_a_quantized_t5_saves_and_loads_with_the_same_logits(mode, tied, tmp_path):
    """Every family quantizes, saves and loads (the family registry picks its config writer and model class):
    a T5 once went to the BERT config writer and came back as a decoder."""
    from lmforge.config import seq2seq_config
    from lmforge.models.seq2seq import Seq2SeqLM

    torch.manual_seed(0)
    model = Seq2SeqLM(seq2seq_config("t5-tiny", dropout=0.0, tie_embeddings=tied)).eval()
    src, tgt = torch.randint(3, 100, (2, 9)), torch.randint(3, 100, (2, 5))
    quantize_model(model, mode, group_size=32)
    with torch.no_grad():
        want = model(input_ids=src, decoder_input_ids=tgt).logits
    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q/config.json").read_text())
    assert cfg["model_type"] == "t5" and cfg["quantization_config"]["family"] == "seq2seq"
    assert json.loads((tmp_path / "q/generation_config.json").read_text())["decoder_start_token_id"] == 0
    back = load_model(tmp_path / "q")
    assert type(back) is Seq2SeqLM and back.quantization["mode"] == mode
    with torch.no_grad():
        got = back(input_ids=src, decoder_input_ids=tgt).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_quantize_auto_and_none_leave_a_full_precision_model_as_it_is(tmp_path):
    """`auto` (the decoding verbs' default) only keeps a file's own 4-bit weights 4-bit: a model stored in full
    precision loads as it is, as with `none`; int4 is asked for by name; an unknown mode is one clear error."""
    from lmforge.errors import ConfigError

    tok = Tokenizer.train_bpe(["hello there, general kenobi"] * 5, vocab_size=300)
    _decoder("llama").save_pretrained(tmp_path / "m", tokenizer=tok)
    for mode in ("auto", "none", None):
        model, _ = load_pretrained(tmp_path / "m", quantize=mode)
        assert {type(m) for m in model.modules()} & {Int4Linear, Int8Linear, Int8Embedding} == set(), mode
        assert getattr(model, "quantization", None) is None
    model, _ = load_pretrained(tmp_path / "m", quantize="int4")
    assert type(model.blocks[0].mlp.up) is Int4Linear and model.quantization["group_size"] == 64
    with pytest.raises(ConfigError, match="quantize 'int3' is not one of: auto, none, int8, int4, int8-dynamic"):
        load_pretrained(tmp_path / "m", quantize="int3")
