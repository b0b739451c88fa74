"""What each fine-tuning task is, declared once: its own arguments (defaults, ranges, help), its defaults for the
shared FinetuneConfig settings, its learning rate per method, the metrics its evaluation reports and the settings
that apply to it. Everything else derives from here: the CLI's `finetune TASK` flags (`settings`), a run's resolved
settings (`resolve`), and the defaults of the Python functions (`finetune_qa(...)` and the rest take their
arguments' defaults from the classes below and `task_config(task)` when no FinetuneConfig is given), so the CLI
and the Python API cannot disagree. The tasks import this module; the driver (tune/recipe.py) imports the tasks.

A run's settings come from three layers, later ones winning: the task's defaults, a YAML recipe
(configs/*.yaml: flat keys, any FinetuneConfig field or task argument, e.g. `method: lora`, `lora_r: 16`,
`data: chatterbot`), then command-line flags and `--set key=value` overrides. The learning-rate default
depends on the method (adapters want larger steps than full fine-tuning).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import (
    SEQ2SEQ_PRESETS,
    FinetuneConfig,
    check_settings,
    coerce_settings,
    parse_override,
    read_recipe,
    setting,
    setting_name,
)
from lmforge.errors import ConfigError

TASKS = ("classify", "qa", "chat", "dpo", "grpo", "seq2seq")


# --- each task's own arguments, declared once (the CLI's flags are built from these and FinetuneConfig) ---------
@dataclass
class TaskArgs:
    """What every task reads."""

    model: str | None = setting(None, "model directory or packaged name")
    data: str | None = setting(None, "training data file, or a built-in set")
    out: str | None = setting(None, "run directory (default: runs/TASK-DATE-TIME)")
    val_data: str | None = setting(None, "validation file (default: a share of --data)")
    test_data: str | None = setting(None, "test file (default: a share of --data)")


@dataclass
class ClassifyArgs(TaskArgs):
    text_col: str | None = setting(None, "text column (default: text, sentence, tweet, ...)")
    label_col: str | None = setting(None, "label column (default: label, sentiment, class, ...)")
    val_fraction: float = setting(0.1, "share of --data held out for validation", low=0, high=1, high_open=True)
    test_fraction: float = setting(0.1, "share of --data held out for the test", low=0, high=1, high_open=True)
    class_weights: bool = setting(False, "weight the loss by inverse class frequency")
    stride: int | None = setting(
        None,
        "tokens shared by neighbouring windows of a text longer than --max-len (default: a quarter of --max-len)",
        low=0,
        integer=True,
    )
    transfer_data: str | None = setting(
        None,
        "with --teacher: more texts (a .txt file, one per line, or a CSV / TSV / JSONL text column; labels ignored) "
        "that the teacher labels and the student trains on beside --data's",
    )


@dataclass
class QAArgs(TaskArgs):
    stride: int = setting(64, "tokens shared by neighbouring windows of a long context", low=1, integer=True)


@dataclass
class ChatArgs(TaskArgs):
    packing: bool = setting(True, "pack short conversations together into rows of up to --max-len tokens")
    eval_before: bool = setting(True, "score the starting model's held-out replies too")
    max_new_tokens: int = setting(64, "reply length for the held-out evaluation", low=1, integer=True)
    eval_limit: int | None = setting(None, "score only the first N held-out questions", low=1, integer=True)


@dataclass
class DPOArgs(TaskArgs):
    beta: float = setting(0.1, "DPO temperature", low=0, low_open=True)


@dataclass
class GRPOArgs(TaskArgs):
    verifier: str = setting(
        "number", "the reward: exact, number, regex:PATTERN, json, code (runs the problem's tests), or FILE.py:FUNCTION"
    )
    group_size: int = setting(
        8, "completions sampled per prompt (the group its advantages are relative to)", low=2, integer=True
    )
    max_new_tokens: int = setting(
        64, "longest completion, sampled or decoded for the held-out accuracy", low=1, integer=True
    )
    temperature: float = setting(1.0, "sampling temperature of the completions", low=0, low_open=True)
    kl_beta: float = setting(0.0, "weight of the KL penalty to the starting model (0: none)", low=0)
    scale_rewards: bool = setting(True, "divide each group's advantages by its reward standard deviation")
    eval_limit: int | None = setting(None, "decode only the first N validation and test problems", low=1, integer=True)


@dataclass
class Seq2SeqArgs(TaskArgs):
    source_col: str | None = setting(None, "source column (default: source, src, input, text, document, en)")
    target_col: str | None = setting(None, "target column (default: target, tgt, output, summary, es)")
    prefix: str = setting("", "task prefix put before every source, e.g. 'translate English to Spanish: '")
    val_fraction: float = setting(0.05, "share of --data held out for validation", low=0, high=1, high_open=True)
    test_fraction: float = setting(0.05, "share of --data held out for the test", low=0, high=1, high_open=True)
    max_target_len: int | None = setting(None, "target tokens kept (default: --max-len)", low=1, integer=True)
    num_beams: int = setting(4, "beam width of the test-split decoding", low=1, integer=True)
    max_new_tokens: int | None = setting(
        None, "longest output when decoding (default: the target limit)", low=1, integer=True
    )
    eval_limit: int = setting(500, "test pairs decoded for the final scores", low=1, integer=True)
    time_budget: float | None = setting(None, "seconds of training: the epochs are sized to fit", low=0, low_open=True)


TASK_CLASSES: dict[str, type[TaskArgs]] = {
    "classify": ClassifyArgs,
    "qa": QAArgs,
    "chat": ChatArgs,
    "dpo": DPOArgs,
    "grpo": GRPOArgs,
    "seq2seq": Seq2SeqArgs,
}
TASK_HELP = {
    "classify": "text classification with an encoder (e.g. all-minilm-l6-v2)",
    "qa": "extractive question answering (SQuAD format), encoder",
    "chat": "instruction tuning (SFT) of a decoder on chat JSONL or chatterbot",
    "dpo": "preference tuning (DPO) on prompt/chosen/rejected JSONL",
    "grpo": "reinforcement learning with verifiable rewards (GRPO) on prompt/answer JSONL or arith",
    "seq2seq": "translation / summarization with an encoder-decoder (T5), or one from scratch",
}
TASK_ARGS: dict[str, dict[str, Any]] = {  # task -> argument -> default (derived from the classes above)
    task: {f.name: f.default for f in dataclasses.fields(cls)} for task, cls in TASK_CLASSES.items()
}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    # max_len: from the data; attention dropout off lets the fused attention kernel run (measured: the same
    # accuracy, 2.7x faster on long texts with bf16: benchmarks/long_docs.py, RESULTS.md)
    "classify": {
        "epochs": 3.0,
        "batch_size": 32,
        "max_len": None,
        "metric": "accuracy",
        "attn_dropout": 0.0,
        "dtype": "auto",
    },
    "qa": {"epochs": 2.0, "batch_size": 16, "max_len": 256, "metric": "f1"},
    "chat": {"epochs": 2.0, "batch_size": 8, "max_len": 512, "metric": "neg_loss"},
    "dpo": {"epochs": 1.0, "batch_size": 4, "max_len": 384, "metric": "neg_loss"},
    # batch_size: prompts per step, each sampled group_size times; steps are slow, so log and checkpoint often
    "grpo": {"epochs": 1.0, "batch_size": 4, "max_len": 512, "metric": "accuracy", "log_every": 1, "ckpt_every": 20},
    "seq2seq": {
        "epochs": 3.0,
        "batch_size": 32,
        "max_len": 128,
        "metric": "neg_loss",
        "weight_decay": 0.0,
        "optimizer": "adafactor",
    },
}
LR: dict[str, dict[str, float]] = {  # task -> method -> default learning rate
    "classify": {"full": 5e-5, "top-k": 2e-4, "lora": 5e-4, "qlora": 5e-4},
    "qa": {"full": 5e-5, "top-k": 2e-4, "lora": 5e-4, "qlora": 5e-4},
    "chat": {"full": 2e-5, "top-k": 5e-5, "lora": 2e-4, "qlora": 2e-4},
    "dpo": {"full": 5e-6, "top-k": 1e-5, "lora": 5e-5, "qlora": 5e-5},
    "grpo": {"full": 1e-5, "top-k": 2e-5, "lora": 2e-4, "qlora": 2e-4},
    # Adafactor's relative steps: T5 pre-trains at 1e-2 and fine-tunes at 1e-3
    "seq2seq": {"full": 1e-3, "top-k": 1e-3, "lora": 1e-3, "qlora": 1e-3},
}
FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig)}
# the validation metrics each task's evaluation reports, higher is better: --metric picks the kept weights by one
METRICS: dict[str, tuple[str, ...]] = {
    "classify": ("accuracy", "macro_f1"),
    "qa": ("f1", "exact_match"),
    "chat": ("neg_loss",),
    "dpo": ("neg_loss", "preference_accuracy", "reward_accuracy", "reward_margin"),
    "grpo": ("accuracy", "reward"),
    "seq2seq": ("neg_loss", "bleu_greedy", "chrf_greedy"),
}
LORA = ("lora", "qlora")
# settings that apply only where a condition holds: given on the command line elsewhere, they are refused
# (setting -> (applies(task, settings), what it applies to))
APPLIES: dict[str, tuple[Any, str]] = {
    "top_k": (lambda task, v: v["method"] == "top-k", "--method top-k"),
    **{
        k: (lambda task, v: v["method"] in LORA, "--method lora or qlora")
        for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
    },
    "quant": (lambda task, v: v["method"] == "qlora", "--method qlora"),
    "label_smoothing": (lambda task, v: task == "classify", "finetune classify"),
    "augment": (lambda task, v: task == "classify", "finetune classify"),
    "mixup": (lambda task, v: task == "classify", "finetune classify"),
    "backtranslate": (lambda task, v: task == "classify", "finetune classify"),
    "teacher": (lambda task, v: task == "classify", "finetune classify (lmforge distill)"),
    **{
        k: (lambda task, v: task == "classify" and v["teacher"], "finetune classify --teacher")
        for k in ("distill_alpha", "distill_temperature")
    },
    "keep_layers": (lambda task, v: task in ("classify", "qa"), "the encoder tasks (classify, qa)"),
    "transfer_data": (lambda task, v: task == "classify" and v["teacher"], "finetune classify --teacher"),
    "augment_ops": (lambda task, v: task == "classify" and v["augment"] > 0, "finetune classify --augment"),
    **{
        k: (lambda task, v: v["schedule"] == "plateau", "--schedule plateau")
        for k in ("plateau_patience", "plateau_factor")
    },
    "min_delta": (
        lambda task, v: v["early_stopping"] or v["schedule"] == "plateau",
        "--early-stopping or --schedule plateau",
    ),
    "val_fraction": (lambda task, v: not v.get("val_data"), "a --data split (without --val-data)"),
    "test_fraction": (lambda task, v: not v.get("test_data"), "a --data split (without --test-data)"),
}


def resolve(
    task: str, recipe: str | Path | None = None, flags: dict[str, Any] | None = None, sets: list[str] | None = None
) -> tuple[FinetuneConfig, dict[str, Any]]:
    """The FinetuneConfig and task arguments for a run (see the module notes for the layering)."""
    if task not in TASKS:
        raise ConfigError(f"unknown fine-tuning task {task!r}; known: {', '.join(TASKS)}")
    values: dict[str, Any] = {**TASK_ARGS[task], **TASK_DEFAULTS[task]}
    known = FIELDS | set(TASK_ARGS[task])

    def put(key: str, value: Any, where: str) -> None:
        key = key.replace("-", "_")
        if key == "task":
            if value != task:
                raise ConfigError(f"{where}: this recipe is for task {value!r}, not {task!r}")
            return
        if key not in known:
            raise ConfigError(
                f"{where}: unknown setting {key!r} for finetune {task}; known: {', '.join(sorted(known))}"
            )
        values[key] = value

    if recipe:
        for k, v in read_recipe(recipe, "a mapping of settings").items():
            put(str(k), v, str(recipe))
    given: dict[str, str] = {}  # settings from the command line -> how they were given
    for k, v in (flags or {}).items():
        if v is not None:
            put(k, v, f"--{k.replace('_', '-')}")
            given[k.replace("-", "_")] = f"--{k.replace('_', '-')}"
    for item in sets or []:
        k, v = parse_override(item, "lora_r=16")
        put(k, v, f"--set {item}")
        given[k.replace("-", "_")] = f"--set {item}"
    for req in ("model", "data"):
        if values.get(req) in (None, ""):
            raise ConfigError(f"finetune {task} needs --{req} (or `{req}:` in the recipe)")
    if values.get("lr") is None:
        method = values.get("method", "full")
        values["lr"] = LR[task].get(method, 5e-5)
        if task == "seq2seq" and _is_preset(values["model"]):  # from scratch: T5's pre-training rate
            values["lr"] = 1e-2
    if isinstance(values.get("lora_targets"), (list, tuple)):  # lora_targets: [q_proj, v_proj]
        values["lora_targets"] = ",".join(map(str, values["lora_targets"]))
    values = coerce_settings(FinetuneConfig, values, setting_name)
    values = coerce_settings(TASK_CLASSES[task], values, setting_name)
    cfg = FinetuneConfig(**{k: v for k, v in values.items() if k in FIELDS})
    cfg.validate()
    args = {k: values[k] for k in TASK_ARGS[task]}
    check_args(task, **args)
    check_applies(task, {**dataclasses.asdict(cfg), **values}, given)
    return cfg, args


def check_applies(task: str, values: dict[str, Any], given: dict[str, str]) -> None:
    """Refuse what would be accepted and then not used: a setting given for a method or task it does not apply
    to (APPLIES), a metric the task's evaluation does not report, held-out files beside a built-in set's own
    splits; note --strategy outside torchrun."""
    for key, how in given.items():
        rule = APPLIES.get(key)
        if rule is not None and not rule[0](task, values):
            raise ConfigError(
                f"{how} applies to {rule[1]}; this run (finetune {task}, --method "
                f"{values['method']}) does not use it: drop it"
            )
    if values["metric"] not in METRICS[task]:
        raise ConfigError(
            f"metric {values['metric']!r} is not one finetune {task} reports; choose one of {', '.join(METRICS[task])}"
        )
    if task == "qa" and values.get("data") == "shakespeare-qa" and (values.get("val_data") or values.get("test_data")):
        raise ConfigError(
            "shakespeare-qa brings its own validation and test splits; --val-data / --test-data go "
            "with a SQuAD file of your own"
        )
    if "strategy" in given and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        print(
            f"lmforge: note: {given['strategy']} applies under torchrun (several processes); this run has one",
            file=sys.stderr,
        )


def task_max_len(task: str, cfg: FinetuneConfig, limit: int) -> int:
    """Tokens per example: cfg.max_len, or the task's default when it is not given, and never past `limit` (the
    model's context; a --max-len past it is noted, the task's own default quietly fitted)."""
    if cfg.max_len is not None and cfg.max_len > limit and cfg.max_len != TASK_DEFAULTS[task]["max_len"]:
        print(
            f"lmforge: note: --max-len {cfg.max_len} is past the model's context of {limit} tokens; using {limit}",
            file=sys.stderr,
        )
    return min(cfg.max_len or TASK_DEFAULTS[task]["max_len"], limit)


def check_args(task: str, **args: Any) -> None:
    """Refuse a task argument outside its choices or range with one line naming it; the tasks call this before
    any work too, so the Python API refuses what the CLI refuses."""
    check_settings(TASK_CLASSES[task](**args), setting_name)


def settings(task: str) -> list[tuple[str, Any, dataclasses.Field]]:
    """(name, this task's default, field) for every setting of `finetune TASK`: the task's arguments first, then
    FinetuneConfig's fields with the task's defaults. The CLI builds one flag from each."""
    defaults = TASK_DEFAULTS[task]
    rows = [(f.name, f.default, f) for f in dataclasses.fields(TASK_CLASSES[task])]
    return rows + [(f.name, defaults.get(f.name, f.default), f) for f in dataclasses.fields(FinetuneConfig)]


def _is_preset(model: Any) -> bool:
    return str(model) in SEQ2SEQ_PRESETS and not Path(str(model)).exists()


def task_config(task: str, method: str = "full", model: str | None = None, **settings: Any) -> FinetuneConfig:
    """The FinetuneConfig a task runs with when none is given: its defaults (TASK_DEFAULTS over FinetuneConfig's),
    the learning rate of its method (seq2seq from a preset: T5's pre-training rate), then `settings` (any
    FinetuneConfig field). What `lmforge finetune TASK --model MODEL` resolves with no other settings."""
    if task not in TASKS:
        raise ConfigError(f"unknown fine-tuning task {task!r}; known: {', '.join(TASKS)}")
    values = {**TASK_DEFAULTS[task], "method": method, **settings}
    if "lr" not in settings:
        values["lr"] = LR[task].get(method, 5e-5)
        if task == "seq2seq" and model is not None and _is_preset(model):
            values["lr"] = 1e-2
    cfg = FinetuneConfig(**{k: v for k, v in values.items() if k in FIELDS})
    cfg.validate()
    return cfg
