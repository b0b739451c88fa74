"""Model merging: one model out of several fine-tuned from the same base, at the cost of one.

    uniform           the mean of the weights (a "model soup"; Wortsman et al. 2022), or a weighted mean
    greedy            the greedy soup: the parents in order of their score on validation data, each added to the
                      soup only if the soup's score does not fall
    task-arithmetic   base + scale * sum_i w_i (parent_i - base) (Ilharco et al. 2023): task vectors added
    ties              TIES-merging (Yadav et al. 2023): each task vector trimmed to its `density` largest
                      entries (by magnitude, per tensor), a sign elected per entry (the sign of the trimmed
                      vectors' sum), the mean of the entries that agree with it; base + scale * that

The parents are model directories of one architecture (the same parameter names and shapes; classifiers with
the same labels in the same order), or LoRA adapters (PEFT layout) of one base, each folded into the base first.
Parameters the base does not have (a classifier's head, added by fine-tuning) are averaged, with the weights, in
every method. The merged model is written as a model directory like any other, with `merge.json`: the method, the
parents, what greedy kept, and each model's size and quality on the evaluation data (perplexity for a decoder,
accuracy for a classifier: lmforge.compress.measure).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.compress.measure import measure
from lmforge.errors import LmforgeError
from lmforge.files import write_json
from lmforge.interop import load_pretrained
from lmforge.interop.hf import check_output_dir
from lmforge.interop.peft import load_adapter
from lmforge.nn.lora import merge_and_unload

METHODS = ("uniform", "greedy", "task-arithmetic", "ties")
NEEDS_BASE = ("task-arithmetic", "ties")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_parent(path: str | Path, base: str | Path | None, device: str = "cpu") -> tuple[nn.Module, Any]:
    """A parent as a model: a model directory (or anything load_pretrained reads), or an adapter folded into its
    base (`base`, else the base its adapter_config.json names)."""
    if not is_adapter(path):
        return load_pretrained(path, device=device)
    base = base or json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise LmforgeError(f"{path} is a LoRA adapter that names no base model; give --base")
    m, tok = load_pretrained(base, device=device)
    load_adapter(m, path)
    return merge_and_unload(m), tok


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    # (a copy: the first parent's own tensors are overwritten by the merge, and .float() of fp32 is no copy)
    return {k: v.detach().to(torch.float32, copy=True) for k, v in m.state_dict().items() if v.is_floating_point()}


def _shapes(m: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in m.state_dict().items() if v.is_floating_point()}


def _check_alike(names: list[str], models: list[nn.Module]) -> None:
    first, labels = _shapes(models[0]), getattr(models[0].config, "labels", None)
    for name, m in zip(names[1:], models[1:]):
        s = _shapes(m)
        if type(m) is not type(models[0]) or s.keys() != first.keys():
            raise LmforgeError(f"{name} is not the same architecture as {names[0]}: merging needs one architecture")
        bad = next((k for k in s if s[k] != first[k]), None)
        if bad:
            raise LmforgeError(f"{name} and {names[0]} differ in {bad} ({tuple(s[bad])} vs {tuple(first[bad])})")
        if getattr(m.config, "labels", None) != labels:
            raise LmforgeError(
                f"{name}'s labels {getattr(m.config, 'labels', None)} are not {names[0]}'s {labels} (in order): "
                f"only classifiers with the same labels merge"
            )


def merge_states(
    states: list[dict[str, torch.Tensor]],
    method: str = "uniform",
    base: dict[str, torch.Tensor] | None = None,
    weights: list[float] | None = None,
    scale: float = 1.0,
    density: float = 0.2,
) -> dict[str, torch.Tensor]:
    """The merged parameters of `states` (fp32 tensors, one name set) by `method` (uniform, task-arithmetic or
    ties; greedy is uniform over the parents it picks). `weights` default to 1 each; uniform normalises them."""
    if method not in ("uniform", "task-arithmetic", "ties"):
        raise LmforgeError(f"merge method {method!r}; choose one of uniform, task-arithmetic, ties")
    w = torch.tensor(weights if weights is not None else [1.0] * len(states), dtype=torch.float32)
    if len(w) != len(states):
        raise LmforgeError(f"{len(w)} weights for {len(states)} models")
    mean_w = w / w.sum()
    out = {}
    for k in states[0]:
        x = torch.stack([s[k] for s in states])  # [N, ...]
        shape = (-1,) + (1,) * (x.dim() - 1)
        if method == "uniform" or base is None or k not in base:
            out[k] = (x * mean_w.view(shape)).sum(0)
            continue
        tau = x - base[k]
        if method == "task-arithmetic":
            out[k] = base[k] + scale * (tau * w.view(shape)).sum(0)
            continue
        flat = tau.reshape(len(states), -1)  # ties: trim, elect, disjoint mean
        keep = max(1, int(round(density * flat.size(1))))
        cut = flat.abs().kthvalue(flat.size(1) - keep + 1, dim=1, keepdim=True).values
        trimmed = torch.where(flat.abs() >= cut, flat, 0.0) * w.view(-1, 1)
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[k] = base[k] + scale * merged.view_as(base[k])
    return out


def _apply(model: nn.Module, merged: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in merged:
                v.copy_(merged[k].to(v.dtype))


def merge(
    models: list[str],
    out: str | Path,
    method: str = "uniform",
    base: str | None = None,
    weights: list[float] | None = None,
    scale: float = 1.0,
    density: float = 0.2,
    val_data: str | None = None,
    eval_data: list[str] | str | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    say=print,
    device: str = "cpu",
) -> dict:
    """Merge `models` (model directories or LoRA adapters of one base) by `method` into the model directory `out`
    (see the module notes). greedy picks on `val_data` (a labelled file for classifiers, text for decoders);
    `eval_data` measures every parent and the merged model the same way (lmforge.compress.measure). device: where
    the models are loaded, merged and measured."""
    if method not in METHODS:
        raise LmforgeError(f"merge method {method!r} is not known; choose one of {', '.join(METHODS)}")
    if len(models) < 2:
        raise LmforgeError(f"merging needs two models or more, got {len(models)}")
    if method in NEEDS_BASE and base is None:
        raise LmforgeError(
            f"--method {method} adds task vectors to a base: give --base (the model they were tuned from)"
        )
    if method == "greedy" and not val_data:
        raise LmforgeError("--method greedy picks its parents on validation data: give --val-data")
    if method not in NEEDS_BASE and (scale != 1.0 or density != 0.2):
        raise LmforgeError(f"--scale and --density apply to task-arithmetic and ties, not {method}")
    if method == "task-arithmetic" and density != 0.2:
        raise LmforgeError("--density applies to ties (task-arithmetic adds whole task vectors): drop it")
    if val_data and method != "greedy":
        raise LmforgeError(f"--val-data is what greedy picks its parents on; --method {method} does not use it")
    if base is not None and method not in NEEDS_BASE and not any(is_adapter(p) for p in models):
        raise LmforgeError(
            f"--base applies to task-arithmetic, ties and LoRA adapters; --method {method} of model "
            f"directories does not use it: drop it"
        )
    if (text_col or label_col) and not (eval_data or val_data):
        raise LmforgeError("--text-col and --label-col name the columns of --eval-data / --val-data: give one")
    if not 0 < density <= 1:
        raise LmforgeError(f"--density must be in (0, 1], got {density}")
    if weights is not None and (len(weights) != len(models) or method == "greedy"):
        raise LmforgeError(
            f"--weights gives one weight per model ({len(models)})"
            + (", and greedy picks its own" if method == "greedy" else "")
        )
    check_output_dir(out)
    # one parent in memory at a time beside the first (which becomes the merged model), and every parent's weights
    merged_model, tok = load_parent(models[0], base, device)
    states, before, val_scores = [], [], []
    for i, path in enumerate(models):
        m = merged_model if i == 0 else load_parent(path, base, device)[0]
        if i:
            _check_alike([models[0], path], [merged_model, m])
        states.append(_state(m))
        before.append(measure(m, tok, eval_data, text_col, label_col))
        if method == "greedy":
            val_scores.append(_score(m, tok, val_data, text_col, label_col))
        del m
    base_state = None
    if method in NEEDS_BASE:
        base_model, _ = load_pretrained(base, device=device)
        base_state = _state(base_model)
        del base_model
    report: dict[str, Any] = {"method": method, "models": [str(p) for p in models], "base": base}
    if method == "greedy":
        scored = [(v, i) for i, v in enumerate(val_scores)]
        order = [i for _, i in sorted(scored, key=lambda t: -t[0])]
        soup, best = [order[0]], max(s for s, _ in scored)
        for i in order[1:]:
            _apply(merged_model, merge_states([states[j] for j in soup + [i]]))
            s = _score(merged_model, tok, val_data, text_col, label_col)
            say(f"greedy: with {models[i]}: {s:.4f} (soup so far {best:.4f})")
            if s >= best:
                soup, best = soup + [i], s
        report["kept"] = [str(models[i]) for i in soup]
        report["val_scores"] = {str(models[i]): s for s, i in scored}
        merged = merge_states([states[j] for j in soup])
    else:
        merged = merge_states(states, method, base_state, weights, scale, density)
        report.update(weights=weights, scale=scale if method in NEEDS_BASE else None)
        report["density"] = density if method == "ties" else None
    _apply(merged_model, merged)
    after = measure(merged_model, tok, eval_data, text_col, label_col)
    merged_model.save_pretrained(out, tokenizer=tok)
    report.update(parents=before, merged=after, out=str(out))
    write_json(Path(out) / "merge.json", report)
    say(scores_table(models, before, after, method))
    say(f"saved: {out}")
    return report


def scores_table(models: list[str], before: list[dict], after: dict, method: str) -> str:
    """Each parent's quality on the evaluation data and the merged model's (a note without evaluation data)."""
    if after.get("quality") is None:
        return f"merged {len(models)} models ({method}); give --eval-data to score them"
    name = after["quality_name"]
    width = max(len(str(m)) for m in models) + 2
    lines = [f"{'model':<{width}}{name:>14}"]
    lines += [f"{str(m):<{width}}{b['quality']:>14.3f}" for m, b in zip(models, before)]
    lines.append(f"{'merged (' + method + ')':<{width}}{after['quality']:>14.3f}")
    return "\n".join(lines)


def _goodness(m: dict) -> float:
    q = m.get("quality")
    if q is None:
        return 0.0
    return -q if m.get("quality_name") == "perplexity" else q


def _score(model: nn.Module, tok, data: str, text_col: str | None, label_col: str | None) -> float:
    """Higher is better: accuracy for a classifier, minus the perplexity for a decoder."""
    m = measure(model, tok, data, text_col, label_col)
    if m["quality"] is None:
        raise LmforgeError("--val-data gives no score for this model: a classifier's labelled file or a decoder's text")
    return _goodness(m)
