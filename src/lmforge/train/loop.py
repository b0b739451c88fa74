"""Pre-training, the whole loop, top to bottom (its objective: clm, mlm or span, from train/objectives.py).

    prepare  corpus -> tokenizer -> token shards (with train.teacher: its top-k next tokens beside them), in the run
             directory (bad input fails before anything is written)
    build    model, optimizer; resume from the latest checkpoint when asked
    loop     sample a global batch -> this process's micro-batches -> forward/backward -> clip -> step
             every log_every:  metrics.jsonl + progress bar (loss, tokens/s, MFU)
             every eval_every: validation loss / perplexity / bits per byte
             every ckpt_every: checkpoint (atomic)
    finish   final model as an HF directory, full validation pass, loss plot, report

The same function runs under `torchrun` (one node or several): every process computes the same global batch
(an epoch sampler: each window once per epoch) and trains its slice, with its own dropout stream; DDP averages
gradients, or FSDP2 shards the model (train.strategy, see train/parallel.py); rank 0 writes, except sharded
checkpoints, which every process writes its part of. Every process tokenizes its share of the corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lmforge
from lmforge.config import RunConfig, load_run_config
from lmforge.data.clean import CLEAN_DIR, clean_corpus
from lmforge.data.corpus import Document, scan_documents, split_documents
from lmforge.data.shards import TokenShard, build_shards
from lmforge.errors import CheckpointError, ConfigError
from lmforge.files import check_out_dir, is_stale_temp, write_json, write_text
from lmforge.interop.load import load_pretrained
from lmforge.models.decoder import DecoderLM
from lmforge.models.family import family_of
from lmforge.report import write_run_report
from lmforge.runtime import matmul_flops, to_device, tune_allocator
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import (
    clean_run_dir,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    world_rng,
)
from lmforge.train.core import Patience, RunLog, Stepper, dtype_note, precision, settle_dtype
from lmforge.train.distributed import DistEnv, init_distributed, rank_seed, shutdown
from lmforge.train.objectives import OBJECTIVES
from lmforge.train.optim import lr_at, make_optimizer
from lmforge.train.parallel import choose_strategy, full_state_dict, wrap
from lmforge.train.teacher import TEACHER_DIR, TeacherShard, store_teacher


@dataclass
class RunResult:
    run_dir: Path
    model_dir: Path
    final: dict[str, float]  # validation metrics of the final model
    steps: int
    seconds: float
    stopped: dict[str, Any] | None = None  # early stopping: when and why the run ended before its last step

    def summary(self) -> str:
        """What `lmforge pretrain` prints at the end (nothing for a session stopped before the last step)."""
        if not self.final:
            return ""
        early = f"stopped early at step {self.steps}: {self.stopped['reason']}\n" if self.stopped else ""
        return f"{early}validation: {format_metrics(self.final)}\nmodel: {self.model_dir}"


def pretrain_run(
    config: str | Path | None, overrides: list[str] | None = None, out: str | Path | None = None, resume: bool = False
) -> RunResult:
    """`lmforge pretrain`: a run from a recipe file and `key=value` overrides into `out` (default
    runs/pretrain-DATE-TIME), or with resume=True the run in `out` continued (its own saved config, the overrides
    applied; the recipe is used only when the folder holds no run yet: one killed before it wrote its config)."""
    if resume:
        if not out:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        return pretrain(load_run_config(config, overrides) if config else None, out, resume=True, overrides=overrides)
    if not config and not overrides:
        raise ConfigError("pretrain needs --config FILE.yaml (see configs/) or --set overrides")
    if not out and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("under torchrun give --out RUN_DIR: every process must name the same run directory")
    out = out or Path("runs") / time.strftime("pretrain-%Y%m%d-%H%M%S")
    return pretrain(load_run_config(config, overrides), out)


def pretrain(
    config: RunConfig | None,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool | None = None,
    overrides: list[str] | None = None,
    stop_after: int | None = None,
) -> RunResult:
    """Train a decoder LM as `config` says, in the run directory `out_dir`.

    resume=True continues the run in `out_dir` from its latest checkpoint with the config saved there
    (`overrides` may change it, e.g. train.steps to train longer); a run killed before its first checkpoint
    starts over from that config, and a folder with no run yet starts `config` (None: refuse). Temporary files a
    killed save left behind are removed first. progress=None shows a bar on terminals.
    stop_after=k ends this session after step k (and its checkpoint, if one falls there) without finishing the
    run, as a job scheduler's time limit would; `resume=True` continues it.
    """
    tune_allocator()
    check_out_dir(out_dir)
    run = Path(out_dir)
    ours = (run / "config.yaml").is_file()
    others = run.is_dir() and any(not is_stale_temp(p) for p in run.iterdir())
    if others and not ours:  # someone else's files (not a killed write of ours): never train over or delete them
        raise ConfigError(
            f"{run} is not empty and holds no run of lmforge (no config.yaml); choose a new or empty --out"
        )
    if resume and ours:  # the saved run decides the device
        config = load_run_config(Path(out_dir) / "config.yaml", overrides)
    if config is None:
        raise CheckpointError(
            f"nothing to resume in {out_dir}: it holds no config.yaml (start the run with "
            f"--config, or give --config with --resume)"
        )
    env = init_distributed(config.train.device)
    try:
        return _pretrain(config, Path(out_dir), resume, progress, overrides, env, stop_after)
    finally:
        shutdown(env)


def _pretrain(
    cfg: RunConfig,
    run: Path,
    resume: bool,
    progress: bool | None,
    overrides: list[str] | None,
    env: DistEnv,
    stop_after: int | None = None,
) -> RunResult:
    t_start = time.time()
    ckpts: list[Path] = []
    if resume:
        if env.main:
            clean_run_dir(run)
        env.barrier()
        if (run / "config.yaml").is_file():
            cfg = load_run_config(run / "config.yaml", overrides)
            ckpts = list_checkpoints(run)
        if not ckpts:  # killed before its first checkpoint (or never started): start over, from its own config
            if env.main and run.is_dir() and any(run.iterdir()):
                print(f"{run} holds no checkpoint yet: starting the run over", file=sys.stderr, flush=True)
                for p in run.iterdir():
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            env.barrier()
            resume = False
    if resume:
        tokenizer = Tokenizer.from_file(run / "tokenizer.json")
    else:
        cfg.validate()
        if (run / "config.yaml").exists() or list_checkpoints(run):
            raise ConfigError(f"{run} already holds a run; continue it with --resume or choose another --out")
        env.barrier()  # every process has looked before process 0 writes config.yaml (else a slower one finds it)
        auto = cfg.train.dtype == "auto"
        cfg.train.dtype = settle_dtype(cfg.train.dtype, env.device)  # ("auto" made concrete: config.yaml keeps it)
        tokenizer = _prepare(cfg, run, env, progress if progress is not None else sys.stderr.isatty())
        if auto and env.main:
            print(dtype_note(cfg.train.dtype, env.device), file=sys.stderr, flush=True)
    tc = cfg.train
    seq_len = tc.seq_len or cfg.model.max_seq_len
    if seq_len < cfg.model.max_seq_len and getattr(cfg.model, "learned_positions", False) and env.main:
        # (a learned position table past seq_len stays at its initial values: reading more tokens than the model
        # was trained on, as `eval perplexity` does by default, scores the untrained positions)
        print(
            f"note: training at seq_len {seq_len}, under the model's context {cfg.model.max_seq_len}: its learned "
            f"positions from {seq_len} on stay untrained; evaluate and generate within {seq_len} tokens (eval "
            f"--window {seq_len}), or set model.max_seq_len={seq_len}",
            file=sys.stderr,
            flush=True,
        )
    per_rank, rem = divmod(tc.batch_size, env.world * tc.grad_accum)
    if rem or per_rank == 0:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} must be a multiple of processes ({env.world}) x "
            f"train.grad_accum ({tc.grad_accum})"
        )
    train_data, val_data = TokenShard.open(run / "data", "train"), TokenShard.open(run / "data", "val")

    # --- model and optimizer -----------------------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    objective = OBJECTIVES[tc.objective](cfg, seq_len)
    model = objective.build().to(env.device)
    if env.rank:  # the same initial weights everywhere; from here on each process draws its own dropout masks
        torch.manual_seed(rank_seed(tc.seed, env.rank))
    objective.bind(tokenizer)
    if tc.teacher:
        objective.teacher = TeacherShard.open(run / "data" / TEACHER_DIR)
        if objective.teacher is None:
            raise CheckpointError(f"{run / 'data' / TEACHER_DIR} holds no complete teacher store; start the run over")
    window = objective.window  # stream tokens one example reads
    train_data.check_fits(window, "train")
    val_data.check_fits(window, "validation")
    strategy = choose_strategy(tc.strategy, model, env, tc.optimizer)
    if strategy == "fsdp":  # sharded before the optimizer is built, so its moments are sharded too
        wrap(model, strategy, env)
    optimizer = make_optimizer(model, tc, env.device.type)
    data_gen = torch.Generator().manual_seed(rank_seed(tc.seed, env.rank))  # masks and spans (mlm, span)
    sampler = train_data.epoch_starts(window, tc.seed)
    prec = precision(tc.dtype, env.device, strategy, env.main, "train.dtype")
    scaler = prec.scaler
    step, tokens_seen = 0, 0
    patience = Patience(tc.early_stopping, tc.min_delta, higher=False)  # (on the validation loss)
    stopped: dict[str, Any] | None = None
    if resume:
        meta = load_checkpoint(ckpts[-1], model, optimizer, data_gen, env, tc.seed)
        step, tokens_seen = meta["step"], meta.get("tokens", 0)
        patience.load(meta.get("patience"))
        if scaler is not None and "scaler" in meta:
            scaler.load_state_dict(meta["scaler"])
        if env.main:
            _truncate_metrics(run / "metrics.jsonl", step)
    train_model = model
    if tc.compile:
        train_model = torch.compile(model)
    if strategy == "ddp":
        train_model = wrap(train_model, strategy, env)
    autocast = prec.autocast
    flops_per_token = cfg.model.flops_per_token(seq_len, training=True)
    peak = tc.peak_tflops * 1e12 if tc.peak_tflops else matmul_flops(prec.dtype, env.device)
    run_log = RunLog(run / "metrics.jsonl", tc.steps, step, "pretrain", progress, env.main)
    stepper = Stepper(train_model, list(model.parameters()), optimizer, strategy, prec, tc.grad_clip)
    eval_starts = val_data.random_starts(
        tc.eval_batches * per_rank * env.world, window, torch.Generator().manual_seed(tc.seed + 1)
    )
    objective.prepare_eval(val_data, eval_starts[env.rank :: env.world], per_rank)

    def evaluate() -> dict[str, float]:
        return objective.evaluate(model, env.device, env, autocast)

    log = run_log.record

    # --- the loop ----------------------------------------------------------------------------------------------
    model.train()
    t_last, tokens_last = time.time(), tokens_seen
    try:
        while step < tc.steps:
            lr = lr_at(step, tc)
            starts = sampler.take(step * tc.batch_size, tc.batch_size)  # the same on every process
            mine = starts[env.rank * per_rank * tc.grad_accum : (env.rank + 1) * per_rank * tc.grad_accum]

            def loss_of(micro: int, mine=mine) -> torch.Tensor:  # this process's micro-batch `micro`
                part = mine[micro * per_rank : (micro + 1) * per_rank]
                batch = {k: to_device(v, env.device) for k, v in objective.batch(train_data, part, data_gen).items()}
                return train_model(**batch, loss_only=True, grad_checkpoint=tc.grad_checkpoint).loss

            loss, grad_norm = stepper.step(tc.grad_accum, loss_of, lr)
            step += 1
            tokens_seen += tc.batch_size * window

            if step % tc.log_every == 0 or step == tc.steps:
                loss_avg = env.mean(loss.item())
                now = time.time()
                tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, tokens_seen
                mfu = tps * flops_per_token / (peak * env.world)
                log(
                    {
                        "step": step,
                        "loss": loss_avg,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": tokens_seen,
                        "tok_per_s": tps,
                        "mfu": mfu,
                        "time": now - t_start,
                    }
                )
                run_log.status(f"loss {loss_avg:.3f}  {tps:,.0f} tok/s  MFU {mfu:.0%}")
            if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                m = evaluate()
                log({"step": step, "split": "val", **m})
                run_log.say(f"step {step}: val " + format_metrics(m))
                patience.update(m["loss"], step)
                if patience.exhausted and step < tc.steps:  # (at the last step it ends anyway)
                    stopped = {
                        "step": step,
                        "reason": f"validation loss did not fall by more than {tc.min_delta:g} "
                        f"in {tc.early_stopping} evaluations",
                        "best_step": patience.best_step,
                        "best": patience.best,
                    }
                    log({"step": step, "split": "stop", **stopped})
                    run_log.say(f"early stop at step {step}: {stopped['reason']} (best at step {patience.best_step})")
                    break
            if tc.ckpt_every and step % tc.ckpt_every == 0:
                rng = world_rng(env, data_gen)
                extra = {
                    "tokens": tokens_seen,
                    "patience": patience.state(),
                    **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                }
                if strategy == "fsdp":
                    save_sharded_checkpoint(
                        run, step, model, optimizer, env, rng, extra=extra, keep=tc.keep_checkpoints
                    )
                elif env.main:
                    save_checkpoint(run, step, model, optimizer, data_gen, extra, keep=tc.keep_checkpoints, rng=rng)
                env.barrier()
            run_log.advance()
            if stop_after is not None and step >= stop_after:
                break
    except KeyboardInterrupt:
        if env.main and list_checkpoints(run):
            print(
                f"\ninterrupted at step {step}; continue from the last checkpoint with: "
                f"lmforge pretrain --resume --out {run}",
                file=sys.stderr,
            )
        elif env.main:
            print(
                f"\ninterrupted at step {step}, before the first checkpoint; remove {run} to start again",
                file=sys.stderr,
            )
        raise
    finally:
        run_log.close()

    # --- finish ------------------------------------------------------------------------------------------------
    model_dir = run / "model"
    final: dict[str, float] = {}
    if step < tc.steps and stopped is None:  # interrupted on purpose (stop_after): the run continues with resume
        return RunResult(run, model_dir, final, step, time.time() - t_start)
    if strategy == "fsdp":  # the whole model, gathered on process 0, is what gets saved and evaluated
        whole = full_state_dict(model)
        if env.main:
            model = objective.build()
            model.load_state_dict(whole)
            model.to(env.device)
    if env.main:
        model.eval()
        model.save_pretrained(
            model_dir,
            tokenizer=tokenizer,
            **({"generation_config": objective.generation_config} if objective.generation_config else {}),
        )
        # (alone: the other processes are done, so no collective inside)
        final = objective.final(model, env.device, DistEnv(device=env.device), autocast)
        seconds = time.time() - t_start
        write_json(
            run / "summary.json",
            {
                "steps": step,
                "tokens": tokens_seen,
                "seconds": seconds,
                "params": model.num_params(),
                "dtype": str(prec.dtype).removeprefix("torch."),
                "final_val": final,
                **({"stopped": stopped} if stopped else {}),
            },
        )

        write_run_report(run)
    env.barrier()
    return RunResult(run, model_dir, final, step, time.time() - t_start, stopped)


def format_metrics(m: dict[str, float]) -> str:
    names = {
        "loss": "loss",
        "ppl": "ppl",
        "bpb": "bpb",
        "masked_acc": "masked acc",
        "nsp_acc": "nsp acc",
        "span_acc": "span acc",
    }
    return "  ".join(f"{names[k]} {m[k]:.4f}" for k in names if k in m)


def _prepare(cfg: RunConfig, run: Path, env: DistEnv, progress: bool = False) -> Tokenizer:
    """List and split the corpus, get a tokenizer, write token shards and config.yaml. Rank 0 trains the tokenizer
    (on at most data.tokenizer_mb of text) and writes; every process tokenizes its share of the documents, streamed
    (data/stream.py). Errors in the input surface here, and a new run directory is removed again."""
    created = not run.exists()
    docs = scan_documents(cfg.data.sources)  # raises on missing / empty input (non-UTF-8 bytes: when read)
    if not cfg.data.tokenizer and not cfg.data.vocab_size and not cfg.train.teacher:
        # the request, recorded: model.vocab_size becomes the trained size below, and a run started over from
        # the saved config.yaml must train the same tokenizer
        cfg.data.vocab_size = cfg.model.vocab_size
    teacher = None
    if cfg.train.teacher:  # (its tokenizer is the run's: the student learns its distribution token by token)
        teacher, teacher_tok = load_pretrained(cfg.train.teacher, device=env.device)
        if not isinstance(teacher, DecoderLM):
            raise ConfigError(f"train.teacher {cfg.train.teacher} is a {type(teacher).__name__}, not a causal LM")
        if cfg.data.tokenizer is None:
            tokenizer = teacher_tok
    if cfg.data.tokenizer:
        tokenizer = Tokenizer.from_file(cfg.data.tokenizer)
        if teacher is not None and tokenizer.vocab_size > teacher.config.vocab_size:
            raise ConfigError(
                f"data.tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens and the teacher "
                f"{teacher.config.vocab_size}: a distilled run uses the teacher's own tokenizer (leave out "
                f"data.tokenizer)"
            )
    try:
        if env.main:  # first the recipe: a run killed from here on is started over by --resume
            run.mkdir(parents=True, exist_ok=True)
            write_text(run / "config.yaml", cfg.to_yaml())
        if cfg.data.clean:  # (before the split: a duplicate is removed whichever side of it it would fall on)
            if env.main:
                report = clean_corpus(cfg.data.sources, run / CLEAN_DIR, progress=progress)
                print(f"cleaned: {report.summary()}", file=sys.stderr, flush=True)
            env.barrier()
            docs = scan_documents([str(run / CLEAN_DIR)])
        train_docs, val_docs = split_documents(docs, cfg.data.val_fraction)
        if not cfg.data.tokenizer and teacher is None and env.main:
            vocab = cfg.data.vocab_size or cfg.model.vocab_size
            texts = _sample(train_docs, int(cfg.data.tokenizer_mb * (1 << 20)))
            tokenizer = OBJECTIVES[cfg.train.objective].train_tokenizer(texts, vocab)
        if env.main:
            tokenizer.save(run)  # tokenizer.json + tokenizer_config.json (special-token names)
        env.barrier()
        if not env.main:
            if not (run / "tokenizer.json").is_file():
                raise ConfigError(
                    f"process {env.rank} cannot see {run / 'tokenizer.json'}, which process 0 wrote: "
                    f"on several machines the run directory (--out) must be on storage they all share"
                )
            tokenizer = Tokenizer.from_file(run / "tokenizer.json")
        # the model's vocabulary is the tokenizer's (a trained BPE can come out smaller than asked), or the
        # teacher's head's, which may be padded past it
        cfg.model.vocab_size = teacher.config.vocab_size if teacher is not None else tokenizer.vocab_size
        cfg.model.pad_token_id = tokenizer.token_id(tokenizer.pad_token)
        family = family_of(cfg.model).name
        if family in ("decoder", "seq2seq"):
            cfg.model.eos_token_id = tokenizer.eos_id
        if family == "seq2seq":
            cfg.model.decoder_start_token_id = cfg.model.pad_token_id
        if family == "decoder":
            cfg.model.bos_token_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        build_shards(
            train_docs,
            val_docs,
            tokenizer,
            run / "data",
            workers=cfg.data.workers,
            rank=env.rank,
            world=env.world,
            barrier=env.barrier,
            progress=progress,
        )
        if teacher is not None:
            store_teacher(
                teacher,
                TokenShard.open(run / "data", "train"),
                run / "data" / TEACHER_DIR,
                cfg.train.distill_top_k,
                min(cfg.train.seq_len or cfg.model.max_seq_len, teacher.config.max_seq_len),
                device=env.device,
                autocast=precision(cfg.train.dtype, env.device, "ddp", False, "train.dtype").autocast,
                rank=env.rank,
                world=env.world,
                barrier=env.barrier,
                progress=progress and env.main,
            )
            del teacher
        if env.main:
            write_text(run / "config.yaml", cfg.to_yaml())
            write_json(run / "environment.json", _environment(cfg))
        env.barrier()
    except BaseException:  # a user error, a bug or Ctrl-C: nothing left behind (a kill -9 leaves config.yaml,
        # and --resume starts the run over from it)
        if created and env.main and not list_checkpoints(run):
            shutil.rmtree(run, ignore_errors=True)
        raise
    return tokenizer


def _sample(docs: list[Document], budget: int):
    """The texts of documents until `budget` bytes: all of them in order when they fit, else in a fixed order
    that mixes the corpus (a hash of each file name)."""
    import hashlib

    used = 0
    if sum(d.size for d in docs) > budget:
        docs = sorted(docs, key=lambda d: hashlib.sha1(Path(d.name).name.encode()).hexdigest())
    for d in docs:
        if used >= budget:
            return
        used += d.size
        yield d.read()


def _environment(cfg: RunConfig) -> dict[str, Any]:
    import platform

    return {
        "seed": cfg.train.seed,
        "lmforge": lmforge.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "argv": sys.argv,
    }


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash
    write_text(path, "".join(ln + "\n" for ln in keep))
