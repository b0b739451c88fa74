"""Decoding for encoder-decoder models: greedy, sampling (temperature, top-k, top-p) and beam search, batched.

The source is encoded once; every step runs the decoder on one new token per row over a KV cache, with the
encoder's keys and values projected once (`Seq2SeqLM.new_cache`).

Beam search is lmforge.generate.beam's, the one loop decoders use too (transformers' rules: the same weights decode
to the same text, tests/test_seq2seq.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.beam import BeamParams, ban_repeated_ngrams, beam_search
from lmforge.generate.sampling import SamplingParams, next_token


@dataclass
class Seq2SeqParams:
    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0  # > 0 favours longer hypotheses, < 0 shorter ones
    early_stopping: bool | str = False  # True, False or "never"
    no_repeat_ngram_size: int = 0  # no n-gram of this size occurs twice in an output (0 = off)
    num_return_sequences: int = 1
    temperature: float = 0.0  # 0 = greedy (or plain beam search); > 0 samples
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        SamplingParams(
            self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed
        ).validate()
        if self.num_beams < 1:
            raise LmforgeError(f"num_beams must be at least 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams and self.num_beams > 1:
            raise LmforgeError(
                f"num_return_sequences ({self.num_return_sequences}) must be between 1 and num_beams ({self.num_beams})"
            )
        if self.num_beams > 1 and self.temperature > 0:
            raise LmforgeError(
                "beam search is deterministic here: use num_beams > 1 with temperature 0, or sample with num_beams 1"
            )
        if self.early_stopping not in (True, False, "never"):
            raise LmforgeError(f"early_stopping must be true, false or never, got {self.early_stopping!r}")
        if self.no_repeat_ngram_size < 0:
            raise LmforgeError(f"no_repeat_ngram_size must be zero or positive, got {self.no_repeat_ngram_size}")


@torch.inference_mode()
def generate_seq2seq_ids(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, params: Seq2SeqParams | None = None
) -> torch.Tensor:
    """Generated target ids [B * num_return_sequences, T] (no start token; EOS kept; padding after it)."""
    params = params or Seq2SeqParams()
    params.validate()
    model.eval()
    if params.num_beams > 1:
        return _beam_search(model, input_ids, attention_mask, params)
    return _sample(model, input_ids, attention_mask, params)


def _sample(model, input_ids, attention_mask, p: Seq2SeqParams) -> torch.Tensor:
    c = model.config
    B = input_ids.size(0)
    enc = model.encode(input_ids, attention_mask)
    cache = model.new_cache(enc, attention_mask, max(1, p.max_new_tokens))
    gen = torch.Generator(device=input_ids.device).manual_seed(p.seed) if p.seed is not None else None
    sp = SamplingParams(p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed)
    seqs = torch.full((B, p.max_new_tokens + 1), c.pad_token_id, dtype=torch.long, device=input_ids.device)
    seqs[:, 0] = c.decoder_start_token_id
    seen = (
        torch.zeros(B, c.vocab_size, dtype=torch.bool, device=input_ids.device) if p.repetition_penalty != 1.0 else None
    )
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    length = 1
    for _ in range(p.max_new_tokens):
        logits = model.head(model.decode(seqs[:, length - 1 : length], cache=cache))[:, -1].float()
        logits = ban_repeated_ngrams(seqs, length, p.no_repeat_ngram_size, logits)
        tok = next_token(logits, sp, gen, seen)
        tok = torch.where(done, torch.full_like(tok, c.pad_token_id), tok)
        seqs[:, length] = tok
        length += 1
        if seen is not None:
            seen[torch.arange(B), tok] = True
        done |= tok == c.eos_token_id
        if bool(done.all()):
            break
    return seqs[:, 1:length]


def _beam_search(model, input_ids, attention_mask, p: Seq2SeqParams) -> torch.Tensor:
    c = model.config
    B, nb = input_ids.size(0), p.num_beams
    max_len = p.max_new_tokens + 1  # the start token counts, as it does in transformers
    enc = model.encode(input_ids, attention_mask).repeat_interleave(nb, dim=0)
    mask = attention_mask.repeat_interleave(nb, dim=0) if attention_mask is not None else None
    cache = model.new_cache(enc, mask, max_len)

    def step(seqs: torch.Tensor, cur: int) -> torch.Tensor:
        return model.head(model.decode(seqs[:, cur - 1 : cur], cache=cache))[:, -1]

    def reorder(rows: torch.Tensor) -> None:
        cache.reorder(rows, same_source=True)  # a beam's parent has its source

    start = torch.full((B, 1), c.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    params = BeamParams(nb, p.length_penalty, p.early_stopping, p.num_return_sequences, p.no_repeat_ngram_size)
    seqs, _ = beam_search(step, reorder, start, max_len, params, [c.eos_token_id], c.pad_token_id)
    out = seqs.reshape(B * p.num_return_sequences, max_len)[:, 1:]
    # everything after a row's first EOS is padding; trim the columns no row uses
    is_eos = out == c.eos_token_id
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    out = out.masked_fill(after, c.pad_token_id)
    used = (out != c.pad_token_id) | is_eos
    width = int(used.nonzero()[:, 1].max()) + 1 if bool(used.any()) else 1
    return out[:, :width]


# --------------------------------------------------------------------------------------------------------------
# text in, text out


def generate_seq2seq(
    model,
    tokenizer,
    sources: Sequence[str],
    params: Seq2SeqParams | None = None,
    prefix: str = "",
    batch_size: int = 32,
    max_source_len: int | None = None,
    progress: bool = False,
) -> list[str] | list[list[str]]:
    """Outputs for each source text (a list of num_return_sequences texts each when that is above 1).
    Sources are batched by length (less padding), truncated to max_source_len tokens (default: the model's
    max_seq_len) with the EOS kept, and the results come back in the input order."""
    params = params or Seq2SeqParams()
    params.validate()
    limit = max_source_len or model.config.max_seq_len
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    encoded = [tokenizer.encode(prefix + s)[: limit - 1] + [eos] for s in sources]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list = [None] * len(encoded)
    device = next(model.parameters()).device
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    for start in batches:
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[r, : len(encoded[i])] = 1
        out = generate_seq2seq_ids(model, ids.to(device), mask.to(device), params).tolist()
        R = params.num_return_sequences if params.num_beams > 1 else 1
        for r, i in enumerate(idx):
            texts = [
                tokenizer.decode([t for t in row if t not in (eos, pad)]).strip() for row in out[r * R : (r + 1) * R]
            ]
            results[i] = texts if R > 1 else texts[0]
    return results
