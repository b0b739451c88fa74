"""Distillation (lmforge.compress.distill, nn.loss's distillation losses, train/teacher.py): the loss is Hinton's,
the chunked one equals it, the stored teacher is the teacher's top-k, and students learn from their teacher — a
classifier from a teacher alone when its labels are noise, a causal LM closer to its teacher than the same student
trained on the text alone — and a distilled run resumes bitwise."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import call_cli, run_cli, tiny_config
from lmforge.compress.distill import distill, teacher_kind
from lmforge.config import FinetuneConfig, encoder_config, load_run_config
from lmforge.data.shards import TokenShard
from lmforge.errors import LmforgeError
from lmforge.interop import load_pretrained
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.nn.loss import TeacherTargets, distill_loss, linear_distill_loss
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import pretrain
from lmforge.train.teacher import TeacherShard, chunk_plan, store_teacher
from lmforge.tune.classify import finetune_classify


def test_distill_loss_is_hintons_and_the_chunked_one_equals_it():
    torch.manual_seed(0)
    n, d, v = 29, 12, 40
    logits, labels = torch.randn(n, v), torch.randint(0, v, (n,))
    labels[4] = -100
    teacher = torch.randn(n, v) * 2
    keep = labels != -100
    # alpha 0: the labels' cross-entropy; alpha 1 over the whole vocabulary: T^2 KL(teacher_T || student_T)
    torch.testing.assert_close(
        distill_loss(logits, labels, None, teacher, 0.0, 3.0), F.cross_entropy(logits[keep], labels[keep])
    )
    kl = F.kl_div(
        F.log_softmax(logits[keep] / 3, -1),
        F.log_softmax(teacher[keep] / 3, -1),
        log_target=True,
        reduction="batchmean",
    )
    torch.testing.assert_close(distill_loss(logits, labels, None, teacher, 1.0, 3.0), 9 * kl)
    # the top-k form renormalises the teacher over its k entries
    logp, idx = torch.log_softmax(teacher, -1).topk(6)
    p = torch.softmax(logp / 2, -1)
    q = torch.log_softmax(logits / 2, -1).gather(-1, idx)
    want = 0.3 * F.cross_entropy(logits[keep], labels[keep]) + 0.7 * 4 * (p * (p.log() - q)).sum(-1)[keep].mean()
    torch.testing.assert_close(distill_loss(logits, labels, idx, logp, 0.7, 2.0), want)
    # chunked through the head: the same value and gradients
    h, w = torch.randn(n, d, requires_grad=True), torch.randn(v, d, requires_grad=True)
    ref = distill_loss(h @ w.T, labels, idx, logp, 0.7, 2.0)
    got = linear_distill_loss(h, w, TeacherTargets(labels, idx, logp, 0.7, 2.0), chunk=8)
    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(ref, (h, w)), strict=True):
        torch.testing.assert_close(a, b)


def test_a_decoder_takes_teacher_targets_as_labels_on_both_loss_paths():
    torch.manual_seed(0)
    m = DecoderLM(tiny_config("llama"))
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    logp, idx = torch.log_softmax(torch.randn(2, 16, 97) * 3, -1).topk(8)
    t = TeacherTargets(y, idx, logp, 0.5, 2.0)
    fused = m(x, labels=t, loss_only=True).loss  # (chunked through the head)
    plain = m(x, labels=t).loss  # (the logits held whole)
    torch.testing.assert_close(fused, plain)
    assert not torch.isclose(fused, m(x, labels=y).loss)


def test_the_stored_teacher_is_its_top_k_at_every_position(tmp_path):
    assert chunk_plan(10, 8) == [(0, 0, 8), (6, 8, 10)]
    for n, c in ((1000, 64), (64, 64), (65, 64), (7, 64)):  # every position kept exactly once
        kept = [i for _, a, b in chunk_plan(n, c) for i in range(a, b)]
        assert kept == list(range(n))
    torch.manual_seed(0)
    teacher = DecoderLM(tiny_config("gpt2")).eval()
    ids = torch.randint(0, 97, (300,))
    shard = TokenShard(ids.numpy().astype(np.uint16), 300)
    store_teacher(teacher, shard, tmp_path / "t", top_k=5, context=64, batch=3)
    stored = TeacherShard.open(tmp_path / "t")
    with torch.no_grad():
        for start, keep, end in chunk_plan(300, 64):
            lp = torch.log_softmax(teacher(ids[None, start:end]).logits[0], -1)
            want_p, want_i = lp.topk(5)
            got_i, got_p = stored.windows(torch.tensor([keep]), end - keep)
            assert torch.equal(got_i[0], want_i[keep - start :])
            torch.testing.assert_close(got_p[0], want_p[keep - start :], atol=2e-3, rtol=2e-3)  # (stored in fp16)
    # incomplete (no meta.json): not a store
    (tmp_path / "t" / "meta.json").unlink()
    assert TeacherShard.open(tmp_path / "t") is None


@pytest.fixture(scope="module")
def lm_teacher(small_corpus, tmp_path_factory):
    """A tiny random decoder with a BPE of the corpus, its weights large enough that its distribution is peaked
    (an arbitrary but definite function of the context, which no student learns from the text alone)."""
    root = tmp_path_factory.mktemp("lmteacher")
    tok = Tokenizer.train_bpe([p.read_text() for p in sorted(small_corpus.iterdir())], vocab_size=300)
    torch.manual_seed(0)
    DecoderLM(tiny_config("llama", vocab_size=tok.vocab_size, init_std=0.3)).save_pretrained(root, tokenizer=tok)
    return root


def _lm_run(small_corpus, teacher, alpha, **kw):
    return load_run_config(
        base={
            "model": {"preset": "bench-gpt2", "n_layer": 1, "n_head": 2, "d_model": 32, "max_seq_len": 32},
            "data": {"sources": [str(small_corpus)], "val_fraction": 0.2},
            "train": {
                "steps": 40,
                "batch_size": 8,
                "seq_len": 32,
                "lr": 3e-3,
                "warmup_steps": 2,
                "eval_every": 0,
                "log_every": 5,
                "teacher": str(teacher),
                "distill_alpha": alpha,
                "distill_top_k": 16,
                **kw,
            },
        }
    )


def _kl_to_teacher(run, teacher) -> float:
    t, _ = load_pretrained(teacher)
    s, _ = load_pretrained(run / "model")
    val = TokenShard.open(run / "data", "val")
    x, _ = val.windows(torch.arange(0, 20 * 32, 32), 32)
    with torch.no_grad():
        p, q = F.log_softmax(t(x).logits, -1), F.log_softmax(s(x).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_a_distilled_causal_lm_is_closer_to_its_teacher_and_resumes_bitwise(small_corpus, lm_teacher, tmp_path):
    pretrain(_lm_run(small_corpus, lm_teacher, 1.0), tmp_path / "soft", progress=False)
    pretrain(_lm_run(small_corpus, lm_teacher, 0.0), tmp_path / "hard", progress=False)
    soft, hard = _kl_to_teacher(tmp_path / "soft", lm_teacher), _kl_to_teacher(tmp_path / "hard", lm_teacher)
    assert soft < 0.7 * hard, (soft, hard)
    meta = json.loads((tmp_path / "soft" / "data" / "teacher" / "meta.json").read_text())
    assert meta["top_k"] == 16 and meta["positions"] == len(TokenShard.open(tmp_path / "soft" / "data", "train"))
    # the run uses the teacher's tokenizer, and its vocabulary
    assert json.loads((tmp_path / "soft" / "model" / "config.json").read_text())["vocab_size"] == 300
    # stopped after step 15 (a checkpoint at 10), resumed: the same weights as the uninterrupted run
    cfg = _lm_run(small_corpus, lm_teacher, 1.0, ckpt_every=10)
    pretrain(cfg, tmp_path / "cut", progress=False, stop_after=15)
    pretrain(None, tmp_path / "cut", resume=True, progress=False)
    a = load_pretrained(tmp_path / "soft" / "model")[0].state_dict()
    b = load_pretrained(tmp_path / "cut" / "model")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_causal_lm_distillation_refusals(small_corpus, lm_teacher, tmp_path):
    assert teacher_kind(lm_teacher) == "causal-lm"
    with pytest.raises(LmforgeError, match="decoder preset"):
        distill(lm_teacher, [str(small_corpus)], tmp_path / "x", student="no-such-preset")
    with pytest.raises(LmforgeError, match="cuts down an encoder teacher"):
        distill(lm_teacher, [str(small_corpus)], tmp_path / "x", keep_layers=1)
    cfg = _lm_run(small_corpus, lm_teacher, 1.0)
    cfg.train.objective = "mlm"
    with pytest.raises(LmforgeError, match="causal LM"):
        cfg.train.validate()
    assert not (tmp_path / "x").exists()


# --- classifiers ------------------------------------------------------------------------------------------------
WORDS = "the a of and to in is it that was for on with as at by this from".split()


def _write(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def keyword_task(tmp_path_factory):
    """Texts whose class is said by one word among fillers; a tiny encoder teacher trained on them, the training
    file again with its labels shuffled (noise), and clean validation and test files."""
    root = tmp_path_factory.mktemp("kd")
    _, tok = load_pretrained("all-minilm-l6-v2")
    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.choice(["fruit", "water"])
            words = rng.choices(WORDS, k=rng.randint(4, 9))
            words.insert(
                rng.randint(0, len(words)), rng.choice({"fruit": ["apple", "pear"], "water": ["river", "lake"]}[label])
            )
            out.append((" ".join(words), label))
        return out

    train, val, test = rows(240), rows(60), rows(80)
    _write(root / "train.csv", train)
    noisy = [t for t, _ in train]
    labels = [lab for _, lab in train]
    rng.shuffle(labels)
    _write(root / "noisy.csv", list(zip(noisy, labels, strict=True)))
    _write(root / "val.csv", val)
    _write(root / "test.csv", test)
    small = dict(n_head=2, d_model=32, dropout=0.0, max_seq_len=64, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    Encoder(encoder_config("bert-mini", n_layer=4, **small)).save_pretrained(root / "base4", tokenizer=tok)
    torch.manual_seed(1)
    Encoder(encoder_config("bert-mini", n_layer=1, **small)).save_pretrained(root / "student1", tokenizer=tok)
    cfg = FinetuneConfig(epochs=8, lr=3e-3, batch_size=16, warmup=0.1, seed=0, ckpt_every=0)
    r = finetune_classify(
        root / "base4",
        root / "train.csv",
        root / "teacher",
        cfg,
        val_data=root / "val.csv",
        test_data=root / "test.csv",
    )
    assert r.test["accuracy"] >= 0.9, r.test  # (a teacher worth learning from)
    return root


def test_a_student_learns_from_its_teacher_when_the_labels_are_noise(keyword_task, tmp_path):
    d = keyword_task
    results = {}
    for alpha in (1.0, 0.0):
        cfg = FinetuneConfig(
            epochs=8,
            lr=3e-3,
            batch_size=16,
            warmup=0.1,
            seed=0,
            ckpt_every=0,
            metric="accuracy",
            teacher=str(d / "teacher" / "model"),
            distill_alpha=alpha,
            distill_temperature=2.0,
        )
        results[alpha] = finetune_classify(
            d / "student1",
            d / "noisy.csv",
            tmp_path / f"a{alpha}",
            cfg,
            val_data=d / "val.csv",
            test_data=d / "test.csv",
        )
    taught, labels_only = results[1.0].test["accuracy"], results[0.0].test["accuracy"]
    teacher = results[1.0].teacher["accuracy"]
    assert taught >= 0.85 and taught >= teacher - 0.1, (taught, teacher)
    assert labels_only <= 0.7, labels_only  # (shuffled labels teach nothing)
    assert "the student keeps" in results[1.0].summary()
    s = json.loads((tmp_path / "a1.0" / "summary.json").read_text())
    assert s["teacher"]["test"]["accuracy"] == teacher


def test_transfer_texts_labelled_by_the_teacher_teach_the_student(keyword_task, tmp_path):
    """24 labelled rows alone teach a fresh student little; the same rows and 216 unlabelled texts the teacher
    labels (--transfer-data, one per line) teach it the task."""
    d = keyword_task
    rows = list(csv.reader(open(d / "train.csv", encoding="utf-8")))[1:]
    _write(tmp_path / "few.csv", rows[:24])
    (tmp_path / "more.txt").write_text("".join(t + "\n" for t, _ in rows[24:]))
    acc = {}
    for name, transfer in (("alone", None), ("transfer", tmp_path / "more.txt")):
        cfg = FinetuneConfig(
            epochs=8, lr=3e-3, batch_size=16, warmup=0.1, seed=0, ckpt_every=0, teacher=str(d / "teacher" / "model")
        )
        r = finetune_classify(
            d / "student1",
            tmp_path / "few.csv",
            tmp_path / name,
            cfg,
            val_data=d / "val.csv",
            test_data=d / "test.csv",
            transfer_data=transfer,
        )
        acc[name] = r.test["accuracy"]
    assert r.rows["transfer"] == 216 and r.rows["train"] == 24
    assert acc["transfer"] >= 0.85 and acc["transfer"] >= acc["alone"] + 0.1, acc


def test_keep_layers_is_the_teacher_with_blocks_evenly_spaced(keyword_task, tmp_path):
    m, _ = load_pretrained(keyword_task / "teacher" / "model")
    blocks = [{k: v.clone() for k, v in b.state_dict().items()} for b in m.blocks]
    assert m.keep_layers(2) == [0, 3] and m.config.n_layer == 2 and len(m.blocks) == 2
    for kept, i in zip(m.blocks, (0, 3), strict=True):
        assert all(torch.equal(v, blocks[i][k]) for k, v in kept.state_dict().items())
    # the CLI: the teacher cut down to 2 of its 4 blocks, distilled, saved with 2 layers; the summary says how much
    # of the teacher's accuracy it keeps
    d = keyword_task
    out = tmp_path / "cli"
    r = run_cli(
        "distill",
        "--teacher",
        str(d / "teacher" / "model"),
        "--data",
        str(d / "train.csv"),
        "--student-layers",
        "2",
        "--out",
        str(out),
        "--set",
        "epochs=2",
        "--set",
        f"val_data={d / 'val.csv'}",
        "--set",
        f"test_data={d / 'test.csv'}",
    )
    assert r.returncode == 0, r.stderr
    assert "keeping blocks 0, 3 of the model's 4" in r.stderr and "the student keeps" in r.stdout
    assert json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--student-layers", "2", "--top-k", "8"], "--top-k applies to a causal-LM teacher"),
        ([], "name the student"),
        (["--student-layers", "9"], "more than the model's 4 blocks"),
    ],
)
def test_distill_refusals_are_one_line(keyword_task, tmp_path, capsys, args, message):
    d = keyword_task
    r = _distill(capsys, d / "teacher" / "model", d / "train.csv", tmp_path / "o", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_a_teacher_must_be_a_classifier_of_the_same_classes(keyword_task, tmp_path, capsys):
    d = keyword_task
    r = _distill(capsys, d / "base4", d / "train.csv", tmp_path / "o", "--student-layers", "2")
    assert r.returncode == 2 and "lmforge distills from a classifier" in r.stderr, r.stderr
    _write(tmp_path / "other.csv", [("apple pie", "sweet"), ("lake shore", "salty")] * 20)
    r = _distill(capsys, d / "teacher" / "model", tmp_path / "other.csv", tmp_path / "o2", "--student-layers", "2")
    assert r.returncode == 2 and "the data's classes are salty, sweet" in r.stderr, r.stderr


def _distill(capsys, teacher, data, out, *args: str):
    """`lmforge distill --teacher T --data D --out O ...` in this process."""
    return call_cli(capsys, "distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *args)
