"""The model families: plain nn.Modules built from a config, with no file I/O of their own (loading and saving
by path live in lmforge.interop: `from lmforge.interop import load_model, load_pretrained`)."""

from lmforge.models.decoder import CausalLMOutput, DecoderLM

__all__ = ["CausalLMOutput", "DecoderLM"]
