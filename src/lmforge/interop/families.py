"""The I/O side of the family registry (lmforge.models.family): for each family, the reader of its HF directory,
the writer of its config.json and the generation_config.json it ships with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmforge.interop import hf, hf_bert, hf_t5

READERS: dict[str, Callable] = {  # family -> (path, raw config, tensors, device) -> model
    "decoder": hf.load_decoder_dir,
    "encoder": hf_bert.load_encoder_dir,
    "seq2seq": hf_t5.load_seq2seq_dir,
}
HF_CONFIG: dict[str, Callable[[Any], dict[str, Any]]] = {  # family -> model config -> config.json
    "decoder": hf.hf_config,
    "encoder": hf_bert.hf_config,
    "seq2seq": hf_t5.hf_config,
}


def generation_config(family: str, c: Any) -> dict[str, Any] | None:
    """The token ids a generation_config.json carries for a model that generates (None: an encoder)."""
    if family == "decoder":
        return {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    if family == "seq2seq":
        return {
            "decoder_start_token_id": c.decoder_start_token_id,
            "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
        }
    return None
