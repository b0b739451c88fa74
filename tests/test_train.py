import json
import os
import shutil

import pytest
import torch
import yaml

from lmforge.config import load_run_config
from lmforge.interop import load_model
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.loop import pretrain


def tiny_run(corpus, **train):
    t = dict(
        seed=7,
        steps=12,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        eval_every=6,
        eval_batches=2,
        ckpt_every=4,
        log_every=1,
        peak_tflops=1.0,
    )
    t.update(train)
    return {
        "model": {"preset": "bench-gpt2", "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 64, "dropout": 0.1},
        "data": {"sources": [str(corpus)], "vocab_size": 300, "val_fraction": 0.2},
        "train": t,
    }


def losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "split" not in r], [
        (r["step"], r["loss"]) for r in recs if "split" in r
    ]


def test_run_directory_contents(tmp_path, small_corpus, capsys):
    cfg = load_run_config(base=tiny_run(small_corpus))
    res = pretrain(cfg, tmp_path / "run", progress=False)
    # seq_len 32 under a 64-row position table: the untrained rows are named once
    assert capsys.readouterr().err.count("learned positions from 32 on stay untrained") == 1
    run = tmp_path / "run"
    for f in [
        "config.yaml",
        "metrics.jsonl",
        "tokenizer.json",
        "tokenizer_config.json",
        "summary.json",
        "environment.json",
        "report/loss.png",
        "report/report.md",
        "report/report.html",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/generation_config.json",
        "data/train.bin",
        "data/val.bin",
        "data/meta.json",
    ]:
        assert (run / f).is_file(), f
    assert [p.name for p in list_checkpoints(run)] == ["step_000008", "step_000012"]  # keep_checkpoints=2
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["seed"] == 7 and saved["model"]["vocab_size"] == 300
    assert json.loads((run / "environment.json").read_text())["seed"] == 7
    train_losses, val = losses(run)
    assert len(train_losses) == 12 and [s for s, _ in val] == [6, 12]
    assert train_losses[-1][1] < train_losses[0][1]  # it learns
    assert set(res.final) >= {"loss", "ppl", "bpb"} and res.final["ppl"] > 1
    m = load_model(res.model_dir)
    assert m.config.vocab_size == 300


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(tmp_path, small_corpus, optimizer):
    base = tiny_run(small_corpus, optimizer=optimizer)
    pretrain(load_run_config(base=base), tmp_path / "straight", progress=False)
    pretrain(load_run_config(base=base), tmp_path / "split", progress=False, stop_after=8)
    assert not (tmp_path / "split" / "model").exists()
    pretrain(load_run_config(base=base), tmp_path / "split", resume=True, progress=False)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert a == b  # bit-identical losses, train and validation, dropout included
    x = torch.randint(0, 300, (1, 16))
    ma, mb = load_model(tmp_path / "straight" / "model"), load_model(tmp_path / "split" / "model")
    assert torch.equal(ma(x).logits, mb(x).logits)


def test_resume_drops_records_after_the_checkpoint(tmp_path, small_corpus):
    base = tiny_run(small_corpus, ckpt_every=5)
    run = tmp_path / "r"
    pretrain(load_run_config(base=base), run, progress=False, stop_after=7)  # checkpoint at 5, logged to 7
    assert max(s for s, _ in losses(run)[0]) == 7
    pretrain(load_run_config(base=base), run, resume=True, progress=False)
    steps = [s for s, _ in losses(run)[0]]
    assert steps == list(range(1, 13))


def test_split_is_by_file_name_not_location(tmp_path, small_corpus):
    from lmforge.data.corpus import read_documents, split_documents

    copy = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(small_corpus, copy)
    a = split_documents(read_documents([str(small_corpus)]), 0.3)
    b = split_documents(read_documents([str(copy)]), 0.3)
    names = [[os.path.basename(d.name) for d in part] for part in a]
    assert names == [[os.path.basename(d.name) for d in part] for part in b]
    assert len(names[1]) == 2 and len(names[0]) == 4  # ceil(0.3 * 6) held out, whole documents


def test_layer_decay_scales_each_depth():
    """build_optimizer(layer_decay=d): the top (final norm, head) learns at the full rate, block i of n at
    d ** (n - i), the embeddings at d ** (n + 1); weight decay stays on matrices only; every trainable
    parameter is in exactly one group."""
    from lmforge.config import encoder_config
    from lmforge.models.encoder import Encoder
    from lmforge.train.optim import build_optimizer

    model = Encoder(
        encoder_config("bert-mini", vocab_size=50, n_layer=3, n_head=2, d_model=16, head="classify", labels=["a", "b"])
    )
    opt = build_optimizer(model, "adamw", 1e-3, 0.01, layer_decay=0.5)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(scale) == len(named)
    assert scale[id(named["classifier.weight"])] == (1.0, 0.01)
    assert scale[id(named["blocks.2.attn.q_proj.weight"])] == (0.5, 0.01)
    assert scale[id(named["blocks.0.mlp.up.bias"])] == (0.125, 0.0)
    assert scale[id(named["tok_emb.weight"])] == (0.0625, 0.0)
    assert {g["lr_scale"] for g in build_optimizer(model, "adamw", 1e-3, 0.01).param_groups} == {1.0}


def test_weight_averaging_keeps_the_mean_of_the_late_evaluation_points(tmp_path):
    """FinetuneConfig.average: the weights at the evaluations in the last share of training are averaged and kept
    when the mean scores at least as well on validation as the best single point (here: a constant metric)."""
    from lmforge.config import FinetuneConfig
    from lmforge.train.supervised import fit

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, y):
            return type("Out", (), {"loss": torch.nn.functional.mse_loss(self.inner(x), y)})()

    wrapped, seen = Wrapped(), []

    def evaluate():
        seen.append(model.weight.detach().clone())
        return {"accuracy": 0.5}

    cfg = FinetuneConfig(epochs=4, lr=0.1, warmup=0.0, eval_every=2, average=0.5, grad_clip=0.0, weight_decay=0.0)
    r = fit(
        wrapped,
        lambda epoch: [{"x": x[:16], "y": y[:16]}, {"x": x[16:], "y": y[16:]}],
        2,
        evaluate,
        cfg,
        metrics_path=tmp_path / "metrics.jsonl",
        progress=True,
    )
    assert len(seen) == 5  # evaluations at steps 2, 4, 6, 8, then one of the averaged weights
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["averaged_points"] for r in logged if "averaged_points" in r] == [3]  # the log holds it too
    late = seen[1:4]  # the points in the last half: steps 4, 6, 8
    torch.testing.assert_close(model.weight.detach(), torch.stack(late).mean(0))
    assert r.best["averaged_points"] == len(late) == 3
    cfg.average = 0.0
    assert "averaged_points" not in fit(wrapped, lambda e: [{"x": x, "y": y}], 1, evaluate, cfg, progress=False).best


def _scripted_fit(tmp_path, scores: list[float], **settings):
    """fit on a linear model for len(scores) steps, evaluated after every step with the scripted scores."""
    from lmforge.config import FinetuneConfig
    from lmforge.train.supervised import fit

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, y):
            return type("Out", (), {"loss": torch.nn.functional.mse_loss(self.inner(x), y)})()

    it = iter(scores)
    cfg = FinetuneConfig(
        epochs=len(scores), lr=0.1, warmup=0.0, eval_every=1, log_every=1, grad_clip=0.0, ckpt_every=0, **settings
    )
    r = fit(
        Wrapped(), lambda e: [{"x": x, "y": y}], 1, lambda: {"accuracy": next(it)}, cfg, tmp_path / "m.jsonl", False
    )
    return r, [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]


def test_early_stopping_ends_the_run_after_its_patience_and_says_why(tmp_path):
    """--early-stopping 2 --min-delta 0.01: a gain of 0.0005 does not count, so the fourth evaluation is the
    second in a row without improvement and training ends there; the log and FitResult say when and why."""
    r, log = _scripted_fit(tmp_path, [0.5, 0.6, 0.6, 0.6005, 0.9, 0.9], early_stopping=2, min_delta=0.01)
    assert r.steps == 4
    assert r.stopped["step"] == 4 and r.stopped["best_step"] == 2 and r.stopped["best"] == 0.6
    assert "accuracy did not improve by more than 0.01 in 2 evaluations" == r.stopped["reason"]
    assert [e for e in log if e.get("split") == "stop"] == [{"step": 4, "split": "stop", **r.stopped}]
    assert max(e["step"] for e in log) == 4
    r, _ = _scripted_fit(tmp_path, [0.5, 0.6, 0.6, 0.6005, 0.9, 0.9], min_delta=0.01)  # off: all six steps
    assert r.steps == 6 and r.stopped is None


def test_plateau_schedule_multiplies_the_learning_rate_when_the_metric_stalls(tmp_path):
    """--schedule plateau --plateau-patience 2 --plateau-factor 0.5: held at the peak, halved after every second
    evaluation in a row without improvement (the count starts again after each drop and after each gain)."""
    r, log = _scripted_fit(
        tmp_path, [0.5, 0.5, 0.5, 0.5, 0.5, 0.7, 0.7], schedule="plateau", plateau_patience=2, plateau_factor=0.5
    )
    lrs = [e["lr"] for e in log if "lr" in e]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert [e["lr_scale"] for e in log if e.get("split") == "plateau"] == [0.5, 0.25]
    assert r.steps == 7 and r.stopped is None


@pytest.mark.parametrize("family", ["decoder", "encoder", "seq2seq"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(family):
    """grad_checkpoint=True (every family, through models.base.call_block) recomputes the blocks in backward:
    the loss and every gradient equal the plain step's (dropout off: the recomputation replays the RNG anyway)."""
    from lmforge.models.family import FAMILIES
    from lmforge.train.supervised import model_loss

    f = FAMILIES[family]
    preset = dict(next(iter(f.presets.values())))
    small = {
        "n_layer": 2,
        "d_model": 32,
        "n_head": 2,
        "vocab_size": 101,
        "max_seq_len": 32,
        "d_ff": 64,
        "head": "mlm",
        "dropout": 0.0,
        "attn_dropout": 0.0,
    }
    cfg = f.config_cls(**{**preset, **{k: v for k, v in small.items() if k in f.config_cls.__dataclass_fields__}})
    torch.manual_seed(0)
    model = f.model_cls(cfg).train()
    x = torch.randint(3, 101, (2, 16))
    batch = {"input_ids": x, "labels": x if family != "encoder" else x.masked_fill(x % 3 == 0, -100)}
    grads, kept = [], []
    for ckpt in (False, True):
        model.zero_grad()
        held = [0]

        def pack(t, held=held):  # what autograd keeps for backward, outside the checkpointed blocks
            held[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model_loss(model, batch, grad_checkpoint=ckpt)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        kept.append(held[0])
    assert kept[1] < 0.7 * kept[0]  # checkpointing keeps less
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    assert len(grads[0][1]) == len(grads[1][1]) > 0
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pretrain_with_activation_checkpointing_trains_the_same(tmp_path, small_corpus):
    """train.grad_checkpoint: the same run with and without it reaches the same weights (to float rounding)."""
    from safetensors.torch import load_file

    outs = []
    for ckpt in (False, True):
        cfg = tiny_run(small_corpus, steps=4, eval_every=0, ckpt_every=0, grad_checkpoint=ckpt)
        cfg["model"]["dropout"] = 0.0
        pretrain(load_run_config(base=cfg), tmp_path / f"r{int(ckpt)}", progress=False)
        outs.append(load_file(tmp_path / f"r{int(ckpt)}" / "model" / "model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-4, atol=1e-5)


def test_muon_steps_hidden_matrices_and_adamw_the_rest():
    """optimizer muon: torch.optim.Muon takes the 2-D weights inside the blocks, AdamW the embeddings, head, norms
    and biases; both move their parameters, and the state_dict round-trips through the checkpoint's flat layout."""
    from conftest import tiny_config
    from lmforge.models import DecoderLM
    from lmforge.train.checkpoint import optimizer_tensors, restore_optimizer
    from lmforge.train.optim import MuonAdamW, build_optimizer

    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", dropout=0.0))
    opt = build_optimizer(model, "muon", 1e-2, 0.1)
    assert isinstance(opt, MuonAdamW)
    muon, adamw = dict(opt.parts)["muon"], dict(opt.parts)["adamw"]
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon and all(".blocks." in f".{n}" and model.get_parameter(n).dim() == 2 for n in in_muon)
    assert {"tok_emb.weight", "lm_head.weight", "norm.weight"} <= in_adamw and not in_muon & in_adamw
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 97, (2, 12))
    for _ in range(2):
        model(x, labels=x, loss_only=True).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    tensors, groups = optimizer_tensors(opt)
    again = build_optimizer(model, "muon", 1e-2, 0.1)
    restore_optimizer(again, tensors, json.loads(json.dumps(groups)))  # (groups travel as JSON)
    for a, b in zip(optimizer_tensors(again)[0].values(), tensors.values()):
        assert torch.equal(a, b)
