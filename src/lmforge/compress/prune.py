"""Pruning: unstructured magnitude pruning, and structured pruning of attention heads or MLP neurons.

Unstructured: in every Linear of the Transformer blocks, the given share of weights with the smallest |w| is set
to zero (per layer, so every layer keeps the same density). The model keeps its shape; dense kernels do the same
work, so this buys size only once stored sparse, and is here to measure how much a model tolerates.

Structured: the same share of attention heads (or MLP neurons) is removed from every block, so the model stays
one config and really gets smaller and faster. Importance is magnitude-based and needs no data:

    head (with grouped-query attention, a K/V head together with the query heads that share it):
        ||rows of W_v for the head|| * ||columns of W_o that read it||
    neuron j:  ||row j of W_up (and W_gate)|| * ||column j of W_down||

i.e. how much the unit can carry from its input to the residual stream. A short recovery fine-tuning (see
`recover`) wins back part of what pruning loses; under unstructured pruning the zeros stay zero (the masks are
applied again after every step).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.data.corpus import read_documents
from lmforge.data.labelled import read_labelled
from lmforge.errors import LmforgeError
from lmforge.models.decoder import DecoderLM
from lmforge.predict import pad_batch

STRUCTURES = ("heads", "neurons")


def _check_fraction(value: float, what: str) -> None:
    if not 0.0 < value < 1.0:
        raise LmforgeError(f"{what} must be between 0 and 1 (exclusive), got {value}")


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("blocks.")]


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the `sparsity` share of smallest-magnitude weights in each block Linear; returns the keep-masks."""
    _check_fraction(sparsity, "sparsity")
    masks = {}
    for name, m in block_linears(model):
        w = m.weight
        k = int(sparsity * w.numel())
        if k == 0:
            continue
        drop = torch.topk(w.abs().flatten(), k, largest=False).indices
        mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        mask[drop] = False
        mask = mask.view_as(w)
        w.mul_(mask)
        masks[name] = mask
    return masks


def sparsity_of(model: nn.Module) -> float:
    """The share of exactly-zero weights over the block Linears."""
    zeros = total = 0
    for _, m in block_linears(model):
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / max(total, 1)


def _rows(lin: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(keep), bias=lin.bias is not None, device=lin.weight.device)
    new.weight.copy_(lin.weight[keep])
    if lin.bias is not None:
        new.bias.copy_(lin.bias[keep])
    return new


def _cols(lin: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(keep), lin.out_features, bias=lin.bias is not None, device=lin.weight.device)
    new.weight.copy_(lin.weight[:, keep])
    if lin.bias is not None:
        new.bias.copy_(lin.bias)
    return new


@torch.no_grad()
def prune_heads(model: nn.Module, fraction: float) -> dict:
    """Remove the least important `fraction` of attention heads (K/V groups under GQA) from every block."""
    _check_fraction(fraction, "the fraction of heads to prune")
    cfg = model.config
    n_kv = getattr(cfg, "n_kv_head", None) or cfg.n_head
    rep = cfg.n_head // n_kv
    keep_groups = max(1, round(n_kv * (1 - fraction)))
    if keep_groups == n_kv:
        raise LmforgeError(f"pruning {fraction:.0%} of {n_kv} head groups removes none; raise the fraction")
    D = cfg.head_dim
    for block in model.blocks:
        a = block.attn
        wv = a.v_proj.weight.view(n_kv, D, -1)
        wo = a.o_proj.weight.view(a.o_proj.out_features, n_kv, rep * D)
        score = wv.flatten(1).norm(dim=1) * wo.transpose(0, 1).flatten(1).norm(dim=1)
        groups = torch.topk(score, keep_groups).indices.sort().values
        kv_rows = (groups[:, None] * D + torch.arange(D)).flatten()
        q_heads = (groups[:, None] * rep + torch.arange(rep)).flatten()
        q_rows = (q_heads[:, None] * D + torch.arange(D)).flatten()
        a.q_proj, a.o_proj = _rows(a.q_proj, q_rows), _cols(a.o_proj, q_rows)
        a.k_proj, a.v_proj = _rows(a.k_proj, kv_rows), _rows(a.v_proj, kv_rows)
        a.n_head, a.n_kv_head = keep_groups * rep, keep_groups
    before = cfg.n_head
    cfg.n_head = keep_groups * rep
    if hasattr(cfg, "n_kv_head"):
        cfg.n_kv_head = keep_groups
    return {"heads_before": before, "heads_after": cfg.n_head}


@torch.no_grad()
def prune_neurons(model: nn.Module, fraction: float) -> dict:
    """Remove the least important `fraction` of MLP hidden units from every block."""
    _check_fraction(fraction, "the fraction of neurons to prune")
    cfg = model.config
    keep_n = max(1, round(cfg.d_ff * (1 - fraction)))
    for block in model.blocks:
        mlp = block.mlp
        score = mlp.up.weight.norm(dim=1) * mlp.down.weight.norm(dim=0)
        if mlp.gated:
            score = score * mlp.gate.weight.norm(dim=1)
        keep = torch.topk(score, keep_n).indices.sort().values
        mlp.up, mlp.down = _rows(mlp.up, keep), _cols(mlp.down, keep)
        if mlp.gated:
            mlp.gate = _rows(mlp.gate, keep)
    before, cfg.d_ff = cfg.d_ff, keep_n
    return {"d_ff_before": before, "d_ff_after": keep_n}


def check_args(sparsity: float | None, structure: str | None, fraction: float | None) -> None:
    if (sparsity is None) == (structure is None):
        raise LmforgeError("prune needs either --sparsity S (magnitude) or --structured heads|neurons --fraction F")
    if structure is not None:
        if structure not in STRUCTURES:
            raise LmforgeError(f"--structured must be one of {', '.join(STRUCTURES)}, got {structure!r}")
        if fraction is None:
            raise LmforgeError("structured pruning needs --fraction F (the share of heads or neurons to remove)")
        _check_fraction(fraction, "the fraction of heads or neurons to prune")
    else:
        if fraction is not None:
            raise LmforgeError(
                "--fraction is the share of heads or neurons --structured removes; magnitude pruning "
                "(--sparsity) takes none: drop it, or prune with --structured heads|neurons"
            )
        _check_fraction(sparsity, "sparsity")


def prune_model(
    model: nn.Module, sparsity: float | None = None, structure: str | None = None, fraction: float | None = None
) -> dict:
    """One entry point: magnitude pruning to `sparsity`, or structured pruning of `fraction` of the heads or
    neurons. Returns what changed (and the masks of magnitude pruning, under "masks")."""
    check_args(sparsity, structure, fraction)
    if structure is not None:
        info = prune_heads(model, fraction) if structure == "heads" else prune_neurons(model, fraction)
        info["masks"] = {}
        return info
    masks = magnitude_prune(model, sparsity)
    return {"sparsity": sparsity_of(model), "masks": masks}


def recover(
    model: nn.Module,
    tokenizer,
    data: str,
    steps: int,
    masks: dict[str, torch.Tensor] | None = None,
    lr: float = 5e-5,
    batch_size: int = 8,
    seq_len: int = 256,
    seed: int = 0,
    text_col: str | None = None,
    label_col: str | None = None,
) -> list[float]:
    """A short recovery fine-tuning after pruning: causal LM on text files for a decoder, the classification
    loss on a labelled file for an encoder classifier. Pruned weights stay zero. Returns the losses."""
    if steps < 1:
        raise LmforgeError(f"recovery steps must be positive, got {steps}")
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    if isinstance(model, DecoderLM):
        ids = torch.tensor([t for doc in read_documents([data]) for t in tokenizer.encode(doc.text)])
        seq_len = min(seq_len, model.config.max_seq_len - 1)
        if len(ids) <= seq_len + 1:
            raise LmforgeError(f"{data}: too little text for recovery ({len(ids)} tokens; need > {seq_len + 1})")

        def batch():
            starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=g)
            rows = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()]).to(dev)
            return model(rows[:, :-1], labels=rows[:, 1:], loss_only=True).loss
    else:
        if getattr(model.config, "head", None) != "classify":
            raise LmforgeError("recovery fine-tuning supports decoders (text) and encoder classifiers (labels)")
        ds = read_labelled(data, text_col, label_col)
        index = {name: i for i, name in enumerate(model.config.labels)}
        unknown = sorted(set(ds.labels) - set(index))
        if unknown:
            raise LmforgeError(f"{data}: labels {unknown[:3]} are not the model's ({', '.join(index)})")
        enc = tokenizer.encode_for_encoder(ds.texts, max_len=model.config.max_seq_len)

        def batch():
            pick = torch.randint(0, len(ds.texts), (batch_size,), generator=g).tolist()
            b = pad_batch([enc[i].ids for i in pick], tokenizer.pad_id)
            y = torch.tensor([index[ds.labels[i]] for i in pick])
            return model(
                b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev), labels=y.to(dev), loss_only=True
            ).loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    named = dict(model.named_modules())
    losses = []
    model.train()
    for _ in range(steps):
        loss = batch()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for name, mask in (masks or {}).items():
                named[name].weight.mul_(mask)
        losses.append(float(loss.detach()))
    model.eval()
    return losses
