"""Packing weights into llama.cpp's K-quant blocks (Q4_K, Q6_K) for `lmforge export --type q4_k_m`.

The `gguf` package decodes every block type but packs only the simple ones (Q8_0, Q4_0, ...), and Q4_K_M — the
mix of Q4_K and Q6_K that llama.cpp, Ollama and LM Studio users download most — needs the two K types. The byte
layouts below follow gguf's own decoders (`gguf.quants.Q4_K / Q6_K.dequantize_blocks`), which the tests use to
check every packed block. The search for scales is the plain one (a sub-block's range split evenly, scales rounded
up so nothing clips), not llama.cpp's iterative refinement: a little more error for much less code.

    Q4_K  256 weights: fp16 d and dmin; 8 sub-blocks of 32 with 6-bit scale and min; 4-bit codes
          w = d * scale_j * q - dmin * min_j                                               4.5 bits a weight
    Q6_K  256 weights: 16 sub-blocks of 16 with an int8 scale; 6-bit codes; fp16 d
          w = d * scale_j * (q - 32)                                                        6.56 bits a weight
"""

from __future__ import annotations

import numpy as np

QK = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def _scale(top: np.ndarray, levels: float) -> np.ndarray:
    """An fp16 super-scale with top / scale <= levels after fp16 rounding (a little margin, so that rounding the
    sub-block scales up never needs more than `levels`)."""
    return _f16(top / (levels - 0.5))


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """[rows, cols] float (cols a multiple of 256) -> [rows, cols / 256 * 144] uint8 Q4_K blocks. Sub-block mins
    and scales are rounded up, so every weight's range fits its 16 codes (nothing clips)."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(-1, 8, 32)  # blocks x sub-blocks x weights
    low = -np.minimum(x.min(-1), 0.0)  # how far below zero a sub-block reaches (>= 0)
    dmin = _scale(low.max(-1), 63)
    mn = np.clip(np.ceil(_div(low, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    offset = dmin.astype(np.float32)[:, None] * mn
    need = (x.max(-1) + offset) / 15.0
    d = _scale(need.max(-1), 63)
    sc = np.clip(np.ceil(_div(need, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc
    q = np.clip(np.rint(_div(x + offset[..., None], np.broadcast_to(step[..., None], x.shape))), 0, 15)
    q = q.astype(np.uint8)
    scales = np.empty((x.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # chunk c: sub-block 2c low nibbles, 2c + 1 high
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], 1)
    return blocks.reshape(rows, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """[rows, cols] float (cols a multiple of 256) -> [rows, cols / 256 * 210] uint8 Q6_K blocks (scales rounded
    up, as in quantize_q4_k)."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(-1, 16, 16)
    need = np.abs(x).max(-1) / 31.0
    d = _scale(need.max(-1), 127)
    sc = np.clip(np.ceil(_div(need, d.astype(np.float32)[:, None])), 0, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    q = np.clip(np.rint(_div(x, np.broadcast_to(step[..., None], x.shape))), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # halves of 128 x four runs of 32 (see gguf's decoder)
    lo, hi = q & 0x0F, q >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(-1, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], 1)
    return blocks.reshape(rows, -1)


def more_bits(layer: int, n_layer: int) -> bool:
    """The layers whose attn_v / ffn_down Q4_K_M keeps in Q6_K: the first and last eighth, every third between
    (the rule llama.cpp's quantizer uses for this mix)."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2
