"""Paged KV memory (lmforge.generate.kv): a sequence holds the blocks its tokens fill and gives them back when it
ends; windowed layers keep only their window; the prefix cache shares blocks instead of copying them; and the
tokens are the ones the model gives without any cache."""

import time

import pytest
import torch

from conftest import IdsTokenizer, tiny_config
from lmforge.errors import LmforgeError
from lmforge.generate.engine import PREFILL_PIECE, Engine, Request
from lmforge.generate.kv import BLOCK, PagedKVCache
from lmforge.generate.sampling import SamplingParams
from lmforge.models.decoder import DecoderLM


def _greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_blocks_follow_the_tokens_held_and_go_back():
    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", max_seq_len=512)).eval()
    cache = PagedKVCache.for_model(model, slots=3, max_len=512)
    with torch.inference_mode():
        for slot, n in ((0, 10), (1, 200)):
            cache.prefill(slot, n)
            model(torch.randint(0, 50, (1, n)), cache=cache)
        assert cache.blocks_used == 1 + 4  # ceil(10 / 64) + ceil(200 / 64): not 2 x the longest
        for _ in range(60):  # row 0 crosses into its second block
            pos, mask = cache.decode([0, 1])
            model(torch.zeros(2, 1, dtype=torch.long), attention_mask=mask, position_ids=pos, cache=cache)
    assert cache.lens[:2] == [70, 260] and cache.blocks_used == 2 + 5
    cache.release(1)
    assert cache.blocks_used == 2 and cache.lens[1] == 0
    assert min(cache.groups[0].free) == 2  # the lowest (already touched) blocks go out first: slot 1's first


def test_windowed_layers_keep_their_window_and_decode_as_without_a_cache():
    torch.manual_seed(0)
    cfg = tiny_config(
        "llama", max_seq_len=512, n_layer=2, sliding_window=70, layer_types=["sliding_attention", "full_attention"]
    )
    model = DecoderLM(cfg).eval()
    prompt = [int(t) for t in torch.randint(5, cfg.vocab_size, (150,))]
    want = _greedy_without_cache(model, prompt, 250)
    engine = Engine(model, IdsTokenizer(), max_batch=2).start()
    try:
        r = Request(prompt, SamplingParams(250, temperature=0))
        held = []
        for _ in engine.stream(r):
            held.append([sum(b != 0 for b in g.tables[r.slot]) for g in engine.cache.groups])
    finally:
        engine.close()
    assert r.completion_ids == want
    windowed, full = engine.cache.groups[0], engine.cache.groups[1]
    assert windowed.window == 70 and full.window is None
    # 400 positions at the end: the full layer holds 7 blocks, the windowed one at most the 3 its window can
    # touch, 1 spare and the one being filled
    assert max(h[1] for h in held) == 7 and max(h[0] for h in held) == 4
    assert engine.cache.blocks_used == 0  # all given back


def test_a_shared_prefix_is_shared_blocks_not_copies():
    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", max_seq_len=512)).eval()
    system = [int(t) for t in torch.randint(5, model.config.vocab_size, (2 * BLOCK + 5,))]
    engine = Engine(model, IdsTokenizer(), max_batch=2, cache_mb=4).start()
    try:
        first = Request(system + [7], SamplingParams(40, temperature=0))
        list(engine.stream(first))
        held = engine.cache.blocks_used  # the prefix cache's 2 blocks
        second = Request(system + [9, 10], SamplingParams(200, temperature=0))
        tables = []
        for _ in engine.stream(second):
            if not tables:
                tables = list(engine.cache.groups[0].tables[second.slot])
        entry = next(iter(engine.prefix.entries.values()))
    finally:
        engine.close()
    assert held == 2 and engine.prefix.hits == 1 and engine.prefix.reused_tokens == 2 * BLOCK
    assert tables[:2] == entry.ids[0]  # the same blocks, by reference
    assert second.completion_ids == _greedy_without_cache(model, system + [9, 10], 200)
    assert engine.cache.blocks_used == 2  # the sequences' blocks went back; the cache's stay


def test_a_full_cache_says_what_to_do():
    model = DecoderLM(tiny_config("llama", max_seq_len=256)).eval()
    cache = PagedKVCache.for_model(model, slots=2, max_len=128)
    with pytest.raises(LmforgeError, match="KV cache full: 129 positions"):
        cache.prefill(0, 129)
    cache.groups[0].free.clear()  # every block held elsewhere
    with pytest.raises(LmforgeError, match="KV memory is full.*--max-batch"):
        cache.prefill(1, 10)


def test_a_long_prompt_is_read_in_pieces_with_the_tokens_of_one_pass():
    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", max_seq_len=1024)).eval()
    prompt = [int(t) for t in torch.randint(5, model.config.vocab_size, (PREFILL_PIECE + 300,))]
    engine = Engine(model, IdsTokenizer(), max_batch=1).start()
    try:
        r = Request(prompt, SamplingParams(6, temperature=0), logprobs=0)
        first = next(t for ev in list(engine.stream(r)) for t in ev.tokens).logprob
    finally:
        engine.close()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    assert r.completion_ids == _greedy_without_cache(model, prompt, 6)
    assert abs(first - float(ref[r.completion_ids[0]])) < 1e-4


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.int8])
def test_narrow_blocks_save_memory_and_keep_the_replies_batch_invariant(narrow):
    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", max_seq_len=512)).eval()
    prompt = [int(t) for t in torch.randint(5, model.config.vocab_size, (100,))]

    def served(kv_dtype, chunk=0, beside=False):
        engine = Engine(model, IdsTokenizer(), max_batch=2, kv_dtype=kv_dtype, prefill_chunk=chunk).start()
        try:
            other = Request([3, 4, 5], SamplingParams(300, temperature=0))
            if beside:  # a stream running, so that the prompt goes in by chunks beside it
                engine.submit([other])
                while len(other.completion_ids) < 2:
                    time.sleep(0.001)
            r = Request(prompt, SamplingParams(30, temperature=0), logprobs=0)
            events = list(engine.stream(r))
            r.first = next(t for ev in events for t in ev.tokens).logprob
            engine.cancel(other)
            return engine, r
        finally:
            engine.close()

    wide, r32 = served(None)
    small, r16 = served(narrow)
    by_chunks, chunked = served(narrow, chunk=16, beside=True)
    assert small.cache.groups[0].k[0].dtype == narrow and small.cache.compute == torch.float32
    D = model.config.head_dim  # bf16: half of float32; int8: a byte a number and a float32 scale a vector
    want = D * 2 if narrow == torch.bfloat16 else D + 4
    assert small.cache.block_bytes * 4 * D == wide.cache.block_bytes * want
    assert by_chunks.stats.chunks > 0 and small.stats.chunks == 0
    assert len(r16.completion_ids) == 30 and r16.finish_reason == "length"
    assert chunked.completion_ids == r16.completion_ids  # read whole or by chunks beside a stream: the same tokens
    assert r32.completion_ids[0] == r16.completion_ids[0] and abs(r32.first - r16.first) < 0.05  # keys rounded
