"""Model directories in the Hugging Face layout: config.json + model.safetensors (or a sharded index) +
tokenizer.json + generation_config.json.

A decoder whose shape GPT-2 or Llama can express is written with those families' config keys and tensor names,
so `transformers` loads it as it is; any other shape is written with lmforge's own names (model_type
"lmforge-decoder"). Each family is a table of (HF name, lmforge names, layout) rows; nothing else differs.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import DecoderConfig
from lmforge.errors import ModelLoadError
from lmforge.files import atomic_dir, check_out_dir, write_json
from lmforge.interop.weights import adopt_weights, meta_init
from lmforge.models.decoder import DecoderLM
from lmforge.models.family import FAMILIES, NATIVE_DECODER_TYPE
from lmforge.nn.init import aligned_state
from lmforge.nn.lora import plain_state_dict

NATIVE_TYPE = NATIVE_DECODER_TYPE

# a row: HF tensor name, the lmforge tensors concatenated into it (along the output dim), layout
# layout "linear": same [out, in] layout; "conv1d": GPT-2's Conv1D stores the weight as [in, out]
Row = tuple[str, list[str], str]


# --------------------------------------------------------------------------------------------------------------
# config <-> HF config.json


GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# hidden_act (hidden_activation in Gemma 2 / 3) of the gated families -> lmforge's MLP kind
GATED_ACT = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu", "gelu": "geglu"}


@dataclass(frozen=True)
class Arch:
    """One HF family of rotary decoders: what its config.json fixes (`fixed`: DecoderConfig fields every model
    of it has) and where it keeps what varies. Everything else is read the same way for all of them."""

    model_type: str
    hf_class: str
    fixed: dict[str, Any] = field(default_factory=dict)
    fused: bool = False  # one qkv_proj and one gate_up_proj tensor (Phi-3)
    window: str = "none"  # where sliding windows come from: none | all (Mistral, Phi-3) | layers (layer_types)
    default_theta: float = 10000.0


ARCHS: dict[str, Arch] = {
    a.model_type: a
    for a in (
        Arch("llama", "LlamaForCausalLM"),
        Arch("mistral", "MistralForCausalLM", window="all"),
        Arch("qwen2", "Qwen2ForCausalLM", {"qkv_bias": True, "bias": False}, window="layers"),
        Arch("qwen3", "Qwen3ForCausalLM", {"qk_norm": "head"}, window="layers"),
        Arch("smollm3", "SmolLM3ForCausalLM", window="layers", default_theta=2e6),
        Arch("phi3", "Phi3ForCausalLM", fused=True, window="all"),
        Arch("olmo2", "Olmo2ForCausalLM", {"norm_layout": "post", "qk_norm": "full"}),
        Arch("gemma", "GemmaForCausalLM", {"norm_offset": 1.0}),
        Arch(
            "gemma2",
            "Gemma2ForCausalLM",
            {"norm_offset": 1.0, "norm_layout": "sandwich"},
            window="layers",
        ),
        Arch(
            "gemma3_text",
            "Gemma3ForCausalLM",
            {"norm_offset": 1.0, "norm_layout": "sandwich", "qk_norm": "head"},
            window="layers",
            default_theta=1e6,
        ),
    )
}
GEMMAS = ("gemma", "gemma2", "gemma3_text")


def hf_config(c: DecoderConfig) -> dict[str, Any]:
    """config.json for `c`: its own family (`c.arch`) where that family can hold it, else GPT-2, Llama or Qwen2
    when one fits, else lmforge's own layout. "Fits" is checked by reading the written config back."""
    candidates = [c.arch] if c.arch else []
    candidates += [t for t in ("gpt2", "llama", "qwen2") if t != c.arch]
    for mt in candidates:
        if mt not in ARCHS and mt != "gpt2":
            continue
        d = _gpt2_config(c) if mt == "gpt2" else _rope_config(c, ARCHS[mt])
        try:
            if d is not None and _same(config_from_hf(d), c):
                return d
        except ModelLoadError:
            continue
    return {"architectures": ["DecoderLM"], "model_type": NATIVE_TYPE, "lmforge": c.to_dict(), **_common(c)}


def _same(a: DecoderConfig, b: DecoderConfig) -> bool:
    skip = {"arch", "dropout", "init_std", "max_seq_len"}
    return all(getattr(a, f) == getattr(b, f) for f in a.__dataclass_fields__ if f not in skip)


def _common(c: DecoderConfig) -> dict[str, Any]:
    return {
        "vocab_size": c.vocab_size,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": "float32",
    }


def _gpt2_config(c: DecoderConfig) -> dict[str, Any] | None:
    if c.mlp not in GPT2_ACT or c.pos_emb != "learned":
        return None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_positions": c.max_seq_len,
        "n_embd": c.d_model,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.d_ff,
        "activation_function": GPT2_ACT[c.mlp],
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "initializer_range": c.init_std,
        **_common(c),
    }


def _rope_config(c: DecoderConfig, arch: Arch) -> dict[str, Any] | None:
    """The config.json of family `arch` for `c`, in the layout every transformers version reads (rope_theta and
    rope_scaling at the top; transformers 5 reads it and writes rope_parameters)."""
    if c.pos_emb != "rope" or c.mlp not in ("swiglu", "geglu"):
        return None
    d: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "hidden_act": "silu" if c.mlp == "swiglu" else "gelu_pytorch_tanh",
        "attention_bias": c.bias,
        "mlp_bias": c.bias,
        "attention_dropout": c.dropout,
        "initializer_range": c.init_std,
        **_common(c),
    }
    if c.rope_scaling:
        scaling = dict(c.rope_scaling)
        if arch.model_type == "phi3" and "original_max_position_embeddings" in scaling:
            d["original_max_position_embeddings"] = scaling.pop("original_max_position_embeddings")
        d["rope_scaling"] = scaling
    if c.rope_partial != 1.0:
        d["partial_rotary_factor"] = c.rope_partial
    if arch.model_type in GEMMAS:
        d["hidden_activation"] = d["hidden_act"]
        d["query_pre_attn_scalar"] = round(c.attn_scale**-2) if c.attn_scale else c.head_dim
        d["final_logit_softcapping"] = c.final_softcap
        d["attn_logit_softcapping"] = c.attn_softcap
    if c.rope_local_theta is not None:
        d["rope_local_base_freq"] = c.rope_local_theta
    if c.no_rope_layers is not None:
        d["no_rope_layers"] = [int(i not in c.no_rope_layers) for i in range(c.n_layer)]
    if c.sliding_window is not None:
        d["sliding_window"] = c.sliding_window
        if arch.window == "layers":
            d["use_sliding_window"] = True
            d["layer_types"] = c.layer_types or ["sliding_attention"] * c.n_layer
            d["max_window_layers"] = 0
    elif arch.window != "none" or arch.model_type in GEMMAS:
        d["sliding_window"] = None
        d["use_sliding_window"] = False
        if arch.window == "layers":
            d["layer_types"] = ["full_attention"] * c.n_layer
    return d


def config_from_hf(d: dict[str, Any], where: str = "config.json") -> DecoderConfig:
    mt = d.get("model_type")
    try:
        if mt == NATIVE_TYPE:
            return DecoderConfig(**d["lmforge"])
        if mt == "gpt2":
            act = {v: k for k, v in GPT2_ACT.items()}.get(d.get("activation_function", "gelu_new"), "gelu_tanh")
            return DecoderConfig(
                vocab_size=d["vocab_size"],
                n_layer=d["n_layer"],
                n_head=d["n_head"],
                d_model=d["n_embd"],
                d_ff=d.get("n_inner") or 4 * d["n_embd"],
                max_seq_len=d["n_positions"],
                pos_emb="learned",
                norm="layernorm",
                norm_eps=d.get("layer_norm_epsilon", 1e-5),
                mlp=act,
                bias=True,
                tie_embeddings=d.get("tie_word_embeddings", True),
                init_std=d.get("initializer_range", 0.02),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                arch="gpt2",
            )
        if mt in ARCHS:
            return _rope_family(d, ARCHS[mt], where)
    except KeyError as e:
        raise ModelLoadError(f"{where}: missing key {e.args[0]!r} for model_type {mt!r}") from None
    except TypeError as e:
        raise ModelLoadError(f"{where}: invalid config ({e})") from None
    raise ModelLoadError(
        f"{where}: model_type {mt!r} is not a decoder; decoder types: {', '.join(FAMILIES['decoder'].hf_model_types)}"
    )


def _rope_family(d: dict[str, Any], arch: Arch, where: str) -> DecoderConfig:
    mt, gemma = arch.model_type, arch.model_type in GEMMAS
    act = d.get("hidden_activation") or d.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if mt != "qwen2" and d.get("attention_bias", False) != d.get("mlp_bias", False):
        raise ModelLoadError(f"{where}: attention_bias != mlp_bias is not supported")
    if act not in GATED_ACT:
        raise ModelLoadError(f"{where}: hidden_act {act!r} is not supported ({', '.join(GATED_ACT)})")
    n_head, n_layer, width = d["num_attention_heads"], d["num_hidden_layers"], d["hidden_size"]
    head_dim = d.get("head_dim") or width // n_head
    context = d.get("max_position_embeddings", 2048)
    theta, scaling, partial, local_theta = _rope(d, arch, context)
    window, layer_types = _windows(d, arch, n_layer)
    no_rope = None
    if mt == "smollm3":
        flags = d.get("no_rope_layers") or [
            int((i + 1) % d.get("no_rope_layer_interval", 4) != 0) for i in range(n_layer)
        ]
        no_rope = [i for i, use in enumerate(flags) if not use]
    cfg = dict(
        vocab_size=d["vocab_size"],
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=d.get("num_key_value_heads") or n_head,
        d_model=width,
        head_dim=head_dim,
        d_ff=d["intermediate_size"],
        max_seq_len=context,
        pos_emb="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        rope_partial=partial,
        rope_local_theta=local_theta,
        sliding_window=window,
        layer_types=layer_types,
        no_rope_layers=no_rope,
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        mlp=GATED_ACT[act],
        bias=bool(d.get("attention_bias", False)),
        qkv_bias=bool(d.get("attention_bias", False)),
        tie_embeddings=d.get("tie_word_embeddings", gemma),
        init_std=d.get("initializer_range", 0.02),
        bos_token_id=_first(d.get("bos_token_id")),
        eos_token_id=_first(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
        arch=mt,
    )
    if gemma:
        cfg.update(embed_scale=width**0.5, attn_scale=d.get("query_pre_attn_scalar", head_dim) ** -0.5)
        if mt != "gemma":
            cfg.update(attn_softcap=d.get("attn_logit_softcapping"), final_softcap=d.get("final_logit_softcapping"))
    cfg.update(arch.fixed)
    return DecoderConfig(**cfg)


def _rope(d: dict[str, Any], arch: Arch, context: int) -> tuple[float, dict | None, float, float | None]:
    """(theta, scaling, partial, local theta) from either layout: transformers 5's `rope_parameters` (a dict, or
    one per layer type for Gemma 3) or the older top-level rope_theta / rope_scaling / partial_rotary_factor."""
    params = d.get("rope_parameters") or {}
    local = None
    if "full_attention" in params or "sliding_attention" in params:  # one per layer type (Gemma 3)
        local = (params.get("sliding_attention") or {}).get("rope_theta")
        params = params.get("full_attention") or {}
    theta = params.get("rope_theta", d.get("rope_theta", arch.default_theta))
    if arch.model_type == "gemma3_text" and local is None:
        local = d.get("rope_local_base_freq", 10000.0)
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") == "default":
        scaling = dict(d.get("rope_scaling") or {})
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        scaling["rope_type"] = scaling.pop("type", None) or scaling["rope_type"]
        if scaling["rope_type"] in ("longrope", "yarn", "llama3") and d.get("original_max_position_embeddings"):
            scaling.setdefault("original_max_position_embeddings", d["original_max_position_embeddings"])
    else:
        scaling = None
    return float(theta), scaling, float(partial), None if local is None else float(local)


def _windows(d: dict[str, Any], arch: Arch, n_layer: int) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types): every layer windowed (Mistral, Phi-3), or the layers `layer_types` names
    (transformers 5 writes it for each family with windows), or, in older files, each family's own switches."""
    window, mt = d.get("sliding_window"), arch.model_type
    if arch.window == "none" or not window:
        return None, None
    if mt in ("qwen2", "qwen3", "smollm3") and not d.get("use_sliding_window", False):
        return None, None
    if arch.window == "all":
        return window, None
    types = d.get("layer_types")
    if types is None:
        if mt in ("qwen2", "qwen3"):
            first = d.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]
        elif mt == "smollm3":
            return None, None  # (its windows come with per-layer types only)
        else:  # Gemma 2: every other layer; Gemma 3: five in six
            every = 2 if mt == "gemma2" else d.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layer)]
    if "sliding_attention" not in types:
        return None, None
    return window, None if all(t == "sliding_attention" for t in types) else list(types)


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, list) and x else x


# --------------------------------------------------------------------------------------------------------------
# tensor name tables


def tensor_rows(c: DecoderConfig, model_type: str) -> list[Row]:
    rows: list[Row] = []
    if model_type == "gpt2":
        rows += [
            ("transformer.wte.weight", ["tok_emb.weight"], "linear"),
            ("transformer.wpe.weight", ["pos_emb.weight"], "linear"),
        ]
        for i in range(c.n_layer):
            h, b = f"transformer.h.{i}", f"blocks.{i}"
            for p in ("weight", "bias"):
                layout = "conv1d" if p == "weight" else "linear"
                rows += [
                    (f"{h}.ln_1.{p}", [f"{b}.attn_norm.{p}"], "linear"),
                    (f"{h}.attn.c_attn.{p}", [f"{b}.attn.{n}_proj.{p}" for n in "qkv"], layout),
                    (f"{h}.attn.c_proj.{p}", [f"{b}.attn.o_proj.{p}"], layout),
                    (f"{h}.ln_2.{p}", [f"{b}.mlp_norm.{p}"], "linear"),
                    (f"{h}.mlp.c_fc.{p}", [f"{b}.mlp.up.{p}"], layout),
                    (f"{h}.mlp.c_proj.{p}", [f"{b}.mlp.down.{p}"], layout),
                ]
        rows += [
            ("transformer.ln_f.weight", ["norm.weight"], "linear"),
            ("transformer.ln_f.bias", ["norm.bias"], "linear"),
        ]
    elif model_type in ARCHS:
        arch = ARCHS[model_type]
        norms = {
            "pre": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"},
            "post": {"post_attention_layernorm": "attn_post_norm", "post_feedforward_layernorm": "mlp_post_norm"},
            "sandwich": {
                "input_layernorm": "attn_norm",
                "post_attention_layernorm": "attn_post_norm",
                "pre_feedforward_layernorm": "mlp_norm",
                "post_feedforward_layernorm": "mlp_post_norm",
            },
        }[c.norm_layout]
        rows.append(("model.embed_tokens.weight", ["tok_emb.weight"], "linear"))
        for i in range(c.n_layer):
            h, b = f"model.layers.{i}", f"blocks.{i}"
            rows += [(f"{h}.{theirs}.weight", [f"{b}.{ours}.weight"], "linear") for theirs, ours in norms.items()]
            if c.qk_norm:
                rows += [(f"{h}.self_attn.{n}_norm.weight", [f"{b}.attn.{n}_norm.weight"], "linear") for n in "qk"]
            if arch.fused:  # Phi-3: q, k and v as one tensor, gate and up as another
                rows += [
                    (f"{h}.self_attn.qkv_proj.weight", [f"{b}.attn.{n}_proj.weight" for n in "qkv"], "linear"),
                    (f"{h}.self_attn.o_proj.weight", [f"{b}.attn.o_proj.weight"], "linear"),
                    (f"{h}.mlp.gate_up_proj.weight", [f"{b}.mlp.gate.weight", f"{b}.mlp.up.weight"], "linear"),
                    (f"{h}.mlp.down_proj.weight", [f"{b}.mlp.down.weight"], "linear"),
                ]
                continue
            for n in "qkvo":
                for p in ("weight", "bias") if (c.qkv_bias if n != "o" else c.bias) else ("weight",):
                    rows.append((f"{h}.self_attn.{n}_proj.{p}", [f"{b}.attn.{n}_proj.{p}"], "linear"))
            for n in ("gate", "up", "down"):
                for p in ("weight", "bias") if c.bias else ("weight",):
                    rows.append((f"{h}.mlp.{n}_proj.{p}", [f"{b}.mlp.{n}.{p}"], "linear"))
        rows.append(("model.norm.weight", ["norm.weight"], "linear"))
    else:
        return []  # native: names are lmforge's own
    if not c.tie_embeddings:
        rows.append(("lm_head.weight", ["lm_head.weight"], "linear"))
    return rows


def to_hf_state(model: torch.nn.Module, model_type: str) -> dict[str, torch.Tensor]:
    ours = plain_state_dict(model)
    rows = tensor_rows(model.config, model_type)
    if not rows:
        out = {k: v for k, v in ours.items() if not (model.config.tie_embeddings and k == "lm_head.weight")}
    else:
        out = {}
        for hf_name, names, layout in rows:
            t = torch.cat([ours[n] for n in names], dim=0)
            out[hf_name] = t.t() if layout == "conv1d" and t.dim() == 2 else t
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def from_hf_state(
    model: torch.nn.Module, hf: dict[str, torch.Tensor], model_type: str, where: str
) -> dict[str, torch.Tensor]:
    ours = model.state_dict()
    if model_type == "gpt2":  # original OpenAI-converted files have no "transformer." prefix
        hf = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in hf.items()}
    rows = tensor_rows(model.config, model_type)
    if not rows:
        rows = [(k, [k], "linear") for k in ours if not (model.config.tie_embeddings and k == "lm_head.weight")]
    out: dict[str, torch.Tensor] = {}
    for hf_name, names, layout in rows:
        if hf_name not in hf:
            raise ModelLoadError(f"{where}: tensor {hf_name!r} is missing; the weights do not match config.json")
        t = hf[hf_name]
        if layout == "conv1d" and t.dim() == 2:
            t = t.t()
        sizes = [ours[n].shape[0] for n in names]
        if t.shape[0] != sum(sizes) or t.shape[1:] != ours[names[0]].shape[1:]:
            want = (sum(sizes), *ours[names[0]].shape[1:])
            raise ModelLoadError(
                f"{where}: tensor {hf_name!r} has shape {tuple(hf[hf_name].shape)}, config.json implies "
                f"{want}; the weights do not match the config"
            )
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()  # fp16/bf16 files compute in fp32 here (CPU kernels, oneDNN packing)
        for n, part in zip(names, torch.split(t, sizes, dim=0)):
            out[n] = part
    return out


# --------------------------------------------------------------------------------------------------------------
# directories


def save_model_dir(
    model: torch.nn.Module, path: str | Path, tokenizer: Any = None, generation_config: dict | None = None
) -> Path:
    """Write `model` (and its tokenizer) as an HF-layout directory, atomically."""
    path = check_output_dir(path)
    cfg = hf_config(model.config)
    state = to_hf_state(model, cfg["model_type"])
    with atomic_dir(path) as tmp:
        write_json(tmp / "config.json", cfg)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gen = {
            "bos_token_id": model.config.bos_token_id,
            "eos_token_id": model.config.eos_token_id,
            "pad_token_id": model.config.pad_token_id,
        }
        gen.update(generation_config or {})
        write_json(tmp / "generation_config.json", gen)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """A model directory is written only where it can be (not a file, not under a file, a place this process
    can write: `lmforge.files.check_out_dir`) and where nothing else would be replaced: a new or empty folder,
    or an earlier model (or adapter) directory."""
    path = check_out_dir(path, flag)
    earlier = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    if path.exists() and any(path.iterdir()) and not earlier:
        raise ModelLoadError(f"{flag} {path} exists and is not a model directory; choose a new or empty output folder")
    return path


def read_config(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    if not f.is_file():
        raise ModelLoadError(f"{path} is not a model directory: config.json is missing")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{f} is not valid JSON ({e}); repair it, or download or save the model again") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: model.safetensors, or the shards named in
    model.safetensors.index.json (each must exist)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [path / f for f in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index} is not a valid shard index ({e})") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shard {missing[0]} named in {index.name} is missing; download it again")
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelLoadError(
            f"{path} has only pickle weights (.bin/.pt); lmforge loads safetensors only "
            f"(convert with safetensors' convert script first)"
        )
    if single.exists():
        raise ModelLoadError(f"{single} is a folder, not a weights file; a model directory holds model.safetensors")
    raise ModelLoadError(
        f"{path} has no model.safetensors; a model directory needs its weights (download them, or save the model again)"
    )


def check_weights(path: Path) -> list[Path]:
    """Refuse, without reading any tensor, a model directory whose safetensors files are cut short or damaged:
    each file's 8-byte header length, its JSON header, and a size equal to what the header describes."""
    files = weight_files(path)
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if n > size - 8:
                    raise ValueError(f"a header of {n:,} bytes in a file of {size:,}")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ModelLoadError(
                f"{f} is truncated or corrupt (its header cannot be read: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); download or save it "
                "again"
            ) from None
        if size != 8 + n + end:
            raise ModelLoadError(
                f"{f} is truncated or corrupt: {size:,} bytes where its header describes "
                f"{8 + n + end:,}; download or save it again"
            )
    return files


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (see `weight_files`), each in 64-byte-aligned memory
    (`lmforge.nn.init.aligned`: safetensors packs tensors without padding)."""
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        try:
            tensors.update(aligned_state(load_file(str(f))))  # (see lmforge.nn.init.aligned)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(
                f"{f} is truncated or corrupt ({str(e).splitlines()[0]}); download or save it again"
            ) from None
    return tensors


def load_decoder_dir(
    path: Path, raw: dict[str, Any], tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A DecoderLM from an HF decoder directory's config and tensors (GPT-2, Llama, Mistral, Qwen2 or lmforge's)."""
    cfg = config_from_hf(raw, str(path / "config.json"))
    try:
        cfg.validate()
    except Exception as e:
        raise ModelLoadError(f"{path / 'config.json'}: {e}") from None
    with meta_init():
        model = DecoderLM(cfg)
    state = from_hf_state(model, tensors, raw["model_type"], str(path))
    return adopt_weights(model, state, str(path)).to(device).eval()
