"""The layer library shared by every model family."""

from lmforge.nn.attention import Attention, KVCache, Rotary, apply_rotary, attention_reference, sdpa
from lmforge.nn.mlp import MLP
from lmforge.nn.norm import RMSNorm, make_norm

__all__ = [
    "MLP",
    "Attention",
    "KVCache",
    "RMSNorm",
    "Rotary",
    "apply_rotary",
    "attention_reference",
    "make_norm",
    "sdpa",
]
