"""One entry point for every fine-tuning task: `finetune(task, ...)` and `lmforge finetune TASK`.

A run's settings come from three layers, later ones winning: the task's defaults, a YAML recipe
(configs/*.yaml: flat keys, any FinetuneConfig field or task argument, e.g. `method: lora`, `lora_r: 16`,
`data: chatterbot`), then command-line flags and `--set key=value` overrides. The learning-rate default
depends on the method (adapters want larger steps than full fine-tuning).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import check_number
from lmforge.errors import ConfigError
from lmforge.train.supervised import FinetuneConfig, setting_name

TASKS = ("classify", "qa", "chat", "dpo", "seq2seq")
TASK_ARGS: dict[str, dict[str, Any]] = {  # task arguments and their defaults (None: required or optional)
    "classify": {"model": None, "data": None, "out": None, "text_col": None, "label_col": None, "val_data": None,
                 "test_data": None, "val_fraction": 0.1, "test_fraction": 0.1, "class_weights": False},
    "qa": {"model": None, "data": None, "out": None, "val_data": None, "test_data": None, "stride": 64},
    "chat": {"model": None, "data": None, "out": None, "val_data": None, "test_data": None, "packing": True,
             "eval_before": True, "max_new_tokens": 64, "eval_limit": None},
    "dpo": {"model": None, "data": None, "out": None, "val_data": None, "test_data": None, "beta": 0.1},
    "seq2seq": {"model": None, "data": None, "out": None, "val_data": None, "test_data": None, "source_col": None,
                "target_col": None, "prefix": "", "val_fraction": 0.05, "test_fraction": 0.05,
                "max_target_len": None, "num_beams": 4, "max_new_tokens": None, "eval_limit": 500,
                "time_budget": None},
}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classify": {"epochs": 3.0, "batch_size": 32, "max_len": 128, "metric": "accuracy"},
    "qa": {"epochs": 2.0, "batch_size": 16, "max_len": 256, "metric": "f1"},
    "chat": {"epochs": 2.0, "batch_size": 8, "max_len": 512, "metric": "neg_loss"},
    "dpo": {"epochs": 1.0, "batch_size": 4, "max_len": 384, "metric": "neg_loss"},
    "seq2seq": {"epochs": 3.0, "batch_size": 32, "max_len": 128, "metric": "neg_loss", "weight_decay": 0.0,
                "optimizer": "adafactor"},
}
LR: dict[str, dict[str, float]] = {  # task -> method -> default learning rate
    "classify": {"full": 5e-5, "top-k": 2e-4, "lora": 5e-4, "qlora": 5e-4},
    "qa": {"full": 5e-5, "top-k": 2e-4, "lora": 5e-4, "qlora": 5e-4},
    "chat": {"full": 2e-5, "top-k": 5e-5, "lora": 2e-4, "qlora": 2e-4},
    "dpo": {"full": 5e-6, "top-k": 1e-5, "lora": 5e-5, "qlora": 5e-5},
    # Adafactor's relative steps: T5 pre-trains at 1e-2 and fine-tunes at 1e-3
    "seq2seq": {"full": 1e-3, "top-k": 1e-3, "lora": 1e-3, "qlora": 1e-3},
}
FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig)}


def resolve(task: str, recipe: str | Path | None = None, flags: dict[str, Any] | None = None,
            sets: list[str] | None = None) -> tuple[FinetuneConfig, dict[str, Any]]:
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
            raise ConfigError(f"{where}: unknown setting {key!r} for finetune {task}; known: "
                              f"{', '.join(sorted(known))}")
        values[key] = value

    if recipe:
        path = Path(recipe)
        if path.is_dir():
            raise ConfigError(f"recipe {path} is a folder; give a YAML file (see configs/ for examples)")
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist (see configs/ for examples)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"recipe {path} is not UTF-8 text; give a YAML file (see configs/ for "
                              f"examples)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of settings")
        for k, v in data.items():
            put(str(k), v, str(path))
    for k, v in (flags or {}).items():
        if v is not None:
            put(k, v, f"--{k.replace('_', '-')}")
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (example: --set lora_r=16)")
        k, _, v = item.partition("=")
        put(k.strip(), yaml.safe_load(v), f"--set {item}")
    for req in ("model", "data"):
        if values.get(req) in (None, ""):
            raise ConfigError(f"finetune {task} needs --{req} (or `{req}:` in the recipe)")
    if values.get("lr") is None:
        method = values.get("method", "full")
        values["lr"] = LR[task].get(method, 5e-5)
        if task == "seq2seq" and _is_preset(values["model"]):  # from scratch: T5's pre-training rate
            values["lr"] = 1e-2
    try:
        cfg = FinetuneConfig(**{k: v for k, v in values.items() if k in FIELDS})
    except TypeError as e:
        raise ConfigError(f"invalid fine-tuning settings: {e}") from None
    _check_types(cfg)
    cfg.validate()
    args = {k: values[k] for k in TASK_ARGS[task]}
    check_args(**args)
    return cfg, args


ARG_RANGES: dict[str, dict[str, Any]] = {  # task arguments that are numbers: their ranges (None: the default)
    "val_fraction": {"low": 0, "high": 1, "high_open": True},
    "test_fraction": {"low": 0, "high": 1, "high_open": True},
    "stride": {"low": 1, "integer": True},
    "max_new_tokens": {"low": 1, "integer": True},
    "eval_limit": {"low": 1, "integer": True},
    "max_target_len": {"low": 1, "integer": True},
    "num_beams": {"low": 1, "integer": True},
    "time_budget": {"low": 0, "low_open": True},
    "beta": {"low": 0, "low_open": True},
}


def check_args(**args: Any) -> None:
    """Refuse a task argument out of its range (ARG_RANGES) with one line naming it; the tasks call this before
    any work too, so the Python API refuses what the CLI refuses."""
    for key, value in args.items():
        if key in ARG_RANGES:
            check_number(setting_name(key), value, **ARG_RANGES[key])


def _is_preset(model: Any) -> bool:
    from lmforge.config import SEQ2SEQ_PRESETS

    return str(model) in SEQ2SEQ_PRESETS and not Path(str(model)).exists()


def _check_types(cfg: FinetuneConfig) -> None:
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        default = f.default
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"{f.name} must be true or false, got {v!r}")
            continue
        if default is None:
            continue
        if isinstance(default, str) and isinstance(v, (list, tuple)):  # lora_targets: [q_proj, v_proj]
            setattr(cfg, f.name, ",".join(map(str, v)))
            continue
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{f.name} must be a number, got {v!r}")
            if isinstance(default, int) and not isinstance(default, bool) and float(v) != int(v):
                raise ConfigError(f"{f.name} must be a whole number, got {v!r}")
            setattr(cfg, f.name, type(default)(v))
        elif isinstance(default, str) and not isinstance(v, str):
            setattr(cfg, f.name, str(v))


def finetune(task: str, recipe: str | Path | None = None, flags: dict[str, Any] | None = None,
             sets: list[str] | None = None, progress: bool | None = None, resume: bool = False):
    """Resolve the settings and run the task's recipe; returns its result object.

    The run folder gets `recipe.yaml` first: every setting as resolved, so `resume=True` (`--resume --out DIR`)
    continues the run with exactly those settings (flags and `sets` given again still override), from its newest
    checkpoint or, when it was killed before the first one, from the start. A user error during a new run leaves
    no folder behind."""
    import shutil
    import time

    from lmforge.errors import CheckpointError, LmforgeError
    from lmforge.files import check_out_dir, write_text

    out_flag = (flags or {}).get("out")
    if resume:
        if not out_flag:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        saved = Path(out_flag) / RECIPE_FILE
        if not saved.is_file():
            raise CheckpointError(f"nothing to resume in {out_flag}: it holds no {RECIPE_FILE} (start the run "
                                  f"without --resume)")
        recipe = saved
    cfg, args = resolve(task, recipe, flags, sets)
    out = check_out_dir(args.get("out") or str(Path("runs") / time.strftime(f"{task}-%Y%m%d-%H%M%S")))
    created = not out.exists()
    if not resume and not created and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; continue its run with --resume, or choose a new --out")
    args["out"] = str(out)
    write_text(out / RECIPE_FILE, yaml.safe_dump({"task": task, **dataclasses.asdict(cfg), **args},
                                                 sort_keys=False))
    args.pop("out")
    model, data = args.pop("model"), args.pop("data")
    run = _TASK_FUNCTIONS[task]()
    try:
        return run(model, data, out, cfg, progress=progress, resume=True, **args)
    except LmforgeError:
        if created and not resume:
            shutil.rmtree(out, ignore_errors=True)
        raise


RECIPE_FILE = "recipe.yaml"


def _classify():
    from lmforge.tune.classify import finetune_classify

    return finetune_classify


def _qa():
    from lmforge.tune.qa import finetune_qa

    return finetune_qa


def _chat():
    from lmforge.tune.sft import finetune_chat

    return finetune_chat


def _dpo():
    from lmforge.tune.dpo import finetune_dpo

    return finetune_dpo


def _seq2seq():
    from lmforge.tune.seq2seq import finetune_seq2seq

    return finetune_seq2seq


# (each task module is imported only when its task runs: the CLI starts without loading them all)
_TASK_FUNCTIONS = {"classify": _classify, "qa": _qa, "chat": _chat, "dpo": _dpo, "seq2seq": _seq2seq}
