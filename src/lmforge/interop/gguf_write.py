"""A decoder lmforge holds -> one .gguf file that llama.cpp, Ollama and LM Studio run (and lmforge reads back).

The layout is the one lmforge.interop.gguf reads, written the other way round from the same tables: llama.cpp's
architecture name and tensor names per family (GGUF_ARCHS, BLOCK_NAMES, FUSED_NAMES), Q/K rows permuted where its
rotary kernel rotates adjacent pairs, Gemma's norms as 1 + w, rope scalings as metadata or per-frequency factor
tensors, and the tokenizer, chat template and generation settings in the metadata (lmforge.interop.gguf_vocab).
Weights are packed by the `gguf` package's own quantizers; nothing of a block format is re-implemented here.

    f32 / f16 / bf16   every tensor in that type (norms and other 1-D tensors stay f32, as llama.cpp keeps them)
    q8_0               2-D weights in blocks of 32 int8 with one scale (nearly lossless)
    q4_0               2-D weights in blocks of 32 4-bit codes with one scale; the embedding and the output
                       matrix in q8_0 (they are the most sensitive; llama.cpp's own 4-bit mixes keep them wider)
    q4_k_m             llama.cpp's most used mix: Q4_K, with the output matrix and the attn_v / ffn_down of some
                       layers in Q6_K (lmforge.interop.kquants packs both)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import DecoderConfig, rope_scaling_type
from lmforge.errors import ConfigError
from lmforge.files import save_with
from lmforge.interop.gguf import BLOCK_NAMES, FUSED_NAMES, GGUF_ARCHS, TOP_NAMES
from lmforge.interop.gguf_vocab import add_tokenizer
from lmforge.interop.hf import hf_config
from lmforge.interop.kquants import more_bits, quantize_q4_k, quantize_q6_k
from lmforge.nn.lora import plain_state_dict
from lmforge.nn.rope import inv_frequencies

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")
_BY_HF = {a.hf: a for a in GGUF_ARCHS.values() if a.name != "mistral"}
_BY_HF["mistral"] = GGUF_ARCHS["llama"]  # (llama.cpp knows Mistral as llama with a sliding window)
GPT2_NAMES = {  # GPT-2's blocks (gguf architecture "gpt2"): LayerNorms with biases, biased linears, no gate
    "attn_norm": "attn_norm",
    "attn_output": "attn.o_proj",
    "ffn_norm": "mlp_norm",
    "ffn_up": "mlp.up",
    "ffn_down": "mlp.down",
}


def gguf_arch(c: DecoderConfig) -> str:
    """llama.cpp's architecture name for a config, or a ConfigError naming what GGUF cannot hold."""
    if not isinstance(c, DecoderConfig):
        raise ConfigError(
            f"only decoder language models are written to GGUF here, not {type(c).__name__} models "
            "(save it as an HF directory with `lmforge convert` instead)"
        )
    if c.pos_emb == "learned":
        if c.norm == "layernorm" and c.mlp == "gelu_tanh" and c.bias and c.n_kv_head == c.n_head:
            return "gpt2"
        raise ConfigError("only GPT-2-shaped models with learned positions can be written to GGUF (gelu_tanh, biases)")
    hf = c.arch if c.arch in _BY_HF else hf_config(c)["model_type"]
    if hf not in _BY_HF:
        raise ConfigError(
            f"this decoder's shape fits none of the GGUF architectures lmforge writes ({', '.join(GGUF_ARCHS)})"
        )
    return _BY_HF[hf].name


def export_gguf(
    model: torch.nn.Module,
    tokenizer: Any,
    out: str | Path,
    type: str = "f16",
    generation_config: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write `model` and `tokenizer` as one GGUF file at `out` (atomically). `type`: one of TYPES.
    generation_config: temperature / top_k / top_p / repetition_penalty, written as `general.sampling.*`."""
    import gguf

    if type not in TYPES:
        raise ConfigError(f"--type {type!r} is not one of {', '.join(TYPES)}")
    c: DecoderConfig = model.config
    arch = gguf_arch(c)
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"{out}: the output must be a .gguf file")
    tensors = list(_tensors(model, arch))

    def write(path: Path) -> None:
        w = gguf.GGUFWriter(str(path), arch)
        w.add_name(name or out.stem)
        w.add_file_type(_FILE_TYPE[type])
        _metadata(w, c, arch)
        add_tokenizer(w, tokenizer)
        for key, value in (generation_config or {}).items():
            if key in _SAMPLING and value is not None:
                getattr(w, _SAMPLING[key])(value)
        for tname, t in tensors:
            data, qtype = _pack(tname, t, type, c.n_layer)
            w.add_tensor(tname, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    save_with(out, write)
    return out


_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15, "bf16": 32}  # llama_ftype
_SAMPLING = {"temperature": "add_sampling_temp", "top_k": "add_sampling_top_k", "top_p": "add_sampling_top_p"}


def _metadata(w, c: DecoderConfig, arch: str) -> None:
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_vocab_size(c.vocab_size)
    if arch == "gpt2":
        w.add_layer_norm_eps(c.norm_eps)
        return
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(int(c.head_dim * c.rope_partial))
    if c.attn_scale is not None and abs(c.attn_scale - c.head_dim**-0.5) > 1e-12:
        w.add_attention_scale(c.attn_scale)
    if c.attn_softcap:
        w.add_attn_logit_softcapping(c.attn_softcap)
    if c.final_softcap:
        w.add_final_logit_softcapping(c.final_softcap)
    if c.sliding_window is not None:
        w.add_sliding_window(c.sliding_window)
        if c.layer_types is not None:
            w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    if c.no_rope_layers is not None:
        w.add_array(f"{arch}.no_rope_layers", list(c.no_rope_layers))
    if c.rope_local_theta is not None:
        w.add_rope_freq_base_swa(c.rope_local_theta)
    s, kind = c.rope_scaling or {}, rope_scaling_type(c.rope_scaling)
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf_scaling(kind))
        w.add_rope_scaling_factor(s.get("factor") or c.max_seq_len / s["original_max_position_embeddings"])
    if kind == "yarn":
        w.add_rope_scaling_orig_ctx_len(s["original_max_position_embeddings"])
        w.add_rope_scaling_attn_factors(
            inv_frequencies(int(c.head_dim * c.rope_partial), c.rope_theta, s, c.max_seq_len)[1]
        )
        for key, ours in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            w.add_float32(f"{arch}.rope.scaling.{key}", float(s.get(ours) or (32 if ours == "beta_fast" else 1)))
    if kind == "longrope":
        w.add_rope_scaling_orig_ctx_len(s["original_max_position_embeddings"])
        dim = int(c.head_dim * c.rope_partial)
        w.add_rope_scaling_attn_factors(inv_frequencies(dim, c.rope_theta, s, c.max_seq_len)[1])
    if kind == "dynamic":
        raise ConfigError("dynamic rope scaling has no GGUF form (llama.cpp computes no per-length frequencies)")


def gguf_scaling(kind: str):
    import gguf

    return {"linear": gguf.RopeScalingType.LINEAR, "yarn": gguf.RopeScalingType.YARN}[kind]


def _tensors(model: torch.nn.Module, arch: str):
    """(GGUF name, fp32 tensor) for every weight, in llama.cpp's names and layouts."""
    c: DecoderConfig = model.config
    state = plain_state_dict(model)
    fam = GGUF_ARCHS.get(arch)
    ours_to_top = {v: k for k, v in TOP_NAMES.items()}
    yield "token_embd.weight", state["tok_emb.weight"]
    if arch == "gpt2":
        yield "position_embd.weight", state["pos_emb.weight"]
    s, kind = c.rope_scaling or {}, rope_scaling_type(c.rope_scaling)
    if kind in ("llama3", "factors"):  # per-frequency divisors of the base frequencies (llama.cpp's rope_freqs)
        dim = int(c.head_dim * c.rope_partial)
        base = inv_frequencies(dim, c.rope_theta)[0]
        yield "rope_freqs.weight", base / inv_frequencies(dim, c.rope_theta, s, c.max_seq_len)[0]
    if kind == "longrope":
        yield "rope_factors_long.weight", torch.tensor(s["long_factor"], dtype=torch.float32)
        yield "rope_factors_short.weight", torch.tensor(s["short_factor"], dtype=torch.float32)
    block_names = {v: k for k, v in BLOCK_NAMES.items()}
    for i in range(c.n_layer):
        b = f"blocks.{i}."
        if arch == "gpt2":
            yield f"blk.{i}.attn_qkv.weight", torch.cat([state[f"{b}attn.{n}_proj.weight"] for n in "qkv"])
            yield f"blk.{i}.attn_qkv.bias", torch.cat([state[f"{b}attn.{n}_proj.bias"] for n in "qkv"])
            for theirs, ours in GPT2_NAMES.items():
                for p in ("weight", "bias"):
                    yield f"blk.{i}.{theirs}.{p}", state[f"{b}{ours}.{p}"]
            continue
        fused = set()
        if fam.hf == "phi3":
            for theirs, parts in FUSED_NAMES.items():
                if theirs.endswith(".bias"):
                    continue
                yield f"blk.{i}.{theirs}", torch.cat([state[b + p] for p in parts])
                fused.update(parts)
        for key, t in state.items():
            if not key.startswith(b):
                continue
            rest = key[len(b) :]
            if rest in fused:
                continue
            theirs = block_names.get(rest)
            if theirs is None:
                raise ConfigError(f"{key} has no GGUF name in architecture {arch}")
            if fam.permuted and rest in ("attn.q_proj.weight", "attn.k_proj.weight"):
                t = permute_rotary(t, c.n_head if rest.startswith("attn.q") else c.n_kv_head)
            if fam.norm_plus_one and rest.endswith("norm.weight"):
                t = t + 1.0
            yield f"blk.{i}.{theirs}", t
    for ours, theirs in (("norm.weight", "output_norm.weight"), ("norm.bias", "output_norm.bias")):
        if ours in state:
            t = state[ours] + 1.0 if fam and fam.norm_plus_one else state[ours]
            yield theirs, t
    if not c.tie_embeddings:
        yield ours_to_top["lm_head.weight"], state["lm_head.weight"]


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of Q / K per head from the "rotate half" order (HF, lmforge) to llama.cpp's pairwise one: the inverse
    of lmforge.interop.gguf.unpermute_rotary."""
    out, inp = w.shape
    hd = out // n_head
    return w.reshape(n_head, 2, hd // 2, inp).transpose(1, 2).reshape(out, inp)


def _pack(name: str, t: torch.Tensor, type: str, n_layer: int = 1):
    """(numpy data, GGML type) of one tensor in the file's type; 1-D tensors and rows that are no whole number of
    blocks stay f32 / f16 (q4_k_m: q8_0 where rows are whole blocks of 32 only, as llama.cpp falls back)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    a = t.detach().float().contiguous().cpu().numpy()
    if a.ndim == 1 or type == "f32":
        return a.astype(np.float32), Q.F32
    if type == "f16":
        return a.astype(np.float16), Q.F16
    if type == "bf16":
        return gguf.quants.quantize(a, Q.BF16), Q.BF16
    if type == "q4_k_m":
        layer = int(name.split(".")[1]) if name.startswith("blk.") else 0
        wide = name == "output.weight" or (
            name.endswith(("attn_v.weight", "ffn_down.weight")) and more_bits(layer, n_layer)
        )
        if a.shape[-1] % 256 == 0:
            return (quantize_q6_k(a), Q.Q6_K) if wide else (quantize_q4_k(a), Q.Q4_K)
        qtype = Q.Q8_0
    else:
        qtype = Q.Q8_0 if type == "q8_0" or name in ("token_embd.weight", "output.weight") else Q.Q4_0
    if a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return a.astype(np.float16), Q.F16
    return gguf.quants.quantize(a, qtype), qtype
