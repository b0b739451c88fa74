"""BERT model directories in the Hugging Face layout, both ways.

Reads `model_type: bert` directories with or without the `bert.` prefix on the body's tensors (a saved BertModel,
like all-MiniLM-L6-v2, has none; BertFor* models have it) and writes directories that transformers loads as the
BertFor* class matching the head, with `id2label` / `label2id` for a classifier.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.config import EncoderConfig
from lmforge.errors import ModelLoadError
from lmforge.files import atomic_dir, write_json
from lmforge.interop.hf import check_output_dir
from lmforge.interop.weights import adopt_weights, meta_init
from lmforge.models.encoder import Encoder
from lmforge.nn.lora import plain_state_dict

ARCHITECTURES = {
    "none": "BertModel",
    "mlm": "BertForMaskedLM",
    "pretrain": "BertForPreTraining",
    "classify": "BertForSequenceClassification",
    "qa": "BertForQuestionAnswering",
}
HEAD_OF = {v: k for k, v in ARCHITECTURES.items()}
ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def hf_config(c: EncoderConfig) -> dict[str, Any]:
    d = {
        "architectures": [ARCHITECTURES[c.head]],
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "intermediate_size": c.d_ff,
        "hidden_act": ACT[c.mlp],
        "max_position_embeddings": c.max_seq_len,
        "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.norm_eps,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.attn_dropout,
        "initializer_range": c.init_std,
        "pad_token_id": c.pad_token_id,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }
    if c.head_dim * c.n_head != c.d_model:  # pruned heads: lmforge reads this; transformers' BERT cannot
        d["head_dim"] = c.head_dim
    if c.labels:
        d["id2label"] = {str(i): name for i, name in enumerate(c.labels)}
        d["label2id"] = {name: i for i, name in enumerate(c.labels)}
        d["problem_type"] = "single_label_classification"
    return d


def config_from_hf(d: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> EncoderConfig:
    arch = (d.get("architectures") or ["BertModel"])[0]
    head = HEAD_OF.get(arch, "none")
    act = {v: k for k, v in ACT.items()}.get(d.get("hidden_act", "gelu"))
    if act is None:
        raise ModelLoadError(f"{where}: hidden_act {d.get('hidden_act')!r} is not supported (gelu, gelu_new, relu)")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"{where}: position_embedding_type {d['position_embedding_type']!r} is not supported")
    labels: list[str] = []
    if head == "classify":
        id2label = d.get("id2label") or {}
        n = (
            d.get("num_labels")
            or len(id2label)
            or (tensors["classifier.weight"].shape[0] if tensors.get("classifier.weight") is not None else 2)
        )
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
    try:
        return EncoderConfig(
            vocab_size=d["vocab_size"],
            n_layer=d["num_hidden_layers"],
            n_head=d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            d_model=d["hidden_size"],
            d_ff=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 512),
            type_vocab_size=d.get("type_vocab_size", 2),
            norm_eps=d.get("layer_norm_eps", 1e-12),
            mlp=act,
            dropout=d.get("hidden_dropout_prob", 0.1),
            attn_dropout=d.get("attention_probs_dropout_prob", 0.1),
            init_std=d.get("initializer_range", 0.02),
            pad_token_id=d.get("pad_token_id", 0),
            pooler=any(k.endswith("pooler.dense.weight") for k in tensors),
            head=head,
            labels=labels,
        )
    except KeyError as e:
        raise ModelLoadError(f"{where}: missing key {e.args[0]!r} for model_type 'bert'") from None


def tensor_rows(c: EncoderConfig) -> list[tuple[str, str]]:
    """(HF name without the `bert.` prefix for body tensors, lmforge name)."""
    rows = [
        ("embeddings.word_embeddings.weight", "tok_emb.weight"),
        ("embeddings.position_embeddings.weight", "pos_emb.weight"),
        ("embeddings.token_type_embeddings.weight", "type_emb.weight"),
        ("embeddings.LayerNorm.weight", "emb_norm.weight"),
        ("embeddings.LayerNorm.bias", "emb_norm.bias"),
    ]
    for i in range(c.n_layer):
        h, b = f"encoder.layer.{i}", f"blocks.{i}"
        for p in ("weight", "bias"):
            rows += [
                (f"{h}.attention.self.query.{p}", f"{b}.attn.q_proj.{p}"),
                (f"{h}.attention.self.key.{p}", f"{b}.attn.k_proj.{p}"),
                (f"{h}.attention.self.value.{p}", f"{b}.attn.v_proj.{p}"),
                (f"{h}.attention.output.dense.{p}", f"{b}.attn.o_proj.{p}"),
                (f"{h}.attention.output.LayerNorm.{p}", f"{b}.attn_norm.{p}"),
                (f"{h}.intermediate.dense.{p}", f"{b}.mlp.up.{p}"),
                (f"{h}.output.dense.{p}", f"{b}.mlp.down.{p}"),
                (f"{h}.output.LayerNorm.{p}", f"{b}.mlp_norm.{p}"),
            ]
    return rows


HEAD_ROWS = {  # HF name (no prefix: heads sit beside `bert.`) -> lmforge name
    "mlm": [
        ("cls.predictions.transform.dense.weight", "mlm_head.dense.weight"),
        ("cls.predictions.transform.dense.bias", "mlm_head.dense.bias"),
        ("cls.predictions.transform.LayerNorm.weight", "mlm_head.norm.weight"),
        ("cls.predictions.transform.LayerNorm.bias", "mlm_head.norm.bias"),
        ("cls.predictions.bias", "mlm_head.bias"),
    ],
    "nsp": [("cls.seq_relationship.weight", "nsp_head.weight"), ("cls.seq_relationship.bias", "nsp_head.bias")],
    "classify": [("classifier.weight", "classifier.weight"), ("classifier.bias", "classifier.bias")],
    "qa": [("qa_outputs.weight", "qa_head.weight"), ("qa_outputs.bias", "qa_head.bias")],
}


def _head_rows(head: str) -> list[tuple[str, str]]:
    return {"mlm": HEAD_ROWS["mlm"], "pretrain": HEAD_ROWS["mlm"] + HEAD_ROWS["nsp"]}.get(head, HEAD_ROWS.get(head, []))


def name_rows(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(full HF tensor name, lmforge name) for every tensor of this model as the matching BertModel / BertFor*
    class names it."""
    c = model.config
    prefix = "" if c.head == "none" else "bert."  # what transformers' BertModel / BertFor* classes expect
    rows = [(prefix + hf, n) for hf, n in tensor_rows(c)]
    if model.pooler is not None:
        rows += [(prefix + "pooler.dense.weight", "pooler.weight"), (prefix + "pooler.dense.bias", "pooler.bias")]
    return rows + _head_rows(c.head)


def to_hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ours = plain_state_dict(model)
    return {hf: ours[n].detach().contiguous().cpu() for hf, n in name_rows(model)}


def from_hf_state(model: torch.nn.Module, hf: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    c = model.config
    # (older TF-converted checkpoints name LayerNorm parameters gamma / beta)
    body = {
        re.sub(
            r"LayerNorm\.gamma$",
            "LayerNorm.weight",
            re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k.removeprefix("bert.")),
        ): v
        for k, v in hf.items()
    }
    rows = tensor_rows(c) + _head_rows(c.head)
    if model.pooler is not None:
        rows += [("pooler.dense.weight", "pooler.weight"), ("pooler.dense.bias", "pooler.bias")]
    ours = model.state_dict()
    out = {}
    for hf_name, name in rows:
        if hf_name not in body:
            raise ModelLoadError(f"{where}: tensor {hf_name!r} is missing; the weights do not match config.json")
        t = body[hf_name]
        if t.shape != ours[name].shape:
            raise ModelLoadError(
                f"{where}: tensor {hf_name!r} has shape {tuple(t.shape)}, config.json implies {tuple(ours[name].shape)}"
            )
        out[name] = t.float() if t.is_floating_point() else t
    return out


def save_encoder_dir(model: torch.nn.Module, path: str | Path, tokenizer: Any = None) -> Path:
    path = check_output_dir(path)
    with atomic_dir(path) as tmp:
        write_json(tmp / "config.json", hf_config(model.config))
        save_file(to_hf_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp, model_max_length=model.config.max_seq_len)
    return path


def load_encoder_dir(
    path: Path, raw: dict[str, Any], tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> torch.nn.Module:
    cfg = config_from_hf(raw, tensors, str(path / "config.json"))
    try:
        cfg.validate()
    except Exception as e:
        raise ModelLoadError(f"{path / 'config.json'}: {e}") from None
    with meta_init():
        model = Encoder(cfg)
    return adopt_weights(model, from_hf_state(model, tensors, str(path)), str(path)).to(device).eval()
