"""Sequence classification: fine-tune an encoder (e.g. all-MiniLM-L6-v2) on labelled text, read top to bottom.

    data     CSV / TSV / JSONL -> texts + label names (broken encodings repaired and counted); label ids in
             sorted name order; a stratified train / validation / test split under the seed (or given files)
    model    the encoder under a fresh classification head carrying the label names; "full" trains all of it,
             "top-k" only the last k blocks and the head
    train    `fit`: length-bucketed batches, AdamW, warm-up + linear decay; the best validation epoch is kept
    finish   test-split accuracy, macro-F1, per-class precision / recall, a confusion-matrix PNG, the model as an
             HF directory (transformers loads it as BertForSequenceClassification), a report
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from lmforge.config import FinetuneConfig
from lmforge.data.labelled import LabelledSet, class_counts, read_labelled, stratified_split
from lmforge.errors import ConfigError, DataError, ModelLoadError
from lmforge.eval.classify import classification_metrics, plot_confusion
from lmforge.files import write_json, write_text
from lmforge.interop import load_pretrained
from lmforge.models.encoder import Encoder
from lmforge.predict import pad_batch, predict_proba
from lmforge.report import write_task_report
from lmforge.runtime import peak_memory_mb, reset_peak_memory
from lmforge.train.supervised import fit, length_buckets
from lmforge.tune.methods import apply_method, check_method, describe, run_footer, save_outputs, say, start_run
from lmforge.tune.recipe import check_args


@dataclass
class ClassifyResult:
    run_dir: Path
    model_dir: Path
    test: dict[str, Any]  # classification_metrics on the test split
    val: dict[str, float]  # best validation metrics
    trainable_params: int
    total_params: int
    seconds: float  # training time
    rows: dict[str, int]  # rows per split, repaired and skipped rows
    adapter_dir: Path | None = None  # under LoRA: the adapter alone, in the PEFT layout

    def summary(self) -> str:
        """What `lmforge finetune classify` prints at the end."""
        t = self.test
        lines = [f"test: accuracy {t['accuracy']:.4f}  macro-F1 {t['macro_f1']:.4f}  ({self.rows['test']} rows, "
                 f"{self.seconds:.0f} s training, {self.trainable_params:,} trainable parameters)"]
        lines += [f"  {name:>12}: precision {m['precision']:.3f}  recall {m['recall']:.3f}  f1 {m['f1']:.3f}  "
                  f"n={m['support']}" for name, m in t["per_class"].items()]
        return "\n".join(lines + [run_footer(self)])


def load_splits(data: str | Path, text_col: str | None, label_col: str | None, val_data: str | Path | None,
                test_data: str | Path | None, val_fraction: float, test_fraction: float, seed: int,
                ) -> tuple[LabelledSet, LabelledSet, LabelledSet, list[str]]:
    ds = read_labelled(data, text_col, label_col)
    names = sorted(set(ds.labels))
    if len(names) < 2:
        raise DataError(f"{data} has a single class {names[0]!r}; classification needs at least two")
    if test_data is None or val_data is None:
        tr, va, te = stratified_split(ds.labels, 0.0 if val_data else val_fraction,
                                      0.0 if test_data else test_fraction, seed)
        train, val, test = ds.subset(tr), ds.subset(va), ds.subset(te)
    else:
        train, val, test = ds, None, None
    train.repaired_rows, train.skipped_rows = ds.repaired_rows, ds.skipped_rows
    if val_data:
        val = read_labelled(val_data, text_col, label_col)
    if test_data:
        test = read_labelled(test_data, text_col, label_col)
    for part, name in ((val, "validation"), (test, "test")):
        unknown = sorted(set(part.labels) - set(names))
        if unknown:
            raise DataError(f"the {name} data has labels the training data never shows: {', '.join(unknown[:5])}")
        if len(part) == 0:
            raise DataError(f"the {name} split is empty: use more data or a larger fraction")
    return train, val, test, names  # type: ignore[return-value]


def finetune_classify(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: FinetuneConfig | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    class_weights: bool = False,
    progress: bool | None = None,
    resume: bool = False,
) -> ClassifyResult | None:
    cfg = cfg or FinetuneConfig()
    cfg.validate()
    check_args("classify", val_fraction=val_fraction, test_fraction=test_fraction)
    if not (test_data or 0 < test_fraction) or val_fraction + test_fraction >= 1:
        raise ConfigError("test_fraction (--test-fraction) must be above 0 (or give --test-data), and the validation "
                          "and test fractions must leave data to train on")
    out, baseline_mem = start_run(cfg, out, resume)

    # --- data ------------------------------------------------------------------------------------------------
    train, val, test, names = load_splits(data, text_col, label_col, val_data, test_data, val_fraction,
                                          test_fraction, cfg.seed)
    label_id = {n: i for i, n in enumerate(names)}

    # --- model -----------------------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model, tok = load_pretrained(model_path, device=cfg.device)
    if not isinstance(model, Encoder):
        raise ModelLoadError(f"{model_path} is a {type(model).__name__}; classification fine-tuning needs an "
                             f"encoder (BERT family) model")
    check_method(model, cfg)  # (a LoRA target that matches nothing: refused before anything is printed)
    say(f"data: {len(train)} train / {len(val)} validation / {len(test)} test rows, classes "
        f"{class_counts(train.labels)}" + (f"; {train.repaired_rows} rows repaired from non-UTF-8 bytes"
                                            if train.repaired_rows else "")
        + (f"; {train.skipped_rows} rows skipped (empty text or label)" if train.skipped_rows else ""))
    if not (model.config.head == "classify" and model.config.labels == names):
        model = model.with_head("classify", names)
    total = model.num_params()
    trainable = apply_method(model, cfg)
    max_len = min(cfg.max_len, model.config.max_seq_len)
    enc = tok.encode_for_encoder(train.texts, max_len=max_len)
    y = torch.tensor([label_id[v] for v in train.labels])
    weights = None
    if class_weights:  # inverse class frequency, mean 1
        counts = torch.bincount(y, minlength=len(names)).float().clamp(min=1)
        weights = (counts.sum() / (len(names) * counts)).to(cfg.device)

    def batches(epoch: int):
        """Shuffled, then bucketed by length (little padding per batch)."""
        for idx in length_buckets(len(enc), lambda i: len(enc[i].ids), cfg.batch_size, cfg.seed + epoch):
            b = pad_batch([enc[i].ids for i in idx], tok.pad_id)
            yield {**b, "labels": y[idx], "class_weights": weights, "shared": ("class_weights",)}

    val_y = [label_id[v] for v in val.labels]

    def evaluate() -> dict[str, float]:
        logits = torch.log(predict_proba(model, tok, val.texts, max_len=max_len).clamp(min=1e-12))
        m = classification_metrics(val_y, logits.argmax(-1).tolist(), names)
        return {"loss": float(F.nll_loss(logits, torch.tensor(val_y))), "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"]}

    # --- train -----------------------------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", yaml.safe_dump({
        "task": "classify", "model": str(model_path), "data": str(data), "val_data": str(val_data or ""),
        "test_data": str(test_data or ""), "text_col": text_col, "label_col": label_col,
        "val_fraction": val_fraction, "test_fraction": test_fraction, "class_weights": class_weights,
        "labels": names, "finetune": dataclasses.asdict(cfg)}, sort_keys=False))
    say(f"model: {total:,} parameters, {trainable:,} trainable ({describe(cfg, model.config.n_layer)})")
    steps_per_epoch = -(-len(enc) // cfg.batch_size)
    reset_peak_memory()
    t0 = time.time()
    loss_fn = None
    if cfg.label_smoothing:
        def loss_fn(m: Encoder, b: dict) -> torch.Tensor:
            logits = m(b["input_ids"], attention_mask=b["attention_mask"], grad_checkpoint=cfg.grad_checkpoint).logits
            return F.cross_entropy(logits, b["labels"], weight=b["class_weights"],
                                   label_smoothing=cfg.label_smoothing)

    result = fit(model, batches, steps_per_epoch, evaluate, cfg, out / "metrics.jsonl", progress, loss_fn,
                 run_dir=out, resume=resume)
    if not result.main:  # under torchrun: process 0 writes the outputs
        return None
    seconds = time.time() - t0
    peak_mem = peak_memory_mb()

    # --- finish ----------------------------------------------------------------------------------------------
    test_pred = predict_proba(model, tok, test.texts, max_len=max_len).argmax(-1).tolist()
    test_m = classification_metrics([label_id[v] for v in test.labels], test_pred, names)
    model_dir, adapter_dir = save_outputs(model, out, tok, str(model_path), cfg)
    plot_confusion(test_m, out / "report" / "confusion.png", title="test split")
    rows = {"train": len(train), "validation": len(val), "test": len(test), "repaired": train.repaired_rows,
            "skipped": train.skipped_rows}
    summary = {"task": "classify", "method": cfg.method, "trainable_params": trainable, "total_params": total,
               "peak_train_memory_mb": peak_mem, "baseline_memory_mb": baseline_mem,
               "train_seconds": seconds, "steps": result.steps,
               "best_val": result.best, "test": test_m,
               "rows": rows}
    write_json(out / "summary.json", summary)

    write_task_report(out, f"Classification fine-tune: {out.name}", [
        ("model", str(model_path)), ("method", describe(cfg, model.config.n_layer)),
        ("trainable / total parameters", f"{trainable:,} / {total:,}"),
        ("rows train / val / test", f"{len(train)} / {len(val)} / {len(test)}"),
        ("repaired rows (non-UTF-8)", str(train.repaired_rows)), ("training time", f"{seconds:.0f} s"),
        ("best validation accuracy", f"{result.best.get('accuracy', float('nan')):.4f}"),
        ("test accuracy", f"{test_m['accuracy']:.4f}"), ("test macro-F1", f"{test_m['macro_f1']:.4f}"),
    ] + [(f"{k}: precision / recall / F1", f"{v['precision']:.3f} / {v['recall']:.3f} / {v['f1']:.3f}")
         for k, v in test_m["per_class"].items()], images=["loss.png", "confusion.png"])
    return ClassifyResult(out, model_dir, test_m, result.best, trainable, total, seconds, rows, adapter_dir)
