"""Size, speed and quality of a model, measured the same way before and after compressing it.

size     bytes of the tensors a model directory stores (each shared tensor once), in MiB
speed    decoders: greedy tokens/s at batch 1 (32 new tokens after a warm-up);
         encoders: sequences/s over the evaluation texts (length-sorted batches of 64)
quality  decoders: perplexity on evaluation text (windows of 256, stride 128);
         classifiers: accuracy on a labelled file
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from lmforge.data.corpus import read_documents
from lmforge.data.labelled import read_labelled
from lmforge.errors import DataError
from lmforge.eval.lm import strided_nll
from lmforge.generate.sampling import SamplingParams, generate_ids
from lmforge.interop.quantized import quantized_state
from lmforge.models.decoder import DecoderLM
from lmforge.nn.packed import release_packed
from lmforge.predict import predict_proba


def size_mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in quantized_state(model).values()) / 2**20


@torch.inference_mode()
def decode_speed(model: DecoderLM, tokenizer, new_tokens: int = 32, prompt: str = "The history of the city") -> float:
    ids = [tokenizer.encode(prompt) or [0]]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    for _ in generate_ids(model, ids, SamplingParams(max_new_tokens=4, temperature=0.0)):
        pass
    t0 = time.perf_counter()
    n = sum(1 for _ in generate_ids(model, ids, params))
    release_packed(model)
    return n / (time.perf_counter() - t0)


def perplexity(model: DecoderLM, tokenizer, sources: list[str], max_tokens: int = 8192) -> float:
    ids = [t for d in read_documents(sources) for t in tokenizer.encode(d.text)][:max_tokens]
    window = min(256, model.config.max_seq_len)
    nll, n = strided_nll(model, ids, window=window, stride=window // 2)
    return math.exp(nll / n)


def classifier_scores(
    model: nn.Module, tokenizer, data: str, text_col: str | None = None, label_col: str | None = None
) -> tuple[float, float]:
    """(accuracy, sequences per second) on a labelled file."""
    ds = read_labelled(data, text_col, label_col)
    labels = model.config.labels
    unknown = sorted(set(ds.labels) - set(labels))
    if unknown:
        raise DataError(f"{data}: labels {unknown[:3]} are not the model's ({', '.join(labels)})")
    predict_proba(model, tokenizer, ds.texts[:64])  # warm-up
    t0 = time.perf_counter()
    probs = predict_proba(model, tokenizer, ds.texts)
    seconds = time.perf_counter() - t0
    pred = probs.argmax(-1).tolist()
    acc = sum(labels[p] == y for p, y in zip(pred, ds.labels)) / len(pred)
    return acc, len(pred) / seconds


def measure(
    model: nn.Module,
    tokenizer,
    eval_data: str | list[str] | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
) -> dict:
    """{"size_mb", "speed", "speed_unit", "quality", "quality_name"} for a decoder or a classifier."""
    out = {"size_mb": size_mb(model), "speed": None, "speed_unit": "", "quality": None, "quality_name": ""}
    if isinstance(model, DecoderLM):
        if eval_data:  # (first: unreadable evaluation text fails before the timing runs)
            sources = [eval_data] if isinstance(eval_data, (str, Path)) else list(eval_data)
            out.update(quality=perplexity(model, tokenizer, [str(s) for s in sources]), quality_name="perplexity")
        out.update(speed=decode_speed(model, tokenizer), speed_unit="tokens/s")
    elif eval_data and getattr(model.config, "head", None) == "classify":
        data = eval_data if isinstance(eval_data, (str, Path)) else eval_data[0]
        acc, seq_s = classifier_scores(model, tokenizer, str(data), text_col, label_col)
        out.update(speed=seq_s, speed_unit="sequences/s", quality=acc * 100, quality_name="accuracy %")
    return out


def comparison(before: dict, after: dict, label: str) -> str:
    """A small before/after table."""

    def fmt(v, digits=2):
        return "-" if v is None else f"{v:,.{digits}f}"

    rows = [("size MiB", fmt(before["size_mb"], 1), fmt(after["size_mb"], 1), after["size_mb"] / before["size_mb"])]
    if before["speed"] is not None:
        rows.append(
            (before["speed_unit"], fmt(before["speed"], 1), fmt(after["speed"], 1), after["speed"] / before["speed"])
        )
    if before["quality"] is not None:
        rows.append(
            (
                before["quality_name"],
                fmt(before["quality"], 3),
                fmt(after["quality"], 3),
                after["quality"] / before["quality"],
            )
        )
    lines = [f"{'':<14}{'before':>12}{label:>14}{'ratio':>8}"]
    lines += [f"{name:<14}{b:>12}{a:>14}{r:>7.2f}x" for name, b, a, r in rows]
    return "\n".join(lines)
