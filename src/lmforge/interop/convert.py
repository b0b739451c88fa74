"""`lmforge convert`: any model lmforge can load -> an HF-layout directory."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import ModelLoadError
from lmforge.interop import load_pretrained
from lmforge.interop.hf import check_output_dir


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
