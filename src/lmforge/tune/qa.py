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

import dataclasses
import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from lmforge.config import FinetuneConfig
from lmforge.data.qa import QAExample, QAFeatures, qa_features, read_squad, shakespeare_qa
from lmforge.errors import DataError, ModelLoadError
from lmforge.eval.qa import squad_scores
from lmforge.files import write_json, write_text
from lmforge.interop import load_pretrained
from lmforge.models.encoder import Encoder
from lmforge.nn.lora import trainable_params
from lmforge.predict import answer, pad_batch
from lmforge.report import write_task_report
from lmforge.runtime import peak_memory_mb, reset_peak_memory
from lmforge.train.supervised import fit
from lmforge.tune.methods import apply_method, describe, run_footer, save_outputs, say, start_run
from lmforge.tune.tasks import QAArgs, check_args, task_config, task_max_len


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
        return (f"test: exact match {self.test['exact_match']:.1f}  F1 {self.test['f1']:.1f}  ({self.rows['test']} "
                f"questions, {self.seconds:.0f} s training)\n" + run_footer(self))


def load_qa_splits(data: str | Path, val_data: str | Path | None, test_data: str | Path | None,
                   seed: int = 0) -> tuple[list[QAExample], list[QAExample], list[QAExample]]:
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
        train = [e for e in rest if part(e) >= 2 or (val is not None and part(e) == 1)
                 or (test is not None and part(e) == 0)]
        val = val if val is not None else [e for e in rest if part(e) == 1]
        test = test if test is not None else [e for e in rest if part(e) == 0]
    for name, split in (("validation", val), ("test", test), ("training", train)):
        if not split:
            raise DataError(f"the {name} split of {data} is empty: give --val-data / --test-data or more contexts")
    if not any(e.answers for e in train):
        raise DataError(f"{data}: no training question has an answer")
    return train, val, test


def finetune_qa(model_path: str | Path, data: str | Path, out: str | Path, cfg: FinetuneConfig | None = None,
                val_data: str | Path | None = None, test_data: str | Path | None = None, stride: int = QAArgs.stride,
                progress: bool | None = None, resume: bool = False) -> QAResult | None:
    cfg = cfg or task_config("qa")
    cfg.validate()
    if cfg.metric not in ("f1", "exact_match"):
        cfg = dataclasses.replace(cfg, metric="f1")
    check_args("qa", stride=stride)
    out, baseline_mem = start_run(cfg, out, resume)
    train, val, test = load_qa_splits(data, val_data, test_data, cfg.seed)

    torch.manual_seed(cfg.seed)
    model, tok = load_pretrained(model_path, device=cfg.device)
    if not isinstance(model, Encoder):
        raise ModelLoadError(f"{model_path} is a {type(model).__name__}; QA fine-tuning needs an encoder model")
    if model.config.head != "qa":
        model = model.with_head("qa")
    total = model.num_params()
    trainable = apply_method(model, cfg)
    if cfg.method in ("lora", "qlora") and model.pooler is not None:
        # QA reads the token states, never the pooled [CLS] vector: a "trained" pooler would get no gradient,
        # yet be counted as trainable and copied into the adapter
        model.pooler.requires_grad_(False)
        trainable = trainable_params(model)
    max_len = task_max_len("qa", cfg, model.config.max_seq_len)
    feats: QAFeatures = qa_features(train, tok, max_len, stride)
    say(f"data: {len(train)} train / {len(val)} validation / {len(test)} test questions; "
        f"{len(feats.ids)} training windows of up to {max_len} tokens (stride {stride})")

    def batches(epoch: int):
        rng = random.Random(cfg.seed + epoch)
        order = list(range(len(feats.ids)))
        rng.shuffle(order)
        for s in range(0, len(order), cfg.batch_size):
            rows = order[s:s + cfg.batch_size]
            b = pad_batch([feats.ids[r] for r in rows], tok.pad_id, [feats.types[r] for r in rows])
            yield {**b, "start_positions": torch.tensor([feats.start[r] for r in rows]),
                   "end_positions": torch.tensor([feats.end[r] for r in rows])}

    def evaluate() -> dict[str, float]:
        preds = answer(model, tok, val, max_len, stride)
        return squad_scores(preds, [[t for t, _ in e.answers] for e in val])

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", yaml.safe_dump({
        "task": "qa", "model": str(model_path), "data": str(data), "val_data": str(val_data or ""),
        "test_data": str(test_data or ""), "stride": stride, "finetune": dataclasses.asdict(cfg)}, sort_keys=False))
    reset_peak_memory()
    t0 = time.time()
    result = fit(model, batches, -(-len(feats.ids) // cfg.batch_size), evaluate, cfg, out / "metrics.jsonl",
                 progress, run_dir=out, resume=resume)
    if not result.main:  # under torchrun: process 0 writes the outputs
        return None
    seconds = time.time() - t0
    peak_mem = peak_memory_mb()
    preds = answer(model, tok, test, max_len, stride)
    scores = squad_scores(preds, [[t for t, _ in e.answers] for e in test])
    model_dir, adapter_dir = save_outputs(model, out, tok, str(model_path), cfg)
    rows = {"train": len(train), "validation": len(val), "test": len(test), "train_windows": len(feats.ids)}
    write_json(out / "summary.json", {"task": "qa", "method": cfg.method, "trainable_params": trainable,
                                      "total_params": total, "peak_train_memory_mb": peak_mem,
                                      "baseline_memory_mb": baseline_mem,
                                      "train_seconds": seconds, "best_val": result.best,
                                      "test": scores, "rows": rows})
    write_json(out / "predictions.json", [{"id": e.id, "question": e.question, "prediction": p,
                                           "answers": [t for t, _ in e.answers]} for e, p in zip(test, preds)])

    samples = [(e.question, p, e.answers[0][0] if e.answers else "") for e, p in zip(test[:8], preds[:8])]
    write_task_report(out, f"Extractive QA fine-tune: {out.name}", [
        ("model", str(model_path)), ("data", str(data)), ("method", describe(cfg, model.config.n_layer)),
        ("trainable / total parameters", f"{trainable:,} / {total:,}"),
        ("questions train / val / test", f"{len(train)} / {len(val)} / {len(test)}"),
        ("training time", f"{seconds:.0f} s"), ("test exact match", f"{scores['exact_match']:.1f}"),
        ("test F1", f"{scores['f1']:.1f}"),
    ] + [(f"Q: {q}", f"predicted: {p!r} | gold: {g!r}") for q, p, g in samples])
    return QAResult(out, model_dir, scores, result.best, trainable, seconds, rows, adapter_dir)
