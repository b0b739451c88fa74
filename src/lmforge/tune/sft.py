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

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.config import FinetuneConfig
from lmforge.data.chat import Messages, chatterbot_chat, held_out_splits, pack, read_chat, tokenize_chat
from lmforge.errors import DataError
from lmforge.eval.generation import reference_scores
from lmforge.files import write_json
from lmforge.generate.chat import reply_all
from lmforge.models.decoder import DecoderLM
from lmforge.tune.driver import Run, Task, run_footer, run_task, say
from lmforge.tune.tasks import ChatArgs, task_max_len


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
        lines = [
            f"held-out replies {name}: exact match {m['exact_match']:.1f}  F1 {m['f1']:.1f}  ROUGE-L {m['rougeL']:.1f}"
            for name, m in (("before", self.before), ("after", self.after))
            if m
        ]
        lines.append(
            f"{self.seconds:.0f} s training, peak memory {self.peak_train_memory_mb:,.0f} MiB, "
            f"{self.trainable_params:,} trainable parameters"
        )
        return "\n".join(lines + [run_footer(self)])


def load_chat_splits(
    data: str | Path, val_data: str | Path | None, test_data: str | Path | None, seed: int
) -> tuple[list[Messages], list[Messages], list[Messages]]:
    """Conversations split by their first question (`chatterbot`: the packaged corpus's own split)."""

    def first(c: Messages) -> str:
        return next((m["content"] for m in c if m["role"] == "user"), c[0]["content"])

    return held_out_splits(
        data, val_data, test_data, seed, read_chat, first, "conversations", ("chatterbot", chatterbot_chat)
    )


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
    return {
        "input_ids": padded("input_ids", pad_id),
        "labels": labels,
        "attention_mask": padded("segment", 0),
        "position_ids": padded("position_ids", 0),
        "logits_at": labels != -100,
    }


def token_loss(model: torch.nn.Module, rows: list[dict[str, list[int]]], pad_id: int, batch_size: int) -> float:
    """Mean loss per assistant token over `rows`."""
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            b = collate(rows[s : s + batch_size], pad_id)
            k = int(b["logits_at"].sum())
            if k:
                total += float(model(**b, loss_only=True).loss) * k
                n += k
    return total / max(n, 1)


class ChatTask(Task):
    name, title, needs = "chat", "Instruction tuning", "chat fine-tuning needs a decoder model"
    model_class = DecoderLM
    packages = ("rouge_score",)  # (the eval extra: its metrics)

    def load_data(self) -> None:
        self.train, self.val, self.test = load_chat_splits(
            self.data, self.args["val_data"], self.args["test_data"], self.cfg.seed
        )

    def prepare(self) -> None:
        cfg, a, tok = self.cfg, self.args, self.tok
        max_len = task_max_len("chat", cfg, self.model.config.max_seq_len)
        tokenized = {}
        for name, convs in (("train", self.train), ("val", self.val)):
            ex = [tokenize_chat(tok, c, max_len) for c in convs]
            tokenized[name] = [e for e in ex if e is not None]
        if not tokenized["train"]:
            raise DataError(f"no training conversation keeps an assistant token within max_len {max_len}")
        self.rows_train = (
            pack(tokenized["train"], max_len)
            if a["packing"]
            else [
                {"input_ids": i, "labels": lab, "segment": [1] * len(i), "position_ids": list(range(len(i)))}
                for i, lab in tokenized["train"]
            ]
        )
        self.rows_val = [
            {"input_ids": i, "labels": lab, "segment": [1] * len(i), "position_ids": list(range(len(i)))}
            for i, lab in tokenized["val"]
        ]
        self.prompts, self.refs = first_reply_prompts(self.test)
        if a["eval_limit"] is not None:
            self.prompts, self.refs = self.prompts[: a["eval_limit"]], self.refs[: a["eval_limit"]]
        n_tok = sum(len(i) for i, _ in tokenized["train"])
        say(
            f"data: {len(self.train)} train / {len(self.val)} validation / {len(self.test)} test conversations; "
            f"{n_tok:,} training tokens in {len(self.rows_train)} rows of up to {max_len}"
            + (" (packed)" if a["packing"] else "")
        )
        self.steps_per_epoch = -(-len(self.rows_train) // cfg.batch_size)
        self.rows = {
            "train": len(self.train),
            "validation": len(self.val),
            "test": len(self.test),
            "test_questions": len(self.prompts),
            "train_rows": len(self.rows_train),
            "train_tokens": n_tok,
        }
        self.before: dict[str, float] = {}
        if a["eval_before"] and self.prompts:  # the starting model's replies, before the method's transform
            t = time.time()
            self.before = reference_scores(reply_all(self.model, tok, self.prompts, a["max_new_tokens"]), self.refs)
            say(
                f"before: held-out replies {_fmt(self.before)}  ({len(self.prompts)} questions, "
                f"{time.time() - t:.0f} s)"
            )

    def batches(self, epoch: int):
        rng = random.Random(self.cfg.seed + epoch)
        order = list(range(len(self.rows_train)))
        rng.shuffle(order)
        for s in range(0, len(order), self.cfg.batch_size):
            yield collate([self.rows_train[i] for i in order[s : s + self.cfg.batch_size]], self.tok.pad_id)

    def evaluate(self) -> dict[str, float]:
        loss = token_loss(self.model, self.rows_val, self.tok.pad_id, self.cfg.batch_size)
        return {"loss": loss, "ppl": math.exp(min(loss, 50)), "neg_loss": -loss}

    def finish(self, fit) -> dict[str, Any]:
        prompts, refs = self.prompts, self.refs
        self.replies = reply_all(self.model, self.tok, prompts, self.args["max_new_tokens"]) if prompts else []
        self.after = reference_scores(self.replies, refs) if prompts else {}
        if self.after:
            say(f"after: held-out replies {_fmt(self.after)}")
        write_json(
            self.out / "replies.json",
            [{"prompt": p, "references": r, "reply": y} for p, r, y in zip(prompts, refs, self.replies)],
        )
        return {"before": self.before, "after": self.after}

    def report_rows(self) -> list[tuple[str, str]]:
        samples = [
            (p[-1]["content"], f"reply: {y!r} | reference: {r[0]!r}" + (f" (+{len(r) - 1} more)" if len(r) > 1 else ""))
            for p, r, y in list(zip(self.prompts, self.refs, self.replies))[:8]
        ]
        return [
            ("conversations train / val / test", f"{len(self.train)} / {len(self.val)} / {len(self.test)}"),
            ("held-out replies before", _fmt(self.before) or "not run"),
            ("held-out replies after", _fmt(self.after) or "not run"),
        ] + samples

    def result(self, run: Run) -> ChatResult:
        return ChatResult(
            run.out,
            run.model_dir,
            run.adapter_dir,
            self.before,
            self.after,
            run.fit.best,
            run.trainable,
            run.total,
            run.seconds,
            run.peak_mb,
            self.rows,
        )


def _fmt(m: dict[str, float]) -> str:
    return f"EM {m['exact_match']:.1f}  F1 {m['f1']:.1f}  ROUGE-L {m['rougeL']:.1f}" if m else ""


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
    """Instruction-tune a decoder on chat data (see the module notes; settings in tune/tasks.py: ChatArgs)."""
    return run_task(
        ChatTask,
        model_path,
        data,
        out,
        cfg,
        progress,
        resume,
        val_data=val_data and str(val_data),
        test_data=test_data and str(test_data),
        packing=packing,
        eval_before=eval_before,
        max_new_tokens=max_new_tokens,
        eval_limit=eval_limit,
    )
