"""Span-corruption batches from token shards (T5's pre-training objective).

Of a raw window of tokens, `noise_density` (15%) are dropped, in spans averaging `mean_span` (3) tokens. The
input keeps the other tokens and puts one sentinel where each span was; the target lists the dropped spans,
each after its sentinel; both end with EOS:

    raw     Thank you for inviting me to your party last week .
    input   Thank you <extra_id_0> me to your party <extra_id_1> week . </s>
    target  <extra_id_0> for inviting <extra_id_1> last </s>

(Here the window is shown ending in kept text. Our windows, like T5's, always end with a dropped span: see
`noise_mask`.) The count of dropped tokens is round(length * noise_density) and the count of spans
round(dropped / mean_span), both fixed by the window length, and the spans' positions and lengths are a uniform
random partition drawn from the caller's generator. So every window of `raw_len` tokens becomes an input and a
target of fixed lengths (`input_target_lengths`): a batch needs no padding, and `raw_length_for` picks the raw
window whose input is exactly the model's input length (T5: 512 input tokens from a raw window of 568).

The target format is that of T5's preprocessing: sentinel i, then dropped span i, for every span, then EOS. The
paper's figure also ends its target with a final sentinel; that sentinel stands for kept text at the end of the
window, which T5's masks (and ours) never have, so targets here end with the last span and EOS. The model builds
its decoder inputs by shifting the target right behind the decoder-start (pad) token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.data.shards import TokenShard
from lmforge.errors import ConfigError
from lmforge.tokenizer import Tokenizer


def span_counts(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of `length` tokens: round(length * noise_density), kept within
    1 .. length-1, split into max(1, round(noise / mean_span)) spans (no more than either side can fill)."""
    if length < 2:
        raise ValueError(f"span corruption needs windows of at least 2 tokens, not {length}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(1, round(num_noise / mean_span))
    return num_noise, min(num_spans, num_noise, length - num_noise)


def input_target_lengths(raw_len: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(input length, target length) that corrupting a window of raw_len tokens produces, EOS included."""
    num_noise, num_spans = span_counts(raw_len, noise_density, mean_span)
    return raw_len - num_noise + num_spans + 1, num_noise + num_spans + 1


def raw_length_for(input_len: int, noise_density: float = 0.15, mean_span: float = 3.0) -> int:
    """The longest raw window whose corrupted input fits in input_len tokens. Its input is exactly input_len
    tokens at usual settings (checked for densities up to 0.5 and mean spans from 1 to 10, all input lengths
    below 1200); only near-degenerate ones (density 0.5 with spans of 1) can leave it a token short."""
    if input_len < 3:
        raise ValueError(f"a corrupted input has at least 3 tokens (text, sentinel, EOS), not {input_len}")
    # input >= raw - (raw * density + 0.5) + 2, so no window longer than `top` fits; walk down to one that does
    top = int((input_len - 1.5) / (1 - noise_density)) + 1
    for raw in range(top, 1, -1):
        if input_target_lengths(raw, noise_density, mean_span)[0] <= input_len:
            return raw
    raise ValueError(f"no raw window fits an input of {input_len} tokens")  # unreachable: raw 2 gives 3


def _partitions(rows: int, n: int, k: int, gen: torch.Generator | None) -> torch.Tensor:
    """[rows, k] lengths of a uniformly random split of n items into k non-empty runs: k-1 distinct cuts among
    the n-1 gaps."""
    cuts = torch.rand(rows, n - 1, generator=gen).argsort(dim=1)[:, : k - 1] + 1
    cuts = cuts.sort(dim=1).values
    edges = torch.cat([torch.zeros(rows, 1, dtype=torch.long), cuts, torch.full((rows, 1), n)], dim=1)
    return edges.diff(dim=1)


def noise_masks(
    rows: int, length: int, noise_density: float, mean_span: float, gen: torch.Generator | None
) -> torch.Tensor:
    """[rows, length] bool masks as `noise_mask` draws them, one per row, in one go."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span)
    keep = _partitions(rows, length - num_noise, num_spans, gen)
    noise = _partitions(rows, num_noise, num_spans, gen)
    runs = torch.stack([keep, noise], dim=2).view(rows, 2 * num_spans)  # kept, dropped, kept, dropped, ...
    # a run boundary at each cumulative length; a position's run is the count of boundaries at or before it
    marks = torch.zeros(rows, length + 1, dtype=torch.long)
    marks.scatter_(1, runs.cumsum(dim=1)[:, :-1], 1)
    return marks.cumsum(dim=1)[:, :length] % 2 == 1


def noise_mask(
    length: int, noise_density: float = 0.15, mean_span: float = 3.0, gen: torch.Generator | None = None
) -> torch.Tensor:
    """[length] bool: True where a token is dropped. Exactly `span_counts(length)` noise tokens in that many
    spans; kept and dropped runs alternate, starting with kept text (the first token is never noise) and ending
    with a dropped span, each side's run lengths a uniform random partition. Deterministic given `gen` (torch's
    global generator when None)."""
    return noise_masks(1, length, noise_density, mean_span, gen)[0]


def corrupt(
    tokens: torch.Tensor, mask: torch.Tensor, sentinel_ids: Sequence[int], eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, target_ids) of T5's span corruption: the input with span i replaced by sentinel_ids[i] and
    EOS appended; the target sentinel_ids[0] span 0 sentinel_ids[1] span 1 ... EOS.

    tokens and mask are [L] or [B, L]; in a batch every row's mask must have as many noise tokens and spans
    (as masks from `noise_masks` of one length do) so that the rows stay equally long."""
    squeeze = tokens.dim() == 1
    if squeeze:
        tokens, mask = tokens[None], mask[None]
    B = tokens.size(0)
    starts = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)  # first token of each span
    span_index = starts.long().cumsum(dim=1) - 1
    spans = int(starts.sum(dim=1).max()) if B else 0
    if spans > len(sentinel_ids):
        raise ValueError(f"{spans} noise spans but only {len(sentinel_ids)} sentinel ids")
    sentinels = torch.as_tensor(list(sentinel_ids), dtype=torch.long)
    eos = torch.full((B, 1), eos_id, dtype=torch.long)
    span_sentinel = sentinels[span_index.clamp(min=0)]

    # input: kept tokens, and a span's sentinel in place of its first token; the rest of the span goes
    keep = ~mask | starts
    if B > 1 and ((keep.sum(dim=1) != keep[0].sum()).any() or (mask.sum(dim=1) != mask[0].sum()).any()):
        raise ValueError("corrupt() needs every row's mask to have as many noise tokens and spans")
    inputs = torch.where(starts, span_sentinel, tokens)[keep].view(B, -1)

    # target: every dropped token once, a span's first token twice, then the first copy becomes the sentinel
    copies = mask.long() + starts.long()
    target = tokens.reshape(-1).repeat_interleave(copies.reshape(-1)).view(B, -1)
    first_copy = (copies.cumsum(dim=1) - copies)[starts]
    rows = torch.arange(B)[:, None].expand_as(starts)[starts]
    target[rows, first_copy] = span_sentinel[starts]

    inputs, target = torch.cat([inputs, eos], dim=1), torch.cat([target, eos], dim=1)
    return (inputs[0], target[0]) if squeeze else (inputs, target)


class SpanCorruptionBatcher:
    """Batches for T5 pre-training: `input_ids` [B, input_len] and `labels` [B, target_len], both fixed.

    Each row reads `raw_len` tokens of the shard (`raw_length_for(input_len)`: 568 for 512) and corrupts them
    with its own mask; every draw comes from the caller's generator, so a resumed run sees the same batches.
    `labels` are plain target ids (no -100: rows are equally long); the model shifts them right itself."""

    def __init__(
        self, tokenizer: Tokenizer, input_len: int, noise_density: float = 0.15, mean_span: float = 3.0
    ) -> None:
        if not 0 < noise_density < 1:
            raise ConfigError(f"span corruption's noise_density must be between 0 and 1, not {noise_density}")
        if mean_span < 1:
            raise ConfigError(f"span corruption's mean_span must be at least 1, not {mean_span}")
        if input_len < 3:
            raise ConfigError(f"span corruption needs an input length of at least 3, not {input_len}")
        if tokenizer.eos_id is None:
            raise ConfigError(
                "span corruption needs a tokenizer with an end-of-sequence token (</s>): train one "
                "with Tokenizer.train_unigram or leave data.tokenizer unset"
            )
        self.noise_density, self.mean_span = noise_density, mean_span
        self.raw_len = raw_length_for(input_len, noise_density, mean_span)
        self.input_len, self.target_len = input_target_lengths(self.raw_len, noise_density, mean_span)
        self.num_spans = span_counts(self.raw_len, noise_density, mean_span)[1]
        have = tokenizer.num_sentinels
        if have == 0:
            raise ConfigError(
                "span corruption needs a tokenizer with <extra_id_N> sentinel tokens: train one "
                "with Tokenizer.train_unigram or leave data.tokenizer unset"
            )
        if have < self.num_spans:
            raise ConfigError(
                f"span corruption of {self.raw_len}-token windows makes {self.num_spans} spans but "
                f"the tokenizer has {have} <extra_id_N> sentinels: train one with more extra_ids "
                f"or lower the input length"
            )
        self.sentinels = tokenizer.sentinel_ids(self.num_spans)
        self.eos = tokenizer.eos_id

    def __call__(self, shard: TokenShard, starts: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raw = shard.windows(starts, self.raw_len)[0]
        mask = noise_masks(raw.size(0), self.raw_len, self.noise_density, self.mean_span, gen)
        inputs, labels = corrupt(raw, mask, self.sentinels, self.eos)
        return {"input_ids": inputs, "labels": labels}


@torch.no_grad()
def span_metrics(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Loss, perplexity and token accuracy of the dropped-span targets over fixed batches (teacher forcing)."""
    import math

    was = model.training
    model.eval()
    loss_sum, n, correct = 0.0, 0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        out = model(**b)
        k = b["labels"].numel()
        loss_sum += out.loss.item() * k
        correct += (out.logits.argmax(-1) == b["labels"]).sum().item()
        n += k
    model.train(was)
    loss = loss_sum / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "span_acc": correct / max(n, 1)}
