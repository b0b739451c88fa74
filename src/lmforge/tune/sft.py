"""Instruction tuning (SFT) of a decoder on chat data, read top to bottom.

    data     chat JSONL (`messages`), or `chatterbot` (the packaged corpus); held-out conversations are split by
             question under the seed unless --val-data / --test-data are given
    tokens   the model's chat template; labels on assistant turns only; short examples packed into rows
    model    the decoder transformed by the method (full / top-k / lora / qlora)
    train    `fit`: AdamW, warm-up + linear decay, validation loss after every epoch, best epoch kept
    finish   greedy replies to the held-out questions before and after, scored against the references
             (exact match, token F1, ROUGE-L); the merged model as an HF directory and, under LoRA, the adapter
             in the PEFT layout; a report with sample replies
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from lmforge.config import FinetuneConfig
from lmforge.data.chat import Messages, chatterbot_chat, held_out_splits, pack, read_chat, tokenize_chat
from lmforge.errors import DataError, ModelLoadError
from lmforge.eval.generation import reference_scores
from lmforge.files import write_json, write_text
from lmforge.generate.chat import reply_all
from lmforge.interop import load_pretrained
from lmforge.models.decoder import DecoderLM
from lmforge.report import write_task_report
from lmforge.runtime import peak_memory_mb, reset_peak_memory
from lmforge.train.supervised import fit
from lmforge.tune.methods import apply_method, check_method, describe, run_footer, save_outputs, say, start_run
from lmforge.tune.tasks import ChatArgs, check_args, task_config, task_max_len


@dataclass
class ChatResult:
    run_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    before: dict[str, float]  # held-out reply scores of the starting model ({} when skipped)
    after: dict[str, float]
    val: dict[str, float]
    trainable_params: int
    total_params: int
    seconds: float
    peak_train_memory_mb: float
    rows: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """What `lmforge finetune chat` prints at the end."""
        lines = [f"held-out replies {name}: exact match {m['exact_match']:.1f}  F1 {m['f1']:.1f}  ROUGE-L "
                 f"{m['rougeL']:.1f}" for name, m in (("before", self.before), ("after", self.after)) if m]
        lines.append(f"{self.seconds:.0f} s training, peak memory {self.peak_train_memory_mb:,.0f} MiB, "
                     f"{self.trainable_params:,} trainable parameters")
        return "\n".join(lines + [run_footer(self)])


def load_chat_splits(data: str | Path, val_data: str | Path | None, test_data: str | Path | None,
                     seed: int) -> tuple[list[Messages], list[Messages], list[Messages]]:
    """Conversations split by their first question (`chatterbot`: the packaged corpus's own split)."""
    def first(c: Messages) -> str:
        return next((m["content"] for m in c if m["role"] == "user"), c[0]["content"])

    return held_out_splits(data, val_data, test_data, seed, read_chat, first, "conversations",
                           ("chatterbot", chatterbot_chat))


def first_reply_prompts(convs: list[Messages]) -> tuple[list[Messages], list[list[str]]]:
    """Held-out questions: each distinct conversation opening (up to its first assistant turn) once, with every
    first answer the data gives it as an acceptable reference. (chatterbot-corpus answers "My laptop screen is
    black." 101 ways: scored once per answer, that one question would be 101 of the 268 test items.)"""
    import json

    questions: dict[str, tuple[Messages, list[str]]] = {}  # insertion-ordered: first appearance
    for c in convs:
        k = next(i for i, m in enumerate(c) if m["role"] == "assistant")
        if k:
            questions.setdefault(json.dumps(c[:k], sort_keys=True), (c[:k], []))[1].append(c[k]["content"])
    return [p for p, _ in questions.values()], [r for _, r in questions.values()]


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad packed rows into a batch: segments double as the attention mask (0 = padding)."""
    T = max(len(r["input_ids"]) for r in rows)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([r[key] + [fill] * (T - len(r[key])) for r in rows])

    labels = padded("labels", -100)
    return {"input_ids": padded("input_ids", pad_id), "labels": labels, "attention_mask": padded("segment", 0),
            "position_ids": padded("position_ids", 0), "logits_at": labels != -100}


def token_loss(model: torch.nn.Module, rows: list[dict[str, list[int]]], pad_id: int, batch_size: int) -> float:
    """Mean loss per assistant token over `rows`."""
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            b = collate(rows[s:s + batch_size], pad_id)
            k = int(b["logits_at"].sum())
            if k:
                total += float(model(**b, loss_only=True).loss) * k
                n += k
    return total / max(n, 1)


def finetune_chat(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: FinetuneConfig | None = None,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    packing: bool = ChatArgs.packing,
    eval_before: bool = ChatArgs.eval_before,
    max_new_tokens: int = ChatArgs.max_new_tokens,
    eval_limit: int | None = None,
    progress: bool | None = None,
    resume: bool = False,
) -> ChatResult | None:
    cfg = cfg or task_config("chat")
    if cfg.metric == "accuracy":
        cfg = dataclasses.replace(cfg, metric="neg_loss")
    cfg.validate()
    check_args("chat", max_new_tokens=max_new_tokens, eval_limit=eval_limit)
    out, baseline_mem = start_run(cfg, out, resume)

    # --- data ------------------------------------------------------------------------------------------------
    train, val, test = load_chat_splits(data, val_data, test_data, cfg.seed)
    torch.manual_seed(cfg.seed)
    model, tok = load_pretrained(model_path, device=cfg.device)
    if not isinstance(model, DecoderLM):
        raise ModelLoadError(f"{model_path} is a {type(model).__name__}; chat fine-tuning needs a decoder model")
    check_method(model, cfg)
    max_len = task_max_len("chat", cfg, model.config.max_seq_len)
    tokenized = {}
    for name, convs in (("train", train), ("val", val)):
        ex = [tokenize_chat(tok, c, max_len) for c in convs]
        tokenized[name] = [e for e in ex if e is not None]
    if not tokenized["train"]:
        raise DataError(f"no training conversation keeps an assistant token within max_len {max_len}")
    rows_train = pack(tokenized["train"], max_len) if packing else [
        {"input_ids": i, "labels": lab, "segment": [1] * len(i), "position_ids": list(range(len(i)))}
        for i, lab in tokenized["train"]]
    rows_val = [{"input_ids": i, "labels": lab, "segment": [1] * len(i), "position_ids": list(range(len(i)))}
                for i, lab in tokenized["val"]]
    prompts, refs = first_reply_prompts(test)
    if eval_limit is not None:
        prompts, refs = prompts[:eval_limit], refs[:eval_limit]
    n_tok = sum(len(i) for i, _ in tokenized["train"])
    say(f"data: {len(train)} train / {len(val)} validation / {len(test)} test conversations; {n_tok:,} training "
        f"tokens in {len(rows_train)} rows of up to {max_len}" + (" (packed)" if packing else ""))

    # --- before ----------------------------------------------------------------------------------------------
    before: dict[str, float] = {}
    if eval_before and prompts:
        t = time.time()
        before = reference_scores(reply_all(model, tok, prompts, max_new_tokens), refs)
        say(f"before: held-out replies EM {before['exact_match']:.1f}  F1 {before['f1']:.1f}  ROUGE-L "
            f"{before['rougeL']:.1f}  ({len(prompts)} questions, {time.time() - t:.0f} s)")

    # --- model -----------------------------------------------------------------------------------------------
    total = model.num_params()
    trainable = apply_method(model, cfg)
    say(f"model: {total:,} parameters, {trainable:,} trainable ({describe(cfg, model.config.n_layer)})")

    def batches(epoch: int):
        rng = random.Random(cfg.seed + epoch)
        order = list(range(len(rows_train)))
        rng.shuffle(order)
        for s in range(0, len(order), cfg.batch_size):
            yield collate([rows_train[i] for i in order[s:s + cfg.batch_size]], tok.pad_id)

    def evaluate() -> dict[str, float]:
        loss = token_loss(model, rows_val, tok.pad_id, cfg.batch_size)
        return {"loss": loss, "ppl": math.exp(min(loss, 50)), "neg_loss": -loss}

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", yaml.safe_dump({
        "task": "chat", "model": str(model_path), "data": str(data), "val_data": str(val_data or ""),
        "test_data": str(test_data or ""), "packing": packing, "max_new_tokens": max_new_tokens,
        "finetune": dataclasses.asdict(cfg)}, sort_keys=False))
    reset_peak_memory()
    t0 = time.time()
    result = fit(model, batches, -(-len(rows_train) // cfg.batch_size), evaluate, cfg, out / "metrics.jsonl",
                 progress, run_dir=out, resume=resume)
    if not result.main:  # under torchrun: process 0 writes the outputs
        return None
    seconds = time.time() - t0
    peak_mem = peak_memory_mb()

    # --- finish ----------------------------------------------------------------------------------------------
    replies = reply_all(model, tok, prompts, max_new_tokens) if prompts else []
    after = reference_scores(replies, refs) if prompts else {}
    if after:
        say(f"after: held-out replies EM {after['exact_match']:.1f}  F1 {after['f1']:.1f}  ROUGE-L "
            f"{after['rougeL']:.1f}")
    model_dir, adapter_dir = save_outputs(model, out, tok, str(model_path), cfg)
    rows = {"train": len(train), "validation": len(val), "test": len(test), "test_questions": len(prompts),
            "train_rows": len(rows_train), "train_tokens": n_tok}
    write_json(out / "summary.json", {
        "task": "chat", "method": cfg.method, "trainable_params": trainable, "total_params": total,
        "peak_train_memory_mb": peak_mem, "baseline_memory_mb": baseline_mem,
        "train_seconds": seconds, "steps": result.steps,
        "best_val": result.best, "before": before, "after": after, "rows": rows})
    write_json(out / "replies.json", [{"prompt": p, "references": r, "reply": y}
                                      for p, r, y in zip(prompts, refs, replies)])

    def fmt(m: dict[str, float]) -> str:
        return f"EM {m['exact_match']:.1f} / F1 {m['f1']:.1f} / ROUGE-L {m['rougeL']:.1f}" if m else "not run"

    samples = [(p[-1]["content"], f"reply: {y!r} | reference: {r[0]!r}" + (f" (+{len(r) - 1} more)" if len(r) > 1
                                                                           else ""))
               for p, r, y in list(zip(prompts, refs, replies))[:8]]
    write_task_report(out, f"Instruction tuning: {out.name}", [
        ("model", str(model_path)), ("data", str(data)), ("method", describe(cfg, model.config.n_layer)),
        ("trainable / total parameters", f"{trainable:,} / {total:,}"),
        ("conversations train / val / test", f"{len(train)} / {len(val)} / {len(test)}"),
        ("training time", f"{seconds:.0f} s"), ("peak memory while training", f"{peak_mem:,.0f} MiB"),
        ("held-out replies before", fmt(before)), ("held-out replies after", fmt(after)),
    ] + samples)
    return ChatResult(out, model_dir, adapter_dir, before, after, result.best, trainable, total, seconds, peak_mem,
                      rows)
