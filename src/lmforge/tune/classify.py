"""Sequence classification: fine-tune an encoder (e.g. all-MiniLM-L6-v2) on labelled text, read top to bottom.

data     CSV / TSV / JSONL -> texts + label names (broken encodings repaired and counted); label ids in
         sorted name order; a stratified train / validation / test split under the seed (or given files)
windows  max_len from the data when not given (the longest text, up to the model's window); a longer text is
         read whole as overlapping windows whose logits are averaged, in training and prediction alike
model    the encoder under a fresh classification head carrying the label names; "full" trains all of it,
         "top-k" only the last k blocks and the head
train    `fit`: length-bucketed batches, AdamW, warm-up + linear decay; the best validation epoch is kept;
         with --teacher, the teacher's softened class distribution (computed once) beside the labels
finish   test-split accuracy, macro-F1, per-class precision / recall, a confusion-matrix PNG, the model as an
         HF directory (transformers loads it as BertForSequenceClassification), a report
"""

from __future__ import annotations

import csv
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import FinetuneConfig
from lmforge.data.augment import augment_ids, check_ops, token_neighbours
from lmforge.data.labelled import LabelledSet, class_counts, read_labelled, read_texts, stratified_split
from lmforge.errors import ConfigError, DataError, ModelLoadError
from lmforge.eval.classify import classification_metrics, plot_confusion
from lmforge.files import write_text
from lmforge.generate.seq2seq import Seq2SeqParams, generate_seq2seq
from lmforge.interop import load_pretrained
from lmforge.models.encoder import Encoder
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.nn.loss import distill_loss
from lmforge.predict import pad_batch, pad_windows, predict_proba, window_logits, window_stride
from lmforge.train.supervised import length_buckets
from lmforge.tune.driver import Run, Task, run_footer, run_task, say
from lmforge.tune.tasks import ClassifyArgs


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
    teacher: dict[str, Any] | None = (
        None  # distilled (--teacher): the teacher's classification_metrics on the test split
    )

    def summary(self) -> str:
        """What `lmforge finetune classify` prints at the end."""
        t = self.test
        lines = [
            f"test: accuracy {t['accuracy']:.4f}  macro-F1 {t['macro_f1']:.4f}  ({self.rows['test']} rows, "
            f"{self.seconds:.0f} s training, {self.trainable_params:,} trainable parameters)"
        ]
        lines += [
            f"  {name:>12}: precision {m['precision']:.3f}  recall {m['recall']:.3f}  f1 {m['f1']:.3f}  "
            f"n={m['support']}"
            for name, m in t["per_class"].items()
        ]
        if self.teacher:
            kept = t["accuracy"] / max(self.teacher["accuracy"], 1e-12)
            lines.append(f"teacher: test accuracy {self.teacher['accuracy']:.4f} (the student keeps {kept:.1%} of it)")
        return "\n".join(lines + [run_footer(self)])


def load_splits(
    data: str | Path,
    text_col: str | None,
    label_col: str | None,
    val_data: str | Path | None,
    test_data: str | Path | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[LabelledSet, LabelledSet, LabelledSet, list[str]]:
    ds = read_labelled(data, text_col, label_col)
    names = sorted(set(ds.labels))
    if len(names) < 2:
        raise DataError(f"{data} has a single class {names[0]!r}; classification needs at least two")
    if test_data is None or val_data is None:
        tr, va, te = stratified_split(
            ds.labels, 0.0 if val_data else val_fraction, 0.0 if test_data else test_fraction, seed
        )
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


def fit_windows(
    tok, texts: list[str], max_len: int | None, stride: int | None, limit: int
) -> tuple[int, int, list[list[list[int]]]]:
    """(max_len, stride, each text's windows) for training. max_len not given: the longest text's length (a
    multiple of 8) when it fits the model's window `limit`, else the whole window; a text longer than max_len is
    read as overlapping windows, and a one-line notice says how many were."""
    windows = tok.encode_windows(
        texts, min(max_len or limit, limit), window_stride(min(max_len or limit, limit)) if stride is None else stride
    )
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
        say(
            f"{long} of {len(texts)} training texts are longer than one window of {max_len} tokens: each is read "
            f"whole as {sum(len(w) for w in windows if len(w) > 1) / long:.1f} windows on average, neighbours sharing "
            f"{stride} tokens, their logits averaged into one prediction"
        )
    return max_len, stride, windows


def teacher_scores(path: str, names: list[str], sets: list[list[str]], device: str = "cpu") -> list[torch.Tensor]:
    """A teacher classifier's log-probabilities [N, classes] for each list of texts in `sets`, read with its own
    tokenizer and window (a teacher and its student need not share a vocabulary); its classes must be `names`."""
    teacher, tok = load_pretrained(path, device=device)
    if not (isinstance(teacher, Encoder) and teacher.config.head == "classify"):
        raise ModelLoadError(f"teacher {path} is not a classifier (an encoder with a classification head)")
    if teacher.config.labels != names:
        raise DataError(
            f"teacher {path} classifies {', '.join(teacher.config.labels)}; the data's classes are {', '.join(names)}"
        )
    return [torch.log(predict_proba(teacher, tok, texts).clamp(min=1e-12)) for texts in sets]


def back_translate(texts: list[str], models: str, device: str = "cpu", batch_size: int = 32) -> list[str]:
    """Each text translated by the first of `models` ("FORWARD,BACK": seq2seq models lmforge loads) and back by
    the second, greedily: a paraphrase in the texts' own language, as far as the two models can make one."""
    names = [m.strip() for m in models.split(",") if m.strip()]
    if len(names) != 2:
        raise ConfigError(
            f"backtranslate (--backtranslate) takes two seq2seq models, FORWARD,BACK (the same one twice for a "
            f"model that translates both ways), got {models!r}"
        )
    out = list(texts)
    for name in names:
        model, tok = load_pretrained(name, device=device)
        if not isinstance(model, Seq2SeqLM):
            raise ModelLoadError(f"{name} is a {type(model).__name__}; back-translation needs seq2seq (T5) models")
        steps = min(128, model.config.max_seq_len)
        out = generate_seq2seq(model, tok, out, Seq2SeqParams(max_new_tokens=steps), batch_size=batch_size)
    return out


class ClassifyTask(Task):
    name, title = "classify", "Classification fine-tune"
    needs = "classification fine-tuning needs an encoder (BERT family) model"
    model_class = Encoder
    images = ("loss.png", "confusion.png")
    packages = ("sklearn",)  # (the eval extra: its metrics)

    def check(self) -> None:
        a, cfg = self.args, self.cfg
        if cfg.augment:
            check_ops(cfg.augment_ops)
        if cfg.mixup and cfg.teacher:
            raise ConfigError("mixup (--mixup) and a teacher (--teacher) do not combine: choose one")
        if a["stride"] is not None and cfg.max_len is not None and a["stride"] >= cfg.max_len - 2:
            raise ConfigError(
                f"stride (--stride) {a['stride']} must be below max_len - 2 ({cfg.max_len - 2}): "
                f"neighbouring windows share that many tokens"
            )
        if not (a["test_data"] or 0 < a["test_fraction"]) or a["val_fraction"] + a["test_fraction"] >= 1:
            raise ConfigError(
                "test_fraction (--test-fraction) must be above 0 (or give --test-data), and the "
                "validation and test fractions must leave data to train on"
            )

    def load_data(self) -> None:
        a = self.args
        self.train, self.val, self.test, self.names = load_splits(
            self.data,
            a["text_col"],
            a["label_col"],
            a["val_data"],
            a["test_data"],
            a["val_fraction"],
            a["test_fraction"],
            self.cfg.seed,
        )
        self.label_id = {n: i for i, n in enumerate(self.names)}
        self.transfer = read_texts(a["transfer_data"], a["text_col"]) if a["transfer_data"] else []

    def load_model(self):
        model, tok = super().load_model()
        if not (model.config.head == "classify" and model.config.labels == self.names):
            model = model.with_head("classify", self.names)
        return model, tok

    def prepare(self) -> None:
        cfg, train, names, tok = self.cfg, self.train, self.names, self.tok
        say(
            f"data: {len(train)} train / {len(self.val)} validation / {len(self.test)} test rows, classes "
            f"{class_counts(train.labels)}"
            + (f"; {train.repaired_rows} rows repaired from non-UTF-8 bytes" if train.repaired_rows else "")
            + (f"; {train.skipped_rows} rows skipped (empty text or label)" if train.skipped_rows else "")
        )
        texts = train.texts + self.transfer  # (--transfer-data: texts the teacher labels, after the labelled ones)
        self.teacher_logp = None
        if cfg.teacher:  # its soft targets, computed once: the teacher never runs again
            self.teacher_logp, teacher_test = teacher_scores(cfg.teacher, names, [texts, self.test.texts], cfg.device)
            y_test = [self.label_id[v] for v in self.test.labels]
            self.teacher_test = classification_metrics(y_test, teacher_test.argmax(-1).tolist(), names)
            say(
                f"teacher {cfg.teacher}: test accuracy {self.teacher_test['accuracy']:.4f}; distilling at temperature "
                f"{cfg.distill_temperature:g}, soft share {cfg.distill_alpha:g}"
                + (f"; {len(self.transfer)} more texts labelled by it (--transfer-data)" if self.transfer else "")
            )
        self.max_len, self.stride, self.windows = fit_windows(
            tok, texts, cfg.max_len, self.args["stride"], self.model.config.max_seq_len
        )
        windows = self.windows
        hard = [self.label_id[v] for v in train.labels]
        if self.transfer:  # (their hard label: the teacher's choice)
            hard += self.teacher_logp[len(train) :].argmax(-1).tolist()
        self.y = torch.tensor(hard)
        self.weights = None
        if self.args["class_weights"]:  # inverse class frequency, mean 1
            counts = torch.bincount(self.y, minlength=len(names)).float().clamp(min=1)
            self.weights = (counts.sum() / (len(names) * counts)).to(cfg.device)
        self.windowed = any(len(w) > 1 for w in windows)
        if cfg.mixup and self.windowed:
            raise ConfigError(
                f"mixup (--mixup) mixes one window per text; some texts are longer than --max-len {self.max_len}: "
                f"raise it or drop --mixup"
            )
        # a batch of long texts holds batch_size x 128 tokens' worth of windows (what batch_size short examples
        # held): 32 windows of 512 would keep ~13 GB of activations for MiniLM's backward
        per_window = max(1, -(-self.max_len // 128))
        self.size = (lambda i: len(windows[i]) * per_window) if self.windowed else None
        if self.windowed:
            say(
                f"batches of up to {max(1, cfg.batch_size // per_window)} windows of {self.max_len} tokens "
                f"(--batch-size {cfg.batch_size} x 128 tokens)"
            )
        self.paraphrases = None
        if cfg.backtranslate:  # (each text's round trip, computed once; written out for the reader)
            para = back_translate(texts, cfg.backtranslate, cfg.device)
            para = [p if p.strip() else t for p, t in zip(para, texts, strict=True)]
            self.paraphrases = tok.encode_windows(para, self.max_len, self.stride)
            if os.environ.get("RANK", "0") == "0":
                buf = io.StringIO()
                csv.writer(buf).writerows([("text", "round_trip"), *zip(texts, para, strict=True)])
                write_text(self.out / "backtranslated.csv", buf.getvalue())
            say(
                f"back-translation through {cfg.backtranslate}: {sum(p != t for p, t in zip(para, texts))} "
                f"of {len(para)} texts changed, e.g. {texts[0][:60]!r} -> {para[0][:60]!r} "
                f"(all in backtranslated.csv)"
            )
        self.neighbours: dict[int, list[int]] = {}
        if cfg.augment:  # (the nearest tokens, in the model's own input embeddings, of every training token)
            self.augment_ops = check_ops(cfg.augment_ops)
            seen = {t for text in windows for win in text for t in win[1:-1]}
            specials = {t for text in windows for win in text for t in (win[0], win[-1])} | {tok.pad_id}
            self.neighbours = token_neighbours(self.model.tok_emb.weight, seen, exclude=specials)
            say(f"augment: {cfg.augment:g} of the tokens of half the texts each epoch ({', '.join(self.augment_ops)})")
        self.order = [sum(map(len, w)) for w in windows]
        self.steps_per_epoch = len(
            length_buckets(len(windows), self.order.__getitem__, cfg.batch_size, cfg.seed, size=self.size)
        )
        self.val_y = [self.label_id[v] for v in self.val.labels]
        self.rows = {
            "train": len(train),
            "validation": len(self.val),
            "test": len(self.test),
            "repaired": train.repaired_rows,
            "skipped": train.skipped_rows,
            "train_windowed": sum(len(w) > 1 for w in windows),
            "transfer": len(self.transfer),
        }

    def batches(self, epoch: int):
        """Shuffled, then bucketed by length (little padding per batch); long texts as [D, W, T] windows. With
        --augment, this epoch's edits first (a function of the seed and the epoch)."""
        w, pad = self._augmented(epoch), self.tok.pad_id
        mix_rng = np.random.default_rng([self.cfg.seed, epoch, 7])
        for idx in length_buckets(
            len(w), self.order.__getitem__, self.cfg.batch_size, self.cfg.seed + epoch, size=self.size
        ):
            b = pad_windows([w[i] for i in idx], pad) if self.windowed else pad_batch([w[i][0] for i in idx], pad)
            soft = {} if self.teacher_logp is None else {"teacher_logp": self.teacher_logp[idx]}
            if self.cfg.mixup:  # (each row's share of itself, drawn per epoch and batch: a resume draws the same)
                soft["mix_lam"] = torch.from_numpy(mix_rng.beta(self.cfg.mixup, self.cfg.mixup, len(idx))).float()
            yield {**b, "labels": self.y[idx], **soft, "class_weights": self.weights, "shared": ("class_weights",)}

    def _augmented(self, epoch: int) -> list[list[list[int]]]:
        """The training windows, half the texts (drawn per epoch) read as their back-translation and/or edited
        (data/augment.py) when --backtranslate / --augment are on."""
        rate, para = self.cfg.augment, self.paraphrases
        if not (rate or para):
            return self.windows
        rng = random.Random(f"augment {self.cfg.seed} {epoch}")
        out = []
        for i, text in enumerate(self.windows):
            if rng.random() < 0.5:
                text = para[i] if para else text
                if rate:
                    text = [
                        augment_ids(win, rate, rng, self.neighbours, self.augment_ops, self.max_len) for win in text
                    ]
            out.append(text)
        return out

    @property
    def loss(self):
        cfg = self.cfg
        if not (cfg.label_smoothing or self.windowed or cfg.teacher or cfg.mixup):
            return None  # the model's own loss, which is this one without any of them

        def loss(m: Encoder, b: dict) -> torch.Tensor:
            if cfg.mixup:  # (the pooled vectors mixed in the model; the labels here, by the same shares)
                lam, y = b["mix_lam"], b["labels"]
                logits = m(
                    b["input_ids"], attention_mask=b["attention_mask"], mixup=lam, grad_checkpoint=cfg.grad_checkpoint
                ).logits
                ce = [
                    F.cross_entropy(
                        logits, t, weight=b["class_weights"], label_smoothing=cfg.label_smoothing, reduction="none"
                    )
                    for t in (y, y.roll(1, 0))
                ]
                return (lam * ce[0] + (1 - lam) * ce[1]).mean()
            logits = window_logits(m, b, grad_checkpoint=cfg.grad_checkpoint)
            if cfg.teacher:  # (the labels' share and the teacher's softened distribution: nn.loss)
                return distill_loss(
                    logits,
                    b["labels"],
                    None,
                    b["teacher_logp"],
                    cfg.distill_alpha,
                    cfg.distill_temperature,
                    weight=b["class_weights"],
                    label_smoothing=cfg.label_smoothing,
                )
            return F.cross_entropy(logits, b["labels"], weight=b["class_weights"], label_smoothing=cfg.label_smoothing)

        return loss

    def evaluate(self) -> dict[str, float]:
        logits = torch.log(
            predict_proba(self.model, self.tok, self.val.texts, max_len=self.max_len, stride=self.stride).clamp(
                min=1e-12
            )
        )
        m = classification_metrics(self.val_y, logits.argmax(-1).tolist(), self.names)
        return {
            "loss": float(F.nll_loss(logits, torch.tensor(self.val_y))),
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
        }

    def finish(self, fit) -> dict[str, Any]:
        pred = (
            predict_proba(self.model, self.tok, self.test.texts, max_len=self.max_len, stride=self.stride)
            .argmax(-1)
            .tolist()
        )
        self.test_m = classification_metrics([self.label_id[v] for v in self.test.labels], pred, self.names)
        plot_confusion(self.test_m, self.out / "report" / "confusion.png", title="test split")
        out = {"labels": self.names, "max_len": self.max_len, "stride": self.stride, "test": self.test_m}
        if self.teacher_logp is not None:
            out["teacher"] = {"model": self.cfg.teacher, "test": self.teacher_test}
        return out

    def report_rows(self) -> list[tuple[str, str]]:
        t, best = self.test_m, self.best
        return [
            ("rows train / val / test", f"{len(self.train)} / {len(self.val)} / {len(self.test)}"),
            ("repaired rows (non-UTF-8)", str(self.train.repaired_rows)),
            ("best validation accuracy", f"{best.get('accuracy', float('nan')):.4f}"),
            ("test accuracy", f"{t['accuracy']:.4f}"),
            ("test macro-F1", f"{t['macro_f1']:.4f}"),
            *(
                [("teacher's test accuracy", f"{self.teacher_test['accuracy']:.4f} ({self.cfg.teacher})")]
                if self.teacher_logp is not None
                else []
            ),
        ] + [
            (f"{k}: precision / recall / F1", f"{v['precision']:.3f} / {v['recall']:.3f} / {v['f1']:.3f}")
            for k, v in t["per_class"].items()
        ]

    def result(self, run: Run) -> ClassifyResult:
        return ClassifyResult(
            run.out,
            run.model_dir,
            self.test_m,
            run.fit.best,
            run.trainable,
            run.total,
            run.seconds,
            self.rows,
            run.adapter_dir,
            self.teacher_test if self.teacher_logp is not None else None,
        )


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
    transfer_data: str | Path | None = None,
    progress: bool | None = None,
    resume: bool = False,
) -> ClassifyResult | None:
    """Fine-tune an encoder to classify texts (see the module notes; settings in tune/tasks.py: ClassifyArgs)."""
    return run_task(
        ClassifyTask,
        model_path,
        data,
        out,
        cfg,
        progress,
        resume,
        text_col=text_col,
        label_col=label_col,
        val_data=val_data and str(val_data),
        test_data=test_data and str(test_data),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        class_weights=class_weights,
        stride=stride,
        transfer_data=transfer_data and str(transfer_data),
    )
