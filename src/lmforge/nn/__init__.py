"""The layer library shared by every model family."""

from lmforge.nn.attention import Attention, KVCache, attention_reference, sdpa
from lmforge.nn.mlp import MLP
from lmforge.nn.norm import RMSNorm, make_norm
from lmforge.nn.rope import Rotary, apply_rotary

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
