"""The encoder-decoder family (T5): parity with transformers both ways, cached decoding, beam search equal to
transformers' generate, and training on a toy task."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import seq2seq_config
from lmforge.errors import ModelLoadError
from lmforge.generate.seq2seq import Seq2SeqParams, ban_repeated_ngrams, generate_seq2seq_ids
from lmforge.interop import load_model
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.nn.attention import relative_position_bucket

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SHAPES = [
    dict(mlp="relu", tie_embeddings=True),
    dict(mlp="geglu", tie_embeddings=False),
    dict(mlp="gelu_tanh", tie_embeddings=True, n_decoder_layer=3),
]


def tiny(seed: int = 0, **kw) -> Seq2SeqLM:
    torch.manual_seed(seed)
    return Seq2SeqLM(seq2seq_config("t5-tiny", dropout=0.0, **kw)).eval()


def batch(vocab: int = 512, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 33:] = 0
    labels = torch.randint(3, vocab, (3, 30), generator=g)
    labels[1, 20:] = -100
    return ids, mask, labels


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s["mlp"])
def test_logits_match_transformers_both_ways(tmp_path, shape):
    ours = tiny(**shape)
    ours.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["architectures"] == ["T5ForConditionalGeneration"]
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        a = ours(ids, mask, labels=labels)
        b = hf(input_ids=ids, attention_mask=mask, labels=labels)
    real = labels != -100
    assert (a.logits - b.logits)[real].abs().max() < 1e-5
    assert abs(a.loss.item() - b.loss.item()) < 1e-5

    # the reverse: a directory transformers wrote (its own config keys) loads into lmforge
    hf.save_pretrained(tmp_path / "theirs")
    back = load_model(tmp_path / "theirs")
    assert isinstance(back, Seq2SeqLM) and back.config.tie_embeddings == shape["tie_embeddings"]
    with torch.no_grad():
        c = back(ids, mask, labels=labels)
    assert (c.logits - b.logits)[real].abs().max() < 1e-5


def test_cached_decoding_equals_full_forward():
    m = tiny(mlp="geglu", tie_embeddings=False)
    ids, mask, labels = batch()
    dec = m.shift_right(labels.clamp(min=0))
    with torch.no_grad():
        full = m(ids, mask, decoder_input_ids=dec).logits
        enc = m.encode(ids, mask)
        cache = m.new_cache(enc, mask, dec.size(1))
        steps = [m.head(m.decode(dec[:, :5], cache=cache))]  # a prefix at once, then one token at a time
        for t in range(5, dec.size(1)):
            steps.append(m.head(m.decode(dec[:, t : t + 1], cache=cache)))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_relative_buckets_cover_near_and_far():
    rel = torch.arange(-200, 201)
    enc = relative_position_bucket(rel, True, 32, 128)
    dec = relative_position_bucket(rel, False, 32, 128)
    assert enc.min() == 0 and enc.max() == 31
    assert len(set(enc[200 - 7 : 200 + 8].tolist())) == 15  # small distances each get their own bucket
    assert enc[0] == enc[50]  # far ones (beyond max_distance) share the last bucket of their side
    assert dec[200:].eq(0).all()  # the decoder never sees keys after the query: one bucket for all of them
    assert dec[0] == 31


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=4),
        dict(num_beams=4, length_penalty=0.6),
        dict(num_beams=4, no_repeat_ngram_size=2),
        dict(num_beams=3, early_stopping=True, num_return_sequences=2),
        dict(num_beams=4, length_penalty=2.0, early_stopping="never"),
        dict(num_beams=1),
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_beam_search_equals_transformers_generate(tmp_path, kw):
    ended, total = 0, 0
    for seed, shape in enumerate(SHAPES[:2]):
        m = tiny(seed, vocab_size=64, **shape)
        with torch.no_grad():  # make EOS likely enough that hypotheses finish before the limit
            m.lm_head.weight[1] += 0.4
        m.save_pretrained(tmp_path / str(seed))
        hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / str(seed)).eval()
        ids, mask, _ = batch(64, seed)
        ids, mask = ids[:, :14], mask[:, :14]
        ours = generate_seq2seq_ids(m, ids, mask, Seq2SeqParams(max_new_tokens=15, **kw))
        with torch.no_grad():
            theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=False, **kw)
        for a, b in zip(ours.tolist(), theirs[:, 1:].tolist()):
            assert upto_eos(a) == upto_eos(b)
            ended += 1 in a
            total += 1
    assert 0 < ended  # the comparison covers hypotheses that end with EOS


def upto_eos(row: list[int]) -> list[int]:
    return row[: row.index(1) + 1] if 1 in row else row


def test_no_repeat_ngram_bans_the_completion():
    seqs = torch.tensor([[0, 5, 6, 7, 5]])
    scores = ban_repeated_ngrams(seqs, 5, 2, torch.zeros(1, 10))
    assert scores[0, 6] == float("-inf") and torch.isfinite(scores[0, [0, 5, 7]]).all()


def test_sampling_is_seeded_and_stops_at_eos():
    m = tiny(vocab_size=64)
    ids, mask, _ = batch(64)
    p = Seq2SeqParams(max_new_tokens=12, temperature=1.0, top_k=20, seed=3)
    a, b = generate_seq2seq_ids(m, ids, mask, p), generate_seq2seq_ids(m, ids, mask, p)
    assert torch.equal(a, b)
    for row in a.tolist():
        if 1 in row:
            assert all(t == 0 for t in row[row.index(1) + 1 :])


def test_training_fits_a_small_set(tmp_path):
    """Teacher-forced training memorises 16 random (source, target) pairs, and beam search then reproduces the
    targets: the loss, the cross-attention and the cached decoding path all have to work for that."""
    torch.manual_seed(0)
    m = Seq2SeqLM(seq2seq_config("t5-tiny", vocab_size=32, dropout=0.0)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 32, (16, 8), generator=g)
    y = torch.cat([torch.randint(3, 32, (16, 6), generator=g), torch.ones(16, 1, dtype=torch.long)], 1)
    first = None
    for _ in range(200):
        loss = m(x, labels=y).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05 * first
    out = generate_seq2seq_ids(m.eval(), x, None, Seq2SeqParams(max_new_tokens=8, num_beams=2))
    assert (out[:, :7] == y).float().mean().item() > 0.95


def test_unsupported_feed_forward_is_a_clear_error(tmp_path):
    tiny().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["feed_forward_proj"] = "gated-silu"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="feed_forward_proj 'gated-silu' is not supported"):
        load_model(tmp_path / "m")


def test_lora_adapter_loads_in_peft_on_t5(tmp_path):
    """LoRA on self- and cross-attention of a T5: the adapter is PEFT's layout, PEFT applies it to
    transformers' T5 with the same logits, and lmforge reads it back."""
    peft = pytest.importorskip("peft")
    from lmforge.interop.peft import load_adapter, save_adapter
    from lmforge.nn.lora import apply_lora, lora_modules

    m = tiny(mlp="geglu", tie_embeddings=False)
    m.save_pretrained(tmp_path / "base")
    apply_lora(m, "attn", r=4, alpha=8, dropout=0.0)
    assert any(".cross_attn." in n for n in lora_modules(m))
    torch.manual_seed(1)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            mod.lora_B.normal_(0, 0.05)
    save_adapter(m, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM"
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        ours = m(ids, mask, labels=labels).logits
        theirs = pm(input_ids=ids, attention_mask=mask, labels=labels).logits
        assert (ours - theirs).abs().max() < 1e-4
        fresh = load_model(tmp_path / "base")
        load_adapter(fresh, tmp_path / "adapter")
        assert (fresh(ids, mask, labels=labels).logits - ours).abs().max() < 1e-5
