"""The model families as data: one record per family, so code that must treat them differently looks the
difference up here instead of asking `isinstance` (the I/O layer keeps its own table of readers and writers per
family name, lmforge.interop.families).

    decoder   DecoderLM    GPT-2, Llama 3, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo 2, SmolLM3  pre-trained with clm
    encoder   Encoder      BERT (mlm / nsp / classify / qa heads)                          pre-trained with mlm
    seq2seq   Seq2SeqLM    T5 (v1.0 tied / v1.1 untied)                                    pre-trained with span
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.config import ENCODER_PRESETS, PRESETS, SEQ2SEQ_PRESETS, DecoderConfig, EncoderConfig, Seq2SeqConfig
from lmforge.errors import ModelLoadError
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.models.seq2seq import Seq2SeqLM

NATIVE_DECODER_TYPE = "lmforge-decoder"  # config.json model_type of a decoder no HF class can hold
# the HF families of rotary decoders DecoderLM holds (their config keys and tensor names: lmforge.interop.hf.ARCHS)
DECODER_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2", "gemma", "gemma2", "gemma3_text")


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    presets: dict[str, dict[str, Any]]
    hf_model_types: tuple[str, ...]  # config.json model_type values this family reads
    objective: str  # what `lmforge pretrain` trains it with: clm (next token), mlm (masked LM), span (T5)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "decoder",
            DecoderConfig,
            DecoderLM,
            PRESETS,
            ("gpt2", *DECODER_ARCHS, NATIVE_DECODER_TYPE),
            "clm",
        ),
        Family("encoder", EncoderConfig, Encoder, ENCODER_PRESETS, ("bert",), "mlm"),
        Family("seq2seq", Seq2SeqConfig, Seq2SeqLM, SEQ2SEQ_PRESETS, ("t5",), "span"),
    )
}


def family_of(obj: Any) -> Family:
    """The family of a model, or of a model config."""
    for f in FAMILIES.values():
        if isinstance(obj, (f.model_cls, f.config_cls)):
            return f
    raise ModelLoadError(f"{type(obj).__name__} is not a model of lmforge's families ({', '.join(FAMILIES)})")


def family_for_model_type(model_type: str | None, where: str = "config.json") -> Family:
    """The family that reads a config.json of this `model_type`."""
    for f in FAMILIES.values():
        if model_type in f.hf_model_types:
            return f
    known = [t for f in FAMILIES.values() for t in f.hf_model_types]
    raise ModelLoadError(
        f"{where}: model_type {model_type!r} is not supported; supported model types: {', '.join(known)}"
    )
