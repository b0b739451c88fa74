"""The logit lens (nostalgebraist, 2020): read a decoder's residual stream after every block through its own final
norm and head, as if the model stopped there, and see at which layer the next token takes shape.

`logit_lens(model, tokenizer, text, target=" Berlin")` runs one forward with the residual stream of every block
recorded (explain/hooks.py) and gives, per layer and position, the top tokens and their probabilities, and per
layer the rank and probability of a target token after the last position. The last layer's lens is the model's
own next-token distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.explain.hooks import hooks
from lmforge.explain.inputs import display_token
from lmforge.models.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer


@dataclass
class LogitLens:
    tokens: list[str]  # the prompt's tokens, as displayed
    top_ids: torch.Tensor  # [n_layer, T, k] the likeliest next tokens at each layer and position
    top_probs: torch.Tensor  # [n_layer, T, k]
    top_tokens: list[list[list[str]]]  # top_ids, as displayed
    target: str | None = None  # the target's text, when one was given
    target_rank: list[int] | None = None  # per layer, the target's rank after the last position (0: top)
    target_prob: list[float] | None = None  # per layer, its probability there


@torch.no_grad()
def logit_lens(model: DecoderLM, tokenizer: Tokenizer, text: str, target: str | None = None, k: int = 5) -> LogitLens:
    """The logit lens of `text` (see the module notes); `target`'s first token is the one ranked."""
    if not isinstance(model, DecoderLM):
        raise LmforgeError(f"the logit lens reads a decoder's residual stream; this model is {type(model).__name__}")
    ids = tokenizer.encode(text)
    if not ids:
        raise LmforgeError("the text is empty: give the logit lens a prompt")
    device = next(model.parameters()).device
    model.eval()
    with hooks(model) as h:
        h.record("blocks.*.resid")
        model(torch.tensor([ids], device=device))
        stream = [h.cache[f"blocks.{i}.resid"][0] for i in range(model.config.n_layer)]
    logp = torch.stack([torch.log_softmax(model.head(model.norm(x)).float(), -1) for x in stream])  # [L, T, V]
    top_logp, top_ids = logp.topk(min(k, logp.size(-1)), dim=-1)
    result = LogitLens(
        [display_token(tokenizer, t) for t in ids],
        top_ids.cpu(),
        top_logp.exp().cpu(),
        [[[display_token(tokenizer, int(t)) for t in pos] for pos in layer] for layer in top_ids.tolist()],
    )
    if target is not None:
        want = tokenizer.encode(target)
        if not want:
            raise LmforgeError("the target is empty: give the token the lens should follow")
        last = logp[:, -1]  # [L, V]
        result.target = target
        result.target_rank = [int((row > row[want[0]]).sum()) for row in last]
        result.target_prob = [float(row[want[0]].exp()) for row in last]
    return result
