"""The pre-training objectives, one class each, so the loop in train/loop.py has no branch on the kind of model:

    clm    next-token prediction (decoders): windows of seq_len tokens; validation loss, perplexity, bits per byte;
           with train.teacher, the teacher's stored top-k beside each window's next tokens (distillation)
    mlm    masked LM (+ next-sentence prediction) for encoders: BERT's masking; masked-token (and NSP) accuracy
    span   span corruption for encoder-decoders (T5): sentinel-marked spans; span loss and accuracy

An objective knows the family it trains (lmforge.models.family), the tokenizer it wants, how many stream tokens one
example reads (`window`), how to cut a batch, and how to score the model during and at the end of training.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmforge.config import RunConfig
from lmforge.data.masking import MLMBatcher, mlm_metrics
from lmforge.data.shards import TokenShard
from lmforge.data.spans import SpanCorruptionBatcher, span_metrics
from lmforge.eval.lm import evaluate_shard, lm_metrics, window_loss
from lmforge.models.family import FAMILIES
from lmforge.nn.loss import TeacherTargets
from lmforge.tokenizer import Tokenizer
from lmforge.train.teacher import TeacherShard

# what a pre-trained decoder samples with when its directory is used for generation
DEFAULT_GENERATION = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_new_tokens": 200}


class Objective:
    name = ""
    family = ""
    generation_config: dict[str, Any] | None = None

    def __init__(self, cfg: RunConfig, seq_len: int) -> None:
        self.cfg, self.seq_len = cfg, seq_len
        self.window = seq_len  # stream tokens one example reads

    @staticmethod
    def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
        raise NotImplementedError

    def build(self) -> nn.Module:
        """The model this objective trains, from the run's model config."""
        return FAMILIES[self.family].model_cls(self.cfg.model)

    def bind(self, tokenizer: Tokenizer) -> None:
        """Called once the model exists (so that the RNG has drawn its initial weights first)."""

    def batch(self, shard: TokenShard, starts: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prepare_eval(self, shard: TokenShard, starts: torch.Tensor, per_rank: int) -> None:
        """Fix what the validation batches need (their masks too), so evaluations compare like with like."""
        self.eval_shard, self.eval_starts, self.per_rank = shard, starts, per_rank

    def evaluate(self, model: nn.Module, device: torch.device, env, autocast) -> dict[str, float]:
        raise NotImplementedError

    def final(self, model: nn.Module, device: torch.device, env, autocast) -> dict[str, float]:
        """The last evaluation, on the saved model (by default the same as during training)."""
        return self.evaluate(model, device, env, autocast)


class CausalLM(Objective):
    name, family, generation_config = "clm", "decoder", DEFAULT_GENERATION

    @staticmethod
    def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
        return Tokenizer.train_bpe(texts, vocab_size=vocab_size)

    teacher: TeacherShard | None = None  # train.teacher's stored top-k (train/teacher.py), set by the loop

    def batch(self, shard: TokenShard, starts: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
        x, y = shard.windows(starts, self.seq_len)
        if self.teacher is None:
            return {"input_ids": x, "labels": y}
        tc = self.cfg.train
        idx, logp = self.teacher.windows(starts, self.seq_len)
        return {"input_ids": x, "labels": TeacherTargets(y, idx, logp, tc.distill_alpha, tc.distill_temperature)}

    def evaluate(self, model: nn.Module, device: torch.device, env, autocast) -> dict[str, float]:
        s = torch.tensor(
            window_loss(model, self.eval_shard, self.eval_starts, self.seq_len, self.per_rank, device, autocast),
            dtype=torch.float64,
            device=device,
        )
        total, count = env.sum_(s).tolist()
        return lm_metrics(total / count, self.eval_shard.bytes_per_token)

    def final(self, model: nn.Module, device: torch.device, env, autocast) -> dict[str, float]:
        return evaluate_shard(model, self.eval_shard, self.seq_len, self.per_rank, device)  # the whole shard


class _Masked(Objective):
    """Objectives whose batches are drawn with a generator (masks, spans): validation batches are drawn once."""

    def prepare_eval(self, shard: TokenShard, starts: torch.Tensor, per_rank: int) -> None:
        super().prepare_eval(shard, starts, per_rank)
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 2)
        self.eval_batches = [
            self.batcher(shard, starts[i : i + per_rank], gen) for i in range(0, len(starts), per_rank)
        ]

    def batch(self, shard: TokenShard, starts: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return self.batcher(shard, starts, gen)


class MaskedLM(_Masked):
    name, family = "mlm", "encoder"

    @staticmethod
    def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
        return Tokenizer.train_wordpiece(texts, vocab_size=vocab_size)  # [CLS], [SEP], [MASK], ## pieces

    def bind(self, tokenizer: Tokenizer) -> None:
        tc = self.cfg.train
        self.batcher = MLMBatcher(
            tokenizer, self.cfg.model.vocab_size, self.seq_len, tc.mlm_probability, tc.whole_word_mask, tc.nsp
        )

    def evaluate(self, model: nn.Module, device: torch.device, env, autocast) -> dict[str, float]:
        return mlm_metrics(model, self.eval_batches, device)  # (per process; equal shards under DDP)


class SpanCorruption(_Masked):
    name, family = "span", "seq2seq"

    @staticmethod
    def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
        # a Unigram vocabulary with <extra_id_N> sentinels, trained on lines (T5 normalises line breaks away)
        return Tokenizer.train_unigram(
            (line for t in texts for line in t.splitlines() if line.strip()), vocab_size=vocab_size
        )

    def bind(self, tokenizer: Tokenizer) -> None:
        tc = self.cfg.train
        self.batcher = SpanCorruptionBatcher(tokenizer, self.seq_len, tc.noise_density, tc.mean_span)
        self.window = self.batcher.raw_len

    def evaluate(self, model: nn.Module, device: torch.device, env, autocast) -> dict[str, float]:
        return span_metrics(model, self.eval_batches, device)


OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (CausalLM, MaskedLM, SpanCorruption)}
