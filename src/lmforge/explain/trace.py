"""Causal tracing (Meng et al. 2022, the ROME figure): where in a decoder is a fact recalled?

Three runs of the same prompt. The clean run records every hook point (explain/hooks.py). The corrupted run adds
Gaussian noise to the subject's token embeddings (`noise` x the embeddings' standard deviation; `samples` draws,
seeded, as one batch), which makes the clean answer unlikely. Then, for each kind of point (the residual stream
after a block, its attention output, its MLP output), each layer and each position, the corrupted run again with
that one point restored to its clean value: how much of the answer's probability comes back says how much the
fact flows through there.

`restored[kind][layer, position]` is the target's probability (the mean over the noise draws) with that point
restored; `clean_prob` and `corrupt_prob` frame it. Restoring the last block's residual stream at the last
position gives back exactly the clean probability (nothing after it can differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.explain.hooks import hooks
from lmforge.explain.inputs import display_token
from lmforge.models.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer

KINDS = ("resid", "attn", "mlp")


@dataclass
class CausalTrace:
    tokens: list[str]  # the prompt's tokens, as displayed
    subject: list[int]  # the corrupted positions
    target: str  # the answer's first token, as displayed
    clean_prob: float
    corrupt_prob: float
    restored: dict[str, torch.Tensor]  # kind -> [n_layer, T]: the target's probability with that point restored


def subject_positions(tokenizer: Tokenizer, text: str, subject: str) -> list[int]:
    """The positions of the tokens that overlap the first occurrence of `subject` in `text`."""
    start = text.find(subject)
    if not subject or start < 0:
        raise LmforgeError(f"the subject {subject!r} is not in the text {text!r}")
    end = start + len(subject)
    offsets = tokenizer.tok.encode(text).offsets
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start]


@torch.no_grad()
def causal_trace(
    model: DecoderLM,
    tokenizer: Tokenizer,
    text: str,
    subject: str,
    target: str | None = None,
    noise: float = 3.0,
    samples: int = 5,
    kinds: tuple[str, ...] = KINDS,
    seed: int = 0,
) -> CausalTrace:
    """The causal trace of `text` (see the module notes): `subject` is the text whose tokens are corrupted;
    `target` the answer whose first token is followed (default: the clean run's top next token)."""
    if not isinstance(model, DecoderLM):
        raise LmforgeError(f"causal tracing follows a decoder's next token; this model is {type(model).__name__}")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise LmforgeError(f"causal tracing restores {', '.join(KINDS)}; got {', '.join(bad) or 'none'}")
    ids = tokenizer.encode(text)
    subj = subject_positions(tokenizer, text, subject)
    device = next(model.parameters()).device
    model.eval()
    x = torch.tensor([ids] * samples, device=device)
    with hooks(model) as h:
        h.record("blocks.*")
        clean = torch.softmax(model(x[:1]).logits[0, -1].float(), -1)
        saved = dict(h.cache)
    if target is not None and not tokenizer.encode(target):
        raise LmforgeError("the target is empty: give the answer the trace should follow")
    want = tokenizer.encode(target)[0] if target is not None else int(clean.argmax())
    emb = model.tok_emb.weight
    g = torch.Generator(device="cpu").manual_seed(seed)
    shake = torch.randn(samples, len(subj), emb.size(1), generator=g).to(device, emb.dtype) * noise * emb.std()

    def corrupt(module, args, out):
        out = out.clone()
        out[:, subj] += shake
        return out

    handle = model.tok_emb.register_forward_hook(corrupt)
    try:

        def prob() -> float:
            return float(torch.softmax(model(x).logits[:, -1].float(), -1)[:, want].mean())

        corrupt_prob = prob()
        restored = {}
        with hooks(model) as h:
            for kind in kinds:
                grid = torch.zeros(model.config.n_layer, len(ids))
                for layer in range(model.config.n_layer):
                    name = f"blocks.{layer}.{kind}"
                    for pos in range(len(ids)):
                        h.clear()
                        h.replace(name, _restore(saved[name], pos))
                        grid[layer, pos] = prob()
                restored[kind] = grid
    finally:
        handle.remove()
    return CausalTrace(
        [display_token(tokenizer, t) for t in ids],
        subj,
        display_token(tokenizer, want),
        float(clean[want]),
        corrupt_prob,
        restored,
    )


def _restore(clean: torch.Tensor, pos: int):
    """A replacement that puts the clean run's value back at one position (for every noise draw)."""

    def put(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, pos] = clean[0, pos].to(out.dtype)
        return out

    return put
