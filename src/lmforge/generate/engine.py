"""The batched generation engine behind `lmforge serve`: continuous batching over a slot KV cache.

Requests arrive from any thread (`submit`); one engine thread runs the model. Between two decode steps it retires
finished and cancelled sequences and admits waiting ones (a prefill each), so a short reply never waits for a long
one, and a new request starts as soon as a slot is free instead of when the whole batch is done. Each running
sequence owns one row of a `SlotKVCache` with its own length; one decode step advances every row by a token.

Results come back as `Event`s through the request's `on_event` callback (called on the engine thread; the HTTP
server hands them to its event loop), or through `Engine.stream` for plain Python callers.

Speculative decoding (`draft`: a drafter from lmforge.generate.speculative) runs while one sequence is running and
none is waiting: the batch-1 case, where a step reads every weight for one token and verifying a few drafted
tokens in one pass costs little more. With several sequences the batched step already shares each weight read
among them, so plain steps run; each sequence's drafter catches up on the tokens it missed when it drafts again.
Requests that ask for logprobs, presence / frequency penalties or a constrained reply decode without drafts.

A prefix cache (`cache_mb`, lmforge.generate.prefix) lets a prompt that begins like an earlier one start from
that one's keys and values and prefill only the rest.

    engine = Engine(model, tokenizer, max_batch=16).start()
    for ev in engine.stream(Request(tokenizer.encode("To be"), SamplingParams(max_new_tokens=20))):
        print(ev.text, end="")
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from lmforge.config import check_number
from lmforge.errors import LmforgeError
from lmforge.generate.constrain import Constraint
from lmforge.generate.prefix import PrefixCache
from lmforge.generate.sampling import SamplingParams, TextStream, sample
from lmforge.generate.speculative import Drafter, choose
from lmforge.nn.packed import packed_linears, release_packed

CHUNK_TARGET = 1.5  # a pass with a piece of a long prompt in it may take this many plain decode steps
PLAIN_EVERY = 8  # ... and after this many such passes, one plain one (to measure what a plain one takes now)


class QueueFull(LmforgeError):
    """The engine's waiting queue is full: the caller should answer 429 and let the client retry."""


@dataclass
class TokenLogprob:
    token: str  # the token's own text
    logprob: float | None  # None for a prompt's first token (nothing predicts it)
    top: list[tuple[str, float]] | None = None  # the most likely alternatives at this position


@dataclass
class Event:
    text: str = ""  # new text that is safe to show (never half a character, never part of a stop string)
    tokens: list[TokenLogprob] = field(default_factory=list)  # the new tokens, when logprobs were asked for
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" on the last event
    error: str | None = None


class Request:
    """One sequence to generate. stop: strings that end it (not shown); end_ids: tokens that end it (EOS,
    end-of-turn). logprobs: None, or how many alternatives to report per token (0 = the chosen token only);
    echo: also score the prompt tokens (with logprobs). Penalties follow OpenAI's presence/frequency ones, and
    logit_bias OpenAI's too (token id -> a bias added to its logit at every step). constraint: the reply's
    grammar (lmforge.generate.constrain), masking every step's logits."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str] = (),
        end_ids: Sequence[int] = (),
        logprobs: int | None = None,
        echo: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        on_event: Callable[[Event], None] | None = None,
        constraint: Constraint | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.logit_bias = dict(logit_bias) if logit_bias else None
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, biases), built on the engine's device
        self.params = params
        self.stop = list(stop)
        self.end_ids = set(end_ids)
        self.logprobs, self.echo = logprobs, echo
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.on_event = on_event
        self.constraint = constraint
        self.completion_ids: list[int] = []
        self.prompt_logprobs: list[TokenLogprob] | None = None  # set by the prefill when echo and logprobs
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted = self.first_token_at = self.finished_at = 0.0
        self.slot = -1
        self._next = 0
        self._stream: TextStream | None = None
        self._generator: torch.Generator | None = None
        self._drafter: Drafter | None = None
        self._cached = 0  # prompt tokens in the cache
        self._prefilling = False  # admitted, its prompt going in by chunks
        self._chunk_n, self._layer = 0, 0  # the chunk going in now: its tokens, the next layer it goes through
        self._hidden: torch.Tensor | None = None  # its hidden states after the layers it went through

    @property
    def ttft(self) -> float | None:
        return self.first_token_at - self.submitted if self.first_token_at else None


@dataclass
class EngineStats:
    requests: int = 0
    finished: dict = field(default_factory=dict)  # finish_reason -> count
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    batch_rows: int = 0  # sum over decode steps of the rows that were running (mean batch = batch_rows / steps)
    step_seconds: float = 0.0
    prefill_seconds: float = 0.0
    chunks: int = 0  # decode steps that also ran a chunk of a long prompt (chunked prefill)
    spec_passes: int = 0  # speculative passes (also counted in steps)
    drafted: int = 0  # tokens drafted in them
    accepted: int = 0  # drafted tokens kept


class Engine:
    """Continuous batching for one decoder. max_batch: sequences decoded together (KV cache rows);
    max_queue: requests allowed to wait for a row (more raise QueueFull at once); max_len: prompt plus new
    tokens per sequence (default: the model's context); draft: speculative decoding of a lone sequence (a
    Drafter, see the module notes); cache_mb: memory for the prefix cache (lmforge.generate.prefix: prompts
    that begin like an earlier one reuse its keys and values; 0: off); prefill_chunk: a prompt longer than this
    arriving while others stream is prefilled in chunks beside their steps (at most this many tokens a chunk, fewer
    as measured, each through as many layers a step as fit; 0: whole)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_batch: int = 16,
        max_queue: int = 64,
        max_len: int | None = None,
        pack_weights: bool = True,
        draft: Drafter | None = None,
        cache_mb: float = 0,
        prefill_chunk: int = 0,
    ) -> None:
        for flag, value, low in (
            ("--max-batch", max_batch, 1),
            ("--max-queue", max_queue, 0),
            ("--max-len", max_len, 1),
            ("--cache-mb", cache_mb, 0),
            ("--prefill-chunk", prefill_chunk, 0),
        ):
            check_number(flag, value, low, integer=flag != "--cache-mb")
        self.prefix = PrefixCache(int(cache_mb * 2**20)) if cache_mb else None
        self.prefill_chunk = prefill_chunk
        self._layer_cost = 0.0  # k: seconds a chunk's pass through one layer adds per token (measured)
        self._max_span = 1 << 30  # at most this many layers of a chunk per step (tests set it)
        self._chunks_since_plain = 0  # passes with a chunk since the last plain one
        self._step_ema = 0.0  # plain decode step seconds, averaged
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.pack_weights = pack_weights
        self.draft = draft
        self.device = model.norm.weight.device
        self.cache = model.new_slot_cache(max_batch, self.max_len)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------------------
    # the caller's side (any thread)

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def check(self, req: Request) -> None:
        """Refuse what can never run, before anything is queued."""
        req.params.validate()
        n, m = len(req.prompt_ids), req.params.max_new_tokens
        if n == 0:
            raise LmforgeError("the prompt is empty: it needs at least one token")
        if n + m > self.max_len:
            raise LmforgeError(
                f"this model's maximum context length is {self.max_len} tokens, but {n + m} were "
                f"requested ({n} in the prompt, {m} to generate); shorten the prompt or lower "
                "max_tokens"
            )
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise LmforgeError(f"prompt token ids must be in [0, {vocab})")

    def warm_up(self) -> Engine:
        """One short request through the started engine before anyone is served: the batch-invariant row plans of
        its products and attention are measured on first use (lmforge.nn.invariant; a second or more per model
        on a CPU), and a first client should not wait for them. Its traces (statistics, prefix cache) are cleared."""
        first = self.tokenizer.eos_id if self.tokenizer is not None and self.tokenizer.eos_id is not None else 0
        for _ in self.stream(Request([first] * 2, SamplingParams(max_new_tokens=2, temperature=0))):
            pass
        with self._cond:
            self.stats = EngineStats()
            if self.prefix is not None:
                self.prefix = PrefixCache(self.prefix.max_bytes, self.prefix.block)
        return self

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue requests (all or none). Raises LmforgeError for a request that can never run, QueueFull when
        there is no room to wait."""
        for r in requests:
            self.check(r)
        with self._cond:
            free = self.max_batch - self.running
            if len(self.waiting) + len(requests) > self.max_queue + max(free - len(self.waiting), 0):
                raise QueueFull(
                    f"the server is busy ({self.running} running, {len(self.waiting)} waiting); retry shortly"
                )
            now = time.perf_counter()
            for r in requests:
                r.submitted = now
                self.waiting.append(r)
            self.stats.requests += len(requests)
            self._cond.notify_all()

    def cancel(self, req: Request) -> None:
        """Stop a request (its client went away); its row is freed before the next step."""
        if req.finish_reason is None:
            req.cancelled = True
            with self._cond:
                self._cond.notify_all()

    def stream(self, req: Request) -> Iterator[Event]:
        """Submit one request and yield its events as they come (for plain Python callers)."""
        q: queue.Queue[Event] = queue.Queue()
        req.on_event = q.put
        self.submit([req])
        try:
            while True:
                ev = q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.cancel(req)

    # ------------------------------------------------------------------------------------------------------------
    # the engine thread

    def _run(self) -> None:
        with (
            torch.inference_mode(),
            packed_linears(self.model, self.max_batch, enabled=self.pack_weights),
            self.draft.context(self.pack_weights) if self.draft is not None else nullcontext(),
        ):
            try:
                while True:
                    with self._cond:
                        while not self._stop and not self.waiting and not self.running:
                            self._cond.wait()
                        if self._stop:
                            break
                        admit = []
                        free = self.max_batch - self.running
                        while self.waiting and len(admit) < free:
                            r = self.waiting.popleft()
                            if not r.cancelled:
                                admit.append(r)
                            else:
                                self._finish(r, "cancelled")
                    for r in self.slots:
                        if r is not None and r.cancelled:
                            self._finish(r, "cancelled")
                    for r in admit:  # a prefill is one request's: if it fails, only that request fails
                        try:
                            self._prefill(r)
                        except Exception as e:  # noqa: BLE001 - one bad request must not take the others down
                            self._fail(r, e)
                    if self.running:
                        try:
                            waiting = next((r for r in self.slots if r is not None and r._prefilling), None)
                            if waiting is not None and (
                                self._chunks_since_plain < PLAIN_EVERY or not self._decoding_rows()
                            ):
                                self._chunk_step(waiting)
                                self._chunks_since_plain += 1
                            elif not self._speculate():
                                self._decode()
                        except Exception as e:  # noqa: BLE001 - the step itself failed: every row it ran
                            for r in self.slots:
                                self._fail(r, e)
            finally:
                with self._cond:
                    leftover = [*self.waiting, *(r for r in self.slots if r is not None)]
                    self.waiting.clear()
                for r in leftover:
                    self._finish(r, "error", error="the engine stopped")
        if self.pack_weights:
            release_packed(self.model)

    def _prefill(self, req: Request) -> None:
        """Admit a request: its slot, its prompt's cached prefix, then its prefill now, or in chunks beside the
        running rows' steps when the rest is longer than prefill_chunk and other sequences are streaming."""
        slot = self.slots.index(None)
        req.slot, self.slots[slot] = slot, req
        self.cache.release(slot)
        req._stream = TextStream(self.tokenizer, req.stop)
        if req.params.seed is not None:
            req._generator = torch.Generator(device=self.device).manual_seed(req.params.seed)
        want_prompt = req.echo and req.logprobs is not None
        start = 0
        if self.prefix is not None and not want_prompt:  # (scoring the prompt needs its every position)
            start, kv = self.prefix.lookup(req.prompt_ids)
            if start:
                self.cache.load(slot, kv, start)
        req._cached = start
        if (
            self.prefill_chunk
            and not want_prompt
            and len(req.prompt_ids) - start > self.prefill_chunk
            and any(i != slot for i in self._decoding_rows())
        ):
            req._prefilling = True  # the chunks run in _chunk_step, one per engine step
            return
        self._prefill_rest(req)

    def _prefill_rest(self, req: Request) -> None:
        """The prompt's tokens not yet in the cache in one pass, then its first token."""
        t0 = time.perf_counter()
        want_prompt = req.echo and req.logprobs is not None
        ids = torch.tensor([req.prompt_ids[req._cached :]], dtype=torch.long, device=self.device)
        self.cache.prefill(req.slot, ids.size(1))
        logits = self.model(ids, cache=self.cache, last_only=not want_prompt).logits[0]
        self.stats.prefill_seconds += time.perf_counter() - t0
        if want_prompt:
            lp = torch.log_softmax(logits[:-1].float(), dim=-1)
            req.prompt_logprobs = [TokenLogprob(self._piece(req.prompt_ids[0]), None)] + [
                self._logprob(lp[i], t, req.logprobs) for i, t in enumerate(req.prompt_ids[1:])
            ]
        self._prefilled(req, logits[-1])

    def _prefilled(self, req: Request, last: torch.Tensor) -> None:
        """The whole prompt is in the cache (`last`: the logits after it): keep its prefix, emit its first token."""
        req._prefilling, req._cached = False, len(req.prompt_ids)
        if self.prefix is not None and not (req.echo and req.logprobs is not None):
            self.prefix.store(req.prompt_ids, lambda n: self.cache.save(req.slot, n))
        self.stats.prompt_tokens += len(req.prompt_ids)
        if req.params.max_new_tokens == 0:
            self._finish(req, "length")
        else:
            self._emit(req, last)

    def _decoding_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.slots) if r is not None and not r._prefilling]

    def _chunk_step(self, req: Request) -> None:
        """One pass of the running rows' decode step with the next part of `req`'s prompt (chunked prefill): a chunk
        of its tokens through one or more of the model's layers (DecoderLM.staged_step), or, with nothing else
        running, the rest of the prompt at once. A chunk's pass through one layer costs about k x its tokens (its
        products, and its attention over the prompt so far: k grows with the prompt's length, and is measured at
        every pass); each chunk is sized so that one layer's pass fits (CHUNK_TARGET - 1) x a plain decode step,
        and each pass given as many layers as fit it. A stream's gap between two tokens so stays within about
        CHUNK_TARGET x its usual one while a long prompt is read (which then takes longer than it would alone:
        the price of not stalling the others)."""
        active = self._decoding_rows()
        if not active:
            req._hidden, req._layer = None, 0  # (a chunk half through its layers is run again whole)
            return self._prefill_rest(req)
        t0 = time.perf_counter()
        p, n_layer = req.prompt_ids, len(self.model.blocks)
        budget = (CHUNK_TARGET - 1) * self._step_ema  # seconds this pass may add to a plain step
        k = self._layer_cost
        if req._layer == 0:  # a new chunk: as many tokens as one layer's pass fits the budget
            n = min(int(budget / k), 2 * req._chunk_n) if k and budget else 4  # (growing at most 2x a chunk)
            req._chunk_n = max(1, min(n, self.prefill_chunk, len(p) - req._cached))
        n, a = req._chunk_n, req._layer
        b = a + max(1, min(n_layer - a, self._max_span, int(budget / (k * n)) if k and budget else 1))
        done = b == n_layer and req._cached + n == len(p)  # this pass ends the prompt
        rows = max(active) + 1
        pos = self.cache.mixed(active, req.slot, n, (a, b))
        ids = torch.zeros((1, rows), dtype=torch.long, device=self.device)
        ids[0, active] = torch.tensor([self.slots[i]._next for i in active], device=self.device)
        chunk = req._hidden if a else torch.tensor([p[req._cached : req._cached + n]], device=self.device)
        logits, out = self.model.staged_step(ids, chunk, pos, self.cache, (a, b), last_logits=done)
        self._pick_and_emit(active, logits.float())
        req._hidden, req._layer = (out, b) if b < n_layer else (None, 0)
        if b == n_layer:
            req._cached += n
        dt = time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.chunks += 1
        self.stats.batch_rows += len(active)
        self.stats.step_seconds += dt
        if self._step_ema:
            measured = max(dt - self._step_ema, 0.0) / ((b - a) * n)
            self._layer_cost = measured if not k else max(0.7 * k + 0.3 * measured, 0.5 * k)
        if done and req.finish_reason is None:
            self._prefilled(req, out.float())

    def _speculate(self) -> bool:
        """A speculative pass for the only running sequence when nothing waits and it drafts something (True);
        False: a plain step is to run. A failure fails that sequence only."""
        active = [r for r in self.slots if r is not None]
        if self.draft is None or len(active) != 1 or self.waiting:
            return False
        r = active[0]
        if (
            r.logprobs is not None
            or r.presence_penalty
            or r.frequency_penalty
            or r.constraint is not None
            or r.logit_bias
            or r.finish_reason is not None
        ):
            return False
        t0 = time.perf_counter()
        try:
            d = r._drafter
            if d is None:
                d = r._drafter = self.draft.fresh()
                d.start(r.prompt_ids, self.max_len)
            p = r.params
            room = min(d.budget(), p.max_new_tokens - len(r.completion_ids) - 1)
            drafts, q = d.propose(r.prompt_ids + r.completion_ids, room, p, r._generator) if room > 0 else ([], None)
            if not drafts:
                d.record(0, 0)
                return False
            base = self.cache.lens[r.slot]
            self.cache.prefill(r.slot, 1 + len(drafts))  # the last token and the drafts, after the row's keys
            logits = self.model(torch.tensor([[r._next, *drafts]], device=self.device), cache=self.cache).logits[0]
            picked = choose(logits, drafts, q, p, None, r._generator)
            self.cache.lens[r.slot] = base + len(picked)  # the rejected drafts' keys are written over later
            d.record(len(drafts), len(picked) - 1)
            self.stats.spec_passes += 1
            self.stats.drafted += len(drafts)
            self.stats.accepted += len(picked) - 1
            for j, tok in enumerate(picked):
                self._emit(r, logits[j], tok)
                if r.finish_reason is not None:
                    break
        except Exception as e:  # noqa: BLE001 - the only running sequence's own pass
            self._fail(r, e)
        self.stats.steps += 1
        self.stats.batch_rows += 1
        self.stats.step_seconds += time.perf_counter() - t0
        return True

    def _decode(self) -> None:
        """A plain step: one token for every running sequence (not for a prompt going in by chunks: every
        PLAIN_EVERY passes with a chunk, one without keeps the measured step time current)."""
        t0 = time.perf_counter()
        self._chunks_since_plain = 0
        active = self._decoding_rows()
        pos, mask = self.cache.decode(active)
        ids = torch.zeros((pos.size(0), 1), dtype=torch.long, device=self.device)
        ids[active, 0] = torch.tensor([self.slots[i]._next for i in active], device=self.device)
        logits = self.model(ids, attention_mask=mask, position_ids=pos, cache=self.cache, last_only=True).logits
        self._pick_and_emit(active, logits[:, -1].float())
        dt = time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.batch_rows += len(active)
        self.stats.step_seconds += dt
        self._step_ema = 0.9 * self._step_ema + 0.1 * dt if self._step_ema else dt

    def _pick_and_emit(self, active: list[int], logits: torch.Tensor) -> None:
        """Each active row's next token from its fp32 logits (rows indexed by slot), then its events."""
        picked: dict[int, int] = {}
        groups: dict[tuple, list[int]] = {}  # rows that sample, by their filters: each group in one pass
        for i in active:
            r = self.slots[i]
            try:
                self._penalise(r, logits[i])
                if r.constraint is not None:
                    r.constraint.apply(logits[i])
            except Exception as e:  # noqa: BLE001 - a request's own settings failed: only its row fails
                self._fail(r, e)
                continue
            if r.params.temperature > 0:
                groups.setdefault((r.params.top_k, r.params.top_p), []).append(i)
        greedy = logits.argmax(-1).tolist()
        for (top_k, top_p), rows in groups.items():
            try:
                reqs = [self.slots[i] for i in rows]
                temps = torch.tensor([r.params.temperature for r in reqs], device=logits.device)
                u = torch.cat([torch.rand(1, generator=r._generator, device=logits.device) for r in reqs])
                picked.update(zip(rows, sample(logits[rows] / temps[:, None], top_k, top_p, u).tolist()))
            except Exception as e:  # noqa: BLE001
                for i in rows:
                    self._fail(self.slots[i], e)
        for i in active:  # stop strings, logprobs and events are per request: a failure there is the row's
            r = self.slots[i]
            if r is None or r.finish_reason is not None:
                continue
            try:
                self._emit(r, logits[i], picked.get(i, greedy[i]))
            except Exception as e:  # noqa: BLE001
                self._fail(r, e)

    @staticmethod
    def _penalise(req: Request, logits: torch.Tensor) -> None:
        """OpenAI's logit bias and presence and frequency penalties on the row's fp32 logits, in place."""
        if req.logit_bias:
            if req._bias is None:
                ids = torch.tensor(list(req.logit_bias), dtype=torch.long, device=logits.device)
                req._bias = ids, torch.tensor(list(req.logit_bias.values()), device=logits.device)
            logits.index_add_(0, *req._bias)
        if (req.presence_penalty or req.frequency_penalty) and req.completion_ids:
            counts = torch.bincount(torch.tensor(req.completion_ids, device=logits.device), minlength=logits.size(-1))[
                : logits.size(-1)
            ].float()
            logits -= req.frequency_penalty * counts + req.presence_penalty * (counts > 0).float()

    def _emit(self, req: Request, logits: torch.Tensor, tok: int | None = None) -> None:
        """Emit the request's next token: `tok` as the batched step picked it from these (penalised) logits, or,
        after a prefill, picked here the same way (one uniform draw from the request's generator a token)."""
        p = req.params
        if tok is None:
            logits = logits.float().clone()
            self._penalise(req, logits)
            if req.constraint is not None:
                req.constraint.apply(logits)
            if p.temperature == 0:
                tok = int(logits.argmax())
            else:
                u = torch.rand(1, generator=req._generator, device=logits.device)
                tok = int(sample(logits[None] / p.temperature, p.top_k, p.top_p, u)[0])
        if not req.first_token_at:
            req.first_token_at = time.perf_counter()
        req.completion_ids.append(tok)
        self.stats.generated_tokens += 1
        if req.constraint is not None:
            req.constraint.consume(tok)
        tokens = []
        if req.logprobs is not None:
            tokens = [self._logprob(torch.log_softmax(logits.float(), dim=-1), tok, req.logprobs)]
        stream = req._stream
        if tok in req.end_ids:
            text, reason = stream.flush(), "stop"
        else:
            text = stream.push(tok)
            reason = "stop" if stream.stopped else None
        if reason is None and len(req.completion_ids) >= p.max_new_tokens:
            text, reason = text + stream.flush(), "length"
        if reason is None:
            req._next = tok
            if req.on_event is not None and (text or tokens):
                req.on_event(Event(text, tokens))
        else:
            self._finish(req, reason, text, tokens)

    def _finish(
        self, req: Request, reason: str, text: str = "", tokens: list | None = None, error: str | None = None
    ) -> None:
        req.finish_reason, req.finished_at = reason, time.perf_counter()
        if 0 <= req.slot < self.max_batch and self.slots[req.slot] is req:
            self.slots[req.slot] = None
            self.cache.release(req.slot)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if req.on_event is not None:
            req.on_event(Event(text, tokens or [], reason, error))

    def _fail(self, req: Request | None, e: Exception) -> None:
        if req is not None and req.finish_reason is None:
            self._finish(req, "error", error=f"generation failed: {type(e).__name__}: {e}")

    def _piece(self, tok: int) -> str:
        return self.tokenizer.decode([tok], skip_special_tokens=False)

    def _logprob(self, lp: torch.Tensor, tok: int, top: int) -> TokenLogprob:
        alts = None
        if top:
            vals, idx = torch.topk(lp, top)
            alts = [(self._piece(i), float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
        return TokenLogprob(self._piece(tok), float(lp[tok]), alts)
