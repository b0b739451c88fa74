"""The same answer whatever the batch (lmforge.nn.invariant): in every weight mode a row's logits are bitwise
the same whatever else is computed with it, so greedy decoding with and without a drafter agree, a served reply
does not depend on the other requests, and a seed reproduces a sampled reply under load.

The model is a small Llama (d_model 128) rather than the usual 32-wide toy, so that its products go through the
same kernel paths as a real model's (MKL and oneDNN pick kernels by shape)."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import IdsTokenizer, tiny_config
from lmforge.generate import SamplingParams, generate_ids
from lmforge.generate.engine import Engine, Request
from lmforge.generate.speculative import NgramDrafter
from lmforge.models.decoder import DecoderLM
from lmforge.nn import invariant
from lmforge.nn.packed import can_pack, packed_linears
from lmforge.nn.quant import Int4Linear, Int8Linear, quantize_model

MODES = ["fp32", "bf16", "int8", "int4"]


def _model(mode: str, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(
        tiny_config("llama", vocab_size=512, d_model=128, n_head=4, n_kv_head=2, d_ff=256, max_seq_len=512)
    ).eval()
    with torch.no_grad():  # a trained model's logits are far from uniform: spread these too
        model.lm_head.weight.mul_(8)
    if mode in ("int8", "int4"):
        quantize_model(model, mode, group_size=32)
    if mode == "bf16":
        model.to(torch.bfloat16)
    return model


@pytest.fixture(scope="module", params=MODES)
def model(request):
    return request.param, _model(request.param)


REPEATING = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 12, 13, 5, 6, 7, 8]
PROMPTS = [
    REPEATING,
    [40, 41, 42],
    [7] * 30 + [3, 9],
    [100 + i for i in range(70)],
    [300, 301, 302, 303, 5, 6],
    [2] * 11,
    [17, 18],
    list(range(200, 260)),
]


def _run(engine: Engine, requests: list[Request]) -> None:
    """Submit all at once and wait for all to finish."""
    left = threading.Semaphore(0)
    for r in requests:
        r.on_event = lambda ev: ev.finish_reason is not None and left.release()
    engine.submit(requests)
    for _ in requests:
        assert left.acquire(timeout=120)
    for r in requests:
        assert r.finish_reason in ("stop", "length"), r.finish_reason


@pytest.mark.parametrize("kind", ["onednn", "linear", "int8", "int4"])
def test_a_products_rows_do_not_depend_on_the_call(kind):
    """Each product kind under its probed plan: a row's result bitwise the same in calls of 1..300 rows, at
    different places in the call (the plans are measured on this machine; the test checks what they promise)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 320)
    if kind == "int8":
        layer = Int8Linear.from_linear(lin)
    elif kind == "int4":
        layer = Int4Linear.from_linear(lin, 32)
    else:
        layer = lin
    x = torch.randn(300, 192)
    if kind == "onednn" and not can_pack(torch.nn.Sequential(lin)):
        pytest.skip("oneDNN cannot take this model's layers here")
    with torch.inference_mode(), packed_linears(torch.nn.Sequential(layer), enabled=kind == "onednn") as m:
        if kind in ("onednn", "linear"):
            assert type(m[0]).__name__ == ("PackedLinear" if kind == "onednn" else "RowLinear")
        alone = torch.cat([m(x[i : i + 1]) for i in range(0, 300, 37)])
        for n in (1, 2, 3, 4, 5, 8, 16, 17, 64, 300):
            for shift in (0, 1):
                if shift + n > 300:
                    continue
                y = m(x[shift : shift + n])
                for j, i in enumerate(range(0, 300, 37)):
                    if shift <= i < shift + n:
                        assert torch.equal(y[i - shift], alone[j]), (kind, n, shift, i)
    assert invariant.report  # what was measured is reported (benchmarks print it)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_invariant_and_right(dtype):
    """A query's output is the same alone, among more queries, and beside rows whose keys reach further (their
    tails hidden), across the key blocks; and it is attention (against the spelled-out formula)."""
    from lmforge.nn.attention import attention_reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 40, 32, generator=g).to(dtype)
    k = torch.randn(3, 2, 600, 32, generator=g).to(dtype)
    v = torch.randn(3, 2, 600, 32, generator=g).to(dtype)
    with torch.inference_mode():
        for t in (0, 7, 255, 256, 300, 599):
            alone = invariant.attention(q[:1, :, :1], k[:1, :, : t + 1], v[:1, :, : t + 1])[0, :, 0]
            hide = (torch.arange(600) <= t)[None, None, None].expand(3, 1, 1, 600)
            among = invariant.attention(q[:, :, :1], k, v, hide)[0, :, 0]
            assert torch.equal(among, alone), t
            n = min(t + 1, 31)  # the same query, last of n causal ones ending at position t
            qs = torch.cat([q[:1, :, 1:n], q[:1, :, :1]], dim=2)
            queries = invariant.attention(qs, k[:1, :, : t + 1], v[:1, :, : t + 1])[0, :, -1]
            assert torch.equal(queries, alone), t
        want = attention_reference(
            q[:, :, :9].float(),
            k[:, :, :300].float().repeat_interleave(3, 1),
            v[:, :, :300].float().repeat_interleave(3, 1),
            torch.ones(9, 300, dtype=torch.bool).tril(291),
        )
        got = invariant.attention(q[:, :, :9], k[:, :, :300], v[:, :, :300]).float()
        assert (got - want).abs().max() < (1e-5 if dtype == torch.float32 else 3e-2)


def test_greedy_with_and_without_a_drafter_is_the_same(model):
    """Speculative verification (k + 1 positions in one pass) gives plain decoding's logits bitwise, so greedy
    decoding with prompt lookup gives the same tokens in every weight mode."""
    mode, m = model
    params = SamplingParams(60, temperature=0)
    for prompt in (REPEATING, PROMPTS[2]):
        plain = [int(t) for t in generate_ids(m, [prompt], params)]
        draft = NgramDrafter(k=5, patience=100)
        assert [int(t) for t in generate_ids(m, [prompt], params, draft=draft)] == plain, mode
        assert draft.stats["passes"] > 0


def test_a_batch_gives_each_row_its_tokens_alone(model):
    """generate_ids over prompts of different lengths: each row greedy as alone, and sampled with seed + i as
    alone with that seed."""
    mode, m = model
    prompts = PROMPTS[:5]
    greedy = SamplingParams(20, temperature=0)
    together = [t.tolist() for t in generate_ids(m, prompts, greedy)]
    for i, p in enumerate(prompts):
        assert [int(t) for t in generate_ids(m, [p], greedy)] == [c[i] for c in together], (mode, i)
    sampled = SamplingParams(20, temperature=1.0, top_k=50, seed=7)
    together = [t.tolist() for t in generate_ids(m, prompts, sampled)]
    for i, p in enumerate(prompts):
        alone = SamplingParams(20, temperature=1.0, top_k=50, seed=7 + i)
        assert [int(t) for t in generate_ids(m, [p], alone)] == [c[i] for c in together], (mode, i)


def test_engine_logits_equal_a_batch1_forward(model):
    """Every decode step's logits for a row, with seven other requests streaming beside it, equal bitwise a
    one-row forward of that row's sequence so far (the same kernels, no other rows)."""
    mode, m = model
    engine = Engine(m, IdsTokenizer(), max_batch=8, max_queue=8)
    logged: dict[int, list[torch.Tensor]] = {}
    commit = engine._commit_rows

    def spy(rows, logits):
        for seq in rows:
            logged.setdefault(id(seq.req), []).append(logits[seq.slot].clone())
        commit(rows, logits)

    engine._commit_rows = spy
    engine.start()
    try:
        reqs = [Request(p, SamplingParams(10 + 3 * i, temperature=0.8, seed=i)) for i, p in enumerate(PROMPTS)]
        _run(engine, reqs)
    finally:
        engine.close()
    with torch.inference_mode(), packed_linears(m, 8):
        for r in reqs[::3]:
            seq = r.prompt_ids + r.completion_ids
            rows = logged[id(r)]
            assert len(rows) == len(r.completion_ids) - 1
            for t in (0, len(rows) // 2, len(rows) - 1):
                prefix = seq[: len(r.prompt_ids) + t + 1]
                alone = m(torch.tensor([prefix]), cache=m.new_cache(1, len(prefix)), last_only=True).logits[0, -1]
                assert torch.equal(rows[t], alone.float()), (mode, t)


def test_a_served_reply_does_not_depend_on_the_other_requests(model):
    """A greedy request alone, then among seven sampled ones (joining and leaving at different steps), a long
    prompt read by chunks beside running streams, and a prompt that starts from the prefix cache: the same
    tokens every time. A seeded sampled request alone and under load: the same tokens too."""
    mode, m = model
    engine = Engine(m, IdsTokenizer(), max_batch=8, max_queue=16, cache_mb=16, prefill_chunk=8).start()
    try:

        def greedy():
            return Request(PROMPTS[3], SamplingParams(25, temperature=0))

        def seeded():
            return Request(PROMPTS[0], SamplingParams(25, temperature=1.0, top_p=0.9, seed=42))

        alone_g, alone_s = greedy(), seeded()
        _run(engine, [alone_g])
        _run(engine, [alone_s])
        chunks = engine.stats.chunks
        for rounds in range(2):  # the second round: prompts start from the prefix cache
            others = [
                Request(p, SamplingParams(8 + 5 * i, temperature=0.9, seed=100 + i)) for i, p in enumerate(PROMPTS[1:7])
            ]
            g, s = greedy(), seeded()
            _run(engine, [others[0], others[1], g, others[2], others[3], s, others[4], others[5]])
            assert g.completion_ids == alone_g.completion_ids, (mode, rounds)
            assert s.completion_ids == alone_s.completion_ids, (mode, rounds)
        assert engine.stats.chunks > chunks, "no prompt was read by chunks beside the streams"
    finally:
        engine.close()


def test_without_invariance_the_kernels_do_differ():
    """The check above can fail: with batch invariance off, fp32 products of one row and of several differ on
    the kernels lmforge uses (MKL and oneDNN both pick another kernel for a single row), so a row's logits move
    with its neighbours."""
    m = _model("fp32")
    x = torch.randn(8, 128)
    lin = m.blocks[0].attn.o_proj
    invariant.set_enabled(False)
    try:
        with torch.inference_mode():
            differs = not torch.equal(lin(x[:1])[0], lin(x)[0])
    finally:
        invariant.set_enabled(True)
    if not differs:
        pytest.skip("this machine's fp32 kernel happens to be batch-invariant at this size")
    with torch.inference_mode(), packed_linears(m):
        o = m.blocks[0].attn.o_proj  # (packed inside the context, under its row plan)
        assert torch.equal(o(x[:1])[0], o(x)[0])
