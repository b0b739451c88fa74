"""What a model is: family, shape, parameter count and FLOPs per token, from a model directory or a preset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.assets import MODELS
from lmforge.config import (
    ENCODER_PRESETS,
    PRESETS,
    SEQ2SEQ_PRESETS,
    DecoderConfig,
    EncoderConfig,
    Seq2SeqConfig,
    encoder_config,
    model_config,
    seq2seq_config,
)
from lmforge.errors import ModelLoadError
from lmforge.interop import resolve_model_path
from lmforge.interop.gguf import _reader, gguf_config
from lmforge.interop.hf import check_weights, config_from_hf, read_config
from lmforge.interop.hf_bert import config_from_hf as bert_config
from lmforge.interop.hf_t5 import config_from_hf as t5_config
from lmforge.interop.hub_cache import is_repo_id


def model_info(target: str | Path) -> dict[str, Any]:
    """Describe a model directory (reads config.json, and checks the weights files' headers and sizes without
    reading their tensors), a .gguf file or a named preset."""
    if str(target) in PRESETS and not Path(target).exists():
        cfg, source, model_type = model_config(str(target)), f"preset {target}", None
    elif str(target) in ENCODER_PRESETS and not Path(target).exists():
        cfg, source, model_type = encoder_config(str(target)), f"preset {target}", None
    elif str(target) in SEQ2SEQ_PRESETS and not Path(target).exists():
        cfg, source, model_type = seq2seq_config(str(target)), f"preset {target}", None
    elif (str(target) in MODELS or is_repo_id(str(target))) and not Path(target).exists():
        return model_info(resolve_model_path(target))  # (a packaged model, or ORG/NAME in the local HF cache)
    elif str(target).endswith(".gguf") and Path(target).is_file():
        cfg, source, model_type = gguf_config(_reader(Path(target)), str(target)), str(target), "gguf"
    else:
        path = Path(target)
        if not path.is_dir():
            raise ModelLoadError(
                f"{target} is neither a model directory nor a preset "
                f"({', '.join([*PRESETS, *ENCODER_PRESETS, *SEQ2SEQ_PRESETS])})"
            )
        raw = read_config(path)
        check_weights(path)  # a cut download fails here, not when the model is first used
        if raw.get("model_type") == "bert":
            mlm_only = raw.get("architectures", ["BertModel"])[0] == "BertForMaskedLM"  # (no pooler)
            cfg = bert_config(raw, {} if mlm_only else {"pooler.dense.weight": None}, str(path / "config.json"))
        elif raw.get("model_type") == "t5":
            cfg = t5_config(raw, str(path / "config.json"))
        else:
            cfg = config_from_hf(raw, str(path / "config.json"))
        source, model_type = str(path), raw.get("model_type")
    return describe(cfg, source, model_type)


def describe(
    cfg: DecoderConfig | EncoderConfig | Seq2SeqConfig, source: str = "", model_type: str | None = None
) -> dict[str, Any]:
    try:
        cfg.validate()
    except Exception as e:
        raise ModelLoadError(f"{source}: {e}") from None
    if isinstance(cfg, EncoderConfig):
        family, kind = "bert", f"encoder (BERT-style, head: {cfg.head})"
    elif isinstance(cfg, Seq2SeqConfig):
        family, kind = "t5", "encoder-decoder (T5-style)"
    else:
        family = "llama" if cfg.pos_emb == "rope" else "gpt2"
        kind = f"decoder ({family}-style)"
    return {
        "source": source,
        "model_type": model_type or family,
        "family": kind,
        "params": cfg.num_params(),
        "params_non_embedding": cfg.num_params(include_embeddings=False),
        "flops_per_token_forward": cfg.flops_per_token(training=False),
        "flops_per_token_train": cfg.flops_per_token(training=True),
        "config": cfg.to_dict(),
    }


def format_info(info: dict[str, Any]) -> str:
    """`model_info`'s facts as `lmforge info` prints them."""
    return "\n".join(
        [
            f"{info['source']}: {info['family']}, model_type {info['model_type']}",
            f"parameters: {info['params']:,} ({info['params_non_embedding']:,} without embeddings)",
            f"FLOPs per token: {info['flops_per_token_forward'] / 1e6:,.1f} M forward, "
            f"{info['flops_per_token_train'] / 1e6:,.1f} M training",
            *(f"  {k}: {v}" for k, v in info["config"].items()),
        ]
    )
