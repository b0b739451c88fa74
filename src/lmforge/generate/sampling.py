"""Decoding for causal LMs: greedy, temperature, top-k, top-p (nucleus), repetition penalty, stop strings,
streaming, and batches of prompts with left padding, over a preallocated KV cache.

`generate_ids` is the token-level engine (a generator: one tensor of new tokens per step, so callers can stream);
`generate` is the text-level call most users want.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch

from lmforge.config import SamplingParams  # noqa: F401 (declared with the other settings; re-exported here)
from lmforge.errors import LmforgeError
from lmforge.generate.beam import BeamParams, decoder_beam_search
from lmforge.generate.constrain import Constraint
from lmforge.generate.engine import Engine, Request
from lmforge.generate.pick import (  # noqa: F401 (re-exported: the names sampling has always had)
    TextStream,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    next_token,
    row_generators,
    sample,
)
from lmforge.nn import packed
from lmforge.nn.packed import packed_linears

# --------------------------------------------------------------------------------------------------------------
# the token-level loop


def _decode_step(model, x, position_ids, mask, cache):
    return model(x, attention_mask=mask, position_ids=position_ids, cache=cache, last_only=True).logits[:, -1]


_compiled_steps: dict = {}


def compiled_decode_step():
    """`_decode_step` through torch.compile: one graph per (model, batch, cache length), built on first use
    (tens of seconds on a CPU) and kept for the process; the norms, rotary, residual adds and activations of a
    step fuse into a few generated kernels instead of some 600 small ops and their Python."""
    if "step" not in _compiled_steps:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled_steps["step"] = torch.compile(_decode_step, fullgraph=True, dynamic=False)
    return _compiled_steps["step"]


COMPILE_BUCKET = 128  # compiled decoding sizes its cache to a multiple of this, so nearby lengths share a graph


@torch.inference_mode()
def generate_ids(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    pack_weights: bool = True,
    compile: bool = False,
    draft=None,
    constraints: Sequence | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, step by step ([B] tensors), until max_new_tokens or all rows hit EOS
    (eos_token_id: one id or several). A finished row keeps yielding its EOS id.

    Each prompt is a request on the batched engine (lmforge.generate.engine, run on this thread: the one
    decoding path, `serve`'s too). A row's tokens are the ones it gets alone: its keys are its own (paged
    blocks from position 0, no padding), every product and attention is batch-invariant (lmforge.nn.invariant),
    and under sampling row i draws from its own generator, seeded with seed + i.

    draft: a speculative drafter (lmforge.generate.speculative: NgramDrafter, ModelDrafter) for one prompt:
    the same tokens as without it, greedy or seeded, in fewer passes.
    constraints: one lmforge.generate.constrain.Constraint (or None) per prompt: each step's logits of that row
    are masked to its grammar (which ends on an EOS id, so eos_token_id must be given). On CPU the Linear weights
    are prepacked for oneDNN (see lmforge.nn.packed; pack_weights=False turns it off).

    compile=True runs every step after the prompt through `torch.compile` over a static KV cache (see
    StaticKVCache, prompts left-padded): the first call for a model, batch size and length bucket pays the
    compilation, later ones decode faster. Its products are inductor's own loops, so its tokens are the eager
    ones up to float rounding, and not batch-invariant.
    """
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmforgeError("every prompt needs at least one token (an empty prompt needs a BOS/EOS token to start)")
    B, T = len(prompts), max(len(p) for p in prompts)
    total = T + params.max_new_tokens
    ctx = model.config.max_seq_len
    if total > ctx:
        raise LmforgeError(
            f"prompt ({T} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
            f"context of {ctx} tokens; shorten the prompt or lower max_new_tokens"
        )
    if params.max_new_tokens == 0:
        return
    if constraints is not None and (draft is not None or eos_token_id is None or len(constraints) != B):
        raise LmforgeError(
            "constrained decoding needs an end token, one constraint (or None) per prompt, and no speculative drafter"
        )
    if draft is not None and (B != 1 or compile):
        raise LmforgeError(
            "speculative decoding runs one prompt at a time, without --compile; give one prompt, or drop --speculative"
        )
    if compile:
        yield from _compiled(model, prompts, params, eos_token_id, pad_token_id, pack_weights, constraints)
        return
    yield from _on_the_engine(model, prompts, params, eos_token_id, pack_weights, draft, constraints)


def _on_the_engine(model, prompts, params, eos_token_id, pack_weights, draft, constraints) -> Iterator[torch.Tensor]:
    """generate_ids on the batched engine, run on this thread: one request per prompt (row i seeded with seed + i),
    their tokens yielded in step: a [B] tensor each time every row still going has its next token."""
    device = next(model.parameters()).device
    ends = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ())
    total = max(len(p) for p in prompts) + params.max_new_tokens
    engine = Engine(
        model, None, max_batch=len(prompts), max_queue=0, max_len=total, pack_weights=pack_weights, draft=draft
    )
    reqs = [
        Request(
            [int(t) for t in p],
            replace(params, seed=None if params.seed is None else params.seed + i),
            end_ids=ends,
            constraint=constraints[i] if constraints is not None else None,
        )
        for i, p in enumerate(prompts)
    ]
    pending: list[list[int]] = [[] for _ in reqs]  # each row's tokens not yielded yet
    done = [False] * len(reqs)  # the row has yielded an end token: it repeats it from now on
    given = 0
    for new in engine.run(reqs):
        for q, toks in zip(pending, new):
            q.extend(toks)
        while all(d or q for d, q in zip(done, pending)):
            step = [ends[0] if d else q.pop(0) for d, q in zip(done, pending)]
            done = [d or t in ends for d, t in zip(done, step)]
            given += 1
            yield torch.tensor(step, device=device)
            if all(done) or given == params.max_new_tokens:
                return


def _seen(model, prompts, params, device) -> torch.Tensor | None:
    """[B, V] bool: the tokens the repetition penalty applies to (None when it is off)."""
    if params.repetition_penalty == 1.0:
        return None
    seen = torch.zeros((len(prompts), model.config.vocab_size), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seen[i, torch.as_tensor(list(p), device=device)] = True
    return seen


def _ends(eos_token_id, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    return torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long, device=device
    )


def _pick(logits, params, generators, seen, constraints, done, ends) -> torch.Tensor:
    """The step's tokens [B] from its logits [B, V]: constrained, penalised, drawn; a finished row repeats its end
    token; `done` and `seen` updated."""
    if constraints is not None:
        logits = logits.float().clone()
        for i, c in enumerate(constraints):
            if c is not None and not done[i]:
                c.apply(logits[i])
    tok = next_token(logits, params, generators, seen)
    if constraints is not None:
        for i, c in enumerate(constraints):
            if c is not None and not done[i]:
                c.consume(int(tok[i]))
    if ends is not None and ends.numel():
        tok = torch.where(done, ends[0], tok)
        done |= torch.isin(tok, ends)
    if seen is not None:
        seen[torch.arange(tok.size(0), device=tok.device), tok] = True
    return tok


def _compiled(model, prompts, params, eos_token_id, pad_token_id, pack_weights, constraints) -> Iterator[torch.Tensor]:
    """generate_ids(compile=True): left-padded prompts over a StaticKVCache, every step after the prompt through
    one compiled graph."""
    device = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    total = T + params.max_new_tokens
    ids = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)
    padded = any(len(p) != T for p in prompts)
    mask = torch.zeros((B, total), dtype=torch.long, device=device) if padded else None
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        if mask is not None:
            mask[i, T - len(p) :] = 1
    generators = row_generators(params.seed, B, device)
    seen = _seen(model, prompts, params, device)
    ends = _ends(eos_token_id, device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step = compiled_decode_step()
    pack_weights = pack_weights and (B == 1 or packed._OPAQUE is not None)
    size = min(model.config.max_seq_len, -(-total // COMPILE_BUCKET) * COMPILE_BUCKET)
    cache = model.new_cache(B, size, static=True)
    keys = torch.zeros((B, size), dtype=torch.bool, device=device)  # slots that hold a real token
    keys[:, :T] = True if mask is None else mask[:, :T].bool()
    x, length = ids, T
    # one compiled row: products as multiply-and-sum loops at memory speed (lmforge.nn.packed); else oneDNN
    with packed_linears(model, B, enabled=pack_weights, gemv=B == 1):
        for _ in range(params.max_new_tokens):
            if length > T:  # a compiled step: fixed shapes, the slot to write in a tensor
                keys[:, length - 1] = True
                cache.at = torch.tensor([length - 1], device=device)
                try:
                    logits = step(model, x, keys.sum(-1, keepdim=True) - 1, keys[:, None, None, :], cache)
                except Exception as e:  # the first call compiles: no C++ compiler, an unsupported operation, ...
                    if length > T + 1:
                        raise
                    why = (str(e).strip().splitlines() or [""])[0][:200]
                    raise LmforgeError(
                        f"torch.compile could not compile the decoding step ({type(e).__name__}: "
                        f"{why}); run without --compile / compile=True"
                    ) from e
                cache.length += 1
            else:
                logits = model(
                    x, attention_mask=None if mask is None else mask[:, :length], cache=cache, last_only=True
                ).logits[:, -1]
            tok = _pick(logits, params, generators, seen, constraints, done, ends)
            yield tok
            if bool(done.all()):
                return
            if mask is not None:
                mask[:, length] = 1
            x, length = tok[:, None], length + 1


# --------------------------------------------------------------------------------------------------------------
# text in, text out


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    on_text: Callable[[int, str], None] | None = None,
    end_token_ids: Sequence[int] = (),
    compile: bool = False,
    draft=None,
    json_schema: dict | str | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
) -> list[str] | str | list[list[str]]:
    """Continue each prompt; returns the new text (a str for a str prompt, else a list).

    temperature: 0 = greedy; None = 1.0 (sampling). stop: strings that end a row (not included in the output).
    end_token_ids: tokens that end a row besides EOS (a chat template's end-of-turn). on_text(row, piece)
    receives text as it is produced, for streaming; pieces never split a multi-byte character. compile: decode
    through torch.compile (see generate_ids). draft: speculative decoding of one prompt (see generate_ids).
    json_schema (a dict or JSON text), json_object, regex or choice: every reply follows that constraint
    (lmforge.generate.constrain).

    num_beams > 1: beam search (lmforge.generate.beam: transformers' rules, with length_penalty and
    early_stopping), the most likely continuations rather than a sample, so the sampling settings, a drafter and
    constraints do not apply (given, they are refused); num_return_sequences of the best come back for each
    prompt (a list per prompt when above 1). on_text then gets each prompt's best text once it is found.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    encoded = [tokenizer.encode(t) or ([start] if start is not None else []) for t in texts]
    ends = list(dict.fromkeys(([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + list(end_token_ids)))
    if num_beams != 1 or num_return_sequences != 1:
        settings = {
            "temperature": temperature not in (None, 0),
            "top_k": top_k is not None,
            "top_p": top_p is not None,
            "repetition_penalty": repetition_penalty != 1.0,
            "seed": seed is not None,
            "compile": compile,
            "a drafter": draft is not None,
            "a constraint": json_schema is not None or json_object or regex is not None or choice is not None,
        }
        given = [name for name, on in settings.items() if on]
        if given:
            raise LmforgeError(
                f"beam search (num_beams {num_beams}) keeps the most likely continuations: "
                f"{', '.join(given)} do not apply to it; drop them, or decode with num_beams 1"
            )
        out = beam_texts(
            model,
            tokenizer,
            encoded,
            max_new_tokens,
            BeamParams(num_beams, length_penalty, early_stopping, num_return_sequences),
            ends,
            stop or [],
        )
        if on_text is not None:
            for i, o in enumerate(out):
                on_text(i, o[0])
        out = [o if num_return_sequences > 1 else o[0] for o in out]
        return out[0] if single else out
    if length_penalty != 1.0 or early_stopping is not False:
        raise LmforgeError(
            "length_penalty and early_stopping steer beam search; with num_beams 1 nothing uses "
            "them: drop them, or give num_beams > 1"
        )
    params = SamplingParams(
        max_new_tokens, 1.0 if temperature is None else temperature, top_k, top_p, repetition_penalty, seed
    )
    streams = [TextStream(tokenizer, stop) for _ in texts]
    done = [False] * len(texts)
    constraints = None
    if json_schema is not None or json_object or regex is not None or choice is not None:
        if not ends:
            raise LmforgeError("constrained decoding needs a tokenizer with an EOS token")
        constraints = [
            Constraint.make(
                tokenizer,
                model.config.vocab_size,
                ends,
                json_schema=json_schema,
                json_object=json_object,
                regex=regex,
                choice=choice,
            )
            for _ in texts
        ]
    for tok in generate_ids(
        model,
        encoded,
        params,
        eos_token_id=ends or None,
        pad_token_id=tokenizer.pad_id,
        compile=compile,
        draft=draft,
        constraints=constraints,
    ):
        for i, t in enumerate(tok.tolist()):
            if done[i]:
                continue
            piece = streams[i].flush() if t in ends else streams[i].push(t)
            done[i] = t in ends or streams[i].stopped
            if on_text is not None and piece:
                on_text(i, piece)
        if all(done):
            break
    for i, s in enumerate(streams):  # max_new_tokens reached: show what was held back
        piece = s.flush() if not done[i] else ""
        if on_text is not None and piece:
            on_text(i, piece)
    emitted = [s.text for s in streams]
    return emitted[0] if single else emitted


def beam_texts(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: BeamParams,
    ends: Sequence[int],
    stop: Sequence[str] = (),
) -> list[list[str]]:
    """Beam search over each prompt's ids (one prompt at a time, its beams batched): the num_return_sequences best
    continuations of each as text, cut before a stop string (which ends a hypothesis as an end token does)."""
    params.validate()
    stop = [s for s in stop if s]
    out = []
    with torch.inference_mode(), packed_linears(model, params.num_beams):
        for p in prompts:

            def stops(seqs: torch.Tensor, cur: int, n: int = len(p)) -> torch.Tensor:
                return torch.tensor(
                    [any(s in tokenizer.decode(row) for s in stop) for row in seqs[:, n : cur + 1].tolist()],
                    dtype=torch.bool,
                )

            hyps, _ = decoder_beam_search(
                model, p, max_new_tokens, params, ends, tokenizer.pad_id or 0, stops if stop else None
            )
            texts = []
            for h in hyps:
                text = tokenizer.decode([t for t in h if t not in ends])
                cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                texts.append(text[:cut] if cut >= 0 else text)
            out.append(texts)
    return out
