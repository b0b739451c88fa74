"""Tiny random models of every decoder family, made by transformers itself from its own config classes: shared
by the parity tests (test_architectures.py) and the GGUF export tests (test_gguf_export.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

V = 320  # (room for a byte-level BPE's 256 bytes, so the GGUF tests can write a real tokenizer)
BASE = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
SHORT = [1.0 + 0.1 * i for i in range(4)]  # longrope factors per rotated frequency (head 16 x 0.5 / 2)

# name -> (transformers config class, its arguments): one row per architecture and rope variant
CASES = {
    "llama": ("LlamaConfig", {}),
    "llama3.2": ("LlamaConfig", {"rope_scaling": LLAMA3, "rope_theta": 500000.0, "tie_word_embeddings": True}),
    "llama-linear": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-dynamic": (
        "LlamaConfig",
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
    ),
    "qwen2.5": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2.5-yarn": (
        "Qwen2Config",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    ),
    "qwen2-window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 24}),
    "gemma2-9b-shape": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}),
    # Gemma 3's own shape of layers (five windowed, one global) and query scale (query_pre_attn_scalar = head_dim)
    "gemma3": (
        "Gemma3TextConfig",
        {"head_dim": 16, "sliding_window": 8, "num_hidden_layers": 6, "query_pre_attn_scalar": 16},
    ),
    "phi3": ("Phi3Config", {"num_key_value_heads": 4}),
    "phi4-mini": (
        "Phi3Config",
        {
            "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 16,
            "max_position_embeddings": 64,
            "rope_scaling": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": [2 * f for f in SHORT]},
            "tie_word_embeddings": True,
        },
    ),
    "olmo2": ("Olmo2Config", {}),
    "smollm3": ("SmolLM3Config", {"num_hidden_layers": 4}),  # (its fourth layer without rotary, as SmolLM3-3B)
}
PROMPT_LEN = 24  # past every window (8) and past phi4-mini's original context (16): its long factors run too


def make_reference(name: str, path: Path):
    cls, extra = CASES[name]
    cfg = getattr(transformers, cls)(**{**BASE, **extra})
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norm scales away from their init, so a misread (1 + w) or a missing norm shows
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(path)
    return ref
