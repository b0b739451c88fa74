"""The one fine-tuning driver: what every task does, in this order, around the task's own hooks.

    settings   the FinetuneConfig (the task's defaults when none is given: tasks.task_config) and the task's own
               arguments, checked against their declarations (tasks.py); the task's `check` for the rest
    run folder new or empty (resuming: this run's own, stale temporary files removed), and `recipe.yaml`: every
               setting, the shape `--resume` and `finetune --recipe` read
    data       task.load_data(data): the splits
    model      task.load_model(model): the model (a head put on, a vocabulary trained, ...) under the seed;
               --keep-layers: a shallower copy of it; a LoRA target that matches nothing refused before anything
               is computed
    prepare    task.prepare(): tokens, windows, a score of the starting model
    method     the method's transform (full / top-k / lora / qlora: methods.py); task.after_method()
    train      `fit` (train/supervised.py) over task.batches(epoch), task.loss when the task has its own
               objective, task.evaluate() on validation; resumable from the run's checkpoints
    finish     on process 0: task.finish() (the test split, the task's own files), the model as an HF directory
               and under LoRA the adapter in the PEFT layout, summary.json, the report; the task's result object

A task is a `Task` subclass declaring those hooks (tune/classify.py and the others); its `finetune_TASK(...)`
function is a thin entry point that calls `run_task`, as `lmforge finetune TASK` does through tune/recipe.py.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lmforge import require
from lmforge.config import FinetuneConfig
from lmforge.errors import ConfigError, ModelLoadError
from lmforge.files import check_out_dir, write_json, write_text
from lmforge.interop import load_pretrained
from lmforge.interop.peft import save_adapter
from lmforge.nn.lora import trainable_params
from lmforge.report import write_task_report
from lmforge.runtime import current_memory_mb, lean_allocator, peak_memory_mb, reset_peak_memory
from lmforge.train.checkpoint import clean_run_dir
from lmforge.train.core import dtype_note, settle_dtype
from lmforge.train.supervised import FitResult, fit
from lmforge.tune.methods import apply_method, check_method, describe
from lmforge.tune.tasks import METRICS, TASK_ARGS, check_args, task_config

RECIPE_FILE = "recipe.yaml"


@dataclass
class Run:
    """What the driver knows of a finished run, for the task's result object."""

    out: Path
    model_dir: Path
    adapter_dir: Path | None
    trainable: int
    total: int
    seconds: float  # training time
    peak_mb: float  # peak memory while training
    fit: FitResult


class Task:
    """One fine-tuning task: its name (a key of tasks.TASKS), the model class it tunes, and its hooks. The driver
    sets `cfg`, `args` (the task's own arguments), `out`, `progress`, and after load_model `model` and `tok`."""

    name = ""
    title = ""  # the report's title
    model_class: type | tuple[type, ...] = nn.Module
    needs = "this task needs another model"  # the error's second half, e.g. "QA fine-tuning needs an encoder model"
    images: tuple[str, ...] = ("loss.png",)  # the report's pictures, under out/report
    packages: tuple[str, ...] = ()  # optional packages (the `eval` extra) its evaluation imports: checked first
    loss = None  # a method (m, batch) -> loss for a task's own objective (or a property giving one, or None);
    # None: the model's own loss. m is what training runs through: the model, its DDP wrapper or its FSDP copy

    def __init__(
        self, cfg: FinetuneConfig, args: dict[str, Any], out: Path, progress: bool | None, model_path: str, data: str
    ) -> None:
        self.cfg, self.args, self.out, self.progress = cfg, args, out, progress
        self.model_path, self.data = model_path, data
        self.resume = False  # continuing a run from its newest checkpoint
        self.model: Any = None
        self.tok: Any = None
        self.rows: dict[str, int] = {}  # examples per split and what was dropped or repaired: summary.json
        self.steps_per_epoch = 0
        self.generation_config: dict | None = None  # saved into the model directory's generation_config.json
        self.best: dict[str, Any] = {}  # the kept weights' validation metrics (set before finish)

    # --- the hooks, in the order the driver calls them -------------------------------------------------------
    def check(self) -> None:
        """Refuse settings that clash (beyond each one's own range, which the declarations check)."""

    def load_data(self) -> None:
        """Read self.data into the splits."""
        raise NotImplementedError

    def load_model(self) -> tuple[nn.Module, Any]:
        """(model, tokenizer) from self.model_path; by default any model lmforge loads, of `model_class`."""
        model, tok = load_pretrained(self.model_path, device=self.cfg.device)
        if not isinstance(model, self.model_class):
            raise ModelLoadError(f"{self.model_path} is a {type(model).__name__}; {self.needs}")
        return model, tok

    def prepare(self) -> None:
        """Tokens, windows, batches' sizes (self.steps_per_epoch), a score of the starting model: everything
        before the method's transform."""

    def after_method(self) -> None:
        """After the method's transform, before training (e.g. a reference model for DPO)."""

    def batches(self, epoch: int) -> Iterable[dict[str, Any]]:
        """The epoch's batches: a function of the epoch alone (a resumed run replays it)."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Validation metrics (higher is better for the ones tasks.METRICS names)."""
        raise NotImplementedError

    def finish(self, fit: FitResult) -> dict[str, Any]:
        """On process 0 after training: the test split scored, the task's own files written; returns what
        summary.json adds to the driver's common fields."""
        raise NotImplementedError

    def report_rows(self) -> list[tuple[str, str]]:
        """The report's rows beside the driver's common ones (model, data, method, parameters, time, memory)."""
        return []

    def result(self, run: Run) -> Any:
        """The object `finetune_TASK` returns."""
        raise NotImplementedError

    # --- for the hooks -----------------------------------------------------------------------------------------
    def describe_method(self) -> str:
        return describe(self.cfg, self.model.config.n_layer)


def run_task(
    task_class: type[Task],
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: FinetuneConfig | None = None,
    progress: bool | None = None,
    resume: bool = False,
    **args: Any,
) -> Any:
    """Run a fine-tuning task (see the module notes); returns its result object (None in a torchrun process other
    than 0: process 0 writes the outputs)."""
    name = task_class.name
    cfg = dataclasses.replace(cfg) if cfg is not None else task_config(name, model=str(model_path))
    if cfg.metric not in METRICS[name]:
        if cfg.metric != FinetuneConfig.metric:  # (FinetuneConfig's own default stands for "the task's")
            raise ConfigError(
                f"metric {cfg.metric!r} is not one finetune {name} reports; choose one of {', '.join(METRICS[name])}"
            )
        cfg.metric = METRICS[name][0]
    cfg.validate()
    auto = cfg.dtype == "auto"
    cfg.dtype = settle_dtype(cfg.dtype, cfg.device)  # ("auto" made concrete: recorded, so a resume keeps it)
    check_args(name, **args)
    for module in task_class.packages:  # (a missing extra: refused before any work, not at the first evaluation)
        require(module, f"finetune {name}", "eval")
    task = task_class(cfg, args, Path(out), progress, str(model_path), str(data))
    task.check()
    main = os.environ.get("RANK", "0") == "0"
    out, baseline_mb = start_run(cfg, out, resume, main)
    task.out, task.resume = out, resume
    if main:
        given = {"model": str(model_path), "data": str(data), "out": str(out), **args}
        write_recipe(out, name, cfg, {k: given[k] for k in TASK_ARGS[name]})  # (in the declaration's order)
    barrier()  # (under torchrun the others start once process 0 has the folder ready)

    task.load_data()
    torch.manual_seed(cfg.seed)
    model, tok = task.load_model()
    if cfg.keep_layers:  # (a shallower copy: before the method, so LoRA and top-k see the kept blocks)
        if not hasattr(model, "keep_layers"):
            raise ConfigError(f"keep_layers (--keep-layers) applies to encoder models; {model_path} is not one")
        if cfg.keep_layers > model.config.n_layer:
            raise ConfigError(
                f"keep_layers (--keep-layers) {cfg.keep_layers} is more than the model's {model.config.n_layer} blocks"
            )
        blocks = model.config.n_layer
        kept = model.keep_layers(cfg.keep_layers)
        say(f"keeping blocks {', '.join(map(str, kept))} of the model's {blocks}")
    check_method(model, cfg)  # (a LoRA target that matches nothing: refused before any work)
    task.model, task.tok = model, tok
    task.prepare()

    total = model.num_params()
    trainable = apply_method(model, cfg)
    task.after_method()
    trainable = trainable_params(model)  # (after_method may have frozen some)
    say(f"model: {total:,} parameters, {trainable:,} trainable ({task.describe_method()})")

    if auto:
        say(dtype_note(cfg.dtype, cfg.device))
    reset_peak_memory()
    t0 = time.time()
    loss = task.loss if type(task).loss is not Task.loss else None
    result = fit(
        model,
        task.batches,
        task.steps_per_epoch,
        task.evaluate,
        cfg,
        out / "metrics.jsonl",
        progress,
        loss,
        run_dir=out,
        resume=resume,
    )
    if not result.main:  # under torchrun: process 0 writes the outputs
        return None
    seconds, peak_mb = time.time() - t0, peak_memory_mb()

    task.best = result.best
    outcome = task.finish(result)
    model_dir, adapter_dir = save_outputs(model, out, tok, str(model_path), cfg, task.generation_config)
    write_json(
        out / "summary.json",
        {
            "task": name,
            "method": cfg.method,
            "trainable_params": trainable,
            "total_params": total,
            "peak_train_memory_mb": peak_mb,
            "baseline_memory_mb": baseline_mb,
            "train_seconds": seconds,
            "steps": result.steps,
            "best_val": result.best,
            "stopped_early": result.stopped,
            **outcome,
            "rows": task.rows,
        },
    )
    write_task_report(
        out,
        f"{task.title}: {out.name}",
        [
            ("model", str(model_path)),
            ("data", str(data)),
            ("method", task.describe_method()),
            ("trainable / total parameters", f"{trainable:,} / {total:,}"),
            ("training time", f"{seconds:.0f} s ({result.steps} steps)"),
            *(
                [("stopped early", f"step {result.stopped['step']}: {result.stopped['reason']}")]
                if result.stopped
                else []
            ),
            ("peak memory while training", f"{peak_mb:,.0f} MiB"),
        ]
        + task.report_rows(),
        images=list(task.images),
    )
    return task.result(Run(out, Path(model_dir), adapter_dir, trainable, total, seconds, peak_mb, result))


def barrier() -> None:
    """Wait for every process of the group (nothing outside torchrun, or before the group is started)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def write_recipe(out: Path, task: str, cfg: FinetuneConfig, args: dict[str, Any]) -> None:
    """recipe.yaml: every setting of the run, flat (the task, the FinetuneConfig fields, the task's arguments):
    what `--resume` continues with and what `finetune --recipe` reads."""
    out.mkdir(parents=True, exist_ok=True)
    plain = {k: (getattr(v, "__name__", str(v)) if callable(v) else v) for k, v in args.items()}  # (a function)
    write_text(
        out / RECIPE_FILE,
        yaml.safe_dump({"task": task, **dataclasses.asdict(cfg), **plain}, sort_keys=False, allow_unicode=True),
    )


def start_run(cfg: FinetuneConfig, out: str | Path, resume: bool = False, main: bool = True) -> tuple[Path, float]:
    """A run folder that is new or empty (or, resuming, this run's own, its stale temporary files removed: by
    process 0 alone, `main`, under torchrun), glibc's memory settings for a checkpointed run (before anything
    large is allocated), and the resident memory before the model, which the run's peak is reported against.
    Returns (out as a Path, baseline MiB)."""
    out = check_out_dir(Path(out))
    if main and resume:
        clean_run_dir(out)
    elif main and out.exists() and any(p.name != RECIPE_FILE for p in out.iterdir()):
        raise ConfigError(f"{out} is not empty; continue its run with --resume, or choose a new --out")
    if cfg.grad_checkpoint:
        lean_allocator()
    return out, current_memory_mb()


def save_outputs(
    model: nn.Module, out: Path, tokenizer, base: str, cfg: FinetuneConfig, generation_config: dict | None = None
) -> tuple[Path, Path | None]:
    """The run's model directory (adapters merged in: any HF tool loads it; generation_config.json gains
    `generation_config`) and, under LoRA, the adapter alone in the PEFT layout. Returns (model_dir, adapter_dir or
    None)."""
    adapter = None
    if cfg.method in ("lora", "qlora"):
        adapter = save_adapter(model, out / "adapter", base_model=str(base), tokenizer=tokenizer)
    extra = {"generation_config": generation_config} if generation_config else {}
    return model.save_pretrained(out / "model", tokenizer=tokenizer, **extra), adapter


def say(msg: str) -> None:
    """A progress or status line for the person running the job: stderr, so stdout stays the results (under
    torchrun, from process 0 only)."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


def run_footer(result: Any) -> str:
    """The last lines every task's summary ends with: where the adapter, the model and the report are."""
    lines = [f"adapter (PEFT layout): {result.adapter_dir}"] if getattr(result, "adapter_dir", None) else []
    return "\n".join(lines + [f"model: {result.model_dir}", f"report: {result.run_dir / 'report' / 'report.html'}"])
