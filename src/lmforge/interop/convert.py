"""`lmforge convert`: any model lmforge can load -> an HF-layout directory; `lmforge export`: -> one GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import ConfigError, ModelLoadError
from lmforge.files import check_out_file
from lmforge.interop import load_pretrained
from lmforge.interop.gguf_write import TYPES, export_gguf
from lmforge.interop.hf import check_output_dir
from lmforge.interop.load import resolve_model_path


def convert(source: str | Path, out: str | Path) -> Path:
    """Load a .gguf file, a model directory or a packaged model name and write it as an HF directory
    (config.json, model.safetensors, tokenizer.json + tokenizer_config.json with the chat template,
    generation_config.json). The result loads in lmforge and in transformers."""
    check_output_dir(out, "output folder")  # before the (slow) load
    src = Path(source)
    if src.exists() and Path(out).exists() and Path(out).resolve() == src.resolve():
        raise ModelLoadError(
            f"the output folder {out} is the model being converted; write the conversion to a new folder"
        )
    model, tokenizer = load_pretrained(source)
    return model.save_pretrained(out, tokenizer=tokenizer)


def export(source: str | Path, out: str | Path, type: str = "f16", adapter: str | Path | None = None) -> Path:
    """Write a model (a directory, a .gguf file, a packaged name or ORG/NAME in the local HF cache; with a LoRA
    adapter merged in) as one GGUF file for llama.cpp, Ollama or LM Studio: weights in `type` (f32, f16, bf16,
    q8_0, q4_0), tokenizer, chat template and the directory's generation settings in the metadata."""
    if type not in TYPES:
        raise ConfigError(f"--type {type!r} is not one of {', '.join(TYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"{out}: the output must be a .gguf file (e.g. model.q8_0.gguf)")
    check_out_file(out, "OUT")
    model, tokenizer = load_pretrained(source, adapter=adapter)
    if getattr(model, "quantization", None):
        raise ConfigError(f"{source} is a quantized directory; export the full-precision model instead")
    gen = {}
    src = resolve_model_path(source)
    if src.is_dir() and (src / "generation_config.json").is_file():
        gen = json.loads((src / "generation_config.json").read_text(encoding="utf-8"))
    return export_gguf(model, tokenizer, out, type=type, generation_config=gen, name=src.stem)
