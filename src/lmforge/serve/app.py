"""`lmforge serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

    GET  /                      the playground (a static page: chat with streaming and parameter controls)
    GET  /health                liveness and load
    GET  /metrics               Prometheus text format
    GET  /v1/models             the served models
    POST /v1/completions        prompt(s) -> text; logprobs and echo for log-likelihood scoring
    POST /v1/chat/completions   messages through the model's chat template; stream: true as server-sent events
    POST /v1/embeddings         sentence embeddings from an encoder model

Each decoder gets an Engine (its own thread); HTTP handlers only translate between JSON and engine requests, so
many clients share one batch. Nothing in a request names a file: models are fixed when the server starts.

A request is checked whole before anything is queued (the key on its headers, then its body's size and arrival
time, then every field), because the engine runs many clients' sequences in one step: what fails there fails for
all of them. Slow or lying clients are bounded: a request's head and its body each have `request_timeout`
seconds to arrive (a closed connection, or 408).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hmac
import json
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge import missing_extra

try:  # the [serve] extra
    from fastapi import Request as HTTPRequest
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:
    raise missing_extra(e, "lmforge serve", "serve") from None

from lmforge.assets import MODELS
from lmforge.config import ServeConfig
from lmforge.data.chat import apply_chat_template
from lmforge.errors import LmforgeError
from lmforge.generate.chat import end_of_turn_ids
from lmforge.generate.constrain import Constraint
from lmforge.generate.engine import Engine, Event, QueueFull, Request, TokenLogprob
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.speculative import make_drafter
from lmforge.interop import load_pretrained
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.predict import embed
from lmforge.runtime import in_own_thread, trim_heap, tune_allocator
from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    validation_message,
)

STATIC = Path(__file__).parent / "static"
REQUEST_TIMEOUT = ServeConfig.request_timeout  # seconds a client has for a request's head, and again for its body
# below this a temperature decodes greedily: dividing logits by a denormal overflows them to inf, and the NaN
# probabilities that follow would make the sampler raise inside the engine's step
MIN_TEMPERATURE = 1e-5


@dataclass
class ServedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    engine: Engine | None = None  # decoders
    lock: threading.Lock = field(default_factory=threading.Lock)  # encoders: one embedding batch at a time
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def kind(self) -> str:
        return "decoder" if self.engine is not None else "encoder"


def load_served(
    paths: Sequence[str],
    max_batch: int = 16,
    max_queue: int = 64,
    max_len: int | None = None,
    quantize: str | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    speculative: str | None = None,
    cache_mb: float = 0,
    prefill_chunk: int = 0,
    kv_dtype: str = "auto",
) -> list[ServedModel]:
    """Load each model (directory, .gguf or packaged name; weights in `dtype`, see load_pretrained) on `device`
    and start an engine for each decoder; speculative: "ngram" or a draft model for the decoders (see
    lmforge.generate.speculative: it drafts while one sequence runs); cache_mb: each engine's prefix cache
    (lmforge.generate.prefix; 0: off); prefill_chunk: chunked prefill of long prompts (see Engine; 0: off);
    kv_dtype: how the engines keep keys and values (auto: as the model computes; or float32, bfloat16, int8)."""
    served, names = [], set()
    for path in paths:
        model, tok = load_pretrained(path, device=device, quantize=quantize, dtype=dtype)
        name = model_name(path)
        if name in names:
            raise LmforgeError(f"two served models are both named {name!r}; serve each path once")
        names.add(name)
        if isinstance(model, DecoderLM):
            if max_len is not None and max_len > model.config.max_seq_len:
                print(
                    f"lmforge: note: {name}: --max-len {max_len} is past its context of "
                    f"{model.config.max_seq_len} tokens; it serves {model.config.max_seq_len}",
                    file=sys.stderr,
                )
            draft = make_drafter(speculative, model, device=device, quantize=quantize, dtype=dtype)
            engine = (
                Engine(
                    model.eval(),
                    tok,
                    max_batch=max_batch,
                    max_queue=max_queue,
                    max_len=max_len,
                    draft=draft,
                    cache_mb=cache_mb,
                    prefill_chunk=prefill_chunk,
                    kv_dtype=None if kv_dtype == "auto" else getattr(torch, kv_dtype),
                )
                .start()
                .warm_up()
            )
            served.append(ServedModel(name, model, tok, engine))
        elif isinstance(model, Encoder):
            served.append(ServedModel(name, model.eval(), tok))
        else:
            raise LmforgeError(f"{path}: serving needs a decoder (completions, chat) or an encoder (embeddings)")
    return served


def model_name(path: str) -> str:
    """The name clients use: a packaged model's name, else the directory's (or .gguf file's) name."""
    if str(path) in MODELS and not Path(path).exists():
        return str(path)
    p = Path(path).resolve()
    return p.stem if p.suffix == ".gguf" else p.name


# ----------------------------------------------------------------------------------------------------------------
# the app


def create_app(
    models: Sequence[ServedModel],
    api_key: str | None = None,
    max_body: int = 1 << 20,
    body_timeout: float = REQUEST_TIMEOUT,
):
    """The ASGI app serving `models` (the first one answers requests that name no model). api_key guards /v1;
    a body over max_body bytes gets 413, one that has not arrived whole within body_timeout seconds 408."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    by_name = {m.name: m for m in models}
    metrics = Metrics()
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models, app.state.metrics = by_name, metrics

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(_req, e: Exception):  # a server bug: still answer in the API's shape (and log it)
        import traceback

        traceback.print_exception(e)
        return JSONResponse(
            APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body(), status_code=500
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    def pick(name: str | None, kind: str) -> ServedModel:
        if name is None and len(by_name) == 1:
            m = next(iter(by_name.values()))
        elif name not in by_name:
            raise APIError(
                400,
                f"the model {name!r} does not exist here; served: {', '.join(by_name)}",
                param="model",
                code="model_not_found",
            )
        else:
            m = by_name[name]
        if m.kind != kind:
            need = "/v1/embeddings" if m.kind == "encoder" else "/v1/completions and /v1/chat/completions"
            article = "an" if m.kind[0] in "aeiou" else "a"
            raise APIError(400, f"the model {m.name!r} is {article} {m.kind}: it serves {need}", param="model")
        return m

    # -- plain pages -----------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        load = {
            m.name: {
                "kind": m.kind,
                "running": m.engine.running if m.engine else 0,
                "waiting": m.engine.queued if m.engine else 0,
            }
            for m in by_name.values()
        }
        return {"status": "ok", "models": load}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(by_name.values()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in by_name.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in by_name:
            raise APIError(
                404, f"the model {name!r} does not exist here", "not_found_error", "model", "model_not_found"
            )
        return model_card(by_name[name])

    # -- generation ------------------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        check_supported(body)
        m = pick(body.model, "decoder")
        tok = m.tokenizer
        prompts = as_token_lists(body.prompt, tok, m.model.config.vocab_size)
        ends = [tok.eos_id] if tok.eos_id is not None else []
        reqs = [
            new_request(
                ids,
                body,
                body.max_tokens if body.max_tokens is not None else 16,
                ends,
                j,
                logprobs=body.logprobs,
                echo=body.echo,
                served=m,
            )
            for ids in prompts
            for j in range(body.n)
        ]
        rid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())

        def choice(i: int, r: Request, text: str, tokens: list[TokenLogprob], reason: str | None) -> dict:
            return {
                "index": i,
                "text": text,
                "finish_reason": reason,
                "logprobs": completion_logprobs(tokens, r, body.echo) if body.logprobs is not None else None,
            }

        if body.stream:

            async def chunks() -> AsyncIterator[dict]:
                echoed = set()
                async for i, ev in run_stream(m, reqs, request):
                    r = reqs[i]
                    text = ev.text
                    if body.echo and i not in echoed:
                        echoed.add(i)
                        text = tok.decode(r.prompt_ids) + text
                    yield {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": m.name,
                        "choices": [choice(i, r, text, ev.tokens, ev.finish_reason)],
                    }
                if body.stream_options and body.stream_options.include_usage:
                    yield {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": m.name,
                        "choices": [],
                        "usage": usage(prompts, reqs),
                    }

            return StreamingResponse(sse(chunks()), media_type="text/event-stream")

        events = await run_all(m, reqs, request)
        choices = []
        for i, (r, evs) in enumerate(zip(reqs, events)):
            text = "".join(e.text for e in evs)
            if body.echo:
                text = tok.decode(r.prompt_ids) + text
            choices.append(choice(i, r, text, [t for e in evs for t in e.tokens], r.finish_reason))
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": m.name,
            "choices": choices,
            "usage": usage(prompts, reqs),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: HTTPRequest):
        check_supported(body)
        m = pick(body.model, "decoder")
        tok = m.tokenizer
        tools, tool_choice = tool_setup(body)
        messages = chat_messages(body.messages, tools, tool_choice)
        try:
            ids = tok.encode(apply_chat_template(tok, messages))
        except LmforgeError as e:
            raise APIError(400, str(e), param="messages") from None
        ends = list(dict.fromkeys(([tok.eos_id] if tok.eos_id is not None else []) + end_of_turn_ids(tok)))
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if limit is None:
            limit = max(m.engine.max_len - len(ids), 0)
        top = (body.top_logprobs or 0) if body.logprobs else None
        reqs = [
            new_request(ids, body, limit, ends, j, logprobs=top, served=m, tools=tools, tool_choice=tool_choice)
            for j in range(body.n)
        ]
        rid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())

        def logprobs(tokens: list[TokenLogprob]) -> dict | None:
            return {"content": [chat_logprob(t) for t in tokens]} if body.logprobs else None

        if body.stream:

            async def chunks() -> AsyncIterator[dict]:
                head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": m.name}
                for i in range(len(reqs)):
                    yield {
                        **head,
                        "choices": [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                calls: dict[int, str | None] = {}  # with tools: choice -> its text so far while it is a call
                async for i, ev in run_stream(m, reqs, request, limit_param):
                    text, reason = ev.text, ev.finish_reason
                    if (
                        tools
                        and (i in calls or not ev.text.strip() or ev.text.lstrip().startswith("{"))
                        and calls.get(i, "") is not None
                    ):
                        calls[i] = calls.get(i, "") + text  # a tool call (or not yet known): sent whole at the end
                        if reason is None:
                            continue
                        message, reason = assistant_message(calls[i], tools, reason)
                        delta = (
                            {"tool_calls": [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]}
                            if message.get("tool_calls")
                            else {"content": message["content"]}
                        )
                    else:
                        calls[i] = None  # plain text: streamed as it comes
                        delta = {"content": text} if text else {}
                    yield {
                        **head,
                        "choices": [
                            {"index": i, "delta": delta, "logprobs": logprobs(ev.tokens), "finish_reason": reason}
                        ],
                    }
                if body.stream_options and body.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": usage([ids], reqs)}

            return StreamingResponse(sse(chunks()), media_type="text/event-stream")

        events = await run_all(m, reqs, request, limit_param)
        choices = []
        for i, (r, evs) in enumerate(zip(reqs, events)):
            message, reason = assistant_message("".join(e.text for e in evs), tools, r.finish_reason)
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": logprobs([t for e in evs for t in e.tokens]),
                    "finish_reason": reason,
                }
            )
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": m.name,
            "choices": choices,
            "usage": usage([ids], reqs),
        }

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        from starlette.concurrency import run_in_threadpool

        m = pick(body.model, "encoder")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(
                400,
                "input must be a string or a non-empty list of strings (token-id input is not supported)",
                param="input",
            )
        if len(texts) > 2048:
            raise APIError(400, f"at most 2048 inputs per request, got {len(texts)}", param="input")
        counts = [len(ids) + 2 for ids in m.tokenizer.encode_batch(texts)]  # + [CLS] and [SEP]
        ctx = m.model.config.max_seq_len
        if max(counts) > ctx:
            raise APIError(400, f"an input has {max(counts)} tokens; this model's maximum is {ctx}", param="input")
        dim = m.model.config.d_model
        if body.dimensions not in (None, dim):
            raise APIError(
                400, f"this model's embeddings have {dim} dimensions; 'dimensions' cannot change it", param="dimensions"
            )

        def run():
            with m.lock, torch.inference_mode():
                return embed(m.model, m.tokenizer, texts)

        vecs = await run_in_threadpool(run)
        data = []
        for i, v in enumerate(vecs):
            if body.encoding_format == "base64":
                value = base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode()
            else:
                value = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        n = sum(counts)
        metrics.count_tokens(m.name, n, 0)
        return {"object": "list", "data": data, "model": m.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    # -- the engine, from asyncio --------------------------------------------------------------------------------

    def submit(m: ServedModel, reqs: list[Request], on_event, limit_param: str) -> None:
        """Queue the requests; limit_param: the field that set their max_tokens (named when over the context)."""
        for k, r in enumerate(reqs):
            r.on_event = functools.partial(on_event, k)
        try:
            m.engine.submit(reqs)
        except QueueFull as e:
            metrics.rejected(m.name)
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except LmforgeError as e:
            too_long = "context length" in str(e)
            raise APIError(
                400,
                str(e),
                param=limit_param if too_long else None,
                code="context_length_exceeded" if too_long else None,
            ) from None

    def finished(m: ServedModel, reqs: list[Request]) -> None:
        metrics.count_tokens(m.name, sum(len(r.prompt_ids) for r in reqs), sum(len(r.completion_ids) for r in reqs))
        for r in reqs:
            if r.ttft is not None:
                metrics.ttft(m.name, r.ttft)

    async def run_all(
        m: ServedModel, reqs: list[Request], request: HTTPRequest, limit_param: str = "max_tokens"
    ) -> list[list[Event]]:
        """Every request's events; cancels them all if the client goes away first."""
        loop = asyncio.get_running_loop()
        events: list[list[Event]] = [[] for _ in reqs]
        left = {"n": len(reqs)}
        done = loop.create_future()

        def on_event(k: int, ev: Event) -> None:  # engine thread
            def deliver():
                events[k].append(ev)
                if ev.finish_reason is not None:
                    left["n"] -= 1
                    if left["n"] == 0 and not done.done():
                        done.set_result(None)

            loop.call_soon_threadsafe(deliver)

        submit(m, reqs, on_event, limit_param)
        try:
            while not done.done():
                await asyncio.wait([done], timeout=0.25)
                if not done.done() and await request.is_disconnected():
                    raise APIError(499, "the client closed the request")
        finally:
            for r in reqs:
                m.engine.cancel(r)
            finished(m, reqs)
        errors = [e.error for evs in events for e in evs if e.error]
        if errors:
            raise APIError(500, errors[0], "server_error")
        return events

    async def run_stream(m: ServedModel, reqs: list[Request], request: HTTPRequest, limit_param: str = "max_tokens"):
        """(request index, event) as they come; the requests are cancelled when the stream is dropped."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        submit(m, reqs, lambda k, ev: loop.call_soon_threadsafe(q.put_nowait, (k, ev)), limit_param)
        left = len(reqs)
        try:
            while left:
                k, ev = await q.get()
                if ev.error:
                    raise APIError(500, ev.error, "server_error")
                left -= ev.finish_reason is not None
                yield k, ev
        finally:
            for r in reqs:
                m.engine.cancel(r)
            finished(m, reqs)

    # the last added runs first: metering sees every answer, the intake's 401 / 408 / 413 included
    app.add_middleware(_Intake, api_key=api_key, limit=max_body, timeout=body_timeout)
    app.add_middleware(_Metered, metrics=metrics)
    return app


# ----------------------------------------------------------------------------------------------------------------
# request and response pieces


def check_supported(body) -> None:
    name = body.unsupported()
    if name:
        raise APIError(
            400, f"the parameter {name!r} is not supported by this server", param=name, code="unsupported_parameter"
        )


def as_token_lists(prompt, tok, vocab_size: int) -> list[list[int]]:
    """OpenAI's prompt forms (a string, strings, token ids, lists of token ids) -> token id lists, each id in
    [0, vocab_size)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    out = []
    for p in prompt:
        ids = tok.encode(p) if isinstance(p, str) else list(p)
        if not all(0 <= t < vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab_size})", param="prompt")
        if not ids and start is not None:
            ids = [start]  # an empty prompt starts from BOS (or EOS, GPT-2's document separator)
        out.append(ids)
    return out


TOOL_FORMAT = "You can call these tools (JSON schemas of their arguments):\n{tools}\n{how}"
TOOL_HOW = {
    "auto": 'To call one, reply with only a JSON object {"name": <tool name>, "arguments": {...}}; '
    "otherwise reply in plain text.",
    "required": 'Reply with only a JSON object {"name": <tool name>, "arguments": {...}} calling one.',
}


def tool_setup(body) -> tuple[list[dict] | None, str]:
    """The request's tools as [{"name", "description", "parameters"}] (None: no tools, or tool_choice "none") and
    its tool_choice: "auto" (the default), "required" or a tool's name."""
    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None, "none"
    tools = []
    for t in body.tools:
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise APIError(
                400,
                'each tool needs {"type": "function", "function": {"name": ..., "parameters": {...}}}',
                param="tools",
            )
        params = f.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise APIError(400, f"tool {f['name']!r}: parameters must be a JSON schema object", param="tools")
        if any(t["name"] == f["name"] for t in tools):
            raise APIError(400, f"two tools are named {f['name']!r}; tool names must be unique", param="tools")
        tools.append({"name": f["name"], "description": f.get("description") or "", "parameters": params})
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name")
        if choice not in [t["name"] for t in tools]:
            raise APIError(400, f"tool_choice names {choice!r}, which is not one of the tools", param="tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise APIError(
            400,
            'tool_choice is none, auto, required or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if body.response_format and (body.response_format.get("type") or "text") != "text" and choice != "none":
        raise APIError(400, "give tools or a response_format, not both", param="response_format")
    return (None, "none") if choice == "none" else (tools, choice)


def chat_messages(messages, tools: list[dict] | None, tool_choice: str) -> list[dict]:
    """The conversation for the chat template, in lmforge's generic tool format (the packaged models' templates
    have none): the tools and how to call them added to the system turn; an assistant turn's tool calls as the
    JSON object the model wrote; a tool turn's result as a user turn."""
    out = []
    for x in messages:
        role = "system" if x.role == "developer" else x.role
        content = x.text()
        if role == "assistant" and x.tool_calls:
            calls = []
            for c in x.tool_calls:
                f = c.get("function") or {}
                try:
                    args = json.loads(f.get("arguments") or "{}")
                except json.JSONDecodeError:
                    raise APIError(400, "a tool call's arguments must be JSON text", param="messages") from None
                calls.append(json.dumps({"name": f.get("name"), "arguments": args}))
            content = "\n".join(calls)
        elif role == "tool":
            if not x.tool_call_id:
                raise APIError(
                    400, "a message with role 'tool' needs the tool_call_id of the call it answers", param="messages"
                )
            role, content = "user", f"Tool result{f' ({x.name})' if x.name else ''}: {content}"
        out.append({"role": role, "content": content})
    if tools:
        listed = json.dumps(
            [{"name": t["name"], "description": t["description"], "parameters": t["parameters"]} for t in tools]
        )
        how = TOOL_HOW["auto" if tool_choice == "auto" else "required"]
        text = TOOL_FORMAT.format(tools=listed, how=how)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def assistant_message(text: str, tools: list[dict] | None, reason: str | None) -> tuple[dict, str | None]:
    """The reply as OpenAI's assistant message: tool_calls when it is a call in the generic format (its arguments
    as JSON text; finish_reason "tool_calls"), content otherwise."""
    if tools and text.lstrip().startswith("{") and reason == "stop":
        try:
            call = json.loads(text)
        except json.JSONDecodeError:
            call = None
        if isinstance(call, dict) and call.get("name") in [t["name"] for t in tools]:
            return {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_" + uuid.uuid4().hex[:24],
                        "type": "function",
                        "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))},
                    }
                ],
            }, "tool_calls"
    return {"role": "assistant", "content": text}, reason


def response_constraint(body, served: ServedModel, ends: list[int]) -> Constraint | None:
    """The reply's grammar from `response_format`: json_object, json_schema ({"json_schema": {"schema": ...}}),
    and lmforge's extensions regex ({"regex": "..."}) and choice ({"choice": [...]}); None for text. A schema
    with a construct the grammar engine does not implement is a 400 that names it."""
    rf = body.response_format or {}
    kind = rf.get("type") or "text"
    if kind == "text":
        return None
    spec: dict = {}
    if kind == "json_object":
        spec["json_object"] = True
    elif kind == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(
                400,
                'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                param="response_format",
            )
        spec["json_schema"] = schema
    elif kind == "regex" and isinstance(rf.get("regex"), str) and rf["regex"]:
        spec["regex"] = rf["regex"]
    elif kind == "choice" and isinstance(rf.get("choice"), list) and rf["choice"]:
        spec["choice"] = rf["choice"]
    else:
        raise APIError(
            400,
            f"response_format type {kind!r} needs its field ('regex': a pattern, 'choice': a list "
            "of strings) or is not one of text, json_object, json_schema, regex, choice",
            param="response_format",
        )
    if not ends:
        raise APIError(400, "this model has no end token to finish a constrained reply", param="response_format")
    try:
        return Constraint.make(served.tokenizer, served.model.config.vocab_size, ends, **spec)
    except LmforgeError as e:
        raise APIError(400, str(e), param="response_format") from None


def new_request(
    ids: list[int],
    body,
    max_tokens: int,
    ends: list[int],
    j: int,
    logprobs: int | None = None,
    echo: bool = False,
    served: ServedModel | None = None,
    tools: list[dict] | None = None,
    tool_choice: str = "none",
) -> Request:
    if tools:  # the call's arguments always parse: decoding follows the tools' schemas
        try:
            constraint = Constraint.make(
                served.tokenizer, served.model.config.vocab_size, ends, tools=tools, tool_choice=tool_choice
            )
        except LmforgeError as e:
            raise APIError(400, str(e), param="tools") from None
    else:
        constraint = response_constraint(body, served, ends) if served is not None else None
    seed = None if body.seed is None else body.seed + j
    temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_k=body.top_k,
        top_p=body.top_p if body.top_p < 1 else None,
        seed=seed,
    )
    bias = None
    if body.logit_bias:
        vocab = served.model.config.vocab_size if served is not None else None
        bias = {int(k): float(v) for k, v in body.logit_bias.items()}
        bad = next((t for t in bias if vocab is not None and t >= vocab), None)
        if bad is not None:
            raise APIError(
                400, f"logit_bias names token {bad}, outside this model's vocabulary of {vocab}", param="logit_bias"
            )
    return Request(
        ids,
        params,
        stop=body.stop or [],
        end_ids=[] if body.ignore_eos and constraint is None else ends,
        logprobs=logprobs,
        echo=echo,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        constraint=constraint,
        logit_bias=bias,
    )


def usage(prompts: list[list[int]], reqs: list[Request]) -> dict:
    p, c = sum(len(x) for x in prompts), sum(len(r.completion_ids) for r in reqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_logprobs(tokens: list[TokenLogprob], r: Request, echo: bool) -> dict:
    """The legacy completions shape: parallel lists, with the prompt's tokens first under echo."""
    items = ((r.prompt_logprobs or []) if echo else []) + list(tokens)
    offsets, pos = [], 0
    for t in items:
        offsets.append(pos)
        pos += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [dict(t.top) if t.top is not None else None for t in items],
        "text_offset": offsets,
    }


def chat_logprob(t: TokenLogprob) -> dict:
    return {
        "token": t.token,
        "logprob": t.logprob,
        "bytes": list(t.token.encode()),
        "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())} for s, v in (t.top or [])],
    }


def model_card(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "lmforge", "kind": m.kind}


async def sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events: one `data: {json}` per chunk, then `data: [DONE]`; an error mid-stream becomes an
    error event (the status line is already sent)."""
    try:
        async for c in chunks:
            yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------------------------------
# ASGI middleware: the intake (key, body size, body time), request metrics


async def _answer(send, e: APIError, close: bool = False) -> None:
    """Send `e` as the whole response; close: the connection too (the rest of the body never came or is not
    wanted, so what follows on the connection cannot be trusted to be the next request)."""
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {
            "type": "http.response.start",
            "status": e.status,
            "headers": headers + ([(b"connection", b"close")] if close else []),
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Intake:
    """A request before its handler: the API key first, from the headers alone (401 whatever the body holds;
    /health, /metrics and the playground stay open), then the body, read whole: 413 over `limit` bytes whether or
    not it declares its length, 408 when it has not all arrived within `timeout` seconds (a client that declares
    more than it sends, or sends its headers and stops, would otherwise hold a handler forever)."""

    def __init__(self, app, api_key: str | None, limit: int, timeout: float) -> None:
        self.app, self.api_key, self.limit, self.timeout = app, api_key, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(scope):
            return await _answer(
                send,
                APIError(
                    401, "incorrect or missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key"
                ),
            )
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout  # for the whole body: a trickle of bytes does not extend it
        chunks, size, more = [], 0, True
        while more:
            try:
                msg = await asyncio.wait_for(receive(), deadline - loop.time())
            except TimeoutError:
                return await _answer(
                    send,
                    APIError(
                        408, f"the request body did not arrive within {self.timeout:g} seconds", code="request_timeout"
                    ),
                    close=True,
                )
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(send)
            more = msg.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the client's disconnect

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        given = header[7:] if header[:7].lower() == b"bearer " else b""
        return hmac.compare_digest(given, self.api_key.encode())

    async def _too_large(self, send) -> None:
        await _answer(
            send,
            APIError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large"),
            close=True,
        )


class _Metered:
    """Counts requests by endpoint and status, and times them to the last byte sent. A request that ends
    without an answer (its client left first) counts as 499, nginx's "client closed request"; one whose handler
    raised as 500."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [None]

        async def watch(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            status[0] = status[0] or 500
            raise
        finally:
            self.metrics.request(scope["path"], status[0] or 499, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------------
# running it


class _TimedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for a request's head: a connection that sends nothing, or
    only part of its headers, is closed `head_timeout` seconds after it opened or after its first byte (uvicorn
    times out an idle keep-alive connection, not a request head that never ends). Once the head has arrived the
    body's deadline is _Intake's."""

    def __init__(self, *args, head_timeout: float = REQUEST_TIMEOUT, **kw) -> None:
        super().__init__(*args, **kw)
        self.head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout, self._expire)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_request():
            self._disarm()
        elif self._head_timer is None:  # the first byte of the next request on a kept-alive connection
            self._head_timer = self.loop.call_later(self.head_timeout, self._expire)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, host: str, port: int, request_timeout: float = REQUEST_TIMEOUT, **kw):
    """uvicorn's settings for lmforge: request heads timed (_TimedH11), idle keep-alive connections closed
    after at most 5 seconds."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=functools.partial(_TimedH11, head_timeout=request_timeout),
        timeout_keep_alive=min(5, max(1, int(request_timeout))),
        **kw,
    )


class ServerThread:
    """Run an app with uvicorn on a background thread (tests, notebooks, benchmarks):

        with ServerThread(create_app(load_served(["smollm2-135m-instruct"]))) as url:
            openai.OpenAI(base_url=url + "/v1", api_key="-")...

    port=0 picks a free port; `url` is where it listens. request_timeout: seconds for a request's head (the
    body's limit is create_app's body_timeout)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, request_timeout: float = REQUEST_TIMEOUT) -> None:
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn_config(app, host, port, request_timeout, log_level="warning", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self.server.run, name="lmforge-http", daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                raise LmforgeError("the HTTP server did not start (is the port in use?)")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# ServeConfig settings that only the decoders' engines read
DECODER_SETTINGS = ("max_batch", "max_queue", "max_len", "cache_mb", "prefill_chunk", "speculative", "kv_dtype")


def check_listen(host: str, port: int) -> None:
    """Refuse, with one line, an address this machine cannot listen on (not one of its own, or a port in use)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OverflowError) as e:
        raise LmforgeError(
            f"--host {host}: not an address this machine can listen on ({e}); use 127.0.0.1 (this "
            "machine only), 0.0.0.0 (every interface) or one of its own addresses"
        ) from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            why = "the port is in use" if e.errno == 98 else e.strerror or str(e)
            raise LmforgeError(f"cannot listen on {host}:{port}: {why}; choose another --port (or --host)") from None


def serve(models: Sequence[str], config: ServeConfig | None = None, **settings: Any) -> None:
    """Load the models and serve them until interrupted, as `config` says (a ServeConfig; `settings` override
    its fields: host, port, api_key, max_batch, max_queue, max_len, quantize, dtype, device, cache_mb,
    prefill_chunk, kv_dtype, speculative, max_body, request_timeout, log_level). Every setting is checked before a
    model loads."""
    import uvicorn

    if not models:
        raise LmforgeError("serve needs at least one --model")
    try:
        c = dataclasses.replace(config or ServeConfig(), **settings)
    except TypeError as e:
        raise LmforgeError(f"serve: {e}") from None
    c.validate()
    host, port, api_key, request_timeout = c.host, c.port, c.api_key, c.request_timeout
    check_listen(host, port)  # (before the models load)
    for_decoders = [f"--{k.replace('_', '-')}" for k in DECODER_SETTINGS if k in settings]
    tune_allocator()
    # loaded on a thread that ends, so that the engine threads are the only ones with OpenMP pools (see
    # runtime.in_own_thread: otherwise a batch-1 step takes about twice as long on few cores)
    served = in_own_thread(
        load_served,
        models,
        c.max_batch,
        c.max_queue,
        c.max_len,
        c.quantize,
        c.dtype,
        c.device,
        c.speculative,
        c.cache_mb,
        c.prefill_chunk,
        c.kv_dtype,
    )
    trim_heap()  # loading and converting the weights freed about 1 GB the server would otherwise keep
    if for_decoders and not any(m.engine is not None for m in served):
        raise LmforgeError(
            f"{', '.join(for_decoders)} set the decoders' engine (completions, chat); "
            f"{', '.join(m.name for m in served)} serve embeddings only: drop them"
        )
    app = create_app(served, api_key=api_key, max_body=c.max_body, body_timeout=request_timeout)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use it")
    print(f"serving {', '.join(m.name for m in served)} at http://{host}:{port}  (playground: /, API: /v1)", flush=True)
    try:
        uvicorn.Server(
            uvicorn_config(app, host, port, request_timeout, log_level=c.log_level, timeout_graceful_shutdown=2)
        ).run()
    except SystemExit as e:  # uvicorn could not start (the address was taken since check_listen, say)
        raise LmforgeError(
            f"the server could not start on {host}:{port} (uvicorn exited with {e.code}); see the lines above"
        ) from None
    finally:
        for m in served:
            if m.engine is not None:
                m.engine.close()
