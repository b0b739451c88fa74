"""One entry point for every fine-tuning task: `finetune(task, ...)` and `lmforge finetune TASK` — the driver.

It resolves a run's settings from the task's declaration (tune/tasks.py: defaults, a YAML recipe, flags and
`--set` overrides), starts the run folder with one `recipe.yaml` (every setting as resolved: what `--resume`
continues with), starts the process group under torchrun, and calls the task's function.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.files import check_out_dir
from lmforge.tune.driver import RECIPE_FILE, write_recipe
from lmforge.tune.tasks import (  # noqa: F401  (the declarations, re-exported for the CLI and older imports)
    APPLIES,
    FIELDS,
    LORA,
    LR,
    METRICS,
    TASK_ARGS,
    TASK_CLASSES,
    TASK_DEFAULTS,
    TASK_HELP,
    TASKS,
    check_applies,
    check_args,
    resolve,
    settings,
    task_config,
    task_max_len,
)


def finetune(
    task: str,
    recipe: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    progress: bool | None = None,
    resume: bool = False,
):
    """Resolve the settings and run the task's recipe; returns its result object (None in a torchrun process
    other than 0: process 0 writes the outputs).

    The run folder gets `recipe.yaml` first: every setting as resolved, so `resume=True` (`--resume --out DIR`)
    continues the run with exactly those settings (flags and `sets` given again still override), from its newest
    checkpoint or, when it was killed before the first one, from the start. A user error during a new run leaves
    no folder behind."""
    import shutil
    import time

    out_flag = (flags or {}).get("out")
    if resume:
        if not out_flag:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        saved = Path(out_flag) / RECIPE_FILE
        if not saved.is_file():
            raise CheckpointError(
                f"nothing to resume in {out_flag}: it holds no {RECIPE_FILE} (start the run without --resume)"
            )
        recipe = saved
    cfg, args = resolve(task, recipe, flags, sets)
    env = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: the process group, each process on its own GPU
        from lmforge.train.distributed import init_distributed

        env = init_distributed(cfg.device)
        cfg.device = str(env.device)
    if env is not None and not args.get("out"):
        raise ConfigError("under torchrun give --out RUN_DIR: every process must name the same run directory")
    out = Path(args.get("out") or str(Path("runs") / time.strftime(f"{task}-%Y%m%d-%H%M%S")))
    created = False
    if env is None or env.main:  # process 0 checks and starts the folder; the others wait for it
        out = check_out_dir(out)
        created = not out.exists()
        if not resume and not created and any(out.iterdir()):
            raise ConfigError(f"{out} is not empty; continue its run with --resume, or choose a new --out")
        args["out"] = str(out)
        write_recipe(out, task, cfg, args)
    if env is not None:
        env.barrier()
    args["out"] = str(out)
    args.pop("out")
    model, data = args.pop("model"), args.pop("data")
    run = _TASK_FUNCTIONS[task]()
    try:
        return run(model, data, out, cfg, progress=progress, resume=True, **args)
    except LmforgeError:
        if created and not resume and os.environ.get("RANK", "0") == "0":
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if env is not None:
            from lmforge.train.distributed import shutdown

            shutdown(env)


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


def _grpo():
    from lmforge.tune.grpo import finetune_grpo

    return finetune_grpo


def _seq2seq():
    from lmforge.tune.seq2seq import finetune_seq2seq

    return finetune_seq2seq


# (each task module is imported only when its task runs: the CLI starts without loading them all)
_TASK_FUNCTIONS = {"classify": _classify, "qa": _qa, "chat": _chat, "dpo": _dpo, "grpo": _grpo, "seq2seq": _seq2seq}
