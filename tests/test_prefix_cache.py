"""The serving engine's prefix cache: prompts that begin like an earlier one reuse its keys and values in whole
blocks, give the same tokens as with the cache off, and the cache keeps to its memory limit (LRU)."""

import torch

from conftest import IdsTokenizer, tiny_config
from lmforge.generate.engine import Engine, Request
from lmforge.generate.prefix import PrefixCache
from lmforge.generate.sampling import SamplingParams
from lmforge.models.decoder import DecoderLM


class _Held:  # a payload as the paged cache hands them out: n positions, 10 bytes a position
    def __init__(self, n: int) -> None:
        self.n, self.nbytes = n, 10 * n


def test_lookup_store_replace_and_evict():
    forgotten = []
    c = PrefixCache(max_bytes=160, block=4, forget=lambda kv: forgotten.append(kv.n))
    a = list(range(10))
    assert c.lookup(a) == (0, None) and c.misses == 1
    c.store(a, _Held)  # 8 of its 10 tokens: whole blocks of 4
    assert list(c.entries) == [tuple(range(8))]
    n, kv = c.lookup(a[:7] + [99, 98])  # shares 7 tokens: one whole block
    assert n == 4 and kv.n == 8 and c.hits == 1 and c.reused_tokens == 4
    assert c.lookup(a[:8])[0] == 4  # at least one token is left to run
    c.store(a + [10, 11], _Held)  # 12 tokens: replaces the 8-token entry it extends, which is let go
    assert list(c.entries) == [tuple(range(12))] and c.bytes == 120 and forgotten == [8]
    calls = []
    c.store(a[:9], lambda n: calls.append(n))  # already held by the longer entry: nothing taken
    assert calls == []
    c.store([50 + i for i in range(8)], _Held)  # over the limit with both: the least recently used goes
    assert list(c.entries) == [tuple(50 + i for i in range(8))] and c.bytes <= c.max_bytes and forgotten == [8, 12]
    c.store(list(range(100, 140)), _Held)  # larger than the whole budget: not kept, its blocks let go at once
    assert tuple(range(100, 140)) not in c.entries and forgotten == [8, 12, 40]
    c.clear()
    assert not c.entries and c.bytes == 0 and forgotten == [8, 12, 40, 8]


def test_engine_reuses_a_shared_prefix_with_the_same_tokens():
    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", max_seq_len=256)).eval()
    system = [int(t) for t in torch.randint(5, model.config.vocab_size, (150,))]
    prompts = [system + [7, 8, 9], system + [11, 12], system[:70] + [3], [1, 2, 3]]
    params = SamplingParams(12, temperature=0)

    def run(cache_mb):
        engine = Engine(model, IdsTokenizer(), max_batch=2, cache_mb=cache_mb).start()
        try:
            out = []
            for p in prompts:
                r = Request(p, params)
                list(engine.stream(r))
                out.append(r.completion_ids)
            return out, engine.prefix
        finally:
            engine.close()

    off, _ = run(0)
    on, cache = run(16)
    assert on == off
    # the first prompt misses and is kept (128 of its 153 tokens); the second reuses 128, the third 64
    assert cache.hits == 2 and cache.misses == 2 and cache.reused_tokens == 128 + 64
