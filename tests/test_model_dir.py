import json

import pytest
import torch

from conftest import tiny_config
from lmforge.errors import ModelLoadError
from lmforge.interop import load_model
from lmforge.models import DecoderLM
from lmforge.tokenizer import Tokenizer


def make(style, **kw):
    torch.manual_seed(0)
    return DecoderLM(tiny_config(style, **kw)).eval()


@pytest.mark.parametrize("variant", ["gpt2", "llama", "llama-tied", "native"])
def test_save_load_identical_logits(tmp_path, variant):
    kw = {"llama-tied": dict(tie_embeddings=True), "native": dict(pos_emb="rope")}.get(variant, {})
    m = make("llama" if variant.startswith("llama") else "gpt2", **kw)
    tok = Tokenizer.train_bpe(["hello there"] * 5, vocab_size=280)
    m.save_pretrained(tmp_path / "m", tokenizer=tok)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(files)
    expected_type = {"gpt2": "gpt2", "native": "lmforge-decoder"}.get(variant, "llama")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == expected_type
    m2 = load_model(tmp_path / "m")
    x = torch.randint(0, 97, (2, 16))
    assert torch.equal(m(x).logits, m2(x).logits)
    assert m2.config == m.config


def test_transformers_loads_our_directories(tmp_path, style):
    transformers = pytest.importorskip("transformers")
    m = make(style)
    m.save_pretrained(tmp_path / "m")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, m(x).logits, rtol=0, atol=1e-5)


def test_we_load_transformers_directories(tmp_path, style):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    if style == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        ref = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        ref = transformers.LlamaForCausalLM(cfg)
    ref.eval().save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, rtol=0, atol=1e-5)


def test_bad_model_directories(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_model(tmp_path / "empty")
    m = make("gpt2")
    m.save_pretrained(tmp_path / "m")
    # truncated weights
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(tmp_path / "m")
    # config that does not match the weights
    m.save_pretrained(tmp_path / "m2")
    c = json.loads((tmp_path / "m2" / "config.json").read_text())
    c["n_embd"] = 64
    (tmp_path / "m2" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ModelLoadError, match="do not match"):
        load_model(tmp_path / "m2")
    c["model_type"] = "mamba"
    (tmp_path / "m2" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ModelLoadError, match="supported model types: gpt2, llama"):
        load_model(tmp_path / "m2")


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_mistral_and_qwen2_directories_both_ways(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    kw = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=family == "qwen2",
    )
    if family == "mistral":
        ref = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **kw))
    else:
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
        with torch.no_grad():  # give the q/k/v biases values, so the test would see them dropped
            for layer in ref.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    ref.eval().save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, rtol=0, atol=1e-5)
    ours.save_pretrained(tmp_path / "back")
    expected = family  # written as its own family
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == expected
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref(x).logits, rtol=0, atol=1e-5)


def test_sharded_safetensors_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    from lmforge.info import model_info

    assert model_info(tmp_path / "hf")["params"] == sum(p.numel() for p in ref.parameters())  # shards checked
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "hf")(x).logits, ref(x).logits, rtol=0, atol=1e-5)


def test_save_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        make("gpt2").save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    make("gpt2").save_pretrained(tmp_path / "m")
    make("gpt2").save_pretrained(tmp_path / "m")  # replacing a model directory is fine


def test_half_precision_files_load_as_float32(tmp_path):
    from safetensors.torch import load_file, save_file

    m = make("llama")
    m.save_pretrained(tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(w)).items()}, str(w))
    again = load_model(tmp_path / "m")
    assert all(p.dtype == torch.float32 for p in again.parameters())
    x = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(again(x).logits, m(x).logits, rtol=0, atol=1e-2)
