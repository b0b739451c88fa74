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
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.tokenizer import Tokenizer


@dataclass
class Encoded:
    text: str
    ids: list[int]
    tokens: list[str]  # display strings, one per id
    spans: list[tuple[int, int]]  # character offsets into text; (0, 0) for special tokens
    special: list[bool]  # [CLS] / [SEP]: kept in IG baselines and never deleted


def model_kind(model: nn.Module) -> str:
    """ "encoder", "decoder" or "seq2seq" (an encoder-decoder); anything else cannot be explained here."""
    if isinstance(model, Encoder):
        return "encoder"
    if isinstance(model, DecoderLM):
        return "decoder"
    if isinstance(model, Seq2SeqLM):
        return "seq2seq"
    raise ModelLoadError(
        f"explain works on lmforge decoder, encoder and encoder-decoder models, got a {type(model).__name__}"
    )


def display_token(tokenizer: Tokenizer, i: int) -> str:
    """What a token reads as: ' cat' for byte-level BPE's 'Ġcat' and SentencePiece's '▁cat', '##ing' for a
    WordPiece continuation. A piece of a multi-byte character decodes to U+FFFD alone, so it falls back to the
    vocabulary entry."""
    piece = tokenizer.decode([i], skip_special_tokens=False)
    entry = tokenizer.id_to_token(i)
    if entry and entry.startswith("\u2581") and "\ufffd" not in piece and not piece.startswith(" "):
        piece = " " + piece  # SentencePiece's word start: decoding one piece alone drops its space
    if not piece or "\ufffd" in piece:
        return entry or f"<{i}>"
    return piece


def encode_text(model: nn.Module, tokenizer: Tokenizer, text: str) -> Encoded:
    """The model's input for `text`, refusing (not truncating) a text longer than the model's context: an
    explanation of a silently cut text would be wrong about the part the user reads last. An encoder-decoder's
    source ends in EOS, as `generate_seq2seq` feeds it."""
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
    ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
    if kind == "seq2seq":
        ids, offsets, special = ids + [model.config.eos_token_id], offsets + [(0, 0)], special + [True]
    if len(ids) > limit:
        raise LmforgeError(f"the text is {len(ids)} tokens but the model reads at most {limit}; shorten the text")
    if all(special):
        raise LmforgeError("the text has no tokens besides special ones; pass a sentence")
    return Encoded(text, ids, [display_token(tokenizer, i) for i in ids], offsets, special)


def device_of(model: nn.Module) -> torch.device:
    if isinstance(model, Seq2SeqLM):
        return model.encoder.norm.weight.device
    return model.norm.weight.device if hasattr(model, "norm") else model.pos_emb.weight.device
