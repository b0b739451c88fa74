"""Masked-LM pre-training: the masking recipe, next-sentence pairs, whole-word masking, and a tiny BERT trained
end to end into a directory transformers loads as BertForMaskedLM."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import load_run_config
from lmforge.data.corpus import read_documents, split_documents
from lmforge.data.masking import MLMBatcher
from lmforge.data.shards import TokenShard, build_shards
from lmforge.errors import ConfigError
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import pretrain


@pytest.fixture(scope="module")
def wp(small_corpus, tmp_path_factory):
    docs = read_documents([str(small_corpus)])
    tok = Tokenizer.train_wordpiece((d.text for d in docs), vocab_size=1500)
    tr, va = split_documents(docs, 0.2)
    d = tmp_path_factory.mktemp("shards")
    build_shards(tr, va, tok, d)
    return tok, TokenShard.open(d, "train")


def test_masking_rates_and_specials(wp):
    tok, shard = wp
    b = MLMBatcher(tok, tok.vocab_size, 64, probability=0.15)
    g = torch.Generator().manual_seed(0)
    batch = b(shard, shard.random_starts(256, 62, g), g)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (256, 64) and (ids[:, 0] == tok.token_id("[CLS]")).all()
    chosen = labels != -100
    assert 0.13 < chosen.float().mean() < 0.17
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS] and [SEP] are never predicted
    masked = ids[chosen] == tok.token_id("[MASK]")
    kept = ids[chosen] == labels[chosen]
    assert 0.75 < masked.float().mean() < 0.85 and 0.07 < kept.float().mean() < 0.14


def test_whole_word_masking_and_nsp(wp):
    tok, shard = wp
    b = MLMBatcher(tok, tok.vocab_size, 64, whole_word=True, nsp=True)
    g = torch.Generator().manual_seed(1)
    batch = b(shard, shard.random_starts(128, b.body_len, g), g)
    ids, labels = batch["input_ids"], batch["labels"]
    original = torch.where(labels != -100, labels, ids)
    cont = torch.tensor([tok.id_to_token(int(i)).startswith("##") for i in original.view(-1)]).view_as(ids)
    chosen = labels != -100
    # a continuation piece is chosen exactly when the piece before it is
    special_before = (original[:, :-1] == tok.token_id("[SEP]")) | (original[:, :-1] == tok.token_id("[CLS]"))
    both = cont[:, 1:] & ~special_before
    assert both.sum() > 50
    assert torch.equal(chosen[:, 1:][both], chosen[:, :-1][both])
    assert set(batch["next_sentence_label"].tolist()) == {0, 1}
    seps = (ids == tok.token_id("[SEP]")).nonzero()
    assert (batch["token_type_ids"][:, -1] == 1).all() and (batch["token_type_ids"][:, 1] == 0).all()
    assert len(seps) >= 2 * 128


def test_objective_needs_an_encoder():
    with pytest.raises(ConfigError, match="needs an encoder"):
        load_run_config(None, ["model.preset=quickstart", "train.objective=mlm"])
    with pytest.raises(ConfigError, match="mlm objective"):
        load_run_config(None, ["model.preset=quickstart", "train.nsp=true"])


def test_mlm_pretraining_end_to_end(small_corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = load_run_config(
        "configs/bert-mini-mlm.yaml",
        [
            f"data.sources=[{small_corpus}]",
            "data.val_fraction=0.2",
            "model.n_layer=2",
            "model.d_model=64",
            "model.n_head=4",
            "model.max_seq_len=64",
            "data.vocab_size=1000",
            "train.seq_len=64",
            "train.steps=60",
            "train.batch_size=16",
            "train.eval_every=30",
            "train.warmup_steps=10",
            "train.ckpt_every=30",
            "train.lr=2e-3",
        ],
    )
    res = pretrain(cfg, tmp_path / "run", progress=False)
    val = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert len(val) == 2 and val[-1]["loss"] < val[0]["loss"] and "masked_acc" in res.final
    # chance over a 1000-token vocabulary is 0.1%; 60 steps reach about the most-frequent-token rate (3-5%)
    assert res.final["masked_acc"] > 0.02
    ref = transformers.BertForMaskedLM.from_pretrained(str(res.model_dir)).eval()
    from lmforge.interop import load_model

    m = load_model(res.model_dir)
    ids = torch.randint(5, 1000, (2, 20))
    with torch.no_grad():
        assert (m(ids).logits - ref(input_ids=ids).logits).abs().max() < 1e-4
    assert (tmp_path / "run" / "report" / "report.html").is_file()


def test_nsp_pretraining_learns_next_sentences(small_corpus, tmp_path):
    """With next-sentence prediction beside masked LM, the held-out NSP accuracy rises from chance (its pairs
    are half true continuations, half sentences from elsewhere in the corpus)."""
    cfg = load_run_config(
        "configs/bert-mini-mlm.yaml",
        [
            f"data.sources=[{small_corpus}]",
            "data.val_fraction=0.2",
            "model.n_layer=2",
            "model.d_model=64",
            "model.n_head=4",
            "model.max_seq_len=64",
            "data.vocab_size=1000",
            "train.seq_len=64",
            "train.steps=150",
            "train.batch_size=16",
            "train.eval_every=50",
            "train.eval_batches=8",
            "train.warmup_steps=10",
            "train.ckpt_every=0",
            "train.lr=2e-3",
            "train.nsp=true",
        ],
    )
    res = pretrain(cfg, tmp_path / "run", progress=False)
    val = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    accs = [r["nsp_acc"] for r in val]
    assert len(accs) == 3 and accs[-1] > accs[0] and accs[-1] > 0.6, accs
    assert res.final["nsp_acc"] > 0.6
