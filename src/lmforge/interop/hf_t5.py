"""T5 model directories in the Hugging Face layout, both ways.

Writes `T5ForConditionalGeneration` directories (config.json with T5's keys, model.safetensors with T5's tensor
names) that transformers loads as they are, and reads them back, including ones transformers wrote. The shared
embedding is stored once as `shared.weight`; the copies some files also hold under `encoder.embed_tokens` /
`decoder.embed_tokens` are the same tensor and are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.config import Seq2SeqConfig
from lmforge.errors import ModelLoadError
from lmforge.files import atomic_dir, write_json
from lmforge.interop.hf import check_output_dir
from lmforge.interop.weights import adopt_weights, meta_init
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.nn.lora import plain_state_dict

# lmforge mlp kind <-> T5's feed_forward_proj
FF_PROJ = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "geglu": "gated-gelu"}


def hf_config(c: Seq2SeqConfig) -> dict[str, Any]:
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_kv": c.head_dim,
        "d_ff": c.d_ff,
        "num_layers": c.n_layer,
        "num_decoder_layers": c.n_decoder_layer,
        "num_heads": c.n_head,
        "relative_attention_num_buckets": c.rel_buckets,
        "relative_attention_max_distance": c.rel_max_distance,
        "dropout_rate": c.dropout,
        "layer_norm_epsilon": c.norm_eps,
        "initializer_factor": c.init_factor,
        "feed_forward_proj": FF_PROJ[c.mlp],
        "tie_word_embeddings": c.tie_embeddings,
        "n_positions": c.max_seq_len,
        "pad_token_id": c.pad_token_id,
        "eos_token_id": c.eos_token_id,
        "decoder_start_token_id": c.decoder_start_token_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def config_from_hf(d: dict[str, Any], where: str) -> Seq2SeqConfig:
    """transformers 5 always writes tie_word_embeddings: true for T5 and says whether the head's input is
    rescaled (T5 v1.0, tied) in scale_decoder_outputs; older files say it with tie_word_embeddings alone."""
    proj = d.get("feed_forward_proj", "relu")
    mlp = {v: k for k, v in FF_PROJ.items()}.get(proj)
    if mlp is None:
        raise ModelLoadError(f"{where}: feed_forward_proj {proj!r} is not supported ({', '.join(FF_PROJ.values())})")
    try:
        return Seq2SeqConfig(
            vocab_size=d["vocab_size"],
            d_model=d["d_model"],
            head_dim=d["d_kv"],
            d_ff=d["d_ff"],
            n_layer=d["num_layers"],
            n_decoder_layer=d.get("num_decoder_layers") or d["num_layers"],
            n_head=d["num_heads"],
            rel_buckets=d.get("relative_attention_num_buckets", 32),
            rel_max_distance=d.get("relative_attention_max_distance", 128),
            dropout=d.get("dropout_rate", 0.1),
            norm_eps=d.get("layer_norm_epsilon", 1e-6),
            init_factor=d.get("initializer_factor", 1.0),
            mlp=mlp,
            tie_embeddings=bool(d.get("scale_decoder_outputs", d.get("tie_word_embeddings", True))),
            max_seq_len=d.get("n_positions") or 512,
            pad_token_id=d.get("pad_token_id", 0),
            eos_token_id=d.get("eos_token_id", 1),
            decoder_start_token_id=d.get("decoder_start_token_id", 0),
        )
    except KeyError as e:
        raise ModelLoadError(f"{where}: missing key {e.args[0]!r} for model_type 't5'") from None


def tensor_rows(c: Seq2SeqConfig) -> list[tuple[str, str]]:
    """(HF name, lmforge name) for every stored tensor."""
    rows = [("shared.weight", "tok_emb.weight")]
    ff = (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down")) if c.gated else (("wi", "up"), ("wo", "down"))
    for side, n in (("encoder", c.n_layer), ("decoder", c.n_decoder_layer)):
        rows.append(
            (f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{side}.rel_bias.bias.weight")
        )
        for i in range(n):
            h, b = f"{side}.block.{i}.layer", f"{side}.blocks.{i}"
            sub = [("0", "SelfAttention", "attn", "attn_norm")]
            if side == "decoder":
                sub.append(("1", "EncDecAttention", "cross_attn", "cross_norm"))
            for idx, hf_attn, ours, norm in sub:
                rows.append((f"{h}.{idx}.layer_norm.weight", f"{b}.{norm}.weight"))
                rows += [(f"{h}.{idx}.{hf_attn}.{p}.weight", f"{b}.{ours}.{p}_proj.weight") for p in "qkvo"]
            mlp = "2" if side == "decoder" else "1"
            rows.append((f"{h}.{mlp}.layer_norm.weight", f"{b}.mlp_norm.weight"))
            rows += [(f"{h}.{mlp}.DenseReluDense.{hf}.weight", f"{b}.mlp.{ours}.weight") for hf, ours in ff]
        rows.append((f"{side}.final_layer_norm.weight", f"{side}.norm.weight"))
    if not c.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head.weight"))
    return rows


def save_seq2seq_dir(
    model: torch.nn.Module, path: str | Path, tokenizer: Any = None, generation_config: dict | None = None
) -> Path:
    """Write `model` (and its tokenizer) as a T5ForConditionalGeneration directory, atomically."""
    path = check_output_dir(path)
    c = model.config
    ours = plain_state_dict(model)
    state = {hf: ours[name].detach().contiguous().cpu() for hf, name in tensor_rows(c)}
    with atomic_dir(path) as tmp:
        write_json(tmp / "config.json", hf_config(c))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gen = {
            "decoder_start_token_id": c.decoder_start_token_id,
            "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
        }
        gen.update(generation_config or {})
        write_json(tmp / "generation_config.json", gen)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def load_seq2seq_dir(
    path: Path, raw: dict[str, Any], tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> torch.nn.Module:
    where = str(path / "config.json")
    cfg = config_from_hf(raw, where)
    try:
        cfg.validate()
    except Exception as e:
        raise ModelLoadError(f"{where}: {e}") from None
    with meta_init():
        model = Seq2SeqLM(cfg)
    ours = model.state_dict()
    state = {}
    for hf, name in tensor_rows(cfg):
        t = tensors.get(hf)
        if t is None and hf == "shared.weight":  # some exports keep only the per-stack copies
            t = tensors.get("encoder.embed_tokens.weight")
        if t is None and hf == "lm_head.weight":  # an unscaled head that shares the embedding (no own tensor)
            t = state["tok_emb.weight"].clone()
        if t is None:
            raise ModelLoadError(f"{path}: tensor {hf!r} is missing; the weights do not match config.json")
        if tuple(t.shape) != tuple(ours[name].shape):
            raise ModelLoadError(
                f"{path}: tensor {hf!r} has shape {tuple(t.shape)}, config.json implies "
                f"{tuple(ours[name].shape)}; the weights do not match the config"
            )
        state[name] = t.float() if t.is_floating_point() and t.dtype != torch.float32 else t
    head = tensors.get("lm_head.weight")
    if cfg.tie_embeddings and head is not None and not torch.equal(head, state["tok_emb.weight"]):
        raise ModelLoadError(f"{path}: a rescaled (T5 v1.0) head with its own lm_head.weight is not supported")
    return adopt_weights(model, state, str(path)).to(device).eval()
