"""GGUF (llama.cpp's format) -> an lmforge decoder + tokenizer, read with the `gguf` package.

What differs from an HF checkpoint:
  * shapes are stored innermost-first: numpy's view of a tensor is already torch's [out, in];
  * weights may be quantized in blocks; `gguf.quants.dequantize` turns them back into float32;
  * llama.cpp's converter permutes the rows of Q and K per head, so that its rotary kernel can rotate adjacent
    pairs (x0, x1), (x2, x3), ...; lmforge (like HF) rotates halves (x0, x_{d/2}), ... We undo that permutation;
  * the tokenizer lives in metadata (`tokenizer.ggml.*`: tokens, merges or scores, token types, special ids)
    along with the chat template (lmforge.interop.gguf_vocab rebuilds it, and writes it);
  * each family's differences are metadata keys and tensor names (GGUF_ARCHS below): Gemma's norms are stored
    as 1 + w, Phi-3's q/k/v and gate/up as fused tensors, Llama 3's rope scaling as a `rope_freqs` tensor of
    per-frequency divisors, Phi-3's longrope as two such tensors.

lmforge.interop.gguf_write writes the same layout from any decoder lmforge holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import DecoderConfig
from lmforge.errors import ModelLoadError
from lmforge.interop.gguf_vocab import tokenizer_from_gguf
from lmforge.interop.weights import adopt_weights, meta_init
from lmforge.models.decoder import DecoderLM
from lmforge.nn.init import aligned
from lmforge.nn.quant import Int4Linear


@dataclass(frozen=True)
class GgufArch:
    """How one family sits in a GGUF file: llama.cpp's architecture name, whether Q/K rows are permuted for its
    pairwise rotary kernel, and norms stored as 1 + w (llama.cpp's RMSNorm has no offset)."""

    name: str
    hf: str  # the HF model_type it is (DecoderConfig.arch)
    permuted: bool = False
    norm_plus_one: bool = False
    window_every: int = 0  # a sliding-window layer pattern llama.cpp fixes for the family (Gemma 2: 2, 3: 6)


GGUF_ARCHS = {
    a.name: a
    for a in (
        GgufArch("gpt2", "gpt2"),
        GgufArch("llama", "llama", permuted=True),
        GgufArch("mistral", "mistral", permuted=True),  # (read only: llama.cpp writes Mistral as llama + a window)
        GgufArch("smollm3", "smollm3", permuted=True),
        GgufArch("qwen2", "qwen2"),
        GgufArch("qwen3", "qwen3"),
        GgufArch("phi3", "phi3"),
        GgufArch("olmo2", "olmo2"),
        GgufArch("gemma", "gemma", norm_plus_one=True),
        GgufArch("gemma2", "gemma2", norm_plus_one=True, window_every=2),
        GgufArch("gemma3", "gemma3_text", norm_plus_one=True, window_every=6),
    )
}
ARCHITECTURES = tuple(GGUF_ARCHS)
# 4-bit block types whose weights are an affine grid per 32 (w = scale * q + low, q in 0..15; Q4_K's super-blocks
# of 256 hold 8 such groups), with the byte offset of the packed codes in one block: load_gguf(keep_4bit=True)
# keeps such Linear weights on their own grid (lmforge.nn.quant.Int4Linear, groups of 32)
FOUR_BIT = {"Q4_0": 2, "Q4_1": 4, "Q4_K": 16}
FOUR_BIT_GROUP = 32
# quantization types we dequantize (others are refused with a clear error)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name (after "blk.N.") -> lmforge name (after "blocks.N.")
BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
    "post_attention_norm.weight": "attn_post_norm.weight",
    "post_ffw_norm.weight": "mlp_post_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate.weight",
    "ffn_up.weight": "mlp.up.weight",
    "ffn_down.weight": "mlp.down.weight",
    "attn_q.bias": "attn.q_proj.bias",  # (Qwen2)
    "attn_k.bias": "attn.k_proj.bias",
    "attn_v.bias": "attn.v_proj.bias",
}
# fused tensors (Phi-3): GGUF name -> the lmforge tensors stacked in it, along the output dimension
FUSED_NAMES = {
    "attn_qkv.weight": ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"),
    "attn_qkv.bias": ("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"),  # (GPT-2)
    "ffn_up.weight": ("mlp.gate.weight", "mlp.up.weight"),
}
TOP_NAMES = {
    "token_embd.weight": "tok_emb.weight",
    "position_embd.weight": "pos_emb.weight",  # (GPT-2)
    "output_norm.weight": "norm.weight",
    "output_norm.bias": "norm.bias",
    "output.weight": "lm_head.weight",
}


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors / IndexError on damaged files
        raise ModelLoadError(
            f"{path} is truncated or not a GGUF file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); download it again"
        ) from None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader, where: str) -> DecoderConfig:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(
            f"{where}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    fam = GGUF_ARCHS[arch]

    def need(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ModelLoadError(f"{where}: GGUF metadata {arch}.{key} is missing")
        return v

    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    n_head, d, n_layer = int(need("attention.head_count")), int(need("embedding_length")), int(need("block_count"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    head_dim = int(get("attention.key_length", d // n_head))
    d_ff = int(need("feed_forward_length"))
    theta = float(get("rope.freq_base", 10000.0))
    context = int(get("context_length", 2048))
    cfg: dict[str, Any] = dict(
        vocab_size=int(vocab),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        d_model=d,
        head_dim=head_dim,
        d_ff=d_ff,
        max_seq_len=context,
        pos_emb="rope",
        rope_theta=theta,
        rope_partial=int(get("rope.dimension_count", head_dim)) / head_dim,
        norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        mlp="swiglu",
        bias=False,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        tie_embeddings="output.weight" not in tensors,
        bos_token_id=_maybe_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_maybe_int(_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=_maybe_int(_field(reader, "tokenizer.ggml.padding_token_id")),
        arch=fam.hf,
    )
    if arch == "gpt2":  # learned positions, LayerNorms with biases, a plain GELU MLP
        cfg.update(
            pos_emb="learned",
            norm="layernorm",
            norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)),
            mlp="gelu_tanh",
            bias=True,
            qkv_bias=True,
            rope_partial=1.0,
        )
        return DecoderConfig(**cfg)
    if "blk.0.attn_q_norm.weight" in tensors:
        width = int(tensors["blk.0.attn_q_norm.weight"].shape[0])
        cfg["qk_norm"] = "head" if width == head_dim else "full"
    if "blk.0.post_ffw_norm.weight" in tensors:
        cfg["norm_layout"] = "sandwich" if "blk.0.attn_norm.weight" in tensors else "post"
    if fam.norm_plus_one:
        cfg.update(norm_offset=1.0, mlp="geglu", embed_scale=d**0.5, attn_scale=head_dim**-0.5)
    if (scale := get("attention.scale")) is not None:
        cfg["attn_scale"] = float(scale)
    for key, ours in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "final_softcap")):
        if get(key):
            cfg[ours] = float(get(key))
    window = get("attention.sliding_window")
    if window:
        pattern = get("attention.sliding_window_pattern")
        if pattern is not None:
            types = ["sliding_attention" if on else "full_attention" for on in pattern]
        elif fam.window_every:
            types = ["sliding_attention" if (i + 1) % fam.window_every else "full_attention" for i in range(n_layer)]
        else:
            types = None
        if types is None or "sliding_attention" in types:
            cfg["sliding_window"] = int(window)
            cfg["layer_types"] = None if types is None or all(t == "sliding_attention" for t in types) else types
    if fam.hf == "gemma3_text":
        cfg["rope_local_theta"] = float(get("rope.freq_base_swa", 10000.0))
    if fam.hf == "smollm3":  # (llama.cpp fixes every fourth layer; lmforge writes the list it has)
        listed = get("no_rope_layers")
        cfg["no_rope_layers"] = (
            [int(i) for i in listed] if listed is not None else [i for i in range(n_layer) if (i + 1) % 4 == 0]
        )
    if fam.hf == "llama" and cfg.get("sliding_window"):
        cfg["arch"] = "mistral"  # (Mistral in llama.cpp's files: the llama architecture with a window)
    cfg["rope_scaling"] = _gguf_rope_scaling(reader, arch, tensors, where)
    return DecoderConfig(**cfg)


def _gguf_rope_scaling(reader, arch: str, tensors: dict, where: str) -> dict[str, Any] | None:
    """The rope scaling a GGUF file describes: per-frequency divisors (`rope_freqs`, llama.cpp's form of Llama 3's
    scaling), Phi-3's two longrope factor sets, or linear / yarn from `rope.scaling.*`."""
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    if "rope_factors_long.weight" in tensors:
        scaling = {
            "rope_type": "longrope",
            "long_factor": dequantize_tensor(tensors["rope_factors_long.weight"], where).tolist(),
            "short_factor": dequantize_tensor(tensors["rope_factors_short.weight"], where).tolist(),
            "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
        }
        if get("rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(get("rope.scaling.attn_factor"))
        return scaling
    if "rope_freqs.weight" in tensors:
        return {"rope_type": "factors", "factors": dequantize_tensor(tensors["rope_freqs.weight"], where).tolist()}
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(get("rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
        }
        for key, ours in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if get(f"rope.scaling.{key}") is not None:
                scaling[ours] = float(get(f"rope.scaling.{key}"))
        if get("rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(get("rope.scaling.attn_factor"))
        return scaling
    raise ModelLoadError(f"{where}: GGUF rope scaling {kind!r} is not supported (linear, yarn, rope_freqs, longrope)")


def _maybe_int(v: Any) -> int | None:
    return None if v is None else int(v)


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of Q/K: rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ..., d-1)."""
    out, inp = w.shape
    hd = out // n_head
    return w.reshape(n_head, hd // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def dequantize_tensor(t, where: str) -> torch.Tensor:
    from gguf import quants

    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"{where}: tensor {t.name} uses quantization {kind}, which lmforge cannot read; "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF stores innermost dimension first
    try:
        if kind in ("F32", "F16"):
            arr = np.asarray(t.data, dtype=np.float32).reshape(shape)
        else:
            arr = quants.dequantize(t.data, t.tensor_type).reshape(shape)
    except (ValueError, NotImplementedError) as e:
        raise ModelLoadError(f"{where}: tensor {t.name} cannot be decoded ({e})") from None
    # own, writable memory from PyTorch's allocator (numpy aligns to 16 bytes only; see lmforge.nn.init.aligned)
    return aligned(torch.tensor(arr, dtype=torch.float32))


def four_bit_grid(t, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 4-bit codes [N, K] (uint8, 0..15) and per-32 scale and low [N, K / 32] of a FOUR_BIT tensor whose
    decoded weight is `w`, such that w = scale * codes + low exactly. Read through the gguf package's own
    decoder: the tensor decoded with every code set to 0 gives each group's low, with every code set to 1 its
    low + scale; the codes then follow from w. Nothing of a block's layout is re-implemented here beyond where
    its codes sit."""
    from gguf import GGML_QUANT_SIZES, quants

    N, K = w.shape
    raw = np.asarray(t.data)
    _, block_bytes = GGML_QUANT_SIZES[t.tensor_type]
    start = FOUR_BIT[t.tensor_type.name]

    def decoded_with_codes(byte: int) -> torch.Tensor:
        blocks = raw.reshape(-1, block_bytes).copy()
        blocks[:, start:] = byte
        groups = quants.dequantize(blocks.reshape(raw.shape), t.tensor_type).reshape(N, K // FOUR_BIT_GROUP, -1)
        return torch.from_numpy(np.ascontiguousarray(groups[..., 0], dtype=np.float32))

    low = decoded_with_codes(0x00)
    scale = decoded_with_codes(0x11) - low
    step = torch.where(scale == 0, torch.ones_like(scale), scale)[..., None]
    groups = w.view(N, K // FOUR_BIT_GROUP, FOUR_BIT_GROUP)
    codes = ((groups - low[..., None]) / step).round_().clamp_(0, 15).to(torch.uint8).view(N, K)
    return codes, scale, low


def four_bit_tensors(path: str | Path) -> bool:
    """Whether the file stores any tensor in 4-bit blocks (read from its header: the tensors are not loaded)."""
    from gguf import GGUFReader

    return any(t.tensor_type.name in FOUR_BIT for t in GGUFReader(str(path)).tensors)


def load_gguf(path: str | Path, device: str | torch.device = "cpu", keep_4bit: bool = False):
    """(model, tokenizer) from a .gguf file; weights dequantized to float32, except with keep_4bit: then every
    Linear stored in 4-bit blocks of 32 (Q4_0, Q4_1, Q4_K) is an Int4Linear on the file's own grid (its codes,
    scales and offsets as stored: nothing requantized), for the int4 kernel."""
    path = Path(path)
    reader = _reader(path)
    cfg = gguf_config(reader, str(path))
    try:
        cfg.validate()
    except Exception as e:
        raise ModelLoadError(f"{path}: {e}") from None
    fam = GGUF_ARCHS[_field(reader, "general.architecture")]
    state: dict[str, torch.Tensor] = {}
    kept: dict[str, list[torch.Tensor]] = {}  # keep_4bit: weight name -> codes, scale, low
    for t in reader.tensors:
        name = t.name
        if name in TOP_NAMES:
            ours = [TOP_NAMES[name]]
        elif name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            if rest in FUSED_NAMES and (rest != "ffn_up.weight" or fam.hf == "phi3"):
                ours = [f"blocks.{i}.{n}" for n in FUSED_NAMES[rest]]
            elif rest in BLOCK_NAMES:
                ours = [f"blocks.{i}.{BLOCK_NAMES[rest]}"]
            elif rest.endswith(".bias") and rest.replace(".bias", ".weight") in BLOCK_NAMES:  # (GPT-2)
                ours = [f"blocks.{i}.{BLOCK_NAMES[rest.replace('.bias', '.weight')].replace('.weight', '.bias')}"]
            else:
                continue
        else:
            continue  # rope_freqs and longrope factors: read into the config
        w = dequantize_tensor(t, str(path))
        if fam.norm_plus_one and name.endswith("norm.weight"):
            w = w - 1.0  # (stored as 1 + w: see GgufArch)
        parts = [w]
        if (
            keep_4bit
            and len(ours) == 1
            and ours[0].startswith("blocks.")
            and t.tensor_type.name in FOUR_BIT
            and w.dim() == 2
        ):
            parts += four_bit_grid(t, w)
        if fam.permuted and len(ours) == 1:
            heads = (
                cfg.n_head
                if ours[0].endswith("q_proj.weight")
                else cfg.n_kv_head
                if ours[0].endswith("k_proj.weight")
                else None
            )
            if heads:  # the same row order for the weight and, kept 4-bit, its codes, scales and offsets
                parts = [unpermute_rotary(x, heads) for x in parts]
        if len(ours) > 1:  # fused: split along the output dimension as the config sizes it
            q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
            sizes = [q, kv, kv] if len(ours) == 3 else [cfg.d_ff, cfg.d_ff]
            if w.shape[0] != sum(sizes):
                raise ModelLoadError(f"{path}: tensor {name} has {w.shape[0]} rows, metadata implies {sum(sizes)}")
            for n, part in zip(ours, torch.split(w, sizes, dim=0)):
                state[n] = part.contiguous()
            continue
        state[ours[0]] = parts[0]
        if len(parts) > 1:
            kept[ours[0]] = parts[1:]
    with meta_init():
        model = DecoderLM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for k, shape in expected.items():
        if k == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if k not in state:
            raise ModelLoadError(f"{path}: tensor for {k} is missing; the file does not match its metadata")
        if state[k].shape != shape:
            raise ModelLoadError(
                f"{path}: tensor for {k} has shape {tuple(state[k].shape)}, metadata implies {tuple(shape)}"
            )
    model = adopt_weights(model, state, str(path))
    for name, (codes, scale, low) in kept.items():
        parent, _, leaf = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(parent), leaf, Int4Linear.from_grid(codes, scale, low, FOUR_BIT_GROUP))
    return model.to(device).eval(), tokenizer_from_gguf(reader, str(path))
