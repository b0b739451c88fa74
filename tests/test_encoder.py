"""The encoder family: parity with transformers' BERT on real MiniLM weights and on random configs of every
head, both directions; head swapping; top-k freezing."""

from __future__ import annotations

import pytest
import torch

from lmforge.assets import model_file
from lmforge.config import encoder_config
from lmforge.interop import load_model, load_pretrained
from lmforge.models.encoder import Encoder, mean_pool
from lmforge.predict import embed, pad_batch
from lmforge.tune.freeze import freeze_all_but_top

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The flight was delayed for three hours and nobody told us why.",
    "great game!",
    "Self-driving cars will change how cities are built, or so they say.",
]


@pytest.fixture(scope="module")
def minilm():
    return load_pretrained("all-minilm-l6-v2")


def test_minilm_matches_transformers_with_padding(minilm):
    model, tok = minilm
    ref = transformers.BertModel.from_pretrained(str(model_file("all-minilm-l6-v2"))).eval()
    enc = tok.encode_for_encoder(TEXTS, max_len=128)
    b = pad_batch([e.ids for e in enc], tok.pad_id)
    assert b["attention_mask"].sum(1).tolist() != [b["input_ids"].size(1)] * 3  # really padded
    with torch.no_grad():
        ours, theirs = model(**b), ref(**b)
    real = b["attention_mask"][..., None].bool()
    assert (ours.hidden - theirs.last_hidden_state).masked_fill(~real, 0).abs().max() <= 1e-5
    assert (ours.pooled - theirs.pooler_output).abs().max() <= 1e-5
    m_ours = mean_pool(ours.hidden, b["attention_mask"])
    m_theirs = mean_pool(theirs.last_hidden_state, b["attention_mask"])
    assert (m_ours - m_theirs).abs().max() <= 1e-5
    # the tokenizer.json's own fixed padding to 128 must not leak into ours
    assert len(enc[1].ids) < 10


def test_embeddings_rank_paraphrases_first(minilm):
    model, tok = minilm
    e = embed(model, tok, ["A man is eating food.", "A man eats a meal.", "The stock market fell sharply."])
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.8 and sim[0, 2] < 0.3


def _tiny(head: str, **kw) -> Encoder:
    torch.manual_seed(0)
    cfg = encoder_config(
        "bert-mini",
        vocab_size=120,
        n_layer=2,
        n_head=4,
        d_model=32,
        max_seq_len=40,
        head=head,
        dropout=0.0,
        attn_dropout=0.0,
        **kw,
    )
    m = Encoder(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide behind init values
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


HF_CLASS = {
    "none": "BertModel",
    "mlm": "BertForMaskedLM",
    "pretrain": "BertForPreTraining",
    "classify": "BertForSequenceClassification",
    "qa": "BertForQuestionAnswering",
}


@pytest.mark.parametrize("head", ["none", "mlm", "pretrain", "classify", "qa"])
def test_export_loads_in_transformers_with_equal_outputs(head, tmp_path):
    kw = {"labels": ["neg", "neu", "pos"]} if head == "classify" else {}
    m = _tiny(head, **kw)
    m.save_pretrained(tmp_path / "m")
    ref = getattr(transformers, HF_CLASS[head]).from_pretrained(str(tmp_path / "m")).eval()
    ids = torch.randint(5, 120, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        o = m(ids, mask, types)
        r = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if head == "none":
        assert (o.hidden - r.last_hidden_state)[0].abs().max() <= 1e-5
        assert (o.pooled - r.pooler_output).abs().max() <= 1e-5
    elif head == "mlm":
        assert (o.logits - r.logits)[0].abs().max() <= 1e-5
    elif head == "pretrain":
        assert (o.logits - r.prediction_logits)[0].abs().max() <= 1e-5
        assert (o.nsp_logits - r.seq_relationship_logits).abs().max() <= 1e-5
    elif head == "classify":
        assert (o.logits - r.logits).abs().max() <= 1e-5
        assert ref.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    else:
        assert (o.logits[..., 0] - r.start_logits)[0].abs().max() <= 1e-5
        assert (o.logits[..., 1] - r.end_logits)[0].abs().max() <= 1e-5
    # and back: lmforge reads what it wrote
    again = load_model(tmp_path / "m")
    assert again.config.head == head and again.config.labels == m.config.labels


def test_loads_transformers_bert_with_prefix(tmp_path):
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    torch.manual_seed(1)
    ref = transformers.BertForMaskedLM(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    m = load_model(tmp_path / "hf")
    assert m.config.head == "mlm" and m.pooler is None
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert (m(ids).logits - ref(input_ids=ids).logits).abs().max() <= 1e-5
    labels = ids.clone()
    labels[:, ::2] = -100
    with torch.no_grad():
        assert torch.allclose(m(ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss, atol=1e-5)


def test_with_head_keeps_body_and_inits_head():
    m = _tiny("none")
    c = m.with_head("classify", ["a", "b"])
    assert torch.equal(c.blocks[1].mlp.up.weight, m.blocks[1].mlp.up.weight)
    assert c.classifier.weight.shape == (2, 32) and c.classifier.bias.abs().sum() == 0
    assert c.classifier.weight.std() < 0.05


def test_top_k_freezes_lower_blocks_and_embeddings():
    m = _tiny("classify", labels=["a", "b"])
    n = freeze_all_but_top(m, 1)
    trainable = {name for name, p in m.named_parameters() if p.requires_grad}
    assert all(name.startswith(("blocks.1.", "pooler.", "classifier.")) for name in trainable)
    assert any(name.startswith("blocks.1.") for name in trainable)
    assert n == sum(p.numel() for p in m.parameters() if p.requires_grad) < m.num_params()
    x = torch.randint(0, 120, (2, 7))
    m.train()
    m(x, labels=torch.tensor([0, 1])).loss.backward()
    assert m.blocks[0].attn.q_proj.weight.grad is None and m.blocks[1].attn.q_proj.weight.grad is not None


def test_config_param_count_matches_module():
    for head in ("none", "mlm", "pretrain", "classify", "qa"):
        kw = {"labels": ["a", "b", "c"]} if head == "classify" else {}
        m = _tiny(head, **kw)
        assert m.config.num_params() == m.num_params(), head


def test_with_head_never_reuses_an_old_classifier():
    m = _tiny("classify", labels=["a", "b"])
    three = m.with_head("classify", ["a", "b", "c"])  # another label count: a new head, no size mismatch
    assert three.classifier.weight.shape == (3, 32)
    swapped = m.with_head("classify", ["b", "a"])  # same count, other names: still a fresh head
    assert not torch.equal(swapped.classifier.weight, m.classifier.weight)
    assert torch.equal(swapped.blocks[0].attn.q_proj.weight, m.blocks[0].attn.q_proj.weight)


def test_gamma_beta_layernorm_names_load(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _tiny("none")
    m.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    t = load_file(str(f))
    t = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in t.items()
    }
    save_file(t, str(f))
    again = load_model(tmp_path / "m")
    assert torch.equal(again.emb_norm.weight, m.emb_norm.weight)


def test_embeddings_skip_the_mlm_projection():
    m = _tiny("mlm")
    out = m(torch.randint(0, 120, (2, 9)), heads=False)
    assert out.logits is None and out.hidden.shape == (2, 9, 32)
