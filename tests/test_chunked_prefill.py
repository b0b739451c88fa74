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


def test_a_chunk_goes_through_a_few_layers_a_step_into_a_slot_below_a_running_row(style):
    """Staged chunks (one layer of a chunk per step, DecoderLM.staged_step): the long prompt lands in slot 0 while
    the row streaming is slot 1 (the chunk's slot is an idle row of the decode part, whose writes must not touch
    it), and every sequence gets the tokens it gets alone, GPT-2 (learned positions) and Llama (RoPE) alike."""
    torch.manual_seed(1)
    model = DecoderLM(tiny_config(style, max_seq_len=256)).eval()
    V = model.config.vocab_size
    long = [int(t) for t in torch.randint(1, V, (70,))]
    engine = Engine(model, IdsTokenizer(), max_batch=2, prefill_chunk=16)
    engine._max_span = 1
    engine.start()
    try:
        first = Request([7, 8], SamplingParams(2, temperature=0))
        runner = Request([3, 4, 5], SamplingParams(200, temperature=0))
        engine.submit([first, runner])
        deadline = time.monotonic() + 60
        while (first.finish_reason is None or len(runner.completion_ids) < 3) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert first.slot == 0 and runner.slot == 1 and runner.finish_reason is None
        b = Request(long, SamplingParams(8, temperature=0), logprobs=0)
        events = list(engine.stream(b))
        while runner.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.slot == 0
        # the first token's log-probability equals one whole forward pass's: no key or value of the prompt was
        # written over while it went in (plain steps run between its chunks, with its row idle)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([long])).logits[0, -1].float(), -1)[b.completion_ids[0]]
        first = next(t for ev in events for t in ev.tokens)
        assert abs(first.logprob - float(ref)) < 1e-4, (first.logprob, float(ref))
        n_layer = model.config.n_layer
        # 70 tokens in chunks of at most 16, each chunk one layer per step while the runner streams
        assert engine.stats.chunks >= n_layer * (70 // 16), engine.stats.chunks
        assert b.completion_ids == _plain(model, long, 8)
        assert runner.completion_ids == _plain(model, [3, 4, 5], 200)
    finally:
        engine.close()
