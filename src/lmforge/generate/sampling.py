"""Decoding for causal LMs: greedy, temperature, top-k, top-p (nucleus), repetition penalty, stop strings,
streaming, and batches of prompts with left padding, over a preallocated KV cache.

`generate_ids` is the token-level engine (a generator: one tensor of new tokens per step, so callers can stream);
`generate` is the text-level call most users want.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from lmforge.config import SamplingParams  # noqa: F401 (declared with the other settings; re-exported here)
from lmforge.errors import LmforgeError
from lmforge.generate.beam import BeamParams, decoder_beam_search
from lmforge.generate.constrain import Constraint
from lmforge.generate.kv import PagedKVCache
from lmforge.nn import packed
from lmforge.nn.packed import packed_linears

# --------------------------------------------------------------------------------------------------------------
# logits -> next token


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: tokens already in the sequence get their logit divided (if > 0) or multiplied by `penalty`.
    seen: [B, V] bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities sum to at least p (always at least the best one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of strictly better tokens
    remove_sorted = before >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. generator: one for the batch, or one per row (each row's draw then
    depends on its own generator only)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generator])
    else:
        u = torch.rand(logits.size(0), generator=generator, device=logits.device)
    return sample(logits / params.temperature, params.top_k, params.top_p, u)


def row_generators(seed: int | None, rows: int, device) -> list[torch.Generator | None]:
    """One generator per row, row i seeded with seed + i (as the server seeds choice i of n): a row's samples do
    not depend on how many rows decode beside it. All None without a seed."""
    if seed is None:
        return [None] * rows
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(rows)]


CANDIDATES = 256  # top-p alone first looks among this many best tokens (see sample)


def sample(logits: torch.Tensor, top_k: int | None, top_p: float | None, u: torch.Tensor) -> torch.Tensor:
    """Token ids [B] drawn from softmax(logits [B, V]) (already divided by the temperature) under top-k and
    top-p, by inverse transform: row b takes the first candidate whose cumulative probability exceeds u[b]
    (uniform in [0, 1), one per row, so each row can draw from its own seeded generator while the batch is
    sampled in one pass).

    Only the tokens that can win are sorted: the k best under top-k (top-p then keeps the smallest prefix of
    those whose share of their mass reaches p); under top-p alone the CANDIDATES best, widened eightfold while
    any row's candidates hold less than p of its probability (then the nucleus may reach past them), which
    keeps the nucleus exact and spares the sort of the whole vocabulary (2 ms a row at 49k tokens). Ties at the
    k-th logit keep k tokens."""
    V = logits.size(-1)
    p = top_p if top_p is not None and top_p < 1.0 else None
    if top_k is None and p is None:
        probs = torch.softmax(logits, dim=-1)
        idx = None
    else:
        k = min(top_k, V) if top_k is not None else min(CANDIDATES, V)
        while True:
            vals, idx = torch.topk(logits, k, dim=-1)  # sorted, best first
            if p is None:
                probs = torch.softmax(vals, dim=-1)
                break
            # each candidate's probability among the kept tokens: the k best under top-k, else all of them
            probs = (
                torch.softmax(vals, dim=-1)
                if top_k is not None
                else torch.exp(vals - torch.logsumexp(logits, dim=-1, keepdim=True))
            )
            before = probs.cumsum(-1) - probs  # mass of strictly better candidates
            if top_k is not None or k == V or bool((before[:, -1] + probs[:, -1] >= p).all()):
                probs = probs.masked_fill(before >= p, 0.0)
                break
            k = min(V, k * 8)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp_(max=probs.size(-1) - 1)
    return (pick if idx is None else idx.gather(-1, pick)).squeeze(-1)


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

    A row's tokens are the ones it gets alone: each prompt is read into its own row of a paged cache (its keys
    from position 0, no padding), every product and attention is batch-invariant (lmforge.nn.invariant), and
    under sampling row i draws from its own generator, seeded with seed + i.

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
    device = next(model.parameters()).device
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
    if draft is not None:
        if B != 1 or compile:
            raise LmforgeError(
                "speculative decoding runs one prompt at a time, without --compile; give one "
                "prompt, or drop --speculative"
            )
        generator = row_generators(params.seed, 1, device)[0]
        ends = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        with packed_linears(model, 1, enabled=pack_weights), draft.context(pack_weights):
            for t in draft.decode(model, prompts[0], params, ends, generator):
                yield torch.tensor([t], device=device)
        return
    if compile:
        yield from _compiled(model, prompts, params, eos_token_id, pad_token_id, pack_weights, constraints)
        return
    generators = row_generators(params.seed, B, device)
    seen = _seen(model, prompts, params, device)
    ends = _ends(eos_token_id, device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = PagedKVCache.for_model(model, B, total)
    rows = list(range(B))
    with packed_linears(model, B, enabled=pack_weights):
        last = []
        for i, p in enumerate(prompts):  # each prompt into its own row, as it would be read alone
            cache.prefill(i, len(p))
            last.append(model(torch.as_tensor([list(p)], device=device), cache=cache, last_only=True).logits[0, -1])
        logits = torch.stack(last)
        for _ in range(params.max_new_tokens):
            tok = _pick(logits, params, generators, seen, constraints, done, ends)
            yield tok
            if bool(done.all()):
                return
            pos, mask = cache.decode(rows)
            logits = model(tok[:, None], attention_mask=mask, position_ids=pos, cache=cache, last_only=True).logits[
                :, -1
            ]


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


class TextStream:
    """Incremental detokenization with stop strings, for one sequence: push token ids, get the text that is safe
    to show. A piece never splits a multi-byte character (an incomplete UTF-8 sequence waits for the next token)
    and never shows the start of what may still become a stop string; a completed stop string ends the stream
    and is not shown (`stopped`). `text` is everything shown so far.

    Each push decodes only the last few tokens, not the whole reply: the text of ids[prefix:] minus that of
    ids[prefix:read], where `read` is how far the text is settled and `prefix` a few tokens before it, so a
    decoder that treats a sequence's first or last token specially (SentencePiece drops a leading space, and a
    lone trailing word marker) sees the same context in both (vLLM's detokenizer works the same way). The cost
    per token is constant, where decoding everything was quadratic in the reply's length."""

    CONTEXT = 4  # settled tokens decoded again with each new one

    def __init__(self, tokenizer, stop: Sequence[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) - 1 for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # shown
        self.decoded = ""  # settled: the text of ids[:read]
        self.prefix = self.read = 0
        self.stopped = False

    def _settle(self) -> bool:
        """Extend `decoded` by the new tokens' text; False while it ends inside a multi-byte character."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if after.endswith("\ufffd"):
            return False
        if after.startswith(before):
            self.decoded += after[len(before) :]
        else:  # (a decoder that rewrites earlier text: fall back to the whole sequence)
            self.decoded = self.tokenizer.decode(self.ids)
        self.read = len(self.ids)
        self.prefix = max(0, self.read - self.CONTEXT)
        return True

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        if not self._settle():
            return ""
        full = self.decoded
        # a stop string cannot start inside what was shown: a tail that could begin one is always held back
        at = max(0, len(self.text) - 1)
        cut = min((i for i in (full.find(s, at) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._show(full[:cut])
        for h in range(min(self.hold, len(full)), 0, -1):  # hold back a tail that could begin a stop string
            if any(s.startswith(full[-h:]) for s in self.stop):
                full = full[:-h]
                break
        return self._show(full)

    def flush(self) -> str:
        """The sequence ended (EOS, length): show what was held back."""
        if self.stopped or not self.ids:
            return ""
        return self._show(self.tokenizer.decode(self.ids) if self.read < len(self.ids) else self.decoded)

    def _show(self, text: str) -> str:
        if len(text) <= len(self.text) or not text.startswith(self.text):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece


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
