"""Portable kernels: every tensor lmforge reads from a file reaches the fast CPU paths in 64-byte-aligned memory.

PyTorch's int8 weight-only product crashes (a segmentation fault) on CPUs with AMX when its weight is not 64-byte
aligned, and safetensors hands out tensors wherever their bytes lie in the file. This machine may well have no
AMX, so the crash itself cannot be shown here; instead each file below is rewritten so its tensors start at odd
offsets (the header padded with spaces, the tensors in another order), the test checks that a plain
`safetensors.torch.load_file` really gives misaligned tensors, then loads the file the normal way and checks that
the tensors bound to a kernel are aligned and that the model computes exactly what it computed before saving."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from lmforge.config import encoder_config, seq2seq_config
from lmforge.interop import load_pretrained
from lmforge.interop.gguf import BLOCK_NAMES
from lmforge.interop.hf import read_safetensors
from lmforge.interop.quantized import save_quantized
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.nn.init import aligned, is_aligned
from lmforge.nn.packed import packed_linears
from lmforge.nn.quant import Int4Linear, Int8Embedding, Int8Linear, NF4Linear, quantize_linear, quantize_model
from lmforge.tokenizer import Tokenizer

TEXTS = ["the cat sat on the mat", "a dog ate the bone", "what a lovely day", "this is terrible news"] * 10
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
OFFSET = 14  # bytes past a 64-byte boundary where the data of a rewritten file starts (the issue's repro)


def relayout(path: Path, offset: int = OFFSET) -> None:
    """Rewrite a safetensors file in place: tensors in reverse name order, data starting `offset` bytes past a
    64-byte boundary of the file (the header is padded with spaces, which the format allows)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    data = raw[8 + n :]
    new, blobs, pos = {}, [], 0
    for name in sorted(header, reverse=True):
        start, end = header[name]["data_offsets"]
        new[name] = {**header[name], "data_offsets": [pos, pos + end - start]}
        blobs.append(data[start:end])
        pos += end - start
    if meta is not None:
        new["__metadata__"] = meta
    h = json.dumps(new).encode()
    h += b" " * ((offset - 8 - len(h)) % 64)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def misaligned_on_plain_load(path: Path, names) -> None:
    """The rewritten file really does hand out misaligned tensors when read without lmforge."""
    raw = load_file(str(path))
    for n in names:
        assert not is_aligned(raw[n]), n


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def wordpiece():
    return Tokenizer.train_wordpiece(TEXTS, vocab_size=200)


def _decoder(style: str) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(tiny_config(style, vocab_size=300, d_model=64, d_ff=128)).eval()


def _classifier() -> Encoder:
    torch.manual_seed(0)
    return Encoder(
        encoder_config(
            "bert-mini",
            vocab_size=200,
            n_layer=2,
            n_head=4,
            d_model=64,
            max_seq_len=40,
            head="classify",
            labels=["neg", "pos"],
            dropout=0.0,
            attn_dropout=0.0,
        )
    ).eval()


def _forward(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _kernel_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors a quantized model hands to CPU kernels: int8 codes (the int8 product, the embedding rows),
    int4 codes and their kernel-layout copy, NF4 codes."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (Int8Linear, Int8Embedding, Int4Linear)):
            out[f"{name}.qweight"] = m.qweight
        if isinstance(m, NF4Linear):
            out[f"{name}.packed"] = m.packed
        if isinstance(m, Int4Linear) and (kernel := m._packed()) is not None:
            out[f"{name}.kernel"] = kernel[0]
    return out


def test_aligned_helper_copies_only_what_is_misaligned():
    # PyTorch's CPU allocator aligns fresh tensors to 64 bytes, whatever their size and dtype
    for n, dtype in [(1, torch.int8), (3, torch.float32), (7, torch.float16), (4097, torch.int8), (100, torch.long)]:
        assert is_aligned(torch.empty(n, dtype=dtype))
    t = torch.arange(64 * 64, dtype=torch.int32).to(torch.int8).view(64, 64)
    assert aligned(t) is t
    view = t.view(-1)[14 : 14 + 64 * 32].view(32, 64)  # 14 bytes in: the issue's data_ptr() % 64
    assert view.data_ptr() % 64 == 14
    copy = aligned(view)
    assert copy is not view and is_aligned(copy) and copy.is_contiguous() and torch.equal(copy, view)
    strided = torch.randn(8, 9)[:, 1:].t()  # not contiguous, not aligned
    fixed = aligned(strided)
    assert is_aligned(fixed) and fixed.is_contiguous() and torch.equal(fixed, strided)


def test_issue_repro_file_is_read_aligned(tmp_path):
    """The issue's layout: an int8 [64, 64] after a 3-float tensor and before an fp16 one."""
    q = torch.randint(-127, 128, (64, 64), dtype=torch.int8)
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.zeros(3), "b": q, "c": torch.ones(5, dtype=torch.float16)}, str(d / "model.safetensors"))
    relayout(d / "model.safetensors")
    misaligned_on_plain_load(d / "model.safetensors", ["b"])
    got = read_safetensors(d)
    assert all(is_aligned(v) for v in got.values())
    assert torch.equal(got["b"], q)
    scales = torch.rand(64) / 100
    x = torch.randn(4, 64)
    y = Int8Linear(got["b"], scales, None)(x)
    assert torch.allclose(y, Int8Linear(q.clone(), scales, None)(x), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["int8", "int4", "int8-dynamic"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_quantized_dirs_load_aligned_and_compute_the_same(family, mode, bpe, wordpiece, tmp_path):
    model, tok = (_classifier(), wordpiece) if family == "bert" else (_decoder(family), bpe)
    ids = IDS.clamp(max=199)
    plain = _forward(model, ids)
    quantize_model(model, mode, group_size=32)
    ref = _forward(model, ids)
    save_quantized(model, tmp_path / "q", tok)
    f = tmp_path / "q" / "model.safetensors"
    relayout(f)
    stored = load_file(str(f))
    misaligned_on_plain_load(f, [k for k, v in stored.items() if k.endswith("qweight")])
    again, _ = load_pretrained(tmp_path / "q")
    kernel = _kernel_tensors(again)
    assert kernel or mode == "int8-dynamic"
    assert all(is_aligned(v) for v in kernel.values()), [k for k, v in kernel.items() if not is_aligned(v)]
    got = _forward(again, ids)
    assert torch.equal(got, ref)
    assert (got - plain).abs().max() / plain.std() < (0.5 if mode == "int4" else 0.1)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
def test_full_precision_dirs_load_aligned_into_packed_and_int8_paths(family, bpe, wordpiece, tmp_path):
    """fp32 directories: tensors read aligned; oneDNN-packed products (decoders), NF4 / int8 bases and int8
    inference built from the loaded weights compute what the same steps compute on the original model."""
    if family == "t5":
        torch.manual_seed(0)
        model, tok = Seq2SeqLM(seq2seq_config("t5-tiny", dropout=0.0)).eval(), None
    elif family == "bert":
        model, tok = _classifier(), wordpiece
    else:
        model, tok = _decoder(family), bpe
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    f = tmp_path / "m" / "model.safetensors"
    relayout(f)
    misaligned_on_plain_load(f, list(load_file(str(f))))
    assert all(is_aligned(v) for v in read_safetensors(tmp_path / "m").values())
    if family == "t5":
        from lmforge.interop import load_model

        again = load_model(tmp_path / "m")
        src = torch.tensor([[5, 17, 42, 99, 3]])
        with torch.no_grad():
            assert torch.equal(again(src, labels=src).logits, model(src, labels=src).logits)
        return
    again, _ = load_pretrained(tmp_path / "m")
    ids = IDS.clamp(max=199)
    assert torch.equal(_forward(again, ids), _forward(model, ids))
    if family != "bert":
        with torch.no_grad(), packed_linears(again):
            packed = _forward(again, ids)
        assert torch.allclose(packed, _forward(model, ids), atol=1e-5, rtol=1e-5)
    layer = (
        again.blocks[0].attn.q_proj
        if family != "bert"
        else next(m for m in again.modules() if type(m) is torch.nn.Linear)
    )
    for kind in ("nf4", "int8"):
        base = quantize_linear(layer, kind)
        assert all(is_aligned(v) for v in _kernel_tensors(base).values())
    quantize_model(again, "int8")
    quantize_model(model, "int8")
    assert torch.equal(_forward(again, ids), _forward(model, ids))
    assert all(is_aligned(v) for v in _kernel_tensors(again).values())


def test_peft_adapter_reads_aligned(bpe, tmp_path):
    from lmforge.interop.peft import read_adapter, save_adapter
    from lmforge.nn.lora import apply_lora, merge_and_unload

    model = _decoder("llama")
    model.save_pretrained(tmp_path / "base", tokenizer=bpe)
    apply_lora(model, "attn", r=4, alpha=8.0, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # B starts at zero: give the adapter something to change
    save_adapter(model, tmp_path / "ad", base_model=str(tmp_path / "base"))
    relayout(tmp_path / "ad" / "adapter_model.safetensors")
    misaligned_on_plain_load(
        tmp_path / "ad" / "adapter_model.safetensors",
        list(load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))),
    )
    _, tensors = read_adapter(tmp_path / "ad")
    assert all(is_aligned(v) for v in tensors.values())
    merged, _ = load_pretrained(tmp_path / "base", adapter=tmp_path / "ad", quantize="int8")
    ref = merge_and_unload(model).eval()
    quantize_model(ref, "int8")
    assert torch.equal(_forward(merged), _forward(ref))


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> np.ndarray:
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).transpose(1, 2).reshape(out, inp).numpy()


def test_gguf_tensors_are_dequantized_into_aligned_memory(tmp_path):
    """A llama-style GGUF (F32 and F16 tensors, 32-byte-aligned in the file as GGUF lays them out) loads into
    aligned tensors and, quantized to int8 at load, computes what the original model does quantized the same."""
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=64, d_model=64, d_ff=128, n_head=4, n_kv_head=2)
    model = DecoderLM(cfg).eval()
    with torch.no_grad():  # fp16 storage for the embedding: make the original exactly what the file holds
        model.tok_emb.weight.copy_(model.tok_emb.weight.half().float())
    sd = model.state_dict()
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for k, v in [
        ("block_count", cfg.n_layer),
        ("embedding_length", cfg.d_model),
        ("feed_forward_length", cfg.d_ff),
        ("attention.head_count", cfg.n_head),
        ("attention.head_count_kv", cfg.n_kv_head),
        ("context_length", cfg.max_seq_len),
        ("vocab_size", cfg.vocab_size),
    ]:
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    names = {
        "tok_emb.weight": "token_embd.weight",
        "norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    back = {v: k for k, v in BLOCK_NAMES.items()}
    for name, t in sd.items():
        if name.endswith((".cos", ".sin")):
            continue
        if name in names:
            gname = names[name]
        else:
            _, i, rest = name.split(".", 2)
            gname = f"blk.{i}.{back[rest]}"
        if name.endswith("q_proj.weight"):
            arr = _llama_cpp_permute(t, cfg.n_head)
        elif name.endswith("k_proj.weight"):
            arr = _llama_cpp_permute(t, cfg.n_kv_head)
        else:
            arr = t.numpy()
        w.add_tensor(gname, arr.astype(np.float16) if name == "tok_emb.weight" else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    loaded, _ = load_pretrained(tmp_path / "m.gguf")
    assert all(is_aligned(p) for p in loaded.parameters())
    assert torch.equal(_forward(loaded, IDS.clamp(max=63)), _forward(model, IDS.clamp(max=63)))
    quantize_model(loaded, "int8")
    quantize_model(model, "int8")
    assert all(is_aligned(v) for v in _kernel_tensors(loaded).values())
    assert torch.equal(_forward(loaded, IDS.clamp(max=63)), _forward(model, IDS.clamp(max=63)))
