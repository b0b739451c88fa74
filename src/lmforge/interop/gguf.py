"""GGUF (llama.cpp's format) -> an lmforge decoder + tokenizer, read with the `gguf` package.

What differs from an HF checkpoint:
  * shapes are stored innermost-first: numpy's view of a tensor is already torch's [out, in];
  * weights may be quantized in blocks; `gguf.quants.dequantize` turns them back into float32;
  * llama.cpp's converter permutes the rows of Q and K per head, so that its rotary kernel can rotate adjacent
    pairs (x0, x1), (x2, x3), ...; lmforge (like HF) rotates halves (x0, x_{d/2}), ... We undo that permutation;
  * the tokenizer lives in metadata (`tokenizer.ggml.*`: tokens, merges, token types, special ids) along with
    the chat template, and is rebuilt here as a `tokenizers` byte-level BPE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import DecoderConfig
from lmforge.errors import ModelLoadError
from lmforge.interop.weights import adopt_weights, meta_init
from lmforge.models.decoder import DecoderLM
from lmforge.nn.init import aligned
from lmforge.nn.quant import Int4Linear
from lmforge.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "mistral")
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
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate.weight",
    "ffn_up.weight": "mlp.up.weight",
    "ffn_down.weight": "mlp.down.weight",
}
TOP_NAMES = {
    "token_embd.weight": "tok_emb.weight",
    "output_norm.weight": "norm.weight",
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
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{where}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ModelLoadError(f"{where}: GGUF metadata {arch}.{key} is missing")
        return v

    n_head = int(need("attention.head_count"))
    d = int(need("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    return DecoderConfig(
        vocab_size=int(vocab),
        n_layer=int(need("block_count")),
        n_head=n_head,
        n_kv_head=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        d_model=d,
        head_dim=int(_field(reader, f"{arch}.attention.key_length", d // n_head)),
        d_ff=int(need("feed_forward_length")),
        max_seq_len=int(_field(reader, f"{arch}.context_length", 2048)),
        pos_emb="rope",
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        norm="rmsnorm",
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        mlp="swiglu",
        bias=False,
        tie_embeddings="output.weight" not in names,
        bos_token_id=_maybe_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_maybe_int(_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=_maybe_int(_field(reader, "tokenizer.ggml.padding_token_id")),
    )


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
    state: dict[str, torch.Tensor] = {}
    kept: dict[str, list[torch.Tensor]] = {}  # keep_4bit: weight name -> codes, scale, low
    for t in reader.tensors:
        name = t.name
        if name in TOP_NAMES:
            ours = TOP_NAMES[name]
        elif name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            if rest not in BLOCK_NAMES:
                continue  # e.g. rope_freqs: derived from the config here
            ours = f"blocks.{i}.{BLOCK_NAMES[rest]}"
        else:
            continue
        w = dequantize_tensor(t, str(path))
        parts = [w]
        if keep_4bit and ours.startswith("blocks.") and t.tensor_type.name in FOUR_BIT and w.dim() == 2:
            parts += four_bit_grid(t, w)
        heads = (
            cfg.n_head if ours.endswith("q_proj.weight") else cfg.n_kv_head if ours.endswith("k_proj.weight") else None
        )
        if heads:  # the same row order for the weight and, kept 4-bit, its codes, scales and offsets
            parts = [unpermute_rotary(x, heads) for x in parts]
        state[ours] = parts[0]
        if len(parts) > 1:
            kept[ours] = parts[1:]
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
    return model.to(device).eval(), gguf_tokenizer(reader, str(path))


def gguf_tokenizer(reader, where: str):
    """A `tokenizers` byte-level BPE from `tokenizer.ggml.*` metadata, with its special tokens and chat template."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"{where}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") == "smollm":  # SmolLM splits digits one by one before BPE
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), split])
    else:
        tok.pre_tokenizer = split
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])

    def name(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return Tokenizer(
        tok,
        eos_token=name("tokenizer.ggml.eos_token_id"),
        bos_token=name("tokenizer.ggml.bos_token_id"),
        pad_token=name("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
