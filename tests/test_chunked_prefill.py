"""Chunked prefill in the serving engine: a long prompt that arrives while another sequence streams goes in by
chunks beside that sequence's steps, and both get the tokens they get alone."""

import time

import torch

from conftest import IdsTokenizer, tiny_config
from lmforge.generate import generate_ids
from lmforge.generate.engine import Engine, Request
from lmforge.generate.sampling import SamplingParams
from lmforge.models.decoder import DecoderLM


def _plain(model, prompt, n):
    return [int(t) for t in generate_ids(model, [prompt], SamplingParams(n, temperature=0))]


def test_a_long_prompt_goes_in_by_chunks_beside_a_running_stream():
    torch.manual_seed(0)
    model = DecoderLM(tiny_config("llama", max_seq_len=256)).eval()
    V = model.config.vocab_size
    short = [3, 4, 5]
    long = [int(t) for t in torch.randint(1, V, (150,))]
    engine = Engine(model, IdsTokenizer(), max_batch=3, prefill_chunk=12).start()
    try:
        a = Request(short, SamplingParams(120, temperature=0))
        engine.submit([a])
        deadline = time.monotonic() + 60
        while len(a.completion_ids) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        b = Request(long, SamplingParams(10, temperature=0))
        events = list(engine.stream(b))
        while a.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats.chunks >= 150 // 12, engine.stats.chunks  # b went in by chunks of at most 12
        assert a.finish_reason == "length" and b.finish_reason == "length" and events[-1].finish_reason == "length"
        assert b.completion_ids == _plain(model, long, 10)
        assert a.completion_ids == _plain(model, short, 120)
        # alone (nothing streaming), a long prompt is prefilled whole
        chunks = engine.stats.chunks
        c = Request(long, SamplingParams(4, temperature=0))
        list(engine.stream(c))
        assert engine.stats.chunks == chunks and c.completion_ids == b.completion_ids[:4]
    finally:
        engine.close()
