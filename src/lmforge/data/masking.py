"""Masked-LM batches from token shards (BERT's recipe).

A window of the token stream becomes `[CLS] tokens [SEP]`, or with next-sentence prediction
`[CLS] A [SEP] B [SEP]` where B follows A half of the time and is a random window otherwise (label 0 = B is the
continuation, 1 = random; HF's convention). Of the non-special tokens, `probability` are chosen for prediction
(whole words together with whole-word masking: a `##piece` goes with its word); a chosen token becomes [MASK]
80% of the time, a random token 10%, and stays itself 10%. Every draw comes from the caller's generator, so a
resumed run sees the same batches.
"""

from __future__ import annotations

import math

import torch

from lmforge.data.shards import TokenShard
from lmforge.errors import ConfigError
from lmforge.tokenizer import Tokenizer


class MLMBatcher:
    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        seq_len: int,
        probability: float = 0.15,
        whole_word: bool = False,
        nsp: bool = False,
    ) -> None:
        ids = {name: tokenizer.token_id(getattr(tokenizer, f"{name}_token")) for name in ("cls", "sep", "mask")}
        missing = [f"[{k.upper()}]" for k, v in ids.items() if v is None]
        if missing:
            raise ConfigError(
                f"masked-LM training needs a tokenizer with {', '.join(missing)}: leave "
                f"data.tokenizer unset (a WordPiece vocabulary is trained) or name an encoder's "
                f"tokenizer.json"
            )
        self.cls, self.sep, self.mask = ids["cls"], ids["sep"], ids["mask"]
        self.seq_len, self.p, self.nsp, self.vocab_size = seq_len, probability, nsp, vocab_size
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        for t in (
            tokenizer.cls_token,
            tokenizer.sep_token,
            tokenizer.mask_token,
            tokenizer.pad_token,
            tokenizer.unk_token,
        ):
            i = tokenizer.token_id(t)
            if i is not None and i < vocab_size:
                self.special[i] = True
        self.continuation = None
        if whole_word:
            self.continuation = torch.zeros(vocab_size, dtype=torch.bool)
            cont = [i for i in tokenizer.continuation_ids() if i < vocab_size]
            if not cont:
                raise ConfigError("whole-word masking needs a WordPiece vocabulary (`##` continuation pieces)")
            self.continuation[cont] = True

    @property
    def body_len(self) -> int:
        """Stream tokens one example reads."""
        return self.seq_len - (3 if self.nsp else 2)

    def __call__(self, shard: TokenShard, starts: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        B = starts.numel()
        body = shard.windows(starts, self.body_len)[0]
        cls = torch.full((B, 1), self.cls, dtype=torch.long)
        sep = torch.full((B, 1), self.sep, dtype=torch.long)
        out: dict[str, torch.Tensor] = {}
        if self.nsp:
            a_len = self.body_len // 2
            b_len = self.body_len - a_len
            is_random = torch.rand(B, generator=gen) < 0.5
            other = shard.windows(shard.random_starts(B, b_len, gen), b_len)[0]
            b = torch.where(is_random[:, None], other, body[:, a_len:])
            ids = torch.cat([cls, body[:, :a_len], sep, b, sep], dim=1)
            types = torch.zeros_like(ids)
            types[:, a_len + 2 :] = 1
            out["token_type_ids"] = types
            out["next_sentence_label"] = is_random.long()
        else:
            ids = torch.cat([cls, body, sep], dim=1)
        inputs, labels = self.mask_tokens(ids, gen)
        out.update(input_ids=inputs, labels=labels)
        return out

    def mask_tokens(self, ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.rand(ids.shape, generator=gen)
        if self.continuation is not None:
            # every piece takes the draw of the piece that starts its word
            starts = ~self.continuation[ids]
            pos = torch.arange(ids.size(1)).expand_as(ids)
            word_start = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values
            r = r.gather(1, word_start)
        chosen = (r < self.p) & ~self.special[ids]
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        how = torch.rand(ids.shape, generator=gen)
        rand_tok = torch.randint(0, self.vocab_size, ids.shape, generator=gen)
        inputs = torch.where(chosen & (how < 0.8), torch.full_like(ids, self.mask), ids)
        inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), rand_tok, inputs)
        return inputs, labels


@torch.no_grad()
def mlm_metrics(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Masked-token loss, accuracy and perplexity (and next-sentence accuracy) over fixed batches."""
    was = model.training
    model.eval()
    loss_sum, n, correct, nsp_ok, nsp_n = 0.0, 0, 0, 0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        labels = b["labels"]
        out = model(**{k: v for k, v in b.items() if k != "next_sentence_label"})
        sel = labels.view(-1) != -100
        target = labels.view(-1)[sel]
        logits = out.logits  # only the masked positions were scored
        loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        n += target.numel()
        if out.nsp_logits is not None:
            nsp_ok += (out.nsp_logits.argmax(-1) == b["next_sentence_label"]).sum().item()
            nsp_n += labels.size(0)
    model.train(was)
    loss = loss_sum / max(n, 1)
    m = {"loss": loss, "ppl": math.exp(min(loss, 50)), "masked_acc": correct / max(n, 1)}
    if nsp_n:
        m["nsp_acc"] = nsp_ok / nsp_n
    return m
