"""Extractive question answering: fine-tune an encoder to point at the answer span in a context.

data     SQuAD-format JSON (or JSONL) files, or `shakespeare-qa` (built from the packaged plays, see
         lmforge.data.qa.shakespeare_qa); without validation / test files, examples are split by context
features question + context windows of max_len tokens overlapping by `stride` (long contexts)
model    the encoder under a fresh qa head (start / end logits per token)
train    `fit`, as for classification; the best validation F1 is kept
finish   exact match and token F1 on the test split (SQuAD definitions), the model as an HF directory
         (transformers loads it as BertForQuestionAnswering), a report with sample answers
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import FinetuneConfig
from lmforge.data.qa import QAExample, QAFeatures, qa_features, read_squad, shakespeare_qa
from lmforge.errors import DataError
from lmforge.eval.qa import squad_scores
from lmforge.files import write_json
from lmforge.models.encoder import Encoder
from lmforge.predict import answer, pad_batch
from lmforge.tune.driver import Run, Task, run_footer, run_task, say
from lmforge.tune.tasks import QAArgs, task_max_len


@dataclass
class QAResult:
    run_dir: Path
    model_dir: Path
    test: dict[str, float]
    val: dict[str, float]
    trainable_params: int
    seconds: float
    rows: dict[str, int]
    adapter_dir: Path | None = None  # under LoRA: the adapter alone, in the PEFT layout

    def summary(self) -> str:
        """What `lmforge finetune qa` prints at the end."""
        return (
            f"test: exact match {self.test['exact_match']:.1f}  F1 {self.test['f1']:.1f}  ({self.rows['test']} "
            f"questions, {self.seconds:.0f} s training)\n" + run_footer(self)
        )


def load_qa_splits(
    data: str | Path, val_data: str | Path | None, test_data: str | Path | None, seed: int = 0
) -> tuple[list[QAExample], list[QAExample], list[QAExample]]:
    if str(data) == "shakespeare-qa":
        s = shakespeare_qa(seed=seed)
        return s["train"], s["dev"], s["test"]
    train = read_squad(data)
    val = read_squad(val_data) if val_data else None
    test = read_squad(test_data) if test_data else None
    if val is None or test is None:  # split by context, so no passage is in two parts

        def part(e: QAExample) -> int:
            return int(hashlib.sha1(e.context.encode()).hexdigest(), 16) % 10

        rest = train
        train = [
            e for e in rest if part(e) >= 2 or (val is not None and part(e) == 1) or (test is not None and part(e) == 0)
        ]
        val = val if val is not None else [e for e in rest if part(e) == 1]
        test = test if test is not None else [e for e in rest if part(e) == 0]
    for name, split in (("validation", val), ("test", test), ("training", train)):
        if not split:
            raise DataError(f"the {name} split of {data} is empty: give --val-data / --test-data or more contexts")
    if not any(e.answers for e in train):
        raise DataError(f"{data}: no training question has an answer")
    return train, val, test


class QATask(Task):
    name, title, needs = "qa", "Extractive QA fine-tune", "QA fine-tuning needs an encoder model"
    model_class = Encoder

    def load_data(self) -> None:
        self.train, self.val, self.test = load_qa_splits(
            self.data, self.args["val_data"], self.args["test_data"], self.cfg.seed
        )

    def load_model(self):
        model, tok = super().load_model()
        return (model if model.config.head == "qa" else model.with_head("qa")), tok

    def prepare(self) -> None:
        self.stride = self.args["stride"]
        self.max_len = task_max_len("qa", self.cfg, self.model.config.max_seq_len)
        self.feats: QAFeatures = qa_features(self.train, self.tok, self.max_len, self.stride)
        say(
            f"data: {len(self.train)} train / {len(self.val)} validation / {len(self.test)} test questions; "
            f"{len(self.feats.ids)} training windows of up to {self.max_len} tokens (stride {self.stride})"
        )
        self.steps_per_epoch = -(-len(self.feats.ids) // self.cfg.batch_size)
        self.rows = {
            "train": len(self.train),
            "validation": len(self.val),
            "test": len(self.test),
            "train_windows": len(self.feats.ids),
        }

    def after_method(self) -> None:
        if self.model.pooler is not None:
            # QA reads the token states, never the pooled [CLS] vector: a "trained" pooler would get no gradient,
            # yet be counted as trainable, copied into an adapter, and under DDP awaited for a gradient that never
            # comes (its output is part of the model's)
            self.model.pooler.requires_grad_(False)

    def batches(self, epoch: int):
        f, bs = self.feats, self.cfg.batch_size
        rng = random.Random(self.cfg.seed + epoch)
        order = list(range(len(f.ids)))
        rng.shuffle(order)
        for s in range(0, len(order), bs):
            rows = order[s : s + bs]
            b = pad_batch([f.ids[r] for r in rows], self.tok.pad_id, [f.types[r] for r in rows])
            yield {
                **b,
                "start_positions": torch.tensor([f.start[r] for r in rows]),
                "end_positions": torch.tensor([f.end[r] for r in rows]),
            }

    def evaluate(self) -> dict[str, float]:
        preds = answer(self.model, self.tok, self.val, self.max_len, self.stride)
        return squad_scores(preds, [[t for t, _ in e.answers] for e in self.val])

    def finish(self, fit) -> dict[str, Any]:
        test = self.test
        preds = answer(self.model, self.tok, test, self.max_len, self.stride)
        self.scores = squad_scores(preds, [[t for t, _ in e.answers] for e in test])
        write_json(
            self.out / "predictions.json",
            [
                {"id": e.id, "question": e.question, "prediction": p, "answers": [t for t, _ in e.answers]}
                for e, p in zip(test, preds)
            ],
        )
        self.samples = [(e.question, p, e.answers[0][0] if e.answers else "") for e, p in zip(test[:8], preds[:8])]
        return {"max_len": self.max_len, "stride": self.stride, "test": self.scores}

    def report_rows(self) -> list[tuple[str, str]]:
        return [
            ("questions train / val / test", f"{len(self.train)} / {len(self.val)} / {len(self.test)}"),
            ("test exact match", f"{self.scores['exact_match']:.1f}"),
            ("test F1", f"{self.scores['f1']:.1f}"),
        ] + [(f"Q: {q}", f"predicted: {p!r} | gold: {g!r}") for q, p, g in self.samples]

    def result(self, run: Run) -> QAResult:
        return QAResult(
            run.out, run.model_dir, self.scores, run.fit.best, run.trainable, run.seconds, self.rows, run.adapter_dir
        )


def finetune_qa(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: FinetuneConfig | None = None,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    stride: int = QAArgs.stride,
    progress: bool | None = None,
    resume: bool = False,
) -> QAResult | None:
    """Fine-tune an encoder for extractive QA (see the module notes; settings in tune/tasks.py: QAArgs)."""
    return run_task(
        QATask,
        model_path,
        data,
        out,
        cfg,
        progress,
        resume,
        val_data=val_data and str(val_data),
        test_data=test_data and str(test_data),
        stride=stride,
    )
