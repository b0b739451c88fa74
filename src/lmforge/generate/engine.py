"""The batched generation engine behind `lmforge serve`: continuous batching over paged KV memory.

Requests arrive from any thread (`submit`); one engine thread runs the model, a step at a time, in three parts:

- **schedule** turns the waiting and running sequences into a `StepPlan`, plain data: which prompts are read
  whole, which sequences decode a token, which long prompt goes in by a chunk through which layers, which lone
  sequence verifies how many drafted tokens. Per-sequence state (`Seq`: its row, its next token, how much of its
  prompt is in, its drafter and text stream) is the scheduler's; a `Request` holds only what was asked and what
  came out.
- **run** executes the plan on the model over the paged cache (lmforge.generate.kv) and returns logits.
- **commit** picks the tokens (penalties, grammar, sampling), appends them, emits events, finishes sequences.

Between two steps finished and cancelled sequences leave and waiting ones are admitted, so a short reply never
waits for a long one, and a new request starts as soon as a row is free instead of when the whole batch is done.
Each running sequence holds one row (`slot`) and the KV blocks its tokens fill.

Results come back as `Event`s through the request's `on_event` callback (called on the engine thread; the HTTP
server hands them to its event loop), or through `Engine.stream` for plain Python callers. `Engine.run` steps the
engine on the calling thread instead, without a thread of its own: `generate_ids` (and through it `generate`,
`chat`, evaluation and GRPO's rollouts) decodes this way, so there is one decoding path.

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
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from lmforge.config import SamplingParams, check_number
from lmforge.errors import LmforgeError
from lmforge.generate.constrain import Constraint
from lmforge.generate.kv import BLOCK, PagedKVCache
from lmforge.generate.pick import TextStream, apply_repetition_penalty, sample
from lmforge.generate.prefix import PrefixCache
from lmforge.generate.speculative import Drafter, choose
from lmforge.nn.packed import packed_linears, release_packed
from lmforge.runtime import trim_heap

CHUNK_TARGET = 1.5  # a pass with a piece of a long prompt in it may take this many plain decode steps
PLAIN_EVERY = 8  # ... and after this many such passes, one plain one (to measure what a plain one takes now)
PREFILL_PIECE = 512  # a prompt is read this many tokens a pass at most
TRIM_AFTER = 1024  # prompt tokens read in one step after which the freed memory goes back to the kernel


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
        self.slot = -1  # the engine row it ran in (for the curious: the engine's own state is in its Seq)

    @property
    def ttft(self) -> float | None:
        return self.first_token_at - self.submitted if self.first_token_at else None


class Seq:
    """A running request as the scheduler keeps it (the request itself holds only what was asked and what came
    out)."""

    def __init__(self, req: Request, slot: int, tokenizer, device: torch.device) -> None:
        self.req, self.slot = req, slot
        self.stream = TextStream(tokenizer, req.stop) if tokenizer is not None else None  # (None: token ids only)
        seed = req.params.seed
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.next = 0  # the token the next step feeds it
        self.cached = 0  # prompt tokens in the KV cache
        self.chunked = False  # its prompt goes in by chunks beside the others' steps
        self.chunk, self.layer = 0, 0  # the chunk going in now: its tokens, the next layer it goes through
        self.hidden: torch.Tensor | None = None  # the chunk's hidden states after the layers it went through
        self.drafter: Drafter | None = None
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, biases) on the device
        self.seen: torch.Tensor | None = None  # [V] bool: the tokens the repetition penalty applies to

    @property
    def plain(self) -> bool:
        """Whether speculative passes may serve it (nothing that needs every step's own logits)."""
        r = self.req
        return not (
            r.logprobs is not None
            or r.presence_penalty
            or r.frequency_penalty
            or r.constraint is not None
            or r.logit_bias
            or r.finish_reason is not None
        )


@dataclass
class Chunk:
    seq: Seq
    n: int  # its tokens
    layers: tuple[int, int]  # the layers [a, b) it goes through this step
    last: bool  # this pass ends the prompt


@dataclass
class Verify:
    seq: Seq
    drafts: list[int]  # tokens drafted after its next one, all checked in one pass
    q: torch.Tensor | None  # the drafter's own distributions (for the record; the rule does not need them)


@dataclass
class StepPlan:
    """One step, as plain data. Either prompts read whole (`prefill`: one pass each), or one batched pass: a
    token for each of `rows` (by slot), a `chunk` of a long prompt beside them, or instead a `verify` pass."""

    prefill: list[Seq] = field(default_factory=list)
    rows: list[Seq] = field(default_factory=list)
    chunk: Chunk | None = None
    verify: Verify | None = None


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
    as measured, each through as many layers a step as fit; 0: whole); kv_dtype: how the KV blocks are stored
    (default: the model's compute dtype; bfloat16 halves a float32 model's, int8 with a scale per head and
    position takes a little over a quarter; the keys are rounded as stored)."""

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
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        for flag, value, low in (
            ("--max-batch", max_batch, 1),
            ("--max-queue", max_queue, 0),
            ("--max-len", max_len, 1),
            ("--cache-mb", cache_mb, 0),
            ("--prefill-chunk", prefill_chunk, 0),
        ):
            check_number(flag, value, low, integer=flag != "--cache-mb")
        self.prefix = None
        if cache_mb:  # (its entries are the cache's blocks: letting one go gives them back)
            self.prefix = PrefixCache(int(cache_mb * 2**20), BLOCK, forget=lambda kv: self.cache.forget(kv))
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
        self.cache = PagedKVCache.for_model(
            model, max_batch, self.max_len, kv_dtype, extra_bytes=self.prefix.max_bytes if self.prefix else 0
        )
        self.slots: list[Seq | None] = [None] * max_batch  # the running sequences, by KV row
        self.waiting: deque[Request] = deque()
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._here = False  # running on the caller's thread (`run`), not the engine's

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
                self.prefix.clear()
                self.prefix.hits = self.prefix.misses = self.prefix.reused_tokens = 0
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

    def run(self, requests: Sequence[Request]) -> Iterator[list[list[int]]]:
        """Run requests to their end on the calling thread (no engine thread: for generate, evaluation and
        rollouts), yielding after each step the tokens each request got in it (an empty list, none). An error
        is raised here, as it happened."""
        if self._thread is not None:
            raise LmforgeError("this engine runs on its own thread (start): submit to it, or use another engine")
        self.submit(requests)
        self._here = True
        try:
            with self._contexts():
                while any(r.finish_reason is None for r in requests):
                    before = [len(r.completion_ids) for r in requests]
                    plan = self.schedule()
                    if plan is not None:
                        self._step(plan)
                    yield [r.completion_ids[n:] for r, n in zip(requests, before)]
        finally:
            self._here = False
            for r in requests:  # (a caller that stops early: the rows go back)
                if r.finish_reason is None:
                    self._finish(r, "cancelled")
            self.waiting.clear()

    # ------------------------------------------------------------------------------------------------------------
    # the engine thread: schedule, run, commit

    def _contexts(self):
        """What a step runs under: inference mode, the packed weights (and the drafter's)."""
        stack = ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(packed_linears(self.model, self.max_batch, enabled=self.pack_weights))
        if self.draft is not None:
            stack.enter_context(self.draft.context(self.pack_weights))
        return stack

    def _run(self) -> None:
        with self._contexts():
            try:
                while not self._stop:
                    plan = self.schedule()
                    if plan is not None:
                        self._step(plan)
            finally:
                with self._cond:
                    leftover = [*self.waiting, *(s.req for s in self.slots if s is not None)]
                    self.waiting.clear()
                for r in leftover:
                    self._finish(r, "error", error="the engine stopped")
        if self.pack_weights:
            release_packed(self.model)

    def _step(self, plan: StepPlan) -> None:
        """Run a plan and commit it. A prompt's pass is that request's alone: if it fails, only it fails; a failed
        batched pass fails every sequence it ran."""
        if plan.prefill:
            for seq in plan.prefill:
                try:
                    self._commit_prefill(seq, self._run_prefill(seq))
                except Exception as e:  # noqa: BLE001 - one bad request must not take the others down
                    self._fail(seq.req, e)
            if sum(len(q.req.prompt_ids) - q.cached for q in plan.prefill) >= TRIM_AFTER:
                trim_heap()  # (a long prompt's activations: freed, but kept by the allocator otherwise)
            return
        if plan.verify is not None:
            try:
                t0 = time.perf_counter()
                self._commit_verify(plan.verify, *self._run_verify(plan.verify), t0)
            except Exception as e:  # noqa: BLE001 - the only running sequence's own pass
                self._fail(plan.verify.seq.req, e)
            return
        try:
            t0 = time.perf_counter()
            logits, chunk_out = self._run_rows(plan)
            self._commit_rows(plan.rows, logits)
            self._commit_chunk(plan.chunk, chunk_out, time.perf_counter() - t0, len(plan.rows))
        except Exception as e:  # noqa: BLE001 - the step itself failed: every row it ran
            for seq in [*plan.rows, *([plan.chunk.seq] if plan.chunk else [])]:
                self._fail(seq.req, e)

    # ---- schedule

    def schedule(self) -> StepPlan | None:
        """The next step's plan (None: nothing to run, or stopping). Waits while there is nothing to do; admits
        waiting requests into free rows, each with its prompt's cached prefix; then decides: the admitted prompts
        read whole, else a chunk of a long prompt beside the decoding rows, a speculative pass for a lone
        sequence, or a plain decode step."""
        with self._cond:
            while not self._stop and not self.waiting and not self.running:
                self._cond.wait()
            if self._stop:
                return None
            admit = []
            free = self.max_batch - self.running
            while self.waiting and len(admit) < free:
                r = self.waiting.popleft()
                if not r.cancelled:
                    admit.append(r)
                else:
                    self._finish(r, "cancelled")
        for seq in self.slots:
            if seq is not None and seq.req.cancelled:
                self._finish(seq.req, "cancelled")
        whole = []
        for r in admit:
            try:
                seq = self._admit(r)
            except Exception as e:  # noqa: BLE001 - its own settings failed: only it fails
                self._fail(r, e)
                continue
            if not seq.chunked:
                whole.append(seq)
        if whole:
            return StepPlan(prefill=whole)
        if not self.running:
            return None
        chunked = next((q for q in self.slots if q is not None and q.chunked), None)
        rows = self._decoding()
        if chunked is not None and (self._chunks_since_plain < PLAIN_EVERY or not rows):
            if not rows:  # nothing else streams: the rest of the prompt at once
                chunked.chunked, chunked.hidden, chunked.layer = False, None, 0
                return StepPlan(prefill=[chunked])
            self._chunks_since_plain += 1
            return StepPlan(rows=rows, chunk=self._plan_chunk(chunked))
        self._chunks_since_plain = 0
        verify = self._plan_verify(rows)
        if verify is not None:
            return StepPlan(verify=verify)
        return StepPlan(rows=rows)

    def _admit(self, req: Request) -> Seq:
        """A free row for the request, its prompt's cached prefix, and whether its prompt goes in by chunks
        (longer than prefill_chunk past the prefix while others stream)."""
        slot = self.slots.index(None)
        seq = Seq(req, slot, self.tokenizer, self.device)
        req.slot, self.slots[slot] = slot, seq
        self.cache.release(slot)
        if req.logit_bias:
            ids = torch.tensor(list(req.logit_bias), dtype=torch.long, device=self.device)
            seq.bias = ids, torch.tensor(list(req.logit_bias.values()), device=self.device)
        if req.params.repetition_penalty != 1.0:
            seq.seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            seq.seen[torch.tensor(req.prompt_ids, device=self.device)] = True
        if self.prefix is not None and not self._scores_prompt(req):  # (scoring needs every position)
            start, kept = self.prefix.lookup(req.prompt_ids)
            if start:
                seq.cached = self.cache.load(slot, kept, start)
        seq.chunked = bool(
            self.prefill_chunk
            and not self._scores_prompt(req)
            and len(req.prompt_ids) - seq.cached > self.prefill_chunk
            and any(q.slot != slot for q in self._decoding())
        )
        return seq

    @staticmethod
    def _scores_prompt(req: Request) -> bool:
        return req.echo and req.logprobs is not None

    def _decoding(self) -> list[Seq]:
        return [q for q in self.slots if q is not None and not q.chunked]

    def _plan_chunk(self, seq: Seq) -> Chunk:
        """The next piece of a long prompt (chunked prefill): a chunk of its tokens through one or more of the
        model's layers (DecoderLM.staged_step). A chunk's pass through one layer costs about k x its tokens (its
        products, and its attention over the prompt so far: k grows with the prompt's length, and is measured at
        every pass); each chunk is sized so that one layer's pass fits (CHUNK_TARGET - 1) x a plain decode step,
        and each pass given as many layers as fit it. A stream's gap between two tokens so stays within about
        CHUNK_TARGET x its usual one while a long prompt is read (which then takes longer than it would alone:
        the price of not stalling the others)."""
        p, n_layer = seq.req.prompt_ids, len(self.model.blocks)
        budget = (CHUNK_TARGET - 1) * self._step_ema  # seconds this pass may add to a plain step
        k = self._layer_cost
        if seq.layer == 0:  # a new chunk: as many tokens as one layer's pass fits the budget
            n = min(int(budget / k), 2 * seq.chunk) if k and budget else 4  # (growing at most 2x a chunk)
            seq.chunk = max(1, min(n, self.prefill_chunk, len(p) - seq.cached))
        n, a = seq.chunk, seq.layer
        b = a + max(1, min(n_layer - a, self._max_span, int(budget / (k * n)) if k and budget else 1))
        return Chunk(seq, n, (a, b), last=b == n_layer and seq.cached + n == len(p))

    def _plan_verify(self, rows: list[Seq]) -> Verify | None:
        """A speculative pass for the only running sequence when nothing waits and its drafter proposes
        something; None: a plain step. A drafter that fails fails its sequence."""
        if self.draft is None or len(rows) != 1 or self.running != 1 or self.waiting or not rows[0].plain:
            return None
        seq = rows[0]
        r, p = seq.req, seq.req.params
        try:
            d = seq.drafter
            if d is None:
                d = seq.drafter = self.draft.fresh()
                d.stats = self.draft.stats  # (the drafter given counts every sequence's passes)
                d.start(r.prompt_ids, self.max_len)
            room = min(d.budget(), p.max_new_tokens - len(r.completion_ids) - 1)
            drafts, q = d.propose(r.prompt_ids + r.completion_ids, room, p, seq.generator) if room > 0 else ([], None)
        except Exception as e:  # noqa: BLE001
            self._fail(r, e)
            return None
        if not drafts:
            d.record(0, 0)
            return None
        return Verify(seq, list(drafts), q)

    # ---- run

    def _run_prefill(self, seq: Seq) -> torch.Tensor:
        """The prompt's tokens not yet in the cache: logits after each (scoring the prompt: one pass) or after the
        last (passes of at most PREFILL_PIECE tokens, so that a long prompt's activations stay small: a query's
        result does not depend on the others in its pass, lmforge.nn.invariant)."""
        t0 = time.perf_counter()
        rest, scores = seq.req.prompt_ids[seq.cached :], self._scores_prompt(seq.req)
        piece = len(rest) if scores else PREFILL_PIECE  # (scoring keeps every position's logits: one pass)
        for s in range(0, len(rest), piece):
            ids = torch.tensor([rest[s : s + piece]], dtype=torch.long, device=self.device)
            self.cache.prefill(seq.slot, ids.size(1))
            logits = self.model(ids, cache=self.cache, last_only=not scores).logits[0]
        self.stats.prefill_seconds += time.perf_counter() - t0
        return logits

    def _run_rows(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batched pass: a token for each decoding row (rows indexed by slot; free rows compute on a dummy
        token and write nothing) and, with a chunk, its tokens through its layers. Returns the rows' logits
        [rows, V] and the chunk's output (DecoderLM.staged_step)."""
        active = [q.slot for q in plan.rows]
        c = plan.chunk
        if c is None:
            pos, mask = self.cache.decode(active)
            ids = torch.zeros((pos.size(0), 1), dtype=torch.long, device=self.device)
            ids[active, 0] = torch.tensor([q.next for q in plan.rows], device=self.device)
            logits = self.model(ids, attention_mask=mask, position_ids=pos, cache=self.cache, last_only=True).logits
            return logits[:, -1].float(), None
        pos = self.cache.mixed(active, c.seq.slot, c.n, c.layers)
        ids = torch.zeros((1, max(active) + 1), dtype=torch.long, device=self.device)
        ids[0, active] = torch.tensor([q.next for q in plan.rows], device=self.device)
        p = c.seq.req.prompt_ids
        x = c.seq.hidden if c.layers[0] else torch.tensor([p[c.seq.cached : c.seq.cached + c.n]], device=self.device)
        logits, out = self.model.staged_step(ids, x, pos, self.cache, c.layers, last_logits=c.last)
        return logits.float(), out

    def _run_verify(self, v: Verify) -> tuple[torch.Tensor, int]:
        """The sequence's next token and its drafts in one pass after its keys: logits at each."""
        base = self.cache.lens[v.seq.slot]
        self.cache.prefill(v.seq.slot, 1 + len(v.drafts))
        ids = torch.tensor([[v.seq.next, *v.drafts]], device=self.device)
        return self.model(ids, cache=self.cache).logits[0], base

    # ---- commit

    def _commit_prefill(self, seq: Seq, logits: torch.Tensor) -> None:
        req = seq.req
        if self._scores_prompt(req):
            lp = torch.log_softmax(logits[:-1].float(), dim=-1)
            req.prompt_logprobs = [TokenLogprob(self._piece(req.prompt_ids[0]), None)] + [
                self._logprob(lp[i], t, req.logprobs) for i, t in enumerate(req.prompt_ids[1:])
            ]
        self._prefilled(seq, logits[-1])

    def _prefilled(self, seq: Seq, last: torch.Tensor) -> None:
        """The whole prompt is in the cache (`last`: the logits after it): keep its prefix, emit its first token."""
        req = seq.req
        seq.chunked, seq.cached = False, len(req.prompt_ids)
        if self.prefix is not None and not self._scores_prompt(req):
            self.prefix.store(req.prompt_ids, lambda n: self.cache.save(seq.slot, n))
        self.stats.prompt_tokens += len(req.prompt_ids)
        if req.params.max_new_tokens == 0:
            self._finish(req, "length")
        else:
            self._emit(seq, last)

    def _commit_chunk(self, c: Chunk | None, out: torch.Tensor | None, dt: float, rows: int) -> None:
        """The step's bookkeeping; with a chunk, its progress, the measured cost of a layer's pass per token, and
        at its prompt's end the first token."""
        self.stats.steps += 1
        self.stats.batch_rows += rows
        self.stats.step_seconds += dt
        if c is None:
            self._step_ema = 0.9 * self._step_ema + 0.1 * dt if self._step_ema else dt
            return
        self.stats.chunks += 1
        seq, (a, b), n_layer = c.seq, c.layers, len(self.model.blocks)
        seq.hidden, seq.layer = (out, b) if b < n_layer else (None, 0)
        if b == n_layer:
            seq.cached += c.n
        if self._step_ema:
            k = self._layer_cost
            measured = max(dt - self._step_ema, 0.0) / ((b - a) * c.n)
            self._layer_cost = measured if not k else max(0.7 * k + 0.3 * measured, 0.5 * k)
        if c.last and seq.req.finish_reason is None:
            self._prefilled(seq, out.float())

    def _commit_verify(self, v: Verify, logits: torch.Tensor, base: int, t0: float) -> None:
        """Keep the drafts the model agrees with and the token after them; the rejected drafts' keys are written
        over later."""
        seq, p = v.seq, v.seq.req.params
        picked = choose(logits, v.drafts, v.q, p, seq.seen, seq.generator)
        self.cache.lens[seq.slot] = base + len(picked)
        seq.drafter.record(len(v.drafts), len(picked) - 1)
        self.stats.spec_passes += 1
        self.stats.drafted += len(v.drafts)
        self.stats.accepted += len(picked) - 1
        for j, tok in enumerate(picked):
            self._emit(seq, logits[j], tok)
            if seq.req.finish_reason is not None:
                break
        self.stats.steps += 1
        self.stats.batch_rows += 1
        self.stats.step_seconds += time.perf_counter() - t0

    def _commit_rows(self, rows: list[Seq], logits: torch.Tensor) -> None:
        """Each row's next token from its fp32 logits (rows indexed by slot), then its events."""
        picked: dict[int, int] = {}
        groups: dict[tuple, list[Seq]] = {}  # rows that sample, by their filters: each group in one pass
        for seq in rows:
            try:
                self._penalise(seq, logits[seq.slot])
                if seq.req.constraint is not None:
                    seq.req.constraint.apply(logits[seq.slot])
            except Exception as e:  # noqa: BLE001 - a request's own settings failed: only its row fails
                self._fail(seq.req, e)
                continue
            p = seq.req.params
            if p.temperature > 0:
                groups.setdefault((p.top_k, p.top_p), []).append(seq)
        greedy = logits.argmax(-1).tolist()
        for (top_k, top_p), group in groups.items():
            try:
                idx = [q.slot for q in group]
                temps = torch.tensor([q.req.params.temperature for q in group], device=logits.device)
                u = torch.cat([torch.rand(1, generator=q.generator, device=logits.device) for q in group])
                picked.update(zip(idx, sample(logits[idx] / temps[:, None], top_k, top_p, u).tolist()))
            except Exception as e:  # noqa: BLE001
                for q in group:
                    self._fail(q.req, e)
        for seq in rows:  # stop strings, logprobs and events are per request: a failure there is the row's
            if seq.req.finish_reason is not None:
                continue
            try:
                self._emit(seq, logits[seq.slot], picked.get(seq.slot, greedy[seq.slot]))
            except Exception as e:  # noqa: BLE001
                self._fail(seq.req, e)

    @staticmethod
    def _penalise(seq: Seq, logits: torch.Tensor) -> None:
        """The repetition penalty (CTRL's), OpenAI's logit bias and presence and frequency penalties on the row's
        fp32 logits, in place."""
        req = seq.req
        if seq.seen is not None:
            logits.copy_(apply_repetition_penalty(logits, seq.seen, req.params.repetition_penalty))
        if seq.bias is not None:
            logits.index_add_(0, *seq.bias)
        if (req.presence_penalty or req.frequency_penalty) and req.completion_ids:
            counts = torch.bincount(torch.tensor(req.completion_ids, device=logits.device), minlength=logits.size(-1))[
                : logits.size(-1)
            ].float()
            logits -= req.frequency_penalty * counts + req.presence_penalty * (counts > 0).float()

    def _emit(self, seq: Seq, logits: torch.Tensor, tok: int | None = None) -> None:
        """Emit the sequence's next token: `tok` as the batched step picked it from these (penalised) logits, or,
        after a prefill, picked here the same way (one uniform draw from the sequence's generator a token)."""
        req, p = seq.req, seq.req.params
        if tok is None:
            logits = logits.float().clone()
            self._penalise(seq, logits)
            if req.constraint is not None:
                req.constraint.apply(logits)
            if p.temperature == 0:
                tok = int(logits.argmax())
            else:
                u = torch.rand(1, generator=seq.generator, device=logits.device)
                tok = int(sample(logits[None] / p.temperature, p.top_k, p.top_p, u)[0])
        if not req.first_token_at:
            req.first_token_at = time.perf_counter()
        req.completion_ids.append(tok)
        self.stats.generated_tokens += 1
        if seq.seen is not None:
            seq.seen[tok] = True
        if req.constraint is not None:
            req.constraint.consume(tok)
        tokens = []
        if req.logprobs is not None:
            tokens = [self._logprob(torch.log_softmax(logits.float(), dim=-1), tok, req.logprobs)]
        stream = seq.stream
        if tok in req.end_ids:
            text, reason = stream.flush() if stream else "", "stop"
        else:
            text = stream.push(tok) if stream else ""
            reason = "stop" if stream and stream.stopped else None
        if reason is None and len(req.completion_ids) >= p.max_new_tokens:
            text, reason = text + (stream.flush() if stream else ""), "length"
        if reason is None:
            seq.next = tok
            if req.on_event is not None and (text or tokens):
                req.on_event(Event(text, tokens))
        else:
            self._finish(req, reason, text, tokens)

    def _finish(
        self, req: Request, reason: str, text: str = "", tokens: list | None = None, error: str | None = None
    ) -> None:
        req.finish_reason, req.finished_at = reason, time.perf_counter()
        if 0 <= req.slot < self.max_batch and self.slots[req.slot] is not None and self.slots[req.slot].req is req:
            self.slots[req.slot] = None
            self.cache.release(req.slot)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if req.on_event is not None:
            req.on_event(Event(text, tokens or [], reason, error))

    def _fail(self, req: Request | None, e: Exception) -> None:
        if self._here:  # run on the caller's thread (`run`): the caller gets the exception itself
            raise e
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
