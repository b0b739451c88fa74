"""Today's decoder families as data: tiny random models made by transformers itself, loaded by lmforge from both
config layouts (transformers 5's `rope_parameters` and the older top-level `rope_theta` / `rope_scaling` that hub
files keep), with logits equal to transformers' (fp32, atol 1e-4) on prompts longer than any sliding window; the
KV-cache decode equal to the full forward; and what lmforge saves loaded back by transformers with equal logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from arch_cases import CASES, PROMPT_LEN, V, make_reference  # noqa: E402
from lmforge.generate.sampling import SamplingParams, generate_ids  # noqa: E402
from lmforge.interop.load import load_model  # noqa: E402


def older_layout(path: Path) -> None:
    """Rewrite a transformers-5 config.json the way hub files written by transformers 4 have it."""
    f = path / "config.json"
    d = json.loads(f.read_text())
    params = d.pop("rope_parameters", None) or {}
    if "full_attention" in params:  # Gemma 3: one per layer type
        d["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        params = params["full_attention"]
    d["rope_theta"] = params.pop("rope_theta", 10000.0)
    if "partial_rotary_factor" in params:
        d["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    kind = params.pop("rope_type", "default")
    if kind != "default":
        d["rope_scaling"] = {"type": kind, **params}
    if d["model_type"] in ("gemma2", "gemma3_text"):
        types = d.pop("layer_types")
        if d["model_type"] == "gemma3_text":
            d["sliding_window_pattern"] = types.index("full_attention") + 1
    f.write_text(json.dumps(d))


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, make_reference(request.param, path), path


def ids(batch: int = 2, n: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(3, V, (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["transformers5", "older"])
def test_logits_equal_transformers(pair, layout, tmp_path):
    name, ref, path = pair
    if layout == "older":
        older = tmp_path / "older"
        older.mkdir()
        for f in path.iterdir():
            (older / f.name).write_bytes(f.read_bytes())
        older_layout(older)
        path = older
        ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()  # it reads the older layout too
    model = load_model(path)
    assert model.num_params() == model.config.num_params() == ref.num_parameters()
    x = ids()
    with torch.no_grad():
        want, got = ref(x).logits, model(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_cache_decode_equals_forward_and_greedy_tokens_equal(pair):
    """The KV cache (sliding windows applied to cached keys too) gives the full forward's logits step by step,
    and the serving engine's paged cache gives transformers' greedy tokens."""
    name, ref, path = pair
    model = load_model(path)
    x = ids(2, PROMPT_LEN)
    cache = model.new_cache(2, PROMPT_LEN)
    with torch.no_grad():
        full = model(x).logits
        steps = [model(x[:, :10], cache=cache).logits[:, -1]]
        steps += [model(x[:, t : t + 1], cache=cache).logits[:, -1] for t in range(10, PROMPT_LEN)]
    if name not in (
        "phi4-mini",
        "llama-dynamic",
    ):  # (past their original context a call's length picks the frequencies)
        torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 9:-1], atol=1e-4, rtol=0)
    if name == "llama-dynamic":
        return  # (generation stays within max_position_embeddings, here shorter than the prompt + reply)
    prompt = ids(1, 12)
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = torch.stack(list(generate_ids(model, prompt.tolist(), SamplingParams(max_new_tokens=14, temperature=0.0))), 1)
    assert got.tolist() == want[:, 12:].tolist()


def test_transformers_loads_what_lmforge_saves(pair, tmp_path):
    name, ref, path = pair
    model = load_model(path)
    model.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == ref.config.model_type  # written as its own family, not a fallback
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = ids()
    with torch.no_grad():  # (against lmforge's: transformers' dynamic rope keeps state from earlier calls)
        torch.testing.assert_close(back(x).logits, model(x).logits, atol=1e-4, rtol=0)


def test_every_decoder_family_has_a_case():
    from lmforge.interop.hf import ARCHS
    from lmforge.models.family import DECODER_ARCHS

    assert set(ARCHS) == set(DECODER_ARCHS)
    covered = {getattr(transformers, cls).model_type for cls, _ in CASES.values()}
    assert set(DECODER_ARCHS) <= covered


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_lora_and_qlora_learn(pair, quantize):
    """LoRA (and LoRA on a frozen 4-bit base) trains on every family: a few steps on one batch lower its loss."""
    from lmforge.nn.lora import apply_lora

    name, ref, path = pair
    model = load_model(path).train()
    apply_lora(model, "all", r=4, dropout=0.0, quantize=quantize)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(2, 16)
    losses = []
    for _ in range(6):
        loss = model(x[:, :-1], labels=x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("mode, tol", [("int8", 0.2), ("int4", 1.0)])  # (random weights: noise, not accuracy)
def test_quantized_inference_stays_close(pair, mode, tol):
    from lmforge.nn.quant import quantize_model

    name, ref, path = pair
    model, q = load_model(path), load_model(path)
    quantize_model(q, mode, group_size=16)
    x = ids()
    with torch.no_grad():
        diff = (q(x).logits - model(x).logits).abs().max().item()
    assert 0 < diff < tol


def test_served_greedy_reply_equals_generate(pair, tmp_path):
    """Through the HTTP server (its engine: paged cache, windows on the cached keys), the greedy reply to a prompt
    longer than any window is the same tokens as decoding in-process."""
    import urllib.request

    from lmforge.serve.app import ServerThread, create_app, load_served
    from lmforge.tokenizer import Tokenizer

    name, ref, path = pair
    if name == "llama-dynamic":
        pytest.skip("(its context, 16, is shorter than prompt + reply)")
    tok = Tokenizer.train_bpe(["to be or not to be 1234 that is the question"] * 20, vocab_size=V)
    model = load_model(path)
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    prompt = ids(1, 12)[0].tolist()
    want = [int(t) for t in generate_ids(model, [prompt], SamplingParams(max_new_tokens=10, temperature=0.0))]
    served = load_served([str(tmp_path / "m")], max_batch=2)
    try:
        with ServerThread(create_app(served)) as url:
            body = {"model": served[0].name, "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 1}
            req = urllib.request.Request(
                url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
    finally:
        served[0].engine.close()
    assert reply["choices"][0]["text"] == tok.decode(want)
