"""Turning a text into the exact token sequence a model sees, for both explanation methods.

Attention maps and saliency must look at the same tokens the model reads in real use, or the explanation is of
some other input: an encoder gets `[CLS] text [SEP]` as in classification, a decoder gets the bare tokens as
`generate` feeds them (no BOS is added there either). Each token also keeps its character span in the text, so
the HTML views can show the original text (spaces, case, accents) rather than re-joined token strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import LmforgeError, ModelLoadError
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.tokenizer import Tokenizer


@dataclass
class Encoded:
    text: str
    ids: list[int]
    tokens: list[str]  # display strings, one per id
    spans: list[tuple[int, int]]  # character offsets into text; (0, 0) for special tokens
    special: list[bool]  # [CLS] / [SEP]: kept in IG baselines and never deleted


def model_kind(model: nn.Module) -> str:
    """"encoder" or "decoder"; anything else cannot be explained here."""
    if isinstance(model, Encoder):
        return "encoder"
    if isinstance(model, DecoderLM):
        return "decoder"
    raise ModelLoadError(f"explain works on lmforge decoder and encoder models, got a {type(model).__name__}")


def display_token(tokenizer: Tokenizer, i: int) -> str:
    """What a token reads as: ' cat' for byte-level BPE's 'Ġcat', '##ing' for a WordPiece continuation. A piece
    of a multi-byte character decodes to U+FFFD alone, so it falls back to the vocabulary entry."""
    piece = tokenizer.decode([i], skip_special_tokens=False)
    if not piece or "\ufffd" in piece:
        piece = tokenizer.id_to_token(i) or f"<{i}>"
    return piece


def encode_text(model: nn.Module, tokenizer: Tokenizer, text: str) -> Encoded:
    """The model's input for `text`, refusing (not truncating) a text longer than the model's context: an
    explanation of a silently cut text would be wrong about the part the user reads last."""
    kind = model_kind(model)
    if not isinstance(text, str) or not text.strip():
        raise LmforgeError("the text to explain is empty; pass a sentence")
    limit = model.config.max_seq_len
    if kind == "encoder":
        # no truncation in practice (the limit is far above any context), so too long texts are seen and refused
        enc = tokenizer.encode_for_encoder([text], max_len=10**9)[0]
        special = [bool(s) for s in enc.special_tokens_mask]
    else:
        enc = tokenizer.tok.encode(text, add_special_tokens=False)
        special = [False] * len(enc.ids)
    ids = list(enc.ids)
    if len(ids) > limit:
        raise LmforgeError(f"the text is {len(ids)} tokens but the model reads at most {limit}; shorten the text")
    if all(special):
        raise LmforgeError("the text has no tokens besides special ones; pass a sentence")
    return Encoded(text, ids, [display_token(tokenizer, i) for i in ids], [tuple(o) for o in enc.offsets],
                   special)


def device_of(model: nn.Module) -> torch.device:
    return model.norm.weight.device if hasattr(model, "norm") else model.pos_emb.weight.device
