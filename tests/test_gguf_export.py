"""GGUF out and back in, for every decoder family: `export_gguf` writes llama.cpp's layout; lmforge reads it back
with equal logits (f32) and near ones (q8_0, q4_0); transformers' own GGUF loader reads it with the reference's
logits where it supports the architecture; the CLI verb writes a file and refuses bad input in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from arch_cases import CASES, PROMPT_LEN, V, make_reference  # noqa: E402
from lmforge.interop.gguf import load_gguf  # noqa: E402
from lmforge.interop.gguf_write import export_gguf  # noqa: E402
from lmforge.interop.load import load_model  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

# the cases transformers' GGUF loader (5.25) reads as their config says; the others through lmforge's reader only:
# that loader ignores rope_freqs (llama3.2), rope.scaling (llama-linear, qwen2.5-yarn), sliding windows (mistral,
# qwen2-window, gemma 2 / 3), key_length (qwen3: head_dim falls back to 128) and longrope
HF_READS = {"llama", "qwen2.5", "phi3"}
GGUF_CASES = [c for c in CASES if c != "llama-dynamic"]  # (dynamic rope has no GGUF form: refused, tested below)


@pytest.fixture(scope="module")
def tokenizer():
    text = ["To be, or not to be, that is the question: 1234 whether 'tis nobler in the mind"] * 40
    tok = Tokenizer.train_bpe(text, vocab_size=V, special_tokens=("<|endoftext|>", "<|pad|>"))
    assert tok.vocab_size <= V
    return tok


@pytest.fixture(scope="module", params=GGUF_CASES)
def exported(request, tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp(request.param)
    ref = make_reference(request.param, path / "hf")
    model = load_model(path / "hf")
    export_gguf(model, tokenizer, path / "m.gguf", type="f32")
    return request.param, ref, model, path / "m.gguf"


def ids(n: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(3, V, (2, n), generator=torch.Generator().manual_seed(1))


def test_lmforge_reads_back_equal_logits(exported, tokenizer):
    name, ref, model, path = exported
    back, tok = load_gguf(path)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, atol=1e-4, rtol=0)
    assert back.config.arch == model.config.arch
    text = "To be 1234, or not"
    assert tok.encode(text) == tokenizer.encode(text)


def test_transformers_gguf_loader_reads_it(exported, tmp_path):
    name, ref, model, path = exported
    if name not in HF_READS:
        pytest.skip(f"transformers' GGUF loader does not read {name}")
    back = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind, tol", [("q8_0", 0.05), ("q4_0", 0.5), ("f16", 0.01), ("bf16", 0.05)])
def test_quantized_types_stay_close(tmp_path, tokenizer, kind, tol):
    ref = make_reference("llama3.2", tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    export_gguf(model, tokenizer, tmp_path / f"m.{kind}.gguf", type=kind)
    back, _ = load_gguf(tmp_path / f"m.{kind}.gguf")
    x = ids()
    with torch.no_grad():
        want = ref(x).logits
        diff = (back(x).logits - want).abs().max().item()
    assert 0 < diff < tol if kind != "f16" else diff < tol


def test_quickstart_shaped_gpt2_round_trips(tmp_path, tokenizer):
    from lmforge.config import DecoderConfig
    from lmforge.models.decoder import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(vocab_size=V, n_layer=2, n_head=4, d_model=64, max_seq_len=64)).eval()
    export_gguf(model, tokenizer, tmp_path / "gpt2.gguf", type="f32")
    back, _ = load_gguf(tmp_path / "gpt2.gguf")
    x = ids(16)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_export_cli_and_bad_input(tmp_path, tokenizer):
    from lmforge.config import DecoderConfig
    from lmforge.models.decoder import DecoderLM

    model = DecoderLM(DecoderConfig(vocab_size=V, n_layer=1, n_head=2, d_model=32, max_seq_len=32)).eval()
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer, generation_config={"temperature": 0.7})
    run = [sys.executable, "-m", "lmforge", "export", str(tmp_path / "m")]
    ok = subprocess.run([*run, str(tmp_path / "m.gguf"), "--type", "q8_0"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["general.architecture"].contents() == "gpt2"
    assert reader.fields["general.sampling.temp"].contents() == pytest.approx(0.7)
    bad = subprocess.run([*run, str(tmp_path / "m.bin")], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and ".gguf" in bad.stderr


def test_dynamic_rope_is_refused_in_one_line(tmp_path, tokenizer):
    from lmforge.errors import ConfigError

    make_reference("llama-dynamic", tmp_path / "hf")
    with pytest.raises(ConfigError, match="dynamic"):
        export_gguf(load_model(tmp_path / "hf"), tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quant_blocks_decode_as_gguf_decodes_them(kind):
    """lmforge's K-quant packer against gguf's own decoder: every block decodes close to the weights (within half
    a quantization step of its sub-block), and a weight pattern the grid holds exactly comes back exactly."""
    import gguf
    import numpy as np

    from lmforge.interop.kquants import quantize_q4_k, quantize_q6_k

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    pack = quantize_q4_k if kind == "Q4_K" else quantize_q6_k
    w = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    w[0, :256] = 0.0  # an all-zero block
    back = gguf.quants.dequantize(pack(w), qtype).reshape(w.shape)
    sub, levels, scale_levels = (32, 15, 63) if kind == "Q4_K" else (16, 62, 127)
    x = w.reshape(-1, 256 // sub, sub)
    span = x.max(-1) - np.minimum(x.min(-1), 0) if kind == "Q4_K" else 2 * np.abs(x).max(-1)
    coarse = span.max(-1, keepdims=True) / levels / scale_levels * 2  # (the 6- / 8-bit scales' own step)
    err = np.abs(back.reshape(x.shape) - x).max(-1)
    assert (err <= 0.5 * span / levels + coarse + 1e-6).all()
    assert np.abs(back[0, :256]).max() == 0.0
    assert pack(w).shape == (8, 512 // 256 * (144 if kind == "Q4_K" else 210))


def test_q4_k_m_export_mixes_types_and_stays_close(tmp_path, tokenizer):
    import gguf

    from lmforge.config import DecoderConfig
    from lmforge.models.decoder import DecoderLM

    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=V, n_layer=8, n_head=4, n_kv_head=2, d_model=256, d_ff=512, max_seq_len=64,
        pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
    )  # fmt: skip
    model = DecoderLM(cfg).eval()
    export_gguf(model, tokenizer, tmp_path / "m.gguf", type="q4_k_m")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert kinds["output.weight"] == "Q6_K" and kinds["blk.0.ffn_down.weight"] == "Q6_K"
    assert kinds["blk.1.ffn_down.weight"] == "Q4_K" and kinds["blk.3.attn_q.weight"] == "Q4_K"
    export_gguf(model, tokenizer, tmp_path / "m0.gguf", type="q4_0")
    x = ids(16)
    with torch.no_grad():
        want = model(x).logits
        err_k = (load_gguf(tmp_path / "m.gguf")[0](x).logits - want).abs().mean().item()
        err_0 = (load_gguf(tmp_path / "m0.gguf")[0](x).logits - want).abs().mean().item()
    assert 0 < err_k < err_0  # (Q4_K's finer scales and Q6_K's wider layers: closer than plain q4_0)
    kept, _ = load_gguf(tmp_path / "m.gguf", keep_4bit=True)  # the Q4_K blocks on the int4 kernel, as stored
    from lmforge.nn.quant import Int4Linear

    assert isinstance(kept.blocks[3].attn.q_proj, Int4Linear)
    with torch.no_grad():
        torch.testing.assert_close(kept(x).logits, load_gguf(tmp_path / "m.gguf")[0](x).logits, atol=2e-2, rtol=0)
