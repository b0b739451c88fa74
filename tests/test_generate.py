import pytest
import torch

from conftest import IdsTokenizer, in_threads, tiny_config
from lmforge.errors import LmforgeError
from lmforge.generate import SamplingParams, generate, generate_ids, next_token
from lmforge.generate.sampling import filter_top_p
from lmforge.models import DecoderLM
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tok = Tokenizer.train_bpe(["the cat sat on the mat. the dog ate the bone."] * 20, vocab_size=300)
    model = DecoderLM(tiny_config("llama", vocab_size=tok.vocab_size, max_seq_len=128)).eval()
    return model, tok


def greedy_reference(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids


def test_greedy_matches_full_forward_argmax(lm):
    model, _ = lm
    prompt = [5, 17, 42, 9]
    out = [int(t) for t in generate_ids(model, [prompt], SamplingParams(12, temperature=0))]
    assert prompt + out == greedy_reference(model, prompt, 12)


def test_temperature_to_zero_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 500)
    greedy = next_token(logits, SamplingParams(temperature=0))
    cold = next_token(logits, SamplingParams(temperature=1e-4), torch.Generator().manual_seed(0))
    assert torch.equal(greedy, cold)


def test_top_k_never_samples_outside_k_best():
    torch.manual_seed(0)
    logits = torch.randn(8, 200)
    allowed = torch.topk(logits, 5, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        t = next_token(logits, SamplingParams(temperature=2.0, top_k=5), g)
        assert (allowed == t[:, None]).any(-1).all()


def test_top_p_never_samples_outside_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(8, 100) * 3
    p = 0.7
    probs = torch.softmax(logits, -1)
    nucleus = []
    for row in probs:
        order = row.argsort(descending=True)
        mass, keep = 0.0, set()
        for i in order.tolist():
            keep.add(i)
            mass += row[i].item()
            if mass >= p:
                break
        nucleus.append(keep)
    kept = torch.isfinite(filter_top_p(logits, p))
    for r, keep in enumerate(nucleus):
        assert set(kept[r].nonzero().flatten().tolist()) == keep
    g = torch.Generator().manual_seed(2)
    for _ in range(200):
        t = next_token(logits, SamplingParams(temperature=1.0, top_p=p), g)
        assert all(int(t[r]) in nucleus[r] for r in range(8))


def test_seed_makes_sampling_repeatable(lm):
    model, tok = lm
    a = generate(model, tok, "the cat", max_new_tokens=20, temperature=1.0, seed=3)
    b = generate(model, tok, "the cat", max_new_tokens=20, temperature=1.0, seed=3)
    c = generate(model, tok, "the cat", max_new_tokens=20, temperature=1.0, seed=4)
    assert a == b and a != c


def test_batch_with_left_padding_equals_one_by_one(lm):
    model, tok = lm
    prompts = ["the", "the cat sat on", "a dog ate the bone and"]
    batch = generate(model, tok, prompts, max_new_tokens=15, temperature=0)
    alone = [generate(model, tok, p, max_new_tokens=15, temperature=0) for p in prompts]
    assert batch == alone


def test_stop_strings_stop(lm):
    model, tok = lm
    full = generate(model, tok, "the", max_new_tokens=40, temperature=0)
    stop = full[5:8]
    assert stop and stop in full
    cut = generate(model, tok, "the", max_new_tokens=40, temperature=0, stop=[stop])
    assert cut == full[: full.index(stop)]
    streamed = []
    generate(model, tok, "the", max_new_tokens=40, temperature=0, stop=[stop], on_text=lambda i, s: streamed.append(s))
    assert "".join(streamed) == cut


def test_streaming_pieces_join_to_the_result(lm):
    model, tok = lm
    pieces = []
    text = generate(
        model, tok, "the dog", max_new_tokens=25, temperature=0.9, seed=0, on_text=lambda i, s: pieces.append(s)
    )
    assert "".join(pieces) == text and len(pieces) > 1


def test_repetition_penalty_changes_greedy_output(lm):
    model, tok = lm
    plain = generate(model, tok, "the cat", max_new_tokens=30, temperature=0)
    penalised = generate(model, tok, "the cat", max_new_tokens=30, temperature=0, repetition_penalty=5.0)
    assert plain != penalised


def test_prompt_longer_than_context_is_a_clear_error(lm):
    model, _ = lm
    with pytest.raises(LmforgeError, match="exceeds the model's context"):
        list(generate_ids(model, [[1] * 120], SamplingParams(max_new_tokens=20)))
    with pytest.raises(LmforgeError, match="top_p"):
        list(generate_ids(model, [[1]], SamplingParams(top_p=1.5)))


def test_packed_weights_match_plain_linears(lm):
    from lmforge.nn.packed import can_pack, packed_linears, release_packed

    model, tok = lm
    if not can_pack(model):
        pytest.skip("oneDNN is not available in this torch build")
    from lmforge.nn.packed import FusedLinear, PackedLinear

    x = torch.randint(0, tok.vocab_size, (3, 20))
    keys, linears = list(model.state_dict()), [id(m) for m in model.modules() if type(m) is torch.nn.Linear]
    params = [id(p) for p in model.parameters()]
    with torch.inference_mode():
        plain = model(x).logits
        with packed_linears(model, batch_hint=3):
            # the tree shows what runs; parameters and state_dict keys are the model's own
            assert type(model.blocks[0].mlp.down) is PackedLinear and type(model.lm_head) is PackedLinear
            assert type(model.blocks[0].attn.fused) is FusedLinear
            left = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is torch.nn.Linear}
            assert left <= {"q_proj", "k_proj", "v_proj", "gate", "up"}  # only the fused siblings stay plain
            assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
            packed = model(x).logits
        after = model(x).logits
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, plain)  # the context puts the plain layers back
    assert [id(m) for m in model.modules() if type(m) is torch.nn.Linear] == linears
    assert model.blocks[0].attn.fused is None
    prompts = [tok.encode("the cat"), tok.encode("a dog ate the bone")]
    a = [t.tolist() for t in generate_ids(model, prompts, SamplingParams(20, temperature=0), pack_weights=True)]
    b = [t.tolist() for t in generate_ids(model, prompts, SamplingParams(20, temperature=0), pack_weights=False)]
    assert a == b
    from lmforge.nn import packed as packed_module

    assert any(m in packed_module._BUILT for m in model.modules())  # kept for the next call ...
    release_packed(model)
    assert not any(m in packed_module._BUILT for m in model.modules())  # ... until released


def test_overlapping_packed_contexts_on_one_model(lm):
    """The serving engine keeps a context open for its whole life while a caller's generate() opens and closes
    others on the same model, from other threads: whichever closes first, the layers stay in until the last one
    closes (closing one used to empty the fused slot under the other's running forward pass), and a forward in a
    thread keeps working while contexts open and close around it."""
    import threading

    from lmforge.nn.packed import FusedLinear, PackedLinear, can_pack, packed_linears

    model, tok = lm
    if not can_pack(model):
        pytest.skip("oneDNN is not available in this torch build")
    attn, down = model.blocks[0].attn, model.blocks[0].mlp
    x = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.inference_mode():
        plain = model(x).logits
        a, b = packed_linears(model, 8), packed_linears(model, 1)
        a.__enter__()
        first = attn.fused
        b.__enter__()
        assert attn.fused is first and type(down.down) is PackedLinear  # b joins a's layers
        a.__exit__(None, None, None)  # the first one closes while the second is still open
        assert attn.fused is first and type(down.down) is PackedLinear
        b.__exit__(None, None, None)
        assert attn.fused is None and type(down.down) is torch.nn.Linear
        errors, outs, stop = [], [], threading.Event()

        def forwards():
            with torch.inference_mode():
                try:
                    while not stop.is_set():
                        outs.append(model(x).logits)
                except Exception as e:  # noqa: BLE001 - the failure is what the test looks for
                    errors.append(e)

        with packed_linears(model, 8):
            t = threading.Thread(target=forwards)
            t.start()
            for _ in range(30):
                with packed_linears(model, 1):
                    assert type(attn.fused) is FusedLinear
            stop.set()
            t.join()
    assert not errors and outs
    for out in outs:
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2-bias", "lora", "int8", "int4"])
def test_fused_projections_match_separate_ones(kind):
    """Inside packed_linears, q/k/v (grouped-query in llama) and gate/up run as one product each, also as int8
    or int4 weight-only layers; the logits and a cached decode match the unfused model, and the state_dict is the
    same inside the context. A LoRA-adapted projection is left unfused."""
    from lmforge.nn.lora import apply_lora
    from lmforge.nn.packed import can_pack, packed_linears
    from lmforge.nn.quant import quantize_model

    torch.manual_seed(0)
    cfg = tiny_config("gpt2" if kind == "gpt2" else "llama", **({"qkv_bias": True} if kind == "qwen2-bias" else {}))
    model = DecoderLM(cfg).eval()
    if not can_pack(model):
        pytest.skip("oneDNN is not available in this torch build")
    if kind == "lora":
        apply_lora(model, "q_proj", r=2)
        model.eval()  # (the adapters' dropout)
        for m in model.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B)
    if kind in ("int8", "int4"):
        quantize_model(model, kind, group_size=32)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.inference_mode():
        plain = model(x).logits
        keys = list(model.state_dict())
        with packed_linears(model, batch_hint=2):
            assert list(model.state_dict()) == keys
            attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
            assert (attn.fused is not None) == (kind != "lora")
            assert (mlp.fused is not None) == (kind != "gpt2")  # gpt2's MLP has no gate
            fused = model(x).logits
        assert attn.fused is None and mlp.fused is None  # the context ends the fused path
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    a = [t.tolist() for t in generate_ids(model, x.tolist(), SamplingParams(8, temperature=0), pack_weights=True)]
    b = [t.tolist() for t in generate_ids(model, x.tolist(), SamplingParams(8, temperature=0), pack_weights=False)]
    assert a == b


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_compiled_single_row_decoding_matches_eager(style):
    """At batch 1 a compiled step runs each product as a multiply-and-sum loop (lmforge.nn.packed.gemv) and
    attention as sums over the cache: the step's logits match the eager forward's and the greedy tokens are the
    eager ones; outside the compiled step the Linear layers are plain again."""
    from lmforge.generate.sampling import compiled_decode_step
    from lmforge.nn.packed import packed_linears

    torch.manual_seed(0)
    model = DecoderLM(tiny_config(style, max_seq_len=256)).eval()
    prompt = [5, 17, 42, 9, 3, 8, 1]
    params = SamplingParams(24, temperature=0)
    eager = [t.tolist() for t in generate_ids(model, [prompt], params)]
    assert [t.tolist() for t in generate_ids(model, [prompt], params, compile=True)] == eager
    assert not any(type(m).__name__ in ("GemvLinear", "PackedLinear", "FusedLinear") for m in model.modules())
    with torch.inference_mode(), packed_linears(model, 1, gemv=True):
        assert type(model.blocks[0].attn.q_proj).__name__ == "GemvLinear"
        cache = model.new_cache(1, 128, static=True)
        model(torch.tensor([prompt]), cache=cache)
        keys = torch.zeros(1, 128, dtype=torch.bool)
        keys[:, : len(prompt) + 1] = True
        cache.at = torch.tensor([len(prompt)])
        step = compiled_decode_step()(
            model, torch.tensor([[7]]), keys.sum(-1, keepdim=True) - 1, keys[:, None, None, :], cache
        )
    full = model(torch.tensor([prompt + [7]])).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_compiled_decoding_matches_eager(style):
    """compile=True (torch.compile over a static KV cache, packed weights inside the graph) gives the eager
    tokens for a left-padded batch, and later calls of the same shapes, on this model or another, reuse the
    compiled graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = DecoderLM(tiny_config(style, max_seq_len=256)).eval()
    prompts = [[5, 17, 42, 9, 3, 8, 1], [11, 2]]
    params = SamplingParams(24, temperature=0)
    eager = [t.tolist() for t in generate_ids(model, prompts, params)]
    compiled = [t.tolist() for t in generate_ids(model, prompts, params, compile=True)]
    assert compiled == eager
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the compiled path ran (fullgraph: a graph break would have raised)
    again = [t.tolist() for t in generate_ids(model, prompts, SamplingParams(30, temperature=0), compile=True)]
    assert again[:24] == eager
    torch.manual_seed(1)  # another model of the same shape shares the graph (its weights are inputs, not constants)
    other = DecoderLM(tiny_config(style, max_seq_len=256)).eval()
    other_eager = [t.tolist() for t in generate_ids(other, prompts, params)]
    assert other_eager != eager
    assert [t.tolist() for t in generate_ids(other, prompts, params, compile=True)] == other_eager
    assert counters["stats"]["unique_graphs"] == graphs  # same shapes, batch and length bucket: no recompilation


def test_compile_failure_is_a_clear_error(lm, monkeypatch):
    from lmforge.generate import sampling

    def broken(*args):
        raise RuntimeError("CppCompileError: no C++ compiler found\nmore lines")

    monkeypatch.setattr(sampling, "compiled_decode_step", lambda: broken)
    model, _ = lm
    with pytest.raises(LmforgeError, match="torch.compile could not compile.*no C\\+\\+ compiler found.*without"):
        list(generate_ids(model, [[5, 17, 42]], SamplingParams(4, temperature=0), compile=True))


@pytest.mark.parametrize("kind", ["smollm2-bpe", "unigram"])
def test_text_stream_decodes_incrementally_and_matches_the_whole_decode(kind):
    """TextStream decodes a few tokens per push, never the whole reply, and what it shows equals decoding all the
    ids at once: random token sequences (multi-byte characters split over tokens included), with and without
    stop strings, on byte-level BPE (SmolLM2's) and a SentencePiece-style Unigram (leading-space markers)."""
    import random

    from lmforge.assets import model_file
    from lmforge.generate.sampling import TextStream
    from lmforge.interop.gguf import _reader
    from lmforge.interop.gguf_vocab import tokenizer_from_gguf

    if kind == "smollm2-bpe":
        path = model_file("smollm2-135m-instruct")
        tok = tokenizer_from_gguf(_reader(path), str(path))
    else:
        tok = Tokenizer.train_unigram(
            ["the cat sat on the mat", "naïve café über straße", "a dog ate the bone"] * 20, vocab_size=120
        )
    text = "The café served crème brûlée — 日本語 too. Stop here STOP and more after it."
    base = tok.encode(text)
    rng = random.Random(0)
    longest = []
    real = tok.decode

    class Counting:  # the tokenizer, counting how many ids each decode is given
        calls: list[int] = []

        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, part, **kw):
            self.calls.append(len(part))
            return real(part, **kw)

    for trial in range(30):
        ids = base if trial == 0 else [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        for stop in ([], ["STOP"]):
            counting = Counting()
            counting.calls = calls = []
            s = TextStream(counting, stop)
            shown = "".join(s.push(i) for i in ids) + s.flush()
            whole = real(ids)
            want = whole[: whole.find("STOP")] if stop and "STOP" in whole else whole
            if not (stop and "STOP" in whole):
                assert shown == want, (trial, stop)
            else:
                assert shown == want and s.stopped
            longest.append(max(calls[:-1] or [0]))  # (flush may decode once in full)
    assert max(longest) <= 8  # a few tokens per push, whatever the reply's length


@pytest.mark.parametrize("top_k, top_p", [(None, None), (3, None), (None, 0.8), (4, 0.7)])
def test_batched_sampler_draws_the_filtered_distribution(top_k, top_p):
    """`sample` (one pass for the whole batch, inverse transform over the candidates) draws each token with the
    probability the filters leave it: 40,000 rows of the same six logits, frequencies within 0.01."""
    from lmforge.generate.sampling import filter_top_k, sample

    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    kept = logits.clone()
    if top_k is not None:
        kept = filter_top_k(kept[None], top_k)[0]
    if top_p is not None:
        kept = filter_top_p(kept[None], top_p)[0]
    want = torch.softmax(kept, -1)
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    got = torch.bincount(sample(logits.expand(n, -1), top_k, top_p, u), minlength=6).float() / n
    assert (got - want).abs().max() < 0.01, (got, want)
    assert (got[want == 0] == 0).all()  # nothing outside the filters, ever


def test_top_p_reaches_past_the_first_candidates():
    """With a flat distribution the nucleus holds more tokens than top-p's first look (CANDIDATES): the sampler
    widens it and draws from the whole nucleus, as the full sort would."""
    from lmforge.generate.pick import CANDIDATES, sample

    logits = -torch.arange(4 * CANDIDATES, dtype=torch.float32)[None] * 1e-3  # nearly flat, no ties
    logits[0, 0] = 3.0
    nucleus = torch.isfinite(filter_top_p(logits, 0.9))[0]
    assert nucleus.sum() > CANDIDATES
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(1))
    drawn = sample(logits.expand(20_000, -1), None, 0.9, u)
    assert nucleus[drawn].all() and int(drawn.max()) >= CANDIDATES


def test_seeded_rows_sampled_together_equal_each_alone():
    """The engine samples its rows in one pass, each seeded request from its own generator: three seeded
    requests (different temperatures, the same filters) decoding side by side give the tokens each gives alone."""
    from lmforge.generate.engine import Engine, Request

    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", max_seq_len=128)).eval()

    def params(i):
        return SamplingParams(max_new_tokens=15, temperature=0.7 + 0.3 * i, top_k=40, top_p=0.9, seed=11 + i)

    prompts = [[5, 6, 7], [9, 10], [3, 4, 5, 6]]
    engine = Engine(model, IdsTokenizer(), max_batch=3, max_queue=8).start()
    alone = []
    for i, p in enumerate(prompts):
        r = Request(p, params(i))
        list(engine.stream(r))
        alone.append(r.completion_ids)
    together: dict[int, list[int]] = {}

    def run(i):
        r = Request(prompts[i], params(i))
        list(engine.stream(r))
        together[i] = r.completion_ids

    steps = engine.stats.steps
    rows = engine.stats.batch_rows
    in_threads(run, 3)
    shared = engine.stats.batch_rows - rows > engine.stats.steps - steps
    engine.close()
    assert [together[i] for i in range(3)] == alone
    assert shared, "the requests never shared a decode step"
