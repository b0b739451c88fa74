"""What a model is: family, shape, parameter count and FLOPs per token, from a model directory or a preset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.config import PRESETS, DecoderConfig, model_config
from lmforge.errors import ModelLoadError


def model_info(target: str | Path) -> dict[str, Any]:
    """Describe a model directory (reads config.json only, no weights) or a named preset."""
    from lmforge.interop.hf import config_from_hf, read_config

    if str(target) in PRESETS and not Path(target).exists():
        cfg, source, model_type = model_config(str(target)), f"preset {target}", None
    elif str(target).endswith(".gguf") and Path(target).is_file():
        from lmforge.interop.gguf import _reader, gguf_config

        cfg, source, model_type = gguf_config(_reader(Path(target)), str(target)), str(target), "gguf"
    else:
        path = Path(target)
        if not path.is_dir():
            raise ModelLoadError(f"{target} is neither a model directory nor a preset ({', '.join(PRESETS)})")
        raw = read_config(path)
        cfg, source, model_type = config_from_hf(raw, str(path / "config.json")), str(path), raw.get("model_type")
    return describe(cfg, source, model_type)


def describe(cfg: DecoderConfig, source: str = "", model_type: str | None = None) -> dict[str, Any]:
    try:
        cfg.validate()
    except Exception as e:
        raise ModelLoadError(f"{source}: {e}") from None
    family = "llama" if cfg.pos_emb == "rope" else "gpt2"
    return {
        "source": source,
        "model_type": model_type or family,
        "family": f"decoder ({family}-style)",
        "params": cfg.num_params(),
        "params_non_embedding": cfg.num_params(include_embeddings=False),
        "flops_per_token_forward": cfg.flops_per_token(training=False),
        "flops_per_token_train": cfg.flops_per_token(training=True),
        "config": cfg.to_dict(),
    }
