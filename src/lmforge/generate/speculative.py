"""Speculative decoding: a few tokens drafted cheaply, then checked by the model in one forward pass.

At batch 1 on a CPU a decoding step reads every weight to produce one token; scoring k + 1 tokens reads them
once too and costs little more. So a drafter guesses the next k tokens, the model scores [last token, d1..dk]
over its KV cache in one pass, and every draft up to the first one it disagrees with is kept, plus one token of
the model's own at that point: between 1 and k + 1 tokens per pass.

Drafters:
  NgramDrafter   prompt lookup: the tokens that followed the latest earlier occurrence of the last n tokens
                 (n = 4 down to 1) in the prompt and reply so far; no second model. Replies that repeat their
                 input (summaries, edits, code, answers quoting a document) draft well; free chat seldom matches.
  ModelDrafter   any smaller causal LM with the same vocabulary, decoding k tokens ahead over its own KV cache.

The check gives plain decoding's tokens exactly, greedy or sampled: at each position the model's token is picked
from its logits as plain decoding picks it (the argmax; or, sampling, one uniform draw from the sequence's
generator through the same filters), and a draft is kept while it equals that token. The logits of a pass over
k + 1 positions are bitwise those of k + 1 single steps (lmforge.nn.invariant), and a pass draws one uniform per
token it emits, as plain decoding does, so a seeded reply is the same with and without a drafter. A draft is
kept with probability p(d), the standard rule's for a deterministic draft (prompt lookup; a draft model here
drafts its greedy tokens); where a drafter samples from its own q, Leviathan et al.'s rule keeps more drafts
(min(1, p/q)) but gives other tokens than plain decoding under the same seed.

Drafting switches itself off while it misses: the draft length follows the recent acceptance (one more after a
fully accepted draft, up to `k`; the accepted count + 1 after a miss), and after `patience` drafts in a row with
nothing accepted the drafter rests for a number of steps that doubles each time (reset by the next hit). Plain
single-token steps run meanwhile, so free chat costs about what plain decoding does.

The caches keep accepted positions only: after a pass their length is set back past the rejected drafts (whose
keys and values the next pass overwrites).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from lmforge.config import SamplingParams
from lmforge.errors import LmforgeError
from lmforge.generate.pick import filter_top_k, filter_top_p, next_token
from lmforge.interop import load_pretrained
from lmforge.nn.packed import packed_linears


def model_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution plain sampling draws from, for rows of (already penalised) logits [N, V]."""
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        logits = filter_top_k(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = filter_top_p(logits, params.top_p)
    return torch.softmax(logits, dim=-1)


class Drafter:
    """Proposes draft tokens for one sequence at a time and keeps its own adaptive draft length; the engine
    (lmforge.generate.engine) drives `budget` / `propose` / `record`, with a `fresh` drafter per sequence."""

    def __init__(self, k: int = 5, patience: int = 3) -> None:
        if k < 1:
            raise LmforgeError(f"speculative draft length must be >= 1, got {k}")
        self.k, self.patience = k, patience
        self.stats = {"passes": 0, "drafted": 0, "accepted": 0, "plain_steps": 0}
        self._k, self._misses, self._rest, self._rest_for = k, 0, 0, 1

    # what a drafter implements -------------------------------------------------------------------------------------
    def fresh(self) -> Drafter:
        """A drafter of the same kind for another sequence (sharing a draft model, not its cache or state)."""
        return type(self)(self.k, patience=self.patience)

    def context(self, pack: bool = True) -> AbstractContextManager:
        """Open while decoding (a draft model's packed weights)."""
        return nullcontext()

    def start(self, prompt: Sequence[int], max_len: int) -> None:
        """A new sequence begins with `prompt`."""

    def propose(
        self, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        """Up to k draft tokens after `tokens` (the whole sequence so far) and their distributions q [n, V]
        (None when the drafts are deterministic)."""
        raise NotImplementedError

    def keep(self, n: int) -> None:
        """Of the last proposal, the sequence kept n tokens (drafts) before the model's own."""

    # the draft length ----------------------------------------------------------------------------------------------
    def budget(self) -> int:
        """How many tokens to draft now (0 while resting after misses); call once per step."""
        if self._rest > 0:
            self._rest -= 1
            return 0
        return self._k

    def record(self, drafted: int, kept: int) -> None:
        """A pass verified `drafted` tokens and kept `kept`: adapt the draft length, rest after misses."""
        if not drafted:
            self.stats["plain_steps"] += 1
            return
        self.keep(kept)
        self.stats["passes"] += 1
        self.stats["drafted"] += drafted
        self.stats["accepted"] += kept
        if kept == drafted:
            self._k, self._misses, self._rest_for = min(self.k, self._k + 1), 0, 1
            return
        self._k = max(1, kept + 1)
        self._misses = 0 if kept else self._misses + 1
        if self._misses >= self.patience:  # keeps missing: rest, longer each time
            self._rest, self._rest_for, self._misses = self._rest_for, self._rest_for * 2, 0


def choose(
    logits: torch.Tensor,
    drafts: list[int],
    q: torch.Tensor | None,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The tokens to emit from the model's logits at [last, d1..dk] (k + 1 rows): position by position the token
    plain decoding picks there (next_token: argmax, or one uniform draw from `generator`), up to and including the
    first one that differs from the draft. seen: the repetition penalty's tokens so far (row j also counts
    d1..dj). q (a drafter's own distributions) is not needed by this rule and may be None."""
    out: list[int] = []
    for j in range(logits.size(0)):
        s = None
        if seen is not None:
            s = seen.clone()
            if drafts[:j]:
                s[torch.as_tensor(drafts[:j], device=s.device)] = True
            s = s[None]
        tok = int(next_token(logits[j : j + 1], params, generator, s)[0])
        out.append(tok)
        if j >= len(drafts) or tok != drafts[j]:
            break
    return out


class NgramDrafter(Drafter):
    """Prompt lookup: after the last n tokens (n = max_ngram down to 1), propose what followed their latest
    earlier occurrence in the sequence. An index from each n-gram to where it last ended is kept up to date
    as tokens arrive, so a proposal costs O(max_ngram), not a scan of the sequence.

    A match of one token proposes one token and a match of two at most three: short matches seldom continue
    far. The default k = 7 makes a pass score 8 positions, the cost of 5 on PyTorch's CPU int4 kernel (it
    takes rows in blocks of 4); replaying recorded replies of the packaged SmolLM2 against these rules picked
    them (copy-like prompts: 1.75x with k = 5 and one-token matches drafting freely, 1.85x with these)."""

    SHORT_MATCH = {1: 1, 2: 3}  # match length -> most draft tokens

    def __init__(self, k: int = 7, max_ngram: int = 4, patience: int = 3) -> None:
        super().__init__(k, patience)
        self.max_ngram = max_ngram
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # tokens[:_indexed] are in the index

    def fresh(self) -> NgramDrafter:
        return NgramDrafter(self.k, self.max_ngram, self.patience)

    def start(self, prompt: Sequence[int], max_len: int) -> None:
        self._index, self._indexed = {}, 0

    def propose(self, tokens, k, params, generator):
        # index every n-gram that ends before the last token (so a match has at least one token after it)
        for end in range(max(self._indexed, 1), len(tokens)):
            for n in range(1, self.max_ngram + 1):
                if end - n >= 0:
                    self._index[tuple(tokens[end - n : end])] = end
        self._indexed = len(tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            at = self._index.get(tuple(tokens[-n:]))
            if at is not None:
                return tokens[at : at + min(k, self.SHORT_MATCH.get(n, k))], None
        return [], None


class ModelDrafter(Drafter):
    """A smaller causal LM with the same vocabulary as the model, run k tokens ahead over its own KV cache,
    greedily (its most likely tokens: under sampling the model keeps a draft when its own draw is that token, see
    `choose`; the draft never takes a draw from the sequence's generator). k = 3 by default: each draft token
    costs a draft-model step, and a pass of 4 positions is one block of the int4 kernel."""

    def __init__(self, draft_model: torch.nn.Module, k: int = 3, patience: int = 3) -> None:
        super().__init__(k, patience)
        self.model = draft_model
        self.cache = None
        self._fed = 0  # tokens of the sequence in the draft cache
        self._in_cache = 0  # of the last proposal's drafts, how many the draft cache holds

    def fresh(self) -> ModelDrafter:
        return ModelDrafter(self.model, self.k, self.patience)

    def context(self, pack: bool = True) -> AbstractContextManager:
        return packed_linears(self.model, 1, enabled=pack)

    def start(self, prompt: Sequence[int], max_len: int) -> None:
        self.cache = self.model.new_cache(1, max_len)
        self._fed = self._in_cache = 0

    @torch.inference_mode()
    def propose(self, tokens, k, params, generator):
        device = next(self.model.parameters()).device
        new = tokens[self._fed :]  # what the draft has not seen: the model's last token(s) since its last pass
        logits = self.model(torch.tensor([new], device=device), cache=self.cache, last_only=True).logits[0, -1]
        self._fed = len(tokens)
        drafts = []
        for i in range(k):
            drafts.append(int(logits.argmax()))
            if i + 1 < k:
                logits = self.model(torch.tensor([[drafts[-1]]], device=device), cache=self.cache).logits[0, -1]
        self._in_cache = len(drafts) - 1  # the cache now holds the sequence and every draft but the last
        return drafts, None

    def keep(self, n: int) -> None:
        # keep the accepted drafts that are in the cache; the rest of the sequence is fed at the next proposal
        m = min(n, self._in_cache)
        self.cache.length = self._fed + m
        self._fed += m


def check_draft_model(model: torch.nn.Module, draft: torch.nn.Module) -> None:
    """A draft model must share the model's vocabulary (same size; its ids are proposed as the model's)."""
    a, b = model.config.vocab_size, draft.config.vocab_size
    if a != b:
        raise LmforgeError(
            f"the draft model's vocabulary has {b} tokens, the model's {a}; speculative decoding "
            "needs a draft model with the same tokenizer"
        )


def make_drafter(
    spec: str | None, model: torch.nn.Module, device: str = "cpu", quantize: str | None = None, dtype: str | None = None
) -> Drafter | None:
    """The drafter `--speculative` names: None, "ngram" (prompt lookup) or a draft model (a directory, .gguf or
    packaged name, loaded like the model: same device, quantization and dtype; it must share the vocabulary)."""
    if not spec:
        return None
    if spec == "ngram":
        return NgramDrafter()
    draft, _ = load_pretrained(spec, device=device, quantize=quantize, dtype=dtype)
    check_draft_model(model, draft)
    return ModelDrafter(draft)
