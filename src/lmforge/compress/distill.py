"""Distillation: a smaller student learns a teacher's softened output distribution beside the labels (Hinton et
al. 2015; DistilBERT, MiniLM). `lmforge distill` picks the run from the teacher:

classifier  an encoder with a classification head: `finetune classify` with `--teacher` (the teacher's class
            distribution of every training text computed once; the loss mixes it, softened by the temperature, with
            the labels: nn.loss.distill_loss). The student is `student` (any encoder lmforge loads, its own
            tokenizer), or the teacher itself with `keep_layers` of its blocks (DistilBERT's student: a pruned
            teacher), or both (a student model cut down).
causal LM   a decoder: pre-training with `train.teacher` on a text corpus, in the teacher's tokenizer; the teacher
            runs once over the training tokens and its top-k next-token log-probabilities are stored beside them
            (train/teacher.py), so it never runs again however long the student trains. The student is a preset
            (default `quickstart`, changed with `model.KEY=VALUE` settings), its vocabulary the teacher's.

Everything else is the two runs' own: their settings (`sets`: FinetuneConfig keys such as `epochs=5` for a
classifier, `train.steps=300` style keys for a causal LM), checkpoints, resume, outputs and report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import PRESETS, load_run_config
from lmforge.errors import ConfigError
from lmforge.interop import resolve_model_path
from lmforge.interop.hf import read_config
from lmforge.quickstart import QUICKSTART
from lmforge.train.loop import RunResult, pretrain
from lmforge.tune.classify import ClassifyResult
from lmforge.tune.recipe import finetune

KINDS = ("classifier", "causal-lm")


@dataclass
class DistillResult:
    kind: str  # one of KINDS
    run: ClassifyResult | RunResult  # the fine-tuning or pre-training run's own result

    def summary(self) -> str:
        return self.run.summary()


def teacher_kind(teacher: str | Path) -> str:
    """ "classifier" or "causal-lm", from the teacher's files alone (its config.json, or a .gguf: a decoder)."""
    p = resolve_model_path(teacher)
    if p.is_file() and p.suffix == ".gguf":
        return "causal-lm"
    archs = " ".join(read_config(p).get("architectures") or [])
    if "ForSequenceClassification" in archs:
        return "classifier"
    if "ForCausalLM" in archs or "LMHeadModel" in archs:
        return "causal-lm"
    raise ConfigError(
        f"teacher {teacher} is a {archs or 'model without architectures in its config.json'}; lmforge distills "
        f"from a classifier (fine-tuned with finetune classify) or a causal LM"
    )


def distill(
    teacher: str | Path,
    data: str | Path | list[str] | None,
    out: str | Path,
    student: str | Path | None = None,
    keep_layers: int | None = None,
    alpha: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    sets: list[str] | None = None,
    device: str | None = None,
    progress: bool | None = None,
    resume: bool = False,
) -> DistillResult | None:
    """Distil `teacher` into a student on `data` (see the module notes); `out` is the run folder. alpha (the soft
    term's share), temperature, top_k (causal LM only) and device default to the runs' own settings. Returns None in a
    torchrun process other than 0."""
    kind = teacher_kind(teacher)
    if isinstance(data, list) and kind == "classifier":
        if len(data) != 1:
            raise ConfigError(f"a classifier is distilled on one labelled file, got {len(data)} for --data")
        data = data[0]
    if kind == "classifier":
        if top_k is not None:
            raise ConfigError("--top-k applies to a causal-LM teacher; a classifier's whole distribution is used")
        if student is None and keep_layers is None:
            raise ConfigError(
                "name the student: --student MODEL (an encoder), --student-layers N (the teacher with N of its "
                "blocks), or both"
            )
        flags: dict[str, Any] = {
            "model": str(student or teacher),
            "data": None if data is None else str(data),
            "out": str(out),
            "teacher": str(teacher),
            "keep_layers": keep_layers,
            "distill_alpha": alpha,
            "distill_temperature": temperature,
            "device": device,
        }
        run = finetune("classify", None, flags, sets, progress=progress, resume=resume)
        return None if run is None else DistillResult(kind, run)

    if keep_layers is not None:
        raise ConfigError(
            "--student-layers cuts down an encoder teacher; a causal-LM student is a preset (--student NAME) "
            "changed with --set model.KEY=VALUE (e.g. model.n_layer=4)"
        )
    if resume:
        extra = [f"train.device={device}"] if device else []
        result = pretrain(None, out, resume=True, progress=progress, overrides=extra + list(sets or []))
        return DistillResult(kind, result)
    preset = str(student or "quickstart")
    if preset not in PRESETS:
        raise ConfigError(
            f"a causal-LM student is a decoder preset ({', '.join(PRESETS)}), got {preset!r}: its vocabulary "
            f"becomes the teacher's and it trains from scratch"
        )
    given = {
        "train.teacher": str(teacher),
        "train.distill_alpha": alpha,
        "train.distill_temperature": temperature,
        "train.distill_top_k": top_k,
        "train.device": device,
    }
    if not data:
        raise ConfigError("distill needs --data: the text the student learns from")
    sources = [str(d) for d in data] if isinstance(data, list) else [str(data)]
    base = {**QUICKSTART, "model": {"preset": preset}, "data": {**QUICKSTART["data"], "sources": sources}}
    overrides = [f"{k}={v}" for k, v in given.items() if v is not None] + list(sets or [])
    result = pretrain(load_run_config(base=base, overrides=overrides), Path(out), progress=progress)
    return DistillResult(kind, result)
