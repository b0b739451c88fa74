"""LoRA: the layer, merge / unmerge, quantized bases, and PEFT-layout adapters checked against peft itself."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from lmforge.config import encoder_config
from lmforge.errors import ConfigError, ModelLoadError
from lmforge.interop import load_model
from lmforge.interop.peft import load_adapter, save_adapter
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.nn.lora import (
    LoRALinear,
    apply_lora,
    lora_disabled,
    lora_modules,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from lmforge.nn.quant import NF4_LEVELS, Int4Linear, Int8Linear, NF4Linear, quantize_linear


def _decoder(style: str) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(tiny_config(style, dropout=0.0)).eval()


def _bert_classifier() -> Encoder:
    torch.manual_seed(0)
    cfg = encoder_config(
        "bert-mini",
        vocab_size=120,
        n_layer=2,
        n_head=4,
        d_model=32,
        max_seq_len=40,
        head="classify",
        labels=["neg", "neu", "pos"],
        dropout=0.0,
        attn_dropout=0.0,
    )
    return Encoder(cfg).eval()


def _train_a_little(model, targets="attn", **kw):
    """Apply LoRA and give the adapters non-zero values (B starts at zero: a test on a fresh adapter proves
    nothing)."""
    n = apply_lora(model, targets, r=4, alpha=8, dropout=0.0, **kw)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return n


def test_lora_trains_only_adapters_and_heads():
    m = _bert_classifier()
    total = sum(p.numel() for p in m.parameters())
    n = apply_lora(m, "attn", r=4)
    names = [k for k, p in m.named_parameters() if p.requires_grad]
    assert all("lora_" in k or k.startswith(("classifier.", "pooler.")) for k in names)
    assert len(lora_modules(m)) == 2 * 4 and n < total * 0.2
    x = torch.randint(0, 120, (2, 9))
    out = m(x, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert all(p.grad is None for k, p in m.named_parameters() if "lora_" not in k and not p.requires_grad)
    assert m.blocks[0].attn.q_proj.lora_A.grad.abs().sum() > 0 or m.blocks[0].attn.q_proj.lora_B.grad.abs().sum() > 0


def test_fresh_adapter_changes_nothing_and_merge_unmerge_round_trip(style):
    m = _decoder(style)
    x = torch.randint(0, 97, (2, 12))
    ref = m(x).logits
    apply_lora(m, "all", r=4, dropout=0.0)
    assert torch.allclose(m(x).logits, ref, atol=1e-6)  # B = 0: the model is unchanged
    with torch.no_grad():
        for mod in lora_modules(m).values():
            mod.lora_B.normal_(0, 0.1)
    adapted = m(x).logits
    assert (adapted - ref).abs().max() > 1e-3
    merge_lora(m)
    assert torch.allclose(m(x).logits, adapted, atol=1e-5)
    unmerge_lora(m)
    assert torch.allclose(m(x).logits, adapted, atol=1e-5)
    with lora_disabled(m):
        assert torch.allclose(m(x).logits, ref, atol=1e-5)


def test_no_matching_target_is_a_clear_error():
    with pytest.raises(ConfigError, match="match no Linear"):
        apply_lora(_decoder("llama"), "c_attn")


def test_nf4_levels_and_round_trip():
    assert NF4_LEVELS.numel() == 16 and NF4_LEVELS[0] == -1 and NF4_LEVELS[-1] == 1 and (NF4_LEVELS == 0).any()
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96)
    torch.nn.init.normal_(lin.weight, 0, 0.02)
    q = NF4Linear.from_linear(lin)
    err = (q.dequantize() - lin.weight).pow(2).mean().sqrt() / lin.weight.std()
    assert err < 0.12  # 4 bits per normal weight: about 10% relative error
    q8 = Int8Linear.from_linear(lin)
    assert (q8.dequantize() - lin.weight).abs().max() <= lin.weight.abs().max() / 127
    assert q.packed.numel() + q.scales.numel() * 4 < lin.weight.numel() * 4 / 6


def test_int4_base_keeps_a_q4_1_grid_exactly():
    # llama.cpp Q4_1: per block of 32 inputs, w = d * q + m with q in 0..15 (d, m fp16): what a Q4_1 GGUF holds
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    q = torch.randint(0, 16, (48, 2, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp sets m = min and d = (max - min) / 15: both ends are used
    d = (torch.rand(48, 2, 1) * 0.01 + 1e-3).half().float()
    mn = (-torch.rand(48, 2, 1) * 0.1).half().float()
    with torch.no_grad():
        lin.weight.copy_((d * q + mn).view(48, 64))
    base = quantize_linear(lin, "int4")
    assert isinstance(base, Int4Linear) and base.group_size == 32
    assert base._packed() is None  # a training base computes from the dequantized weight, not the bf16 kernel
    assert (base.dequantize() - lin.weight).abs().max() < 1e-6
    nf4 = NF4Linear.from_linear(lin)
    assert (nf4.dequantize() - lin.weight).abs().max() > 100 * (base.dequantize() - lin.weight).abs().max()
    with pytest.raises(ConfigError, match="groups of 32"):
        quantize_linear(torch.nn.Linear(40, 8), "int4")


BASE_TYPES = {"int8": Int8Linear, "nf4": NF4Linear, "int4": Int4Linear}


@pytest.mark.parametrize("mode", ["int8", "nf4", "int4"])
def test_quantized_base_lora_trains_and_keeps_the_model(mode):
    m = _decoder("llama")
    x = torch.randint(0, 97, (2, 12))
    ref = m(x).logits
    apply_lora(m, "attn", r=4, quantize=mode)
    assert isinstance(m.blocks[0].mlp.up, BASE_TYPES[mode])
    assert isinstance(m.blocks[0].attn.q_proj.base, BASE_TYPES[mode])
    out = m(x, labels=x)
    assert (out.logits - ref).abs().max() < (0.05 if mode == "int8" else 0.5)
    out.loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert not any(p.requires_grad for k, p in m.named_parameters() if "lora_" not in k)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_adapter_loads_in_peft_with_equal_logits(style, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    m = _decoder(style)
    m.save_pretrained(tmp_path / "base")
    _train_a_little(m, "all" if style == "llama" else ["q_proj", "v_proj", "mlp.up"])
    save_adapter(m, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert (pm(x).logits - m(x).logits).abs().max() < 1e-4
    # the merged export is the adapter model, in transformers too
    m.save_pretrained(tmp_path / "merged")
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (hf_merged(x).logits - m(x).logits).abs().max() < 1e-4
    # and back: lmforge reads the adapter PEFT just read, onto a fresh base
    pm.save_pretrained(tmp_path / "resaved")
    fresh = load_model(tmp_path / "base")
    load_adapter(fresh, tmp_path / "resaved")
    with torch.no_grad():
        assert (fresh(x).logits - m(x).logits).abs().max() < 1e-5


def test_classifier_adapter_in_peft_and_merged_export(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    m = _bert_classifier()
    m.save_pretrained(tmp_path / "base")
    _train_a_little(m, "attn")
    save_adapter(m, tmp_path / "adapter")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 120, (2, 9))
    with torch.no_grad():
        ours = m(x).logits
        assert (pm(x).logits - ours).abs().max() < 1e-4
    # a merged export gives the adapter model's logits, in lmforge and in transformers
    m.save_pretrained(tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    hf_merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(x).logits - ours).abs().max() < 1e-4
        assert (hf_merged(x).logits - ours).abs().max() < 1e-4
    merge_and_unload(m)
    assert not lora_modules(m) and isinstance(m.blocks[0].attn.q_proj, torch.nn.Linear)
    with torch.no_grad():
        assert (m(x).logits - ours).abs().max() < 1e-5


def test_adapter_for_another_base_is_refused(tmp_path):
    m = _decoder("llama")
    _train_a_little(m, "attn")
    save_adapter(m, tmp_path / "adapter")
    wider = DecoderLM(tiny_config("llama", d_model=64))
    with pytest.raises(ModelLoadError, match="another base"):
        load_adapter(wider, tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match="another base"):
        load_adapter(DecoderLM(tiny_config("gpt2")), tmp_path / "adapter")  # names GPT-2 does not have
    with pytest.raises(ModelLoadError, match="not a PEFT adapter"):
        load_adapter(_decoder("llama"), tmp_path)


def test_lora_layer_exposes_the_effective_weight():
    lin = torch.nn.Linear(8, 6)
    lo = LoRALinear(lin, r=2, alpha=4)
    with torch.no_grad():
        lo.lora_B.fill_(0.1)
    x = torch.randn(3, 8)
    assert torch.allclose(lo(x), torch.nn.functional.linear(x, lo.weight, lo.bias), atol=1e-6)


def test_qlora_on_an_encoder_classifier():
    m = _bert_classifier()
    x = torch.randint(0, 120, (2, 9))
    with torch.no_grad():
        ref = m(x).logits
    n = apply_lora(m, "attn", r=4, quantize="nf4")
    assert isinstance(m.blocks[0].mlp.up, NF4Linear) and isinstance(m.tok_emb, torch.nn.Embedding)
    out = m(x, labels=torch.tensor([0, 1]))
    assert (out.logits - ref).abs().max() < 0.2
    out.loss.backward()
    assert m.classifier.weight.grad is not None and n == sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_qlora_decoder_shares_an_int8_vocabulary_matrix(tmp_path):
    from lmforge.nn.quant import Int8Embedding

    tied = DecoderLM(tiny_config("llama", dropout=0.0, tie_embeddings=True)).eval()
    apply_lora(tied, "attn", quantize="nf4")
    assert isinstance(tied.tok_emb, Int8Embedding) and tied.lm_head.qweight is tied.tok_emb.qweight
    x = torch.randint(0, 97, (2, 12))
    tied(x, labels=x).loss.backward()
    tied.save_pretrained(tmp_path / "q")  # dequantized + merged: a plain model directory
    back = load_model(tmp_path / "q")
    with torch.no_grad():
        assert (back(x).logits - tied(x).logits).abs().max() < 0.05


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapter_made_by_peft_loads_with_equal_logits(family, tmp_path):
    """An adapter made elsewhere: peft.get_peft_model on a transformers model, one training step, save_pretrained;
    lmforge reads it onto the same base, unmerged and merged, with peft's logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmforge.interop import load_pretrained
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    if family == "gpt2":  # Conv1D layers; c_attn is q, k and v fused
        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        )
        lcfg = dict(
            target_modules=["c_attn", "c_proj", "c_fc"],
            rank_pattern={"c_fc": 2},
            alpha_pattern={"c_proj": 16},
            fan_in_fan_out=True,
        )
    else:
        hf = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=97,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            )
        )
        lcfg = dict(
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"o_proj": 16},
        )
    hf.eval().save_pretrained(tmp_path / "base")
    Tokenizer.train_bpe(["hello there"] * 5, vocab_size=97).save(tmp_path / "base")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, task_type="CAUSAL_LM", **lcfg))
    x = torch.randint(0, 97, (2, 12))
    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1.0)
    pm(input_ids=x, labels=x).loss.backward()
    opt.step()  # B moves off zero (A, random from the start, has no gradient while B is zero)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.eval().save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        theirs = pm(input_ids=x).logits
        with pm.disable_adapter():
            plain = pm(input_ids=x).logits
    assert (theirs - plain).abs().max() > 1e-2  # the adapter is not a no-op
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
    assert len(lora_modules(ours)) == 2 * (6 if family == "gpt2" else 5)  # c_attn is three of ours
    assert not any(m.training for m in ours.modules())  # an eval model stays in eval: no LoRA dropout
    with torch.no_grad():
        assert (ours(x).logits - theirs).abs().max() <= 1e-4
        merged, _ = load_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
        assert not lora_modules(merged) and (merged(x).logits - theirs).abs().max() <= 1e-4
