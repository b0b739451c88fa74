"""Sequence classification: fine-tune an encoder (e.g. all-MiniLM-L6-v2) on labelled text, read top to bottom.

    data     CSV / TSV / JSONL -> texts + label names (broken encodings repaired and counted); label ids in
             sorted name order; a stratified train / validation / test split under the seed (or given files)
    windows  max_len from the data when not given (the longest text, up to the model's window); a longer text is
             read whole as overlapping windows whose logits are averaged, in training and prediction alike
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
from lmforge.predict import pad_batch, pad_windows, predict_proba, window_logits, window_stride
from lmforge.report import write_task_report
from lmforge.runtime import peak_memory_mb, reset_peak_memory
from lmforge.train.supervised import fit, length_buckets
from lmforge.tune.methods import apply_method, check_method, describe, run_footer, save_outputs, say, start_run
from lmforge.tune.tasks import ClassifyArgs, check_args, task_config


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


def fit_windows(tok, texts: list[str], max_len: int | None, stride: int | None, limit: int
                ) -> tuple[int, int, list[list[list[int]]]]:
    """(max_len, stride, each text's windows) for training. max_len not given: the longest text's length (a
    multiple of 8) when it fits the model's window `limit`, else the whole window; a text longer than max_len is
    read as overlapping windows, and a one-line notice says how many were."""
    windows = tok.encode_windows(texts, min(max_len or limit, limit), window_stride(min(max_len or limit, limit))
                                 if stride is None else stride)
    if max_len is None:
        longest = max(len(w[0]) for w in windows)
        if all(len(w) == 1 for w in windows) and longest < limit:
            max_len = min(limit, max(8, -(-longest // 8) * 8))
            windows = [[w[0]] for w in windows]  # (each already fits: the same ids)
            say(f"max_len {max_len}: the longest training text has {longest} tokens")
    if max_len is not None and max_len > limit:
        say(f"note: --max-len {max_len} is past the model's window of {limit} tokens; using {limit}")
    max_len = min(max_len or limit, limit)
    stride = window_stride(max_len) if stride is None else stride
    long = sum(len(w) > 1 for w in windows)
    if long:
        say(f"{long} of {len(texts)} training texts are longer than one window of {max_len} tokens: each is read "
            f"whole as {sum(len(w) for w in windows if len(w) > 1) / long:.1f} windows on average, neighbours sharing "
            f"{stride} tokens, their logits averaged into one prediction")
    return max_len, stride, windows


def finetune_classify(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: FinetuneConfig | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    val_fraction: float = ClassifyArgs.val_fraction,
    test_fraction: float = ClassifyArgs.test_fraction,
    class_weights: bool = ClassifyArgs.class_weights,
    stride: int | None = None,
    progress: bool | None = None,
    resume: bool = False,
) -> ClassifyResult | None:
    cfg = cfg or task_config("classify")
    cfg.validate()
    check_args("classify", val_fraction=val_fraction, test_fraction=test_fraction, stride=stride)
    if stride is not None and cfg.max_len is not None and stride >= cfg.max_len - 2:
        raise ConfigError(f"stride (--stride) {stride} must be below max_len - 2 ({cfg.max_len - 2}): neighbouring "
                          f"windows share that many tokens")
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
    max_len, stride, windows = fit_windows(tok, train.texts, cfg.max_len, stride, model.config.max_seq_len)
    y = torch.tensor([label_id[v] for v in train.labels])
    weights = None
    if class_weights:  # inverse class frequency, mean 1
        counts = torch.bincount(y, minlength=len(names)).float().clamp(min=1)
        weights = (counts.sum() / (len(names) * counts)).to(cfg.device)
    windowed = any(len(w) > 1 for w in windows)
    # a batch of long texts holds batch_size x 128 tokens' worth of windows (what batch_size short examples
    # held): 32 windows of 512 would keep ~13 GB of activations for MiniLM's backward
    per_window = max(1, -(-max_len // 128))
    size = (lambda i: len(windows[i]) * per_window) if windowed else None
    if windowed:
        say(f"batches of up to {max(1, cfg.batch_size // per_window)} windows of {max_len} tokens (--batch-size "
            f"{cfg.batch_size} x 128 tokens)")
    order = [sum(map(len, w)) for w in windows]

    def batches(epoch: int):
        """Shuffled, then bucketed by length (little padding per batch); long texts as [D, W, T] windows."""
        for idx in length_buckets(len(windows), order.__getitem__, cfg.batch_size, cfg.seed + epoch, size=size):
            b = (pad_windows([windows[i] for i in idx], tok.pad_id) if windowed
                 else pad_batch([windows[i][0] for i in idx], tok.pad_id))
            yield {**b, "labels": y[idx], "class_weights": weights, "shared": ("class_weights",)}

    val_y = [label_id[v] for v in val.labels]

    def evaluate() -> dict[str, float]:
        logits = torch.log(predict_proba(model, tok, val.texts, max_len=max_len, stride=stride).clamp(min=1e-12))
        m = classification_metrics(val_y, logits.argmax(-1).tolist(), names)
        return {"loss": float(F.nll_loss(logits, torch.tensor(val_y))), "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"]}

    # --- train -----------------------------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", yaml.safe_dump({
        "task": "classify", "model": str(model_path), "data": str(data), "val_data": str(val_data or ""),
        "test_data": str(test_data or ""), "text_col": text_col, "label_col": label_col,
        "val_fraction": val_fraction, "test_fraction": test_fraction, "class_weights": class_weights,
        "labels": names, "max_len": max_len, "stride": stride, "finetune": dataclasses.asdict(cfg)},
        sort_keys=False))
    say(f"model: {total:,} parameters, {trainable:,} trainable ({describe(cfg, model.config.n_layer)})")
    steps_per_epoch = len(length_buckets(len(windows), order.__getitem__, cfg.batch_size, cfg.seed, size=size))
    reset_peak_memory()
    t0 = time.time()
    loss_fn = None
    if cfg.label_smoothing or windowed:  # (otherwise the model's own loss, which is this one without either)
        def loss_fn(m: Encoder, b: dict) -> torch.Tensor:
            logits = window_logits(m, b, grad_checkpoint=cfg.grad_checkpoint)
            return F.cross_entropy(logits, b["labels"], weight=b["class_weights"],
                                   label_smoothing=cfg.label_smoothing)

    result = fit(model, batches, steps_per_epoch, evaluate, cfg, out / "metrics.jsonl", progress, loss_fn,
                 run_dir=out, resume=resume)
    if not result.main:  # under torchrun: process 0 writes the outputs
        return None
    seconds = time.time() - t0
    peak_mem = peak_memory_mb()

    # --- finish ----------------------------------------------------------------------------------------------
    test_pred = predict_proba(model, tok, test.texts, max_len=max_len, stride=stride).argmax(-1).tolist()
    test_m = classification_metrics([label_id[v] for v in test.labels], test_pred, names)
    model_dir, adapter_dir = save_outputs(model, out, tok, str(model_path), cfg)
    plot_confusion(test_m, out / "report" / "confusion.png", title="test split")
    rows = {"train": len(train), "validation": len(val), "test": len(test), "repaired": train.repaired_rows,
            "skipped": train.skipped_rows, "train_windowed": sum(len(w) > 1 for w in windows)}
    summary = {"task": "classify", "method": cfg.method, "trainable_params": trainable, "total_params": total,
               "peak_train_memory_mb": peak_mem, "baseline_memory_mb": baseline_mem,
               "train_seconds": seconds, "steps": result.steps, "max_len": max_len, "stride": stride,
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
