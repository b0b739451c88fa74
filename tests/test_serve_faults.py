"""`lmforge serve` against clients that misbehave: out-of-range fields, a wrong key on a broken body, bodies that
never finish arriving, and a short soak of all of it mixed with valid traffic (benchmarks/serve_soak.py's `soak`).

One server over a tiny random decoder (serve_soak's: two layers, a 512-token BPE), with an API key and a request
timeout of one second, so that the slow-client cases finish quickly.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lmforge.generate.engine import Engine, Request
from lmforge.generate.sampling import SamplingParams
from lmforge.serve.app import ServedModel, ServerThread, create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_soak import VALID, soak, summary, tiny_decoder  # noqa: E402

KEY = "sk-faults"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = 1.0  # the server's request timeout here


@pytest.fixture(scope="module")
def server():
    model, tok = tiny_decoder()
    engine = Engine(model, tok, max_batch=4, max_queue=32).start()
    app = create_app([ServedModel("tiny", model, tok, engine)], api_key=KEY, body_timeout=TIMEOUT)
    with ServerThread(app, request_timeout=TIMEOUT) as url:
        yield url, engine
    engine.close()


def _stream_text(r: httpx.Response) -> tuple[str, str | None]:
    """The streamed text of a completion and its finish_reason ("error" for an error event)."""
    text, finish = "", None
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return text, "error"
            for c in chunk["choices"]:
                text += c["text"]
                finish = c["finish_reason"] or finish
    return text, finish


LONG = {"max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}


_ALONE: dict[str, str] = {}  # prompt -> its greedy text run alone (the same for every test of the module)


def _greedy_alone(url: str, prompts: list[str]) -> list[str]:
    for p in prompts:
        if p in _ALONE:
            continue
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "prompt": p}, headers=AUTH, timeout=60) as r:
            text, finish = _stream_text(r)
        assert finish == "length"
        _ALONE[p] = text
    return [_ALONE[p] for p in prompts]


def _two_streams_around(url: str, engine: Engine, prompts: list[str], meanwhile) -> list[tuple[str, str | None]]:
    """Open two greedy streams, call meanwhile() once both are decoding, then read both to the end."""
    with httpx.Client(timeout=60, headers=AUTH) as c:
        with (
            c.stream("POST", url + "/v1/completions", json={**LONG, "prompt": prompts[0]}) as a,
            c.stream("POST", url + "/v1/completions", json={**LONG, "prompt": prompts[1]}) as b,
        ):
            deadline = time.time() + 10
            while engine.running < 2 and time.time() < deadline:
                time.sleep(0.002)
            assert engine.running == 2, "the two streams never ran together"
            meanwhile()
            return [_stream_text(a), _stream_text(b)]


PROMPTS = ["To be, or not to be", "Now is the winter of our discontent"]


def test_huge_seed_is_400_and_leaves_other_streams_alone(server):
    """The user report: a seed past 64 bits was a 500 and ended every stream in flight with the same error."""
    url, engine = server
    alone = _greedy_alone(url, PROMPTS)
    answers = []

    def bad():
        answers.append(
            httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "seed": 2**64}, headers=AUTH)
        )

    got = _two_streams_around(url, engine, PROMPTS, bad)
    assert answers[0].status_code == 400 and answers[0].json()["error"]["param"] == "seed"
    assert got == [(alone[0], "length"), (alone[1], "length")]


def test_a_request_failing_inside_the_engine_ends_alone(server):
    url, engine = server
    alone = _greedy_alone(url, PROMPTS)
    events = []

    def poisoned():  # past the server's validation, straight into the engine: manual_seed raises in the prefill
        r = Request([1, 2, 3], SamplingParams(max_new_tokens=3, temperature=1.0, seed=2**64), on_event=events.append)
        engine.submit([r])

    got = _two_streams_around(url, engine, PROMPTS, poisoned)
    assert events and events[-1].finish_reason == "error"
    assert got == [(alone[0], "length"), (alone[1], "length")]


BIG = 10**30
FIELDS = [  # (path, field, value, the param the 400 names)
    ("/v1/completions", "seed", 2**64, "seed"),
    ("/v1/completions", "seed", -(2**63) - 1, "seed"),
    ("/v1/chat/completions", "seed", BIG, "seed"),
    ("/v1/completions", "max_tokens", -1, "max_tokens"),
    ("/v1/completions", "max_tokens", BIG, "max_tokens"),
    ("/v1/chat/completions", "max_tokens", BIG, "max_tokens"),
    ("/v1/chat/completions", "max_completion_tokens", BIG, "max_completion_tokens"),
    ("/v1/chat/completions", "max_completion_tokens", -1, "max_completion_tokens"),
    ("/v1/completions", "n", 0, "n"),
    ("/v1/completions", "n", 17, "n"),
    ("/v1/completions", "top_k", 0, "top_k"),
    ("/v1/completions", "logprobs", 21, "logprobs"),
    ("/v1/completions", "logprobs", -1, "logprobs"),
    ("/v1/chat/completions", "top_logprobs", 21, "top_logprobs"),
    ("/v1/completions", "temperature", 2.5, "temperature"),
    ("/v1/completions", "top_p", 1.5, "top_p"),
    ("/v1/completions", "presence_penalty", -2.5, "presence_penalty"),
    ("/v1/chat/completions", "frequency_penalty", 2.5, "frequency_penalty"),
    ("/v1/completions", "prompt", [BIG, 1], "prompt"),
    ("/v1/completions", "prompt", [-1], "prompt"),
    ("/v1/embeddings", "dimensions", 0, "dimensions"),
]


@pytest.mark.parametrize("path, field, value, param", FIELDS, ids=[f"{f[1]}={str(f[2])[:12]}" for f in FIELDS])
def test_out_of_range_fields_get_400_naming_the_field(server, path, field, value, param):
    url, _ = server
    body = {
        "model": "tiny",
        "max_tokens": 2,
        "prompt": "to be",
        "input": "to be",
        "messages": [{"role": "user", "content": "hi"}],
        field: value,
    }
    r = httpx.post(url + path, json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_edge_values_that_are_valid_still_answer(server):
    """The largest seed, a huge top_k (the vocabulary bounds it) and a denormal temperature (decoded greedily:
    dividing logits by it would give the sampler NaN probabilities inside the engine's step)."""
    url, _ = server
    base = {"prompt": "to be", "max_tokens": 5, "ignore_eos": True}
    for extra in ({"seed": 2**63 - 1, "n": 16}, {"seed": -(2**63)}, {"top_k": BIG}, {"temperature": 1e-300}):
        r = httpx.post(url + "/v1/completions", json={**base, **extra}, headers=AUTH)
        assert r.status_code == 200, (extra, r.text)
    greedy = httpx.post(url + "/v1/completions", json={**base, "temperature": 0}, headers=AUTH).json()
    tiny = httpx.post(url + "/v1/completions", json={**base, "temperature": 1e-300}, headers=AUTH).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_the_key_is_checked_before_the_body(server):
    url, _ = server
    broken = {"content-type": "application/json"}
    for headers in ({**broken, "Authorization": "Bearer wrong"}, broken):
        r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={**broken, **AUTH})
    assert r.status_code == 400
    # a declared body it never sends: answered 401 at once, not after the body's timeout
    head, _, t = _raw(
        url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Length: 100\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 401") and t < TIMEOUT / 2


def _raw(url: str, data: bytes, wait: float = TIMEOUT + 3) -> tuple[bytes, bool, float]:
    """Send `data` on a fresh connection and read until the server closes it or `wait` passes: (what came back,
    whether it closed, seconds to the first byte or the close)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(data)
        s.settimeout(wait)
        t0, got, first = time.perf_counter(), b"", None
        try:
            while True:
                piece = s.recv(4096)
                first = first or time.perf_counter() - t0
                if not piece:
                    return got, True, first
                got += piece
        except TimeoutError:
            return got, False, first or wait
        except ConnectionResetError:
            return got, True, first or time.perf_counter() - t0


HEAD = (
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
    + KEY.encode()
    + b"\r\n"
)


@pytest.mark.parametrize(
    "data",
    [
        HEAD + b"Content-Length: 200\r\n\r\n" + b'{"prompt": "to be", ',  # a body shorter than it says
        HEAD + b"Content-Length: 50\r\n\r\n",  # the headers, then nothing
    ],
    ids=["short-body", "no-body"],
)
def test_a_body_that_never_arrives_gets_408_and_a_closed_connection(server, data):
    url, _ = server
    got, closed, t = _raw(url, data)
    assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got
    assert closed and TIMEOUT * 0.9 < t < TIMEOUT + 1.5


@pytest.mark.parametrize("data", [b"", b"POST /v1/completions HTTP/1.1\r\nHost:"], ids=["silent", "half-head"])
def test_a_head_that_never_ends_is_closed(server, data):
    url, _ = server
    got, closed, t = _raw(url, data)
    assert got == b"" and closed and t < TIMEOUT + 1.5
    # and a kept-alive connection still serves request after request
    with httpx.Client(headers=AUTH) as c:
        assert [
            c.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code for _ in range(3)
        ] == [200] * 3


def test_short_soak_has_no_5xx_and_answers_every_valid_request(server):
    url, engine = server
    t0 = time.perf_counter()
    records = asyncio.run(soak(url, "tiny", clients=8, seconds=5, key=KEY, lying_wait=TIMEOUT + 3, request_timeout=30))
    assert time.perf_counter() - t0 < 5 + TIMEOUT + 10
    rows = {r["kind"]: r for r in summary(records)}
    assert rows["all"]["5xx"] == 0, [r for r in records if r["server_error"]]
    valid = rows["all valid"]
    assert valid["sent"] >= 20 and valid["answered"] == valid["sent"], [r for r in records if not r["ok"]]
    assert rows["all"]["answered"] == rows["all"]["sent"], [r for r in records if not r["ok"]]
    assert all(rows[k]["sent"] > 0 for k in VALID)
    deadline = time.time() + 10  # dropped streams are cancelled, nothing is left running
    while (engine.running or engine.queued) and time.time() < deadline:
        time.sleep(0.02)
    assert engine.running == 0 and engine.queued == 0
    assert threading.active_count() < 50
