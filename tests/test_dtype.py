"""bfloat16 as a compute dtype: what `auto` picks, inference with bf16 weights in every family, training under
autocast (pre-training's loop and fine-tuning's fit), and the fused head loss under autocast; each held to a
tolerance against fp32."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import IdsTokenizer, call_cli, in_threads, tiny_config
from lmforge import runtime
from lmforge.config import FinetuneConfig, encoder_config, seq2seq_config
from lmforge.models import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.nn.loss import cross_entropy, linear_cross_entropy

BF16 = torch.bfloat16


@pytest.fixture
def fresh_pick(monkeypatch):
    """auto's choice is made once per process: forget it for the test (and after it)."""
    monkeypatch.setattr(runtime, "_picked", {})


def test_auto_picks_bf16_only_with_bf16_units_that_measure_faster(fresh_pick, monkeypatch, capsys):
    assert runtime.resolve_dtype("float32") == torch.float32 and runtime.resolve_dtype(None) == torch.float32
    assert runtime.resolve_dtype("bfloat16") == BF16 and runtime.resolve_dtype(BF16) == BF16
    assert runtime.resolve_dtype("float16") == torch.float16  # (training, with a gradient scaler)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, auto"):
        runtime.resolve_dtype("half")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})
    assert runtime.resolve_dtype("auto") == torch.float32
    assert "dtype auto: float32 (this CPU has no bf16 matrix instructions)" in capsys.readouterr().err
    runtime.resolve_dtype("auto")
    assert capsys.readouterr().err == ""  # told once per process

    speeds = {torch.float32: 1.0, BF16: 4.0}  # FLOP/s: bf16 4x faster
    monkeypatch.setattr(runtime, "matmul_flops", lambda dtype, **kw: speeds[dtype])
    for flags, speed, want in [({"amx_bf16", "avx512_bf16"}, 4.0, BF16), ({"avx512_bf16"}, 1.2, torch.float32)]:
        monkeypatch.setattr(runtime, "_picked", {})
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: flags)
        speeds[BF16] = speed
        assert runtime.resolve_dtype("auto") == want
        err = capsys.readouterr().err
        assert ("AMX" if "amx_bf16" in flags else "AVX-512 BF16") in err and f"{speed:.1f}x fp32" in err
    assert runtime.pick_dtype("meta")[0] == torch.float32


def test_auto_measures_without_moving_the_global_rng(fresh_pick, monkeypatch):
    """auto's measurement runs inside training set-up, after a resumed run restored its RNG: it must not draw
    from the global generator, or the resumed run's dropout would differ from a run never stopped."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512_bf16"})
    before = torch.get_rng_state()
    runtime.resolve_dtype("auto", say=False)
    assert torch.equal(torch.get_rng_state(), before)


def _close(bf: torch.Tensor, fp: torch.Tensor, rel: float) -> None:
    """bf16 outputs against fp32 ones: the largest error under `rel` of the largest value."""
    assert bf.dtype == BF16
    err = (bf.float() - fp).abs().max() / fp.abs().max()
    assert err < rel, f"bf16 is off by {err:.3%} of the largest value"


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_decoder_in_bf16_matches_fp32(style, tmp_path):
    """Weights in bf16 through load_pretrained: logits within 3% of the largest one, the same greedy tokens
    over a short continuation, and the KV cache in bf16 too."""
    from lmforge.generate.sampling import SamplingParams, generate_ids
    from lmforge.interop import load_pretrained
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.train_bpe(["the cat sat on the mat. the dog ate the bone."] * 20, vocab_size=97)
    DecoderLM(tiny_config(style, vocab_size=tok.vocab_size)).eval().save_pretrained(tmp_path / "m", tokenizer=tok)
    fp, _ = load_pretrained(tmp_path / "m", dtype="float32")
    bf, _ = load_pretrained(tmp_path / "m", dtype="bfloat16")
    assert {p.dtype for p in bf.parameters()} == {BF16}
    x = torch.randint(0, tok.vocab_size, (2, 24))
    with torch.inference_mode():
        _close(bf(x).logits, fp(x).logits, 0.03)
        assert bf.new_cache(1, 8).k[0].dtype == BF16
    params = SamplingParams(6, temperature=0)
    assert [t.tolist() for t in generate_ids(bf, x[:, :8].tolist(), params)] == [
        t.tolist() for t in generate_ids(fp, x[:, :8].tolist(), params)
    ]


def test_encoder_and_seq2seq_in_bf16_match_fp32():
    torch.manual_seed(0)
    enc = Encoder(encoder_config("bert-mini", vocab_size=120, n_layer=2, n_head=4, d_model=32, max_seq_len=40)).eval()
    t5 = Seq2SeqLM(seq2seq_config("t5-tiny", dropout=0.0)).eval()
    ids = torch.randint(3, 120, (3, 20))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        h_fp = enc(ids, attention_mask=mask).hidden
        lg_fp = t5(ids, attention_mask=mask, decoder_input_ids=ids[:, :7]).logits
        enc.to(BF16), t5.to(BF16)
        h_bf = enc(ids, attention_mask=mask).hidden
        lg_bf = t5(ids, attention_mask=mask, decoder_input_ids=ids[:, :7]).logits
    _close(h_bf, h_fp, 0.03)
    _close(lg_bf, lg_fp, 0.03)
    cos = torch.nn.functional.cosine_similarity(h_bf.float().flatten(1), h_fp.flatten(1))
    assert cos.min() > 0.999


def test_fused_head_loss_under_autocast_equals_the_plain_head():
    """Under autocast the chunked head loss does its products in bf16, as the head's Linear would: the loss and
    both gradients match lm_head + cross_entropy under the same autocast, and stay near the fp32 ones."""
    torch.manual_seed(0)
    h = torch.randn(300, 64, requires_grad=True)
    w = (torch.randn(500, 64) * 0.1).requires_grad_()
    t = torch.randint(0, 500, (300,))
    t[::7] = -100

    def run(fn, autocast: bool):
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            loss = fn()
        h.grad = w.grad = None
        loss.backward()
        return loss.detach(), h.grad.clone(), w.grad.clone()

    fused = run(lambda: linear_cross_entropy(h, w, t, chunk=128), True)
    plain = run(lambda: cross_entropy(torch.nn.functional.linear(h, w), t), True)
    full = run(lambda: cross_entropy(h @ w.T, t), False)
    assert fused[1].dtype == fused[2].dtype == torch.float32
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(fused[1:], plain[1:]):
        assert (a - b).abs().max() < 0.01 * b.abs().max()
    assert abs(fused[0] - full[0]) < 0.01 * full[0]
    for a, b in zip(fused[1:], full[1:]):
        assert (a - b).abs().max() < 0.02 * b.abs().max()


def _fit(dtype: str, seed: int = 0):
    from lmforge.train.supervised import fit

    torch.manual_seed(seed)
    model = DecoderLM(tiny_config("llama"))
    rows = torch.randint(0, 97, (8, 17), generator=torch.Generator().manual_seed(1))
    rows[:, 1::2] = rows[:, 0::2][:, :8]  # a pattern to learn: each odd token repeats the one before it

    def batches(epoch: int):
        yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    def evaluate():
        with torch.no_grad():
            loss = model(input_ids=rows[:, :-1], labels=rows[:, 1:]).loss
        return {"loss": loss.item(), "bf16": float(loss.dtype == BF16 or torch.is_autocast_enabled("cpu"))}

    cfg = FinetuneConfig(epochs=30, lr=1e-2, warmup=0.0, dtype=dtype, metric="bf16", log_every=1)
    res = fit(model, batches, 1, evaluate, cfg, progress=False)
    return res, model


def test_fit_under_bf16_autocast_learns_like_fp32():
    """Fine-tuning's loop with dtype bfloat16: its evaluations run under autocast, the weights stay fp32, and the
    training loss falls as far as fp32's (within 5%) on the same data and seeds."""
    fp, fp_model = _fit("float32")
    bf, bf_model = _fit("bfloat16")
    assert bf.best["bf16"] == 1.0 and fp.best["bf16"] == 0.0
    assert {p.dtype for p in bf_model.parameters()} == {torch.float32}
    first, last = bf.history[0]["loss"], bf.history[-2]["loss"]
    assert last < 0.7 * first
    assert abs(last - fp.history[-2]["loss"]) < 0.05 * fp.history[-2]["loss"]


def test_pretrain_in_bf16_records_its_dtype(tmp_path, small_corpus):
    """train.dtype bfloat16 through the pre-training loop: the loss falls and the summary says the dtype."""
    from lmforge.config import load_run_config
    from lmforge.train.loop import pretrain

    base = {
        "model": {"preset": "bench-llama", "n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "max_seq_len": 32},
        "data": {"sources": [str(small_corpus)], "vocab_size": 300},
        "train": {
            "steps": 30,
            "batch_size": 8,
            "lr": 3e-3,
            "warmup_steps": 3,
            "eval_every": 0,
            "ckpt_every": 0,
            "dtype": "bfloat16",
            "log_every": 5,
            "peak_tflops": 1.0,
        },
    }
    r = pretrain(load_run_config(base=base), tmp_path / "run", progress=False)
    assert json.loads((r.run_dir / "summary.json").read_text())["dtype"] == "bfloat16"
    recs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in recs if "split" not in x]
    assert losses[-1] < losses[0] - 0.5


def test_cli_dtype_flag(capsys, tmp_path):
    """--dtype on the inference verbs (one shared flag): a bad value is a one-line usage error; bf16 generation
    and embeddings work on the packaged models."""
    r = call_cli(capsys, "generate", "--model", "smollm2-135m-instruct", "--prompt", "Hi", "--dtype", "fp16")
    assert r.returncode == 2 and "invalid choice: 'fp16'" in r.stderr
    r = call_cli(
        capsys,
        "embed",
        "--model",
        "all-minilm-l6-v2",
        "--text",
        "a cat",
        "--text",
        "a kitten",
        "--text",
        "tax law",
        "--similarity",
        "--dtype",
        "bfloat16",
    )
    assert r.returncode == 0, r.stderr
    sims = [[float(v) for v in line.split()[:3]] for line in r.stdout.splitlines()]
    assert sims[0][1] > sims[0][2]  # a cat is nearer a kitten than tax law, in bf16 as in fp32


def test_serving_engine_decodes_a_bf16_model():
    """The batched engine on bf16 weights (packed for oneDNN where it can): its cache is bf16, requests of
    different lengths finish with all their tokens, and greedy rows agree with bf16 generate on the first tokens
    (beyond those, bf16's rounding may tip a near tie either way)."""
    from lmforge.generate.engine import Engine, Request
    from lmforge.generate.sampling import SamplingParams, generate_ids

    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", max_seq_len=128)).eval().to(BF16)

    engine = Engine(model, IdsTokenizer(), max_batch=2, max_queue=4).start()
    assert engine.cache.dtype == BF16 and engine.cache.groups[0].k[0].dtype == BF16
    prompts, got = [[5, 6, 7, 8], [9, 10], [11, 12, 13]], {}

    def run(i):
        r = Request(prompts[i], SamplingParams(max_new_tokens=12, temperature=0.0))
        events = list(engine.stream(r))
        got[i] = (r.completion_ids, [e.error for e in events if e.error])

    in_threads(run, 3)
    engine.close()
    for i, p in enumerate(prompts):
        ids, errors = got[i]
        assert not errors and len(ids) == 12
        alone = [int(t[0]) for t in generate_ids(model, [p], SamplingParams(3, temperature=0))]
        assert ids[:3] == alone


@pytest.mark.parametrize("kind", ["causal", "causal-gqa", "causal-chunk", "mask-per-head", "mask-gqa", "none"])
def test_bf16_cpu_attention_matches_the_fp32_kernel(kind):
    """bf16 attention on a CPU runs as batched products over the score matrix (nn.attention._bf16_scores): the
    output and the gradients match PyTorch's fp32 kernel to bf16 rounding, for causal, grouped-query, a chunk of
    queries after a cache, and boolean masks; a query row with no visible key stays finite."""
    from lmforge.nn.attention import sdpa

    torch.manual_seed(0)
    H, Hkv = 4, (2 if "gqa" in kind else 4)
    Tq = 5 if kind == "causal-chunk" else 16
    q, k, v = torch.randn(2, H, Tq, 8), torch.randn(2, Hkv, 16, 8), torch.randn(2, Hkv, 16, 8)
    mask = None
    if kind.startswith("mask"):
        mask = torch.rand(2, H if kind == "mask-per-head" else 1, Tq, 16) > 0.3
        mask[..., 0] = True
    causal = kind.startswith("causal")
    outs, grads = [], []
    for dtype in (BF16, torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = sdpa(*leaves, mask, causal=causal)
        out.float().pow(2).sum().backward()
        outs.append(out.float())
        grads.append([t.grad.float() for t in leaves])
    assert (outs[0] - outs[1]).abs().max() < 0.03
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 0.05 * b.abs().max()
    empty = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    empty[..., 1, :] = False
    x = torch.randn(1, 2, 4, 8, dtype=BF16)
    assert torch.isfinite(sdpa(x, x, x, empty, causal=False)).all()


def test_decoding_under_autocast_runs_the_plain_layers_in_bf16():
    """Prepacked fp32 oneDNN weights take no bf16 input: under autocast decoding leaves the layers as they are
    (products in bf16 through autocast) instead of failing in oneDNN; outside it, it packs as before."""
    from lmforge.config import SamplingParams
    from lmforge.generate.sampling import generate_ids
    from lmforge.nn.packed import PackedLinear, packed_linears

    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", dropout=0.0)).eval()
    with torch.no_grad(), torch.autocast("cpu", BF16), packed_linears(model) as m:
        assert not any(isinstance(x, PackedLinear) for x in m.modules())
    with torch.no_grad(), packed_linears(model) as m:
        assert any(isinstance(x, PackedLinear) for x in m.modules())
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    with torch.autocast("cpu", BF16):
        steps = [t.tolist() for t in generate_ids(model, [[1, 2, 3], [4, 5]], params)]
    assert len(steps) == 6 and all(len(s) == 2 for s in steps)
