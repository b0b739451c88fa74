"""The ecosystem's formats: HF model directories per family, GGUF, PEFT adapters and quantized directories, and
`load_model` / `load_pretrained`, which pick the right one from a path."""

from lmforge.interop.load import load_model, load_pretrained, resolve_model_path

__all__ = ["load_model", "load_pretrained", "resolve_model_path"]
