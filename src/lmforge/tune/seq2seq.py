"""Sequence-to-sequence fine-tuning (translation, summarization), read top to bottom.

data     (source, target) pairs from JSONL / CSV / TSV, or the packaged Bible pairs (`bible-en-es`,
         `bible-es-en`: King James and Reina-Valera 1909 verses from Debian's SWORD modules). The Bible is
         split by book (no verse of a held-out book is trained on); files are split at random under the seed
         unless --val-data / --test-data are given. Rows with an empty side are dropped and counted; sources
         and targets longer than the limits are truncated, with a warning that says how many.
model    a seq2seq model directory (T5 layout), or a preset name (t5-tiny, t5-translate, t5-small, ...) to
         train from scratch: a shared Unigram vocabulary is then trained on the training pairs first
train    `fit` (the loop every task uses): length-bucketed batches, AdamW, warm-up + linear decay; the
         decoder is teacher-forced on the shifted target; the best validation loss is kept
finish   test-split BLEU and chrF (sacrebleu) and ROUGE (rouge-score) from beam search, sample outputs, the
         model as an HF directory (transformers loads it as T5ForConditionalGeneration), a report
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.config import SEQ2SEQ_PRESETS, FinetuneConfig, seq2seq_config
from lmforge.data.pairs import held_out_by_group, read_pairs, truncation_report
from lmforge.data.sword import DEFAULT_TEST_BOOKS, DEFAULT_VAL_BOOKS
from lmforge.errors import ConfigError, ModelLoadError
from lmforge.eval.generation import seq2seq_scores
from lmforge.files import write_text
from lmforge.generate.seq2seq import Seq2SeqParams, generate_seq2seq
from lmforge.interop import load_pretrained
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import from_rank0
from lmforge.train.optim import build_optimizer
from lmforge.train.supervised import length_buckets
from lmforge.tune.driver import Run, Task, run_footer, run_task, say
from lmforge.tune.tasks import Seq2SeqArgs, task_max_len


@dataclass
class Seq2SeqResult:
    run_dir: Path
    model_dir: Path
    test: dict[str, float]  # bleu, chrf, rouge1/2/L on the test split
    val: dict[str, float]  # best validation metrics
    seconds: float  # training time
    rows: dict[str, int]
    samples: list[dict[str, str]] = field(default_factory=list)
    adapter_dir: Path | None = None  # under LoRA: the adapter alone, in the PEFT layout

    def summary(self) -> str:
        """What `lmforge finetune seq2seq` prints at the end."""
        t = self.test
        lines = [
            f"test: BLEU {t['bleu']:.2f}  chrF {t['chrf']:.2f}  ROUGE-L {t['rougeL']:.2f}  ({t['n']} pairs, "
            f"{self.seconds:.0f} s training)"
        ]
        lines += [f"  {d['source'][:70]!r} -> {d['prediction'][:70]!r}" for d in self.samples[:3]]
        return "\n".join(lines + [run_footer(self)])


@dataclass
class Splits:
    train: Any  # PairSet
    val: Any
    test: Any
    how: str  # how the split was made, for the report


def load_splits(
    data: str,
    source_col: str | None,
    target_col: str | None,
    val_data: str | None,
    test_data: str | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Splits:
    ds = read_pairs(data, source_col, target_col)
    if ds.dropped_empty:
        say(f"warning: {ds.dropped_empty:,} rows of {data} have an empty source or target and were skipped")
    if ds.groups is not None and val_data is None and test_data is None:
        train_i, val_i, test_i = held_out_by_group(ds)
        how = (
            f"by book: test = {', '.join(DEFAULT_TEST_BOOKS)}; validation = {', '.join(DEFAULT_VAL_BOOKS)}; "
            f"every other book trains"
        )
        return Splits(ds.subset(train_i), ds.subset(val_i), ds.subset(test_i), how)
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    n_test = 0 if test_data else max(1, int(len(order) * test_fraction))
    n_val = 0 if val_data else max(1, int(len(order) * val_fraction))
    if len(order) - n_test - n_val < 1:
        raise ConfigError(f"{data} has {len(order)} usable pairs: too few to split into train / validation / test")
    test = read_pairs(test_data, source_col, target_col) if test_data else ds.subset(order[:n_test])
    val = read_pairs(val_data, source_col, target_col) if val_data else ds.subset(order[n_test : n_test + n_val])
    train = ds.subset(order[n_test + n_val :])
    return Splits(
        train,
        val,
        test,
        f"random under seed {seed} ({val_fraction:.0%} validation, {test_fraction:.0%} test)"
        if not (val_data or test_data)
        else "given files",
    )


def build_model(model_path: str, train_texts: list[str], device: str, run_dir: Path | None = None):
    """(model, tokenizer, from_scratch): a saved seq2seq model, or a preset trained from scratch with a Unigram
    vocabulary learned on the training texts (both sides, so a translation pair shares one vocabulary).

    From scratch, the vocabulary is trained once per run: process 0 trains it and writes it into run_dir/tokenizer
    before the first step; a resumed run and the other processes under torchrun read that one (a vocabulary
    trained again would give the saved weights other ids)."""
    if model_path in SEQ2SEQ_PRESETS and not Path(model_path).exists():
        cfg = seq2seq_config(model_path)
        saved = run_dir / "tokenizer" if run_dir is not None else None
        main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        done = saved is not None and (saved / "tokenizer_config.json").is_file()  # (written last)
        if saved is not None and not done and main:
            t0 = time.time()
            tok = Tokenizer.train_unigram(train_texts, vocab_size=cfg.vocab_size)
            tok.save(saved)
            say(
                f"tokenizer: Unigram, {tok.vocab_size:,} pieces trained on {len(train_texts):,} texts in "
                f"{time.time() - t0:.1f} s (kept in {saved})"
            )
        elif saved is None:
            tok = Tokenizer.train_unigram(train_texts, vocab_size=cfg.vocab_size)
        if saved is not None:
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if not (saved / "tokenizer_config.json").is_file():
                raise ConfigError(
                    f"{saved / 'tokenizer.json'}, which process 0 wrote, cannot be seen here: on "
                    "several machines the run directory (--out) must be on storage they all share"
                )
            tok = Tokenizer.from_file(saved)
        cfg.vocab_size = tok.vocab_size
        cfg.pad_token_id, cfg.eos_token_id = tok.pad_id, tok.eos_id
        cfg.decoder_start_token_id = tok.pad_id
        return Seq2SeqLM(cfg).to(device), tok, True

    model, tok = load_pretrained(model_path, device=device)
    if not isinstance(model, Seq2SeqLM):
        raise ModelLoadError(
            f"{model_path} is a {type(model).__name__}; seq2seq fine-tuning needs an "
            f"encoder-decoder (T5) model directory or a preset ({', '.join(SEQ2SEQ_PRESETS)})"
        )
    return model, tok, False


def encode_pairs(
    tok, sources: list[str], targets: list[str], prefix: str, max_source: int, max_target: int, eos: int
) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
    """Token ids (EOS-terminated, truncated) and every source's / target's length before truncation."""
    src = tok.encode_batch([prefix + s for s in sources])
    tgt = tok.encode_batch(targets)
    src_lens, tgt_lens = [len(s) + 1 for s in src], [len(t) + 1 for t in tgt]  # with EOS, before truncation
    return ([s[: max_source - 1] + [eos] for s in src], [t[: max_target - 1] + [eos] for t in tgt], src_lens, tgt_lens)


class Seq2SeqTask(Task):
    name, title = "seq2seq", "Seq2seq fine-tune"
    packages = ("sacrebleu", "rouge_score")  # (the eval extra: its metrics)

    def check(self) -> None:
        if self.cfg.method not in ("full", "lora", "qlora"):
            raise ConfigError(f"method {self.cfg.method!r} is not available for seq2seq models; use full or lora")

    def load_data(self) -> None:
        a = self.args
        self.sp = load_splits(
            self.data,
            a["source_col"],
            a["target_col"],
            a["val_data"],
            a["test_data"],
            a["val_fraction"],
            a["test_fraction"],
            self.cfg.seed,
        )
        sp = self.sp
        say(f"data: {len(sp.train):,} train / {len(sp.val):,} validation / {len(sp.test):,} test pairs, split {sp.how}")

    def load_model(self):
        model, tok, self.scratch = build_model(
            self.model_path, self.sp.train.sources + self.sp.train.targets, self.cfg.device, self.out
        )
        return model, tok

    def prepare(self) -> None:
        cfg, a, sp, tok, c = self.cfg, self.args, self.sp, self.tok, self.model.config
        self.max_source = task_max_len("seq2seq", cfg, c.max_seq_len)
        self.max_target = min(a["max_target_len"] or self.max_source, c.max_seq_len)
        self.src, self.tgt, src_lens, tgt_lens = encode_pairs(
            tok, sp.train.sources, sp.train.targets, a["prefix"], self.max_source, self.max_target, c.eos_token_id
        )
        for warning in (
            truncation_report(tgt_lens, self.max_target, "targets"),
            truncation_report(src_lens, self.max_source, "sources"),
        ):
            if warning:
                say(f"warning: {warning}")
        self.vsrc, self.vtgt, _, _ = encode_pairs(
            tok, sp.val.sources, sp.val.targets, a["prefix"], self.max_source, self.max_target, c.eos_token_id
        )
        self.gen_len = a["max_new_tokens"] or self.max_target
        self.steps_per_epoch = -(-len(self.src) // cfg.batch_size)
        self.generation_config = {"num_beams": a["num_beams"], "max_new_tokens": self.gen_len}
        self.rows = {
            "train": len(sp.train),
            "validation": len(sp.val),
            "test": len(sp.test),
            "empty_dropped": sp.train.dropped_empty,
            "sources_truncated": sum(n > self.max_source for n in src_lens),
            "targets_truncated": sum(n > self.max_target for n in tgt_lens),
        }

    def describe_method(self) -> str:
        return super().describe_method() + (", from scratch" if self.scratch else "")

    def after_method(self) -> None:
        budget = self.args["time_budget"]
        if budget:  # a fixed wall-clock budget: measure a few steps, then size the epochs to fit
            # (under torchrun process 0's sizing, so every process trains the same number of steps)
            self.cfg.epochs = from_rank0(
                budget_epochs(self.model, self.batches, self.steps_per_epoch, budget, self.cfg)
            )
            say(f"time budget {budget:.0f} s: {self.cfg.epochs:.2f} epochs")

    def batches(self, epoch: int):
        """Shuffled, then bucketed by source and target length (little padding per batch)."""
        src, tgt = self.src, self.tgt
        for idx in length_buckets(
            len(src), lambda i: (len(src[i]), len(tgt[i])), self.cfg.batch_size, self.cfg.seed + epoch
        ):
            yield collate([src[i] for i in idx], [tgt[i] for i in idx], self.model.config.pad_token_id)

    def evaluate(self) -> dict[str, float]:
        val = self.sp.val
        loss = pair_loss(self.model, self.vsrc, self.vtgt, self.model.config.pad_token_id, self.cfg.batch_size)
        hyps = generate_seq2seq(
            self.model,
            self.tok,
            val.sources[:200],
            Seq2SeqParams(max_new_tokens=self.gen_len),
            prefix=self.args["prefix"],
            batch_size=64,
            max_source_len=self.max_source,
        )
        s = seq2seq_scores(hyps, val.targets[:200])
        return {
            "neg_loss": -loss,
            "loss": loss,
            "ppl": math.exp(min(loss, 50)),
            "bleu_greedy": s["bleu"],
            "chrf_greedy": s["chrf"],
        }

    def finish(self, fit) -> dict[str, Any]:
        a, test = self.args, self.sp.test
        n = self.n_test = min(len(test), a["eval_limit"] or len(test))
        t1 = time.time()
        hyps = generate_seq2seq(
            self.model,
            self.tok,
            test.sources[:n],
            Seq2SeqParams(max_new_tokens=self.gen_len, num_beams=a["num_beams"]),
            prefix=a["prefix"],
            batch_size=32,
            max_source_len=self.max_source,
            progress=bool(self.progress),
        )
        self.test_m = seq2seq_scores(hyps, test.targets[:n])
        self.test_m["n"] = n
        self.test_m["decode_seconds"] = round(time.time() - t1, 1)
        self.samples = [
            {"source": s, "reference": r, "prediction": h} for s, r, h in zip(test.sources[:n], test.targets[:n], hyps)
        ]
        write_text(self.out / "predictions.jsonl", "".join(_json(d) + "\n" for d in self.samples))
        return {
            "from_scratch": self.scratch,
            "epochs": self.cfg.epochs,
            "max_target_len": self.max_target,
            "test": self.test_m,
            "split": self.sp.how,
        }

    def report_rows(self) -> list[tuple[str, str]]:
        sp, t = self.sp, self.test_m
        return [
            ("pairs train / val / test", f"{len(sp.train):,} / {len(sp.val):,} / {len(sp.test):,}"),
            ("split", sp.how),
            ("epochs", f"{self.cfg.epochs:.2f}"),
            ("best validation loss", f"{self.best.get('loss', float('nan')):.4f}"),
            (
                f"test BLEU / chrF (beam {self.args['num_beams']}, {self.n_test} pairs)",
                f"{t['bleu']:.2f} / {t['chrf']:.2f}",
            ),
            ("test ROUGE-1 / 2 / L", f"{t['rouge1']:.2f} / {t['rouge2']:.2f} / {t['rougeL']:.2f}"),
        ] + [
            (f"sample {i + 1}", f"{d['source']}  →  {d['prediction']}  (reference: {d['reference']})")
            for i, d in enumerate(self.samples[:8])
        ]

    def result(self, run: Run) -> Seq2SeqResult:
        return Seq2SeqResult(
            run.out,
            run.model_dir,
            self.test_m,
            run.fit.best,
            run.seconds,
            self.rows,
            self.samples[:20],
            run.adapter_dir,
        )


def finetune_seq2seq(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: FinetuneConfig | None = None,
    source_col: str | None = None,
    target_col: str | None = None,
    prefix: str = Seq2SeqArgs.prefix,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    val_fraction: float = Seq2SeqArgs.val_fraction,
    test_fraction: float = Seq2SeqArgs.test_fraction,
    max_target_len: int | None = None,
    num_beams: int = Seq2SeqArgs.num_beams,
    max_new_tokens: int | None = None,
    eval_limit: int | None = Seq2SeqArgs.eval_limit,
    time_budget: float | None = None,
    progress: bool | None = None,
    resume: bool = False,
) -> Seq2SeqResult | None:
    """Fine-tune an encoder-decoder, or train one from a preset (see the module notes; settings in
    tune/tasks.py: Seq2SeqArgs)."""
    return run_task(
        Seq2SeqTask,
        model_path,
        data,
        out,
        cfg,
        progress,
        resume,
        source_col=source_col,
        target_col=target_col,
        prefix=prefix,
        val_data=val_data and str(val_data),
        test_data=test_data and str(test_data),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_target_len=max_target_len,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        eval_limit=eval_limit,
        time_budget=time_budget,
    )


def collate(sources: list[list[int]], targets: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    S, T = max(map(len, sources)), max(map(len, targets))
    ids = torch.full((len(sources), S), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(targets), T), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(sources, targets)):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        labels[i, : len(t)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def pair_loss(model, sources: list[list[int]], targets: list[list[int]], pad: int, batch_size: int) -> float:
    """Mean per-token cross-entropy of the targets given the sources (teacher forcing)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(sources), batch_size):
        b = collate(sources[s : s + batch_size], targets[s : s + batch_size], pad)
        n = int((b["labels"] != -100).sum())
        total += float(model(**{k: v.to(device) for k, v in b.items()}, loss_only=True).loss) * n
        count += n
    model.train(was)
    return total / max(count, 1)


def budget_epochs(model, batches, steps_per_epoch: int, seconds: float, cfg: FinetuneConfig) -> float:
    """Epochs that fit in `seconds` of training, from the time of a few real steps (on a copy of the weights'
    state, restored afterwards) minus the evaluations' share."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, cfg.optimizer, 0.0, 0.0)
    model.train()
    it = iter(batches(0))
    next(it)  # warm-up step not timed
    times = []
    for _ in range(6):
        b = next(it, None)
        if b is None:
            break
        t = time.time()
        model(**b, loss_only=True, grad_checkpoint=cfg.grad_checkpoint).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t)
    model.load_state_dict(state)
    per_step = sorted(times)[len(times) // 2] if times else 1.0
    epochs = 0.92 * seconds / (per_step * steps_per_epoch)  # ~8% for evaluation
    return max(0.05, round(epochs, 2))


def _json(d: dict) -> str:
    import json

    return json.dumps(d, ensure_ascii=False)
