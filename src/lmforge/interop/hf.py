"""Model directories in the Hugging Face layout: config.json + model.safetensors (or a sharded index) +
tokenizer.json + generation_config.json.

A decoder whose shape GPT-2 or Llama can express is written with those families' config keys and tensor names,
so `transformers` loads it as it is; any other shape is written with lmforge's own names (model_type
"lmforge-decoder"). Each family is a table of (HF name, lmforge names, layout) rows; nothing else differs.
"""

from __future__ import annotations

import json
import struct
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


def _fits_gpt2(c: DecoderConfig) -> bool:
    return (
        c.pos_emb == "learned"
        and c.norm == "layernorm"
        and c.bias
        and c.qkv_bias
        and c.mlp in ("gelu", "gelu_tanh", "relu")
        and c.n_kv_head == c.n_head
        and c.head_dim * c.n_head == c.d_model
    )


def _fits_llama(c: DecoderConfig) -> bool:
    return c.pos_emb == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu" and c.qkv_bias == c.bias


def _fits_qwen2(c: DecoderConfig) -> bool:
    return (
        c.pos_emb == "rope"
        and c.norm == "rmsnorm"
        and c.mlp == "swiglu"
        and c.qkv_bias
        and not c.bias
        and c.head_dim * c.n_head == c.d_model
    )


GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def hf_config(c: DecoderConfig) -> dict[str, Any]:
    common = {
        "vocab_size": c.vocab_size,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": "float32",
    }
    if _fits_gpt2(c):
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
            **common,
        }
    if _fits_llama(c):
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": c.d_model,
            "intermediate_size": c.d_ff,
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head,
            "head_dim": c.head_dim,
            "max_position_embeddings": c.max_seq_len,
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "hidden_act": "silu",
            "attention_bias": c.bias,
            "mlp_bias": c.bias,
            "attention_dropout": c.dropout,
            "initializer_range": c.init_std,
            **common,
        }
    if _fits_qwen2(c):
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": c.d_model,
            "intermediate_size": c.d_ff,
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head,
            "max_position_embeddings": c.max_seq_len,
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "hidden_act": "silu",
            "use_sliding_window": False,
            "attention_dropout": c.dropout,
            "initializer_range": c.init_std,
            **common,
        }
    return {"architectures": ["DecoderLM"], "model_type": NATIVE_TYPE, "lmforge": c.to_dict(), **common}


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
            )
        if mt in ("llama", "mistral", "qwen2"):
            if d.get("hidden_act", "silu") != "silu":
                raise ModelLoadError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
            if d.get("rope_scaling"):
                raise ModelLoadError(f"{where}: rope_scaling is not supported yet")
            if d.get("attention_bias", False) != d.get("mlp_bias", False):
                raise ModelLoadError(f"{where}: attention_bias != mlp_bias is not supported")
            if d.get("use_sliding_window") and d.get("sliding_window"):
                raise ModelLoadError(f"{where}: sliding-window attention is not supported yet")
            n_head = d["num_attention_heads"]
            max_len = d.get("max_position_embeddings", 2048)
            if mt == "mistral" and d.get("sliding_window"):
                # a window at least as long as the context changes nothing; within it we are exact
                max_len = min(max_len, d["sliding_window"])
            return DecoderConfig(
                vocab_size=d["vocab_size"],
                n_layer=d["num_hidden_layers"],
                n_head=n_head,
                n_kv_head=d.get("num_key_value_heads") or n_head,
                d_model=d["hidden_size"],
                head_dim=d.get("head_dim") or d["hidden_size"] // n_head,
                d_ff=d["intermediate_size"],
                max_seq_len=max_len,
                pos_emb="rope",
                rope_theta=float(d.get("rope_theta", 10000.0)),
                norm="rmsnorm",
                norm_eps=d.get("rms_norm_eps", 1e-6),
                mlp="swiglu",
                bias=bool(d.get("attention_bias", False)),
                qkv_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False)),
                tie_embeddings=d.get("tie_word_embeddings", False),
                init_std=d.get("initializer_range", 0.02),
                bos_token_id=_first(d.get("bos_token_id")),
                eos_token_id=_first(d.get("eos_token_id")),
                pad_token_id=d.get("pad_token_id"),
            )
    except KeyError as e:
        raise ModelLoadError(f"{where}: missing key {e.args[0]!r} for model_type {mt!r}") from None
    except TypeError as e:
        raise ModelLoadError(f"{where}: invalid config ({e})") from None
    raise ModelLoadError(
        f"{where}: model_type {mt!r} is not a decoder; decoder types: {', '.join(FAMILIES['decoder'].hf_model_types)}"
    )


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
    elif model_type in ("llama", "mistral", "qwen2"):
        rows.append(("model.embed_tokens.weight", ["tok_emb.weight"], "linear"))
        for i in range(c.n_layer):
            h, b = f"model.layers.{i}", f"blocks.{i}"
            rows += [
                (f"{h}.input_layernorm.weight", [f"{b}.attn_norm.weight"], "linear"),
                (f"{h}.post_attention_layernorm.weight", [f"{b}.mlp_norm.weight"], "linear"),
            ]
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
